"""The few collectives the library needs, on the device the backend can reduce.

A leaf module (torch only), so every layer may use it: checkpoint and data as well as
the trainers.

NCCL reduces CUDA tensors only, gloo CPU ones: ``collective_device`` is that choice,
made once here instead of at every all-reduce.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def collective_device() -> torch.device:
    """The device a tensor must be on for this process group's collectives."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sums(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """Every rank's sums added up (one all-reduce of float64 scalars), as floats."""
    if not sums:
        return {}
    keys = sorted(sums)
    flat = torch.stack([sums[k].double().cpu().reshape(()) for k in keys])
    if dist.is_initialized() and dist.get_world_size() > 1:
        flat = flat.to(collective_device())
        dist.all_reduce(flat)
    return dict(zip(keys, flat.cpu().tolist()))


def all_reduce_max(flag: float) -> float:
    """The largest ``flag`` over every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([flag], device=collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def gather_objects(obj: Any) -> list:
    """Every rank's picklable ``obj``, on every rank, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
