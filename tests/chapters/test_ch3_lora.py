"""ch3_lora: one ch3_sft run per method, one row each in the table and summary, the plot, the goal logic
and the --methods parser.

The chapter runs ch3_sft as a command (``run_chapter``, tested in tests/test_artifacts.py); here that
command runs in-process on the session's smoke checkpoint and data, so each run takes a second, and
the flags the chapter builds still go through ch3_sft's own parser.
"""
import json

import pytest

from minilife.chapters import ch3_lora as L
from minilife.chapters import ch3_sft as S

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def in_process(monkeypatch, smoke_data_dir, smoke_pretrained):
    """Replace the chapter's child processes by ch3_sft.main on the smoke artifacts; returns the calls."""
    calls = []

    def run_chapter(chapter, args):
        calls.append((chapter, list(args)))
        S.main(list(args) + ["--data-dir", smoke_data_dir, "--pretrained", smoke_pretrained])

    monkeypatch.setattr(L, "run_chapter", run_chapter)
    monkeypatch.setattr(L, "ensure_pretrained", lambda *a, **k: smoke_pretrained)
    return calls


def test_one_run_per_method_gives_one_row_each(in_process, tmp_path):
    out = tmp_path / "cmp"
    s = L.main(["--smoke", "--out", str(out), "--methods", "full lora:2", "--n-train", "40", "--n-test", "8"])
    assert [c for c, _ in in_process] == ["ch3_sft", "ch3_sft"]
    first, second = (args for _, args in in_process)
    assert "--no-base-eval" not in first and "--no-base-eval" in second  # the base model is scored once
    assert first[first.index("--method") + 1] == "full" and first[first.index("--out") + 1] == str(out / "full")
    assert second[second.index("--lora-rank") + 1] == "2" and second[second.index("--out") + 1] == str(out / "lora_r2")
    for args in (first, second):
        assert args[args.index("--n-train") + 1] == "40" and "--smoke" in args and "--overwrite" in args

    rows = s["results"]
    assert [r["method"] for r in rows] == ["full", "lora r=2"]
    runs = [json.loads((out / d / "summary.json").read_text()) for d in ("full", "lora_r2")]
    for row, run in zip(rows, runs):  # each row is its run's summary
        assert row["trainable"] == run["trainable_params"] and row["retention_pct"] == run["retention_pct"]
        assert row["score"] == run["sft"]["score"] and row["exact"] == run["sft"]["exact"]
        assert row["adamw_state_MiB"] == run["optimizer_state_bytes"] / 2**20
    full, lora = rows
    assert full["params_vs_full"] == 1.0 and 0 < lora["params_vs_full"] < 0.2  # r=2 on a C=64 model
    assert lora["params_vs_full"] == lora["trainable"] / full["trainable"]
    assert lora["acc_vs_full"] == (lora["score"] / full["score"] if full["score"] else None)
    assert lora["adamw_state_MiB"] < full["adamw_state_MiB"]  # AdamW keeps moments of the trainable values only
    assert runs[1]["base"] == {} and runs[0]["base"]["n"] == 8

    saved = json.loads((out / "summary.json").read_text())
    assert saved["results"] == rows and saved["goal"] == s["goal"] and saved["config"]["methods"] == "full lora:2"
    table = (out / "results.md").read_text()
    assert "| full |" in table and "| lora r=2 |" in table and s["goal"]["text"] in table
    assert (out / "methods.png").stat().st_size > 0


def test_without_a_full_run_there_is_nothing_to_compare(in_process, tmp_path):
    s = L.main(["--smoke", "--out", str(tmp_path), "--methods", "lora:1", "--n-train", "40", "--n-test", "8"])
    (row,) = s["results"]
    assert row["params_vs_full"] is None and row["acc_vs_full"] is None
    assert s["goal"]["met"] is None and s["goal"]["text"].startswith("n/a")


def test_a_run_without_a_summary_is_a_usage_error_naming_it(tmp_path):
    with pytest.raises((RuntimeError, ValueError), match="lora r=4.* left no readable summary"):
        L.collect("lora r=4", tmp_path / "missing" / "summary.json")


# --------------------------------------------------------------------------------------------
# the goal and the parser, without running anything


def row(method, trainable, score, full_trainable=1000, full_score=0.5):
    return {"method": method, "trainable": trainable, "score": score, "exact": score,
            "params_vs_full": trainable / full_trainable, "acc_vs_full": score / full_score if full_score else None}


def test_lora_goal_picks_the_best_lora_within_five_percent_of_full():
    full = row("full", 1000, 0.5)
    small, better, big = row("lora r=1", 20, 0.40), row("lora r=4", 50, 0.46), row("lora r=16", 200, 0.5)
    g = L.lora_goal([full, small, better, big])
    assert g["met"] is True and g["run"] == "lora r=4"  # 92% of full with 5.0% of its parameters
    assert "5.0%" in g["text"] and "92%" in g["text"] and g["text"].endswith("-> met")
    g = L.lora_goal([full, small, big])  # r=16 is too big to count; r=1 reaches 80%
    assert g["met"] is False and g["run"] == "lora r=1" and g["text"].endswith("NOT met")
    assert L.lora_goal([full, big])["met"] is None  # no LoRA run small enough
    assert L.lora_goal([full, row("dora r=1", 20, 0.5)])["met"] is None  # DoRA is not LoRA for this goal
    assert L.lora_goal([full, row("lora r=1", 20, 0.5, full_score=0.0)])["met"] is None  # full scored nothing


@pytest.mark.parametrize("text, parsed", [("full", ("full", None)), ("lora:4", ("lora", 4)), ("dora:16", ("dora", 16)),
                                          ("adapter", ("adapter", None)), ("prefix", ("prefix", None))])
def test_parse_method(text, parsed):
    assert L.parse_method(text) == parsed


@pytest.mark.parametrize("text, says", [("qlora:4", "unknown method 'qlora'"), ("lora", "'lora' needs a rank >= 1"),
                                        ("lora:0", "needs a rank >= 1"), ("dora:x", "needs a rank"),
                                        ("full:2", "full takes no rank")])
def test_parse_method_names_the_bad_item(text, says):
    with pytest.raises(ValueError, match=says):
        L.parse_method(text)


@pytest.mark.parametrize("flags, named", [(["--methods", "full lora"], "'lora' needs a rank"),
                                          (["--methods", " "], "name at least one run")])
def test_bad_methods_are_usage_errors(flags, named, usage_error):
    assert named in usage_error(L.main, ["--smoke"] + flags)
