"""One home for each name: every ``from pixelbert_dist.X import NAME`` in the repository takes
NAME from the module that defines it (or a submodule, or a package's ``__init__``, whose
re-exports are its public face). A name imported through a second module is a second home
that drifts. Built from the source with ``ast``, importing nothing."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pixelbert_dist", "launch", "benchmarks", "tests")


def _module_path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def _defined(path: Path) -> frozenset[str]:
    """Top-level names a module defines itself (imports excluded)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name))
        elif isinstance(node, (ast.If, ast.Try)):  # guarded definitions (fallbacks)
            names.update(n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef)))
    return frozenset(names)


def second_homes() -> list[str]:
    found = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "results" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                    continue
                if not node.module.startswith("pixelbert_dist"):
                    continue
                source = _module_path(node.module)
                if source is None or source.name == "__init__.py":
                    continue
                for alias in node.names:
                    if alias.name in _defined(source) or _module_path(f"{node.module}.{alias.name}"):
                        continue
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {alias.name} from {node.module}")
    return found


def test_every_imported_name_comes_from_its_defining_module():
    assert second_homes() == []
