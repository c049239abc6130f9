"""Coursework: markers <-> registry, workspaces that score zero / full / exactly one exercise, subtly
wrong solutions losing their points, and broken workspaces (syntax error, missing file, hang) reported
per exercise. Grading runs pytest subprocesses, so only a few exercises of ch2 are graded here; the
`slow` test grades every chapter's reference solutions."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from minilife import course
from minilife.common import UsageError

# the ids fixed by the course texts and notebooks
IDS = {"memory_bill": "ch1", "bpe_merge_step": "ch2", "minhash_signature": "ch2", "lsh_banding": "ch2", "rope": "ch2",
       "rmsnorm": "ch2", "causal_attention": "ch2", "adamw_step": "ch2", "warmup_cosine": "ch2",
       "sft_loss_mask": "ch3", "lora_forward": "ch3", "lora_merge": "ch3", "bradley_terry": "ch4", "gae": "ch4",
       "ppo_clipped_loss": "ch4", "dpo_loss": "ch4", "loss_scaling": "ch5", "grad_accumulation": "ch5",
       "online_softmax": "ch5"}
ROOT = Path(__file__).resolve().parents[1]


def edit(workspace: Path, module: str, old: str, new: str) -> None:
    path = workspace / module
    text = path.read_text()
    assert text.count(old) == 1, old
    path.write_text(text.replace(old, new))


# registry and markers (no subprocess)


def test_every_marker_region_is_in_the_registry_and_vice_versa():
    regions = course.library_regions()
    assert set(regions) == set(course.EXERCISES) == set(IDS)
    for ex_id, ex in course.EXERCISES.items():
        assert ex.chapter == IDS[ex_id]
        assert {f for f, _, _ in regions[ex_id]} == {ex.module}, ex_id
        assert ex.tests and ex.points > 0
        for node in ex.tests:
            assert node.startswith("tests/") and (ROOT / node.split("::")[0]).is_file(), node
            name = node.split("::")[1].split("[")[0]
            assert re.search(rf"^\s*def {name}\(", (ROOT / node.split("::")[0]).read_text(), re.M), node


def test_stubs_compile_keep_the_signature_and_restore_exactly():
    for ex_id, ex in course.EXERCISES.items():
        text = (ROOT / ex.module).read_text()
        stub = course.strip_regions(text, {ex_id}, ex.module)
        compile(stub, ex.module, "exec")  # indentation kept: the module still imports
        assert (stub.count("raise NotImplementedError(")
            - text.count("raise NotImplementedError(") == len(course.library_regions()[ex_id]))
        assert stub.count(f"{ex_id}: implement ") == len(course.library_regions()[ex_id])
        defs = lambda t: re.findall(r"^\s*def \w+\(", t, re.M)  # noqa: E731
        assert defs(stub) == defs(text), ex_id  # no function (signature) lost
        assert course.restore_regions(stub, text, {ex_id}, ex.module) == text


def test_bad_markers_name_the_line():
    with pytest.raises(ValueError, match=r"x.py:2: exercise 'a' is never closed"):
        course.find_regions("pass\n# exercise: a\npass\n", "x.py")
    with pytest.raises(ValueError, match=r"x.py:1: 'end exercise: b' without"):
        course.find_regions("# end exercise: b\n", "x.py")


def test_unknown_chapter_names_the_valid_ones(tmp_path, capsys):
    with pytest.raises(UsageError, match="ch1, ch2, ch3, ch4, ch5"):
        course.make("ch9", tmp_path / "ws")
    assert course.main(["make", "chapter2", "--out", str(tmp_path / "ws")]) == 2
    assert "unknown chapter 'chapter2'; valid chapters: ch1, ch2, ch3, ch4, ch5" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UsageError, match="not an empty directory"):
        course.make("ch1", tmp_path / "full")
    with pytest.raises(UsageError, match="not a workspace"):
        course.grade(tmp_path / "full")


# workspaces graded by pytest subprocesses (two or three ch2 exercises each)

GRADED = ["adamw_step", "causal_attention"]
POINTS = {e: course.EXERCISES[e].points for e in IDS}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """ch2 workspaces: fresh, one exercise solved, all solved (the reference)."""
    base = tmp_path_factory.mktemp("course")
    every = {e.id for e in course.chapter_exercises("ch2")}
    return {"fresh": course.make("ch2", base / "fresh"), "one": course.make("ch2", base / "one", solved={"adamw_step"}),
            "ref": course.make("ch2", base / "ref", solved=every), "base": base, "every": every}


def by_id(result):
    return {r["id"]: r for r in result["exercises"]}


def test_fresh_workspace_scores_zero_with_the_helpful_message(ws):
    result = course.grade(ws["fresh"], only=GRADED, timeout=300)
    assert result["total"] == 0 and result["max"] == sum(POINTS[e] for e in GRADED)
    for ex_id, row in by_id(result).items():
        assert row["status"] == "failed", row
        assert f"NotImplementedError: {ex_id}: implement" in row["detail"] and "; read " in row["detail"]
    assert json.loads((ws["fresh"] / "course.json").read_text())["chapter"] == "ch2"


def test_plain_pytest_in_the_workspace_imports_the_students_copy(ws):
    pytest_exe = Path(sys.executable).with_name("pytest")
    out = subprocess.run([str(pytest_exe), "-q", "-x", "-p", "no:cacheprovider", "tests/optim/test_adamw.py"],
                         cwd=ws["fresh"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1  # the installed minilife would pass
    assert "NotImplementedError: adamw_step: implement the AdamW update" in out.stdout


def test_one_exercise_solved_scores_exactly_its_points(ws):
    result = course.grade(ws["one"], only=GRADED, timeout=300)
    rows = by_id(result)
    assert rows["adamw_step"]["status"] == "passed" and rows["causal_attention"]["status"] == "failed"
    assert result["total"] == POINTS["adamw_step"]


def test_reference_solutions_score_full_marks(ws, capsys):
    assert course.main(["grade", str(ws["ref"]), "--only", "causal_attention,warmup_cosine", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"] == result["max"] == POINTS["causal_attention"] + POINTS["warmup_cosine"]


def test_subtly_wrong_solutions_lose_their_points(ws):
    wrong = course.make("ch2", ws["base"] / "wrong", solved=ws["every"])
    edit(wrong, "minilife/optim/adamw.py", "bias1, bias2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t",
         "bias1, bias2 = 1.0, 1.0")  # no bias correction
    edit(wrong, "minilife/model/attention.py", "return k_pos <= q_pos  # (Tq, Tk)",
         "return k_pos <= q_pos + 1  # (Tq, Tk)")  # the mask shifted by one: each query sees the next token
    result = course.grade(wrong, only=GRADED, timeout=300)
    assert result["total"] == 0 and all(r["status"] == "failed" for r in result["exercises"]), result


def test_broken_workspace_is_reported_per_exercise(ws, capsys):
    broken = course.make("ch2", ws["base"] / "broken", solved=ws["every"])
    edit(broken, "minilife/optim/adamw.py", "if wd != 0.0:", "if wd != 0.0")  # a syntax error in one region
    (broken / "tests/model/test_attention.py").unlink()  # a missing file
    assert course.main(["grade", str(broken), "--only", "adamw_step,warmup_cosine,causal_attention"]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "error" in rows["adamw_step"] and "SyntaxError" in rows["adamw_step"], table
    assert "error" in rows["causal_attention"] and "not found" in rows["causal_attention"], table
    # warmup_cosine's tests import minilife.optim (and so adamw.py): graded with the reference AdamW in place
    assert "passed" in rows["warmup_cosine"], table
    assert rows["total"].split()[1] == f"{POINTS['warmup_cosine']}/{POINTS['warmup_cosine'] + 4}"


def test_hanging_exercise_times_out(ws):
    hang = course.make("ch2", ws["base"] / "hang", solved=ws["every"])
    edit(hang, "minilife/optim/adamw.py", "if wd != 0.0:", "while True:\n                    pass\n"
         "                if wd != 0.0:")
    result = course.grade(hang, only=["adamw_step"], timeout=5)
    row = by_id(result)["adamw_step"]
    assert row["status"] == "timeout" and row["points"] == 0 and row["seconds"] < 60


@pytest.mark.slow
@pytest.mark.parametrize("chapter", course.CHAPTERS)
def test_every_reference_solution_scores_full_marks(chapter, tmp_path):
    ref = course.make(chapter, tmp_path / "ref", solved={e.id for e in course.chapter_exercises(chapter)})
    result = course.grade(ref, timeout=600)
    assert result["total"] == result["max"], course.format_table(result)
