"""Distributed plumbing: where this process sits in the job, and DeepSpeed config filling.

The re-exports load on first use (PEP 562), so that reading a DeepSpeed JSON (a command's
argument check, ``--help``) does not import torch.
"""

from __future__ import annotations

import importlib

_MODULE_OF = {
    "fill_deepspeed_config": "ds_config",
    "precision_of": "ds_config",
    "DistEnv": "env",
    "detect_env": "env",
    "device_for": "env",
    "init_distributed": "env",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
