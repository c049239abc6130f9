"""Chapter 5.5 (kernels): the smoke run, its parity table and memory sweep, and the interpreter child.

TRITON_INTERPRET=1 is set before anything imports triton, so the smoke run computes the Triton tiers
in this process; the child-process path (what a plain CPU run uses) is tested on its own.
"""
import os

import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():  # a GPU machine tests the compiled kernels instead
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from minilife.chapters import ch5_kernels  # noqa: E402

# fp32 kernels vs float64 math at these sizes (T=32, V<=300): rounding gives errors of ~1e-6; a
# wrong mask, block edge or normalisation gives errors of order 0.01-1. 1e-4 separates the two.
PARITY_TOL = 1e-4


def test_smoke_run(tmp_path):
    summary = ch5_kernels.main(["--smoke", "--out", str(tmp_path)])
    for name in ("summary.json", "metrics.jsonl", "memory_vs_vocab.png", "attention_memory_vs_T.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "summary.json").read_text())["triton_tiers"] == "interpreter"
    tiers = {r["tier"] for r in summary["parity"]}
    assert {"flash attention, Triton", "Triton cross_entropy", "fused linear + CE, Triton chunks",
            "torch SDPA", "flash attention, torch tiles"} <= tiers
    for row in summary["parity"]:  # every tier ran (none n/a) and matches float64 math
        assert isinstance(row["out_err"], float) and isinstance(row["grad_err"], float), row
        assert row["out_err"] < PARITY_TOL and row["grad_err"] < PARITY_TOL, row
    # memory: with chunks of N/8 rows the fused loss keeps ~2 chunk-sized buffers instead of ~3
    # logits-sized ones, plus the same gradients: well under half at every V of the sweep
    for row in summary["memory_vocab"]:
        assert row["fused_MiB"] < 0.5 * row["materialised_MiB"], row
    longest = summary["memory_attention"][-1]  # T=128: the (T, T) scores dominate naive attention
    assert longest["flash_torch_MiB"] < 0.6 * longest["naive_MiB"], longest
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == len(summary["parity"]) + len(summary["memory_vocab"]) + len(summary["memory_attention"])
    assert summary["timings"].startswith("n/a") if not torch.cuda.is_available() else summary["timings"]


def test_triton_rows_in_a_child_interpreter_process():
    """The path a plain CPU run takes: a child Python with TRITON_INTERPRET=1 computes the Triton rows."""
    rows = ch5_kernels.triton_rows_in_interpreter(dict(T=16, D=16), dict(N=8, V=40, C=8, chunk=3))
    assert [r["tier"] for r in rows] == ["flash attention, Triton", "Triton cross_entropy",
                                         "fused linear + CE, Triton chunks"]
    for row in rows:
        assert row["out_err"] < PARITY_TOL and row["grad_err"] < PARITY_TOL, row


def test_no_interpret_marks_triton_rows_na(tmp_path, monkeypatch):
    monkeypatch.setattr(ch5_kernels, "interpreting", lambda: False)
    rows = ch5_kernels.parity(torch.device("cpu"), "n/a", dict(T=16, D=16), dict(N=8, V=40, C=8, chunk=3))
    na = [r for r in rows if r["out_err"] == ch5_kernels.NA]
    assert {r["tier"] for r in na} == ch5_kernels.TRITON_TIERS
    assert all(isinstance(r["out_err"], float) for r in rows if r not in na)


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ch5_kernels.main(["--help"])
    assert exit_info.value.code == 0
    assert "--smoke" in capsys.readouterr().out
