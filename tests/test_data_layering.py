"""The data package's imports point one way: no cycle between its modules, counting
imports inside functions too, and nothing above it (model, distributed, train, ...)."""
from __future__ import annotations

import ast
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "pixelbert_dist" / "data"
HIGHER = ("pixelbert_dist.model", "pixelbert_dist.distributed", "pixelbert_dist.train",
          "pixelbert_dist.finetune", "pixelbert_dist.checkpoint")


def _module(path: Path) -> str:
    parts = path.relative_to(DATA.parent.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every pixelbert_dist module this file imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pixelbert_dist"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pixelbert_dist"))
    return found


def test_no_cycles_and_no_upward_imports():
    files = {_module(p): p for p in DATA.rglob("*.py")}
    graph = {name: {m for m in _imports(path) if m in files and m != name}
             for name, path in files.items()}
    for name, path in files.items():
        upward = sorted(m for m in _imports(path) if m.startswith(HIGHER))
        assert not upward, f"{name} imports {upward}"
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node] - {"pixelbert_dist.data"}):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join(path + [nxt])
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert "pixelbert_dist.data.loader" not in graph["pixelbert_dist.data.dali_wds"]
