"""Package re-exports that load on first use (PEP 562): a command's ``--help`` or a config
check imports a package's light submodules without pulling in torch through its ``__init__``."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, module_of: dict[str, str]) -> tuple[list[str], Callable[[str], object]]:
    """``__all__`` and ``__getattr__`` for ``package``, where ``module_of`` maps each public
    name to the submodule (relative to the package) that defines it."""

    def __getattr__(name: str):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)

    return sorted(module_of), __getattr__
