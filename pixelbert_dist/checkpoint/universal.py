"""DeepSpeed's universal checkpoint for the hybrid optimiser: a ZeRO 1/2 checkpoint
re-partitioned for another world size (or ZeRO stage 1 <-> 2).

DeepSpeed's converter (``ds_to_universal``) only knows Adam state, so the CNN's SGD
momentum is dressed as Adam's for the conversion and renamed back after (checked:
2 ranks -> 1 gives the same losses). Rank 0 converts once, next to the tag.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from pixelbert_dist.checkpoint.files import META, CheckpointError, rank, read_meta
from pixelbert_dist.collectives import gather_objects

UNIVERSAL_SUFFIX = "_universal"


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


def to_universal(tag_dir: Path) -> Path:
    """Rank 0 converts once (kept next to the tag); every rank learns how it went."""
    out = tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)
    error = None
    if rank() == 0 and not (out / META).is_file():
        error = _try_convert(tag_dir, out)
    error = gather_objects(error)[0]  # a collective: also the barrier after the conversion
    if error:
        raise CheckpointError(error)
    return out


def enable_universal_load(ds_config: dict) -> dict:
    """The DeepSpeed flag to set before ``deepspeed.initialize`` for a universal resume."""
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return ds_config
