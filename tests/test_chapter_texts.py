"""The course texts chapters/0N_<name>/README.md point at things that exist.

Checked for every chapter text: it exists; every repository path it names (minilife/..., data/...,
tests/..., notebooks/...) exists; every `python -m X` it names is a module file in the repository;
its exercise table lists exactly the chapter's exercises from the fixed list below, each with a file
that holds that exercise's solution region and, as the first name in its "implement" cell, the
function or method that encloses the region; its `python -m minilife.course make chN` names its own
chapter. The fixed list is compared with ``minilife.course.EXERCISES`` when that registry is filled.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "chapters"

CHAPTER_DIRS = {"01_budget": "ch1", "02_pretraining": "ch2", "03_sft": "ch3", "04_alignment": "ch4",
                "05_practical": "ch5"}

# The fixed exercise ids (the course texts, the notebooks and minilife/course.py all use these).
EXERCISE_CHAPTER = {
    "memory_bill": "ch1",
    "bpe_merge_step": "ch2", "minhash_signature": "ch2", "lsh_banding": "ch2", "rope": "ch2",
    "rmsnorm": "ch2", "causal_attention": "ch2", "adamw_step": "ch2", "warmup_cosine": "ch2",
    "sft_loss_mask": "ch3", "lora_forward": "ch3", "lora_merge": "ch3",
    "bradley_terry": "ch4", "gae": "ch4", "ppo_clipped_loss": "ch4", "dpo_loss": "ch4",
    "loss_scaling": "ch5", "grad_accumulation": "ch5", "online_softmax": "ch5",
}

# a repository path: starts a word (not inside another path, a URL or "~/minilife-ch1")
PATH_RE = re.compile(r"(?<![\w./~-])((?:minilife|data|tests|notebooks|bench)/[\w./-]*[\w/])")
MODULE_RE = re.compile(r"python -m ([\w.]+)")
MAKE_RE = re.compile(r"python -m minilife\.course make (\S+)")
ROW_RE = re.compile(r"^\|\s*`(?P<id>[^`]+)`\s*\|(?P<impl>[^|]*)\|(?P<files>[^|]*)\|", re.M)
NAME_RE = re.compile(r"`([A-Za-z_][\w.]*)")  # a backticked name; "memory_bill(model, opts)" -> memory_bill


def readme(name: str) -> str:
    return (COURSE / name / "README.md").read_text(encoding="utf-8")


def exercise_rows(text: str) -> list[re.Match]:
    """The rows of the table under the "## Exercises" heading."""
    assert "## Exercises" in text, "no '## Exercises' section"
    section = text.split("## Exercises", 1)[1].split("\n## ", 1)[0]
    return list(ROW_RE.finditer(section))


def enclosing_defs(path: Path, exercise: str) -> set[str]:
    """Qualified names (f, Class.method) of the functions whose body holds '# exercise: <id>'."""
    source = path.read_text(encoding="utf-8")
    lines = [i + 1 for i, line in enumerate(source.splitlines()) if line.strip() == f"# exercise: {exercise}"]
    found: set[str] = set()

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef) and any(child.lineno <= n <= child.end_lineno for n in lines):
                    found.add(name)
                walk(child, name + ".")

    walk(ast.parse(source), "")
    return found


def test_the_course_has_exactly_the_five_chapters():
    dirs = sorted(p.name for p in COURSE.iterdir() if p.is_dir() and re.match(r"\d\d_", p.name))
    assert dirs == sorted(CHAPTER_DIRS)


@pytest.mark.parametrize("name", sorted(CHAPTER_DIRS))
def test_readme_exists_and_has_the_sections(name):
    text = readme(name)
    for heading in ("## The idea", "## The equations", "## Read the code in this order", "## Run it",
                    "## Failure → fix", "## Exercises"):
        assert heading in text, f"chapters/{name}/README.md lacks {heading!r}"


@pytest.mark.parametrize("name", sorted(CHAPTER_DIRS))
def test_every_path_named_exists(name):
    paths = set(PATH_RE.findall(readme(name)))
    assert any(p.startswith("minilife/") for p in paths), "names no module to read"
    # notebooks/ is written by the notebooks work of the same issue; its paths are checked once it exists
    missing = [p for p in sorted(paths) if not (ROOT / p).exists()
               and not (p.startswith("notebooks/") and not (ROOT / "notebooks").is_dir())]
    assert not missing, f"chapters/{name}/README.md names paths that do not exist: {missing}"


@pytest.mark.parametrize("name", sorted(CHAPTER_DIRS))
def test_every_python_m_names_a_real_module(name):
    modules = set(MODULE_RE.findall(readme(name)))
    assert any(m.startswith("minilife.chapters.") for m in modules), "no chapter command to run"
    for module in sorted(modules):
        rel = Path(*module.split("."))
        assert (ROOT / rel.with_suffix(".py")).is_file() or (ROOT / rel / "__main__.py").is_file(), (
            f"chapters/{name}/README.md runs `python -m {module}`, which is not a module in the repository")


@pytest.mark.parametrize("name", sorted(CHAPTER_DIRS))
def test_make_command_names_this_chapter(name):
    made = set(MAKE_RE.findall(readme(name)))
    assert made == {CHAPTER_DIRS[name]}, f"chapters/{name}/README.md: `course make` for {made}"
    assert "python -m minilife.course grade" in readme(name)


@pytest.mark.parametrize("name", sorted(CHAPTER_DIRS))
def test_exercise_table_lists_exactly_the_chapters_exercises(name):
    ids = [row["id"] for row in exercise_rows(readme(name))]
    unknown = [i for i in ids if i not in EXERCISE_CHAPTER]
    assert not unknown, f"chapters/{name}/README.md: exercise ids not in the fixed list: {unknown}"
    expected = sorted(i for i, ch in EXERCISE_CHAPTER.items() if ch == CHAPTER_DIRS[name])
    assert sorted(ids) == expected, f"chapters/{name}/README.md lists {sorted(ids)}, expected {expected}"


@pytest.mark.parametrize("name", sorted(CHAPTER_DIRS))
def test_each_exercise_names_the_file_and_function_holding_its_region(name):
    for row in exercise_rows(readme(name)):
        exercise = row["id"]
        files = PATH_RE.findall(row["files"])
        assert files, f"{exercise}: no file named"
        for f in files:
            text = (ROOT / f).read_text(encoding="utf-8")
            assert f"# exercise: {exercise}" in text, f"{exercise}: {f} holds no '# exercise: {exercise}' region"
        names = NAME_RE.findall(row["impl"])
        assert names, f"{exercise}: the implement cell names no function"
        holders = set().union(*(enclosing_defs(ROOT / f, exercise) for f in files))
        assert names[0] in holders, f"{exercise}: `{names[0]}` is not the function holding the region ({holders})"


def test_fixed_list_matches_the_course_registry():
    course = pytest.importorskip("minilife.course")
    registry = getattr(course, "EXERCISES", None)
    if not registry:
        pytest.skip("minilife.course.EXERCISES is not filled yet")
    assert {i: e.chapter for i, e in registry.items()} == EXERCISE_CHAPTER
