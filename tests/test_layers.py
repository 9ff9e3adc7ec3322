"""The package's import graph: no cycles (function-level imports included) and no import
against the layer order  base <- data / model / checkpoint <- distributed <- train <-
finetune <- apps  (README, "Where things are"). Built from the source with ``ast``, importing nothing.
Above it: benchmarks/ and tests/ import modules as packages (``benchmarks.common``), never by
editing sys.path, and the package imports none of them (nor launch/)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pixelbert_dist"

# The lowest layer: leaf modules every layer may use (they import no other package module).
LAYERS = {
    "pixelbert_dist": 0,
    "config": 0,
    "lazy": 0,
    "metrics": 0,
    "tracking": 0,
    "collectives": 0,
    "console": 0,
    "data": 1,
    "model": 1,
    "checkpoint": 1,
    "distributed": 2,
    "train": 3,
    "finetune": 4,
    "jobs": 5,
    "plotting": 5,
}
# Siblings of one layer that must not import each other: the data path never imports the model.
FORBIDDEN = {("data", "model"), ("model", "data")}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, anywhere in its source (``from a import b``
    counts as importing ``a.b`` when that is a module, else ``a``)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path.name == "__init__.py", node)
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            else:
                continue
            edges |= {name for name in names if name in files and name != module}
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def layer_of(module: str) -> tuple[str, int]:
    part = module.split(".")[1] if "." in module else "pixelbert_dist"
    return part, LAYERS[part]


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    bad = set()
    for module, targets in graph.items():
        (area, layer) = layer_of(module)
        for target in targets:
            (target_area, target_layer) = layer_of(target)
            if target_layer > layer or (area, target_area) in FORBIDDEN:
                bad.add((module, target))
    return bad


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "pixelbert_dist.train.trainer" in graph["pixelbert_dist.train.run"]  # inside main()
    assert "pixelbert_dist.model.pixelbert" in graph["pixelbert_dist.model.flops"]  # from .pixelbert import
    assert {"pixelbert_dist.train.loop", "pixelbert_dist.checkpoint.files"} <= graph["pixelbert_dist.finetune.trainer"]


def test_every_package_module_has_a_layer():
    assert {layer_of(m)[0] for m in import_graph()} <= set(LAYERS)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == []


def test_imports_follow_the_layer_order():
    assert sorted(upward_imports(import_graph())) == []


REPO = PACKAGE.parent
# sys.path edited in code (insert / append / extend / assignment): the way the benchmarks
# once reached their helpers. Spelled as a pattern so this file does not match itself.
SYS_PATH_EDIT = re.compile(r"\bsys\.path\s*(\.\s*(insert|append|extend)\s*\(|\[[^]]*\]\s*=(?!=)|\s*\+?=(?!=))")


def test_no_sys_path_edits_in_benchmarks_or_tests():
    """benchmarks/ is a package run with ``python -m benchmarks.X``; tests import it as such."""
    files = [p for folder in ("benchmarks", "tests") for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".sh")]
    files = [p for p in files if p.is_file()]  # not a dangling link
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if SYS_PATH_EDIT.search(line)
    ]
    assert len(files) > 20 and found == []


def test_the_library_never_imports_the_benchmarks():
    """Benchmarks sit above the library (they import it): never the other way round."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            found |= {(module_name(path), n) for n in names if n.split(".")[0] in ("benchmarks", "tests", "launch")}
    assert sorted(found) == []
