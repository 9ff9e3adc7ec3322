"""Distributed plumbing: where this process sits in the job, and DeepSpeed config filling.

The re-exports load on first use (PEP 562), so that reading a DeepSpeed JSON (a command's
argument check, ``--help``) does not import torch.
"""

from __future__ import annotations

from pixelbert_dist.lazy import lazy_exports

_MODULE_OF = {
    "fill_deepspeed_config": "ds_config",
    "precision_of": "ds_config",
    "DistEnv": "env",
    "detect_env": "env",
    "device_for": "env",
    "init_distributed": "env",
}
__all__, __getattr__ = lazy_exports(__name__, _MODULE_OF)
