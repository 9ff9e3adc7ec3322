"""Job submission (Slurm through submitit, or this machine): an application layer above
``train``. ``options`` checks the scheduler options, ``plan`` turns the pre-training
arguments and sweeps into jobs, ``snapshot`` freezes the code a job runs, ``task`` is
what every Slurm task runs, ``submission`` puts it together."""

from __future__ import annotations

from pixelbert_dist.lazy import lazy_exports

_MODULE_OF = {"SubmitConfig": "options", "SubmitError": "options", "submit": "submission"}
__all__, __getattr__ = lazy_exports(__name__, _MODULE_OF)
