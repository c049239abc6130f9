"""The chapter notebooks: valid nbformat v4 committed with cleared outputs, no redefined library code,
and every one executes headless (nbclient) at smoke size with its runs under tmp.

Execution: ``MINILIFE_SMOKE=1`` selects smoke sizes; ``MINILIFE_RUNS`` points the artifacts the notebooks
build (ch2_data, ch2_pretrain, ch3_sft, ch4_reward, ch4_ppo at smoke size) at one session tmp dir shared by
the five notebooks, and the kernel's cwd is a fresh tmp dir that must stay empty. The kernel is this
interpreter (a kernelspec written to a tmp ``JUPYTER_PATH``), so it sees the same installed minilife.
"""
import ast
import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NAMES = ["01_budget", "02_pretraining", "03_sft", "04_alignment", "05_practical"]
NOTEBOOKS = [NOTEBOOK_DIR / f"{n}.ipynb" for n in NAMES]
MODULE_CLASS = re.compile(r"class\s+\w+\s*\(\s*(?:torch\.)?nn\.Module\s*\)")


def library_names() -> tuple[set[str], set[str]]:
    """(public top-level function names, public top-level class names) of every module under minilife/."""
    functions, classes = set(), set()
    for path in (ROOT / "minilife").rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                functions.add(node.name)
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                classes.add(node.name)
    return functions, classes


def code_of(cell) -> str:
    """A code cell's source with IPython magics and shell lines (``%``, ``!``) dropped, so ast can parse it."""
    return "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))


def redefinitions(nb, functions: set[str], classes: set[str]) -> list[str]:
    """What a notebook redefines: nn.Module subclasses, and functions or classes named like library ones."""
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        src = code_of(cell)
        found += [f"cell {i}: {m.group(0)}" for m in MODULE_CLASS.finditer(src)]
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in functions:
                found.append(f"cell {i}: def {node.name} shadows a minilife function")
            elif isinstance(node, ast.ClassDef) and node.name in classes:
                found.append(f"cell {i}: class {node.name} shadows a minilife class")
    return found


def test_the_five_notebooks_exist():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_valid_v4_with_outputs_cleared(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and any(c.cell_type == "markdown" for c in nb.cells)
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: code cell {i} has outputs"
    assert 'os.environ.get("MINILIFE_SMOKE") == "1"' in code[0].source, f"{path.name}: first cell must read MINILIFE_SMOKE"
    assert nb.metadata.get("kernelspec", {}).get("language") == "python"


def test_library_names_are_found():
    functions, classes = library_names()
    assert {"memory_bill", "s_curve", "dpo_loss", "flash_attention_torch", "show_mask"} <= functions
    assert {"GPT", "AdamW", "RewardModel"} <= classes


def test_the_scan_catches_redefinitions():
    """A positive control: the scan must flag each kind of planted redefinition (so a clean scan means something)."""
    functions, classes = library_names()
    bad = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%matplotlib inline\nimport torch.nn as nn\nclass Mine(nn.Module):\n    pass"),
        nbformat.v4.new_code_cell("import torch\nclass Other(torch.nn.Module):\n    pass"),
        nbformat.v4.new_code_cell("def s_curve(j, b, r):\n    return 1 - (1 - j ** r) ** b"),
        nbformat.v4.new_code_cell("for _ in range(1):\n    def dpo_loss(*a):\n        pass"),
        nbformat.v4.new_code_cell("class AdamW:\n    pass"),
        nbformat.v4.new_code_cell("def my_helper():\n    pass"),  # a new name is fine
    ])
    found = redefinitions(bad, functions, classes)
    assert len(found) == 5, found
    assert not any("my_helper" in f for f in found)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_no_redefined_library_code(path):
    functions, classes = library_names()
    assert redefinitions(nbformat.read(path, as_version=4), functions, classes) == []


@pytest.fixture(scope="session")
def notebook_env(tmp_path_factory) -> dict:
    """One runs root for all five notebooks (smoke artifacts built once) and a kernelspec for this Python."""
    runs = tmp_path_factory.mktemp("notebook_runs")
    jupyter = tmp_path_factory.mktemp("jupyter")
    spec = jupyter / "kernels" / "minilife-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "minilife tests", "language": "python"}))
    return {"MINILIFE_RUNS": str(runs), "JUPYTER_PATH": str(jupyter), "MINILIFE_SMOKE": "1"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_executes_headless_at_smoke_size(path, notebook_env, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    for key, value in notebook_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    nb = nbformat.read(path, as_version=4)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    NotebookClient(nb, timeout=300, kernel_name="minilife-test", resources={"metadata": {"path": str(cwd)}}).execute()

    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert errors == []
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 1, f"{path.name}: no inline plot"
    assert list(cwd.iterdir()) == [], "a notebook wrote relative to its cwd instead of under MINILIFE_RUNS"
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before, "a notebook wrote into notebooks/"
    assert nbformat.read(path, as_version=4).cells[1].get("outputs") == [], "the committed notebook was changed"
