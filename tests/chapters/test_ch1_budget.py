"""Chapter 1 smoke run: it runs in seconds, writes its artifacts, and its headline checks hold."""
import json

import pytest

from minilife.chapters import ch1_budget


def test_smoke_run_writes_artifacts(tmp_path):
    summary = ch1_budget.main(["--smoke", "--out", str(tmp_path), "--device", "cpu", "--timing-steps", "1"])
    for name in ("metrics.jsonl", "memory_bill.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert (tmp_path / "memory_bill.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the notes' figures, reproduced to the whole GB the notes quote
    assert summary["notes_reproduced_gb"] == {"notes-8b-72gb": 72.0, "notes-7b-84gb": 84.0}
    # predicted vs measured on the real micro model: exact state bytes, exact activation accounting,
    # FLOP formula equal to torch's counter (all exact integers, so tolerance 0)
    assert summary["state_bytes_exact"] is True
    assert summary["activation_ratio_vs_autograd"] == 1.0
    assert 1.0 < summary["activation_ratio_vs_fused"] < 2.0  # plain autograd keeps more than the fused minimum
    assert summary["flops_ratio_vs_counter"] == 1.0
    assert summary["params"]["llama2-7b-shape"] == 6_738_415_616
    tables = {json.loads(line)["table"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert {"params", "memory", "notes", "measured", "flops", "cost"} <= tables


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        ch1_budget.main(["--help"])
    assert e.value.code == 0 and "--precision" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        ch1_budget.main(["--mfu", "1.5"])
    assert e.value.code == 2 and "--mfu must be in (0, 1]" in capsys.readouterr().err
