"""How the data modules depend on each other, read from their source (every import counts: top level,
inside functions, under TYPE_CHECKING): no cycles, and nobody imports another module's private names."""
import ast
from pathlib import Path

import minilife.data

DATA = Path(minilife.data.__file__).parent


def _imports() -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported data module, imported name or "")] for every import of a minilife.data module."""
    out = {}
    for path in sorted(DATA.glob("*.py")):
        found = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "minilife.data":
                found += [(a.name, "") for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("minilife.data."):
                found += [(node.module.rsplit(".", 1)[1], a.name) for a in node.names]
            elif isinstance(node, ast.Import):
                found += [(a.name.rsplit(".", 1)[1], "") for a in node.names if a.name.startswith("minilife.data.")]
        out[path.stem] = found
    return out


def test_no_private_names_cross_modules():
    bad = [(m, f"{src}.{name}") for m, found in _imports().items() for src, name in found if name.startswith("_")]
    assert bad == []


def test_no_import_cycles():
    graph = {m: {src for src, _ in found} for m, found in _imports().items()}
    for start in graph:  # depth-first walk from every module: reaching it again is a cycle
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                assert nxt != start, " -> ".join(path + [nxt])
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
