"""DeepSpeed's universal checkpoint for the hybrid optimiser: a ZeRO 1/2 checkpoint
re-partitioned for another world size (or ZeRO stage 1 <-> 2).

DeepSpeed's converter (``ds_to_universal``) only knows Adam state, so the CNN's SGD
momentum is dressed as Adam's for the conversion and renamed back after (checked:
2 ranks -> 1 gives the same losses). Rank 0 converts once, next to the tag, while the
other ranks wait in a process group of their own with a long timeout (``CONVERSION_TIMEOUT``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist

from pixelbert_dist.checkpoint.files import META, CheckpointError, rank, read_meta

log = logging.getLogger(__name__)

UNIVERSAL_SUFFIX = "_universal"
# How long the other ranks wait for rank 0's conversion. It reads the whole checkpoint and
# writes a file per (parameter, state, saved rank) before merging them: 42 s for R50 from
# 2 ranks on a loaded 2-core VM, growing with the saved world size (benchmarks/results/
# cpu-2core-2026-12-07-resume-bytes). Generous: a hung conversion still ends, in hours.
CONVERSION_TIMEOUT = timedelta(hours=3)


def _load_ds_file(path: Path) -> dict:
    """A DeepSpeed optimizer shard, unpickled with only the classes it is known to hold."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location="cpu", weights_only=True)


def _dress_sgd_as_adam(tag_dir: Path, work: Path) -> set[str]:
    """A copy of ``tag_dir`` whose SGD momentum sits where ds_to_universal looks for Adam's.

    DeepSpeed's converter reads ``exp_avg`` and ``exp_avg_sq`` from every param group; the
    CNN's SGD group has a ``momentum_buffer`` only. Model files are linked, not copied.
    Returns the names of the SGD group's parameters.
    """
    work.mkdir(parents=True)
    sgd_names: set[str] = set()
    for src in tag_dir.iterdir():
        if not src.name.endswith("_optim_states.pt"):
            os.symlink(src.resolve(), work / src.name)
            continue
        shard = _load_ds_file(src)
        osd = shard["optimizer_state_dict"]
        for gid, state in osd["base_optimizer_state"]["state"].items():
            if "momentum_buffer" in state and "exp_avg" not in state:
                state["exp_avg"] = state.pop("momentum_buffer")
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
                sgd_names.update(osd["param_slice_mappings"][gid])
        torch.save(shard, work / src.name)
    return sgd_names


def _convert_universal(tag_dir: Path, out: Path) -> None:
    """ds_to_universal for the hybrid optimiser (ZeRO 1/2); the SGD state is renamed back."""
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    work = out.with_name(out.name + ".in")
    shutil.rmtree(work, ignore_errors=True)
    try:
        sgd_names = _dress_sgd_as_adam(tag_dir, work)
        ds_to_universal(
            SimpleNamespace(
                input_folder=str(work),
                output_folder=str(out),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
        )
        for name in sgd_names:  # DeepSpeed's universal loader restores whatever keys it finds
            folder = out / "zero" / name
            os.replace(folder / "exp_avg.pt", folder / "momentum_buffer.pt")
            (folder / "exp_avg_sq.pt").unlink()
        shutil.copy(tag_dir / META, out / META)  # last: marks the conversion complete
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _try_convert(tag_dir: Path, out: Path) -> str | None:
    """The conversion on rank 0; an error message instead of an exception (to share it)."""
    stage = read_meta(tag_dir).get("zero_stage")
    if stage not in (1, 2):
        return (
            f"{tag_dir} was saved with ZeRO stage {stage}; a universal resume of the hybrid "
            f"optimiser is supported from ZeRO 1 and 2 checkpoints. Resume with the world "
            f"size it was written at."
        )
    try:
        _convert_universal(tag_dir, out)
    except Exception as err:  # noqa: BLE001 - every rank raises it below
        shutil.rmtree(out, ignore_errors=True)
        return f"converting {tag_dir} to a universal checkpoint failed: {type(err).__name__}: {err}"
    return None


def _waiting_group():
    """A gloo group whose collectives wait ``CONVERSION_TIMEOUT``: the other ranks wait in
    it while rank 0 converts, instead of in a collective of the job's group (whose timeout,
    10 minutes by default, the conversion passes at scale)."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return None
    return tdist.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)  # a collective: every rank, same order


def _share(error: str | None, group) -> str | None:
    if group is None:
        return error
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, error, group=group)
    tdist.destroy_process_group(group)
    return out[0]


def to_universal(tag_dir: Path) -> Path:
    """Rank 0 converts once (kept next to the tag), ahead of the job's collectives; every
    rank learns how it went. Rank 0 logs how long the conversion took."""
    out = tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)
    group, error = _waiting_group(), None
    if rank() == 0 and not (out / META).is_file():
        start = time.perf_counter()
        error = _try_convert(tag_dir, out)
        log.info("universal conversion of %s: %.1f s", tag_dir.name, time.perf_counter() - start)
    error = _share(error, group)  # also the barrier after the conversion
    if error:
        raise CheckpointError(error)
    return out


def enable_universal_load(ds_config: dict) -> dict:
    """The DeepSpeed flag to set before ``deepspeed.initialize`` for a universal resume."""
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ds_config
