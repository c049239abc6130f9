"""ch3_forgetting: the plan of runs (LR sweep, epoch sweep, LoRA, general mix), one row per run with the
retention formula and the 80% warning, the plots and summary; bad sweeps are usage errors.

As in test_ch3_lora.py, the chapter's ch3_sft child processes run in-process on the session's smoke
checkpoint and data; the flags the chapter builds go through ch3_sft's own parser.
"""
import json

import pytest

from minilife.chapters import ch3_forgetting as F
from minilife.chapters import ch3_sft as S
from minilife.common import config_from_args

pytestmark = pytest.mark.usefixtures("one_thread")


def config(argv):
    return config_from_args(F.ForgettingConfig, argv)


@pytest.fixture
def in_process(monkeypatch, smoke_data_dir, smoke_pretrained):
    """Replace the chapter's child processes by ch3_sft.main on the smoke artifacts; returns the calls."""
    calls = []

    def run_chapter(chapter, args):
        calls.append((chapter, list(args)))
        S.main(list(args) + ["--data-dir", smoke_data_dir, "--pretrained", smoke_pretrained, "--no-plots"])

    monkeypatch.setattr(F, "run_chapter", run_chapter)
    monkeypatch.setattr(F, "ensure_pretrained", lambda *a, **k: smoke_pretrained)
    monkeypatch.setattr(F, "ensure_data", lambda *a, **k: smoke_data_dir)
    return calls


# --------------------------------------------------------------------------------------------
# the plan, without running anything


def test_default_plan_sweeps_lr_then_epochs_then_lora_then_mixing():
    plan = F.plan(config([]))
    assert [label for label, _ in plan] == [
        "full lr=0.0001 ep=2", "full lr=0.0003 ep=2", "full lr=0.001 ep=2",  # the LR sweep at --epochs
        "full lr=0.0003 ep=1", "full lr=0.0003 ep=4",  # epochs at the middle LR
        "LoRA r=4 ep=2", "full lr=0.001 ep=2 + general mix 0.5"]  # mixing at the top LR, where forgetting is worst
    flags = dict(plan)
    assert flags["full lr=0.0003 ep=4"] == ["--lr", "0.0003", "--epochs", "4.0"]
    assert flags["LoRA r=4 ep=2"] == ["--method", "lora", "--lora-rank", "4", "--epochs", "2.0"]
    assert flags["full lr=0.001 ep=2 + general mix 0.5"] == ["--lr", "0.001", "--epochs", "2.0", "--general-mix", "0.5"]


def test_plan_middle_lr_skips_a_repeated_epoch_count_and_drops_switched_off_runs():
    cfg = config(["--lrs", "1e-3", "1e-4", "3e-4", "2e-3", "--epochs", "2", "--epoch-sweep", "2", "3",
                  "--lora-rank", "0", "--general-mix", "0"])
    labels = [label for label, _ in F.plan(cfg)]
    assert labels == ["full lr=0.001 ep=2", "full lr=0.0001 ep=2", "full lr=0.0003 ep=2", "full lr=0.002 ep=2",
                      "full lr=0.001 ep=3"]  # middle of the sorted LRs (upper of two); ep=2 is already in the sweep
    assert [label for label, _ in F.plan(config(["--smoke"]))] == ["full lr=0.0003 ep=1", "LoRA r=4 ep=1",
                                                                  "full lr=0.0003 ep=1 + general mix 0.5"]


@pytest.mark.parametrize("flags", [["--lrs"], ["--lrs", "0"], ["--lrs", "-1e-3"], ["--epoch-sweep", "0"]])
def test_bad_sweeps_are_usage_errors(flags, usage_error):
    assert "--lrs" in usage_error(F.main, ["--smoke"] + flags)


def test_collect_computes_the_warning_and_names_a_missing_summary(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"val_loss": 2.0, "general_loss_before": 4.0, "general_loss_after": 5.0,
                                "retention_pct": 79.9}))
    r = F.collect("run a", path)
    assert r == {"run": "run a", "sft_val_loss": 2.0, "general_before": 4.0, "general_after": 5.0,
                 "retention_pct": 79.9, "warning": "below 80%"}
    path.write_text(json.dumps({"val_loss": 2.0, "general_loss_before": 4.0, "general_loss_after": 5.0,
                                "retention_pct": 80.0}))
    assert F.collect("run b", path)["warning"] == ""  # the line itself is not below it
    with pytest.raises((RuntimeError, ValueError), match="'x'.* left no readable summary"):
        F.collect("x", tmp_path / "none" / "summary.json")


# --------------------------------------------------------------------------------------------
# a smoke sweep


def test_a_smoke_sweep_gives_one_row_per_run_with_retention(in_process, tmp_path):
    out = tmp_path / "forget"
    s = F.main(["--smoke", "--out", str(out), "--lrs", "3e-4", "--epoch-sweep", "--lora-rank", "2",
                "--general-mix", "0.5", "--n-train", "40"])
    labels = ["full lr=0.0003 ep=1", "LoRA r=2 ep=1", "full lr=0.0003 ep=1 + general mix 0.5"]
    assert [r["run"] for r in s["results"]] == labels
    for i, ((_, args), r) in enumerate(zip(in_process, s["results"])):
        for flag in ("--no-generate", "--no-base-eval", "--overwrite"):
            assert flag in args  # losses only: no answers are generated
        assert args[args.index("--out") + 1] == str(out / f"run{i}")
        run = json.loads((out / f"run{i}" / "summary.json").read_text())
        assert r["sft_val_loss"] == run["val_loss"] is not None
        assert r["retention_pct"] == pytest.approx(100.0 * r["general_before"] / r["general_after"])
        assert r["warning"] == ("below 80%" if r["retention_pct"] < 80 else "")
    assert "--method" in in_process[1][1] and "--general-mix" in in_process[2][1]
    assert len({r["general_before"] for r in s["results"]}) == 1  # one base model, one held-out text
    assert json.loads((out / "summary.json").read_text()) == s and s["warning_line"] == 80.0
    for name in ("forgetting.png", "tradeoff.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert all(f"| {label} |" in table for label in labels)
