"""ch4_dpo_sweep: one ch4_dpo run per beta plus the principles run, one table row each (read from that run's
summary), the KL/reward plots; bad --betas are usage errors.

The chapter runs ch4_dpo as a command (``run_chapter``, tested in tests/test_artifacts.py); here that command
runs in-process on an SFT model made once by ch3_sft at small sizes, and the flags the chapter builds still go
through ch4_dpo's own parser.
"""
import json

import pytest

from minilife.chapters import ch4_dpo as D
from minilife.chapters import ch4_dpo_sweep as W

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def in_process(monkeypatch):
    """Replace the chapter's child processes by ch4_dpo.main; returns the calls."""
    calls = []

    def run_chapter(chapter, args):
        calls.append((chapter, list(args)))
        D.main(list(args))

    monkeypatch.setattr(W, "run_chapter", run_chapter)
    return calls


def test_one_run_per_setting_gives_one_row_each(in_process, sft_model, tmp_path):
    out = tmp_path / "sweep"
    s = W.main(["--smoke", "--out", str(out), "--sft", sft_model, "--betas", "0.1 1", "--n-test", "3",
                "--steps", "2"])
    assert [c for c, _ in in_process] == ["ch4_dpo"] * 3
    argvs = [args for _, args in in_process]
    assert [a[a.index("--beta") + 1] for a in argvs] == ["0.1", "1.0", "0.1"]
    assert [a[a.index("--pairs") + 1] for a in argvs] == ["world", "world", "principles"]
    for args in argvs:
        assert args[args.index("--sft") + 1] == sft_model and args[args.index("--steps") + 1] == "2"
        assert "--smoke" in args and "--overwrite" in args
    dirs = ["world_beta0.1", "world_beta1", "principles_beta0.1"]
    rows = s["results"]
    assert [r["run"] for r in rows] == ["world beta=0.1", "world beta=1", "principles beta=0.1"]
    for row, d in zip(rows, dirs):  # each row is its run's summary
        run = json.loads((out / d / "summary.json").read_text())
        assert (row["beta"], row["pairs"], row["kl_to_sft"], row["gold_dpo"]) == \
            (run["beta"], run["pairs"], run["kl_to_sft"], run["gold_dpo"])
        assert row["val_acc"] == run["val_after"]["val_accuracy"] and row["wins"] + row["ties"] + row["losses"] == 3
    assert len({r["gold_sft"] for r in rows}) == 1  # the same SFT answers judged in every run
    table = (out / "results.md").read_text()
    assert all(f"| {r['run']} |" in table for r in rows)
    assert json.loads((out / "summary.json").read_text())["results"] == rows
    assert (out / "kl_gold.png").is_file() and (out / "kl_margin.png").is_file()


@pytest.mark.parametrize("betas", ["", "0.1 x", "0 1", "-1"])
def test_bad_betas_are_usage_errors(usage_error, betas):
    assert "--betas" in usage_error(W.main, ["--smoke", "--betas", betas])
