"""Job submission (Slurm through submitit, or this machine): an application layer above
``train``. ``options`` checks the scheduler options, ``plan`` turns the pre-training
arguments and sweeps into jobs, ``snapshot`` freezes the code a job runs, ``task`` is
what every Slurm task runs, ``submission`` puts it together."""

from __future__ import annotations

import importlib

_MODULE_OF = {"SubmitConfig": "options", "SubmitError": "options", "submit": "submission"}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):  # PEP 562: `submit.py --help` must not wait for torch
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
