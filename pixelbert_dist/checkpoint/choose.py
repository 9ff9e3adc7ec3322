"""Which checkpoint a resume takes, and whether this run may load it.

A resume verifies the files against meta.json; ``auto`` falls back to the newest intact
checkpoint (saying which and why), an explicit tag that fails is an error naming the
file. A checkpoint written at another data-parallel world size or ZeRO stage is refused
with an error, unless the caller asks for DeepSpeed's universal checkpoint (ZeRO 1/2),
which re-partitions the shards (``universal.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pixelbert_dist.checkpoint import files, shared_load
from pixelbert_dist.checkpoint.files import CheckpointError, read_meta
from pixelbert_dist.checkpoint.layout import LATEST, list_tags, read_latest
from pixelbert_dist.checkpoint.universal import UNIVERSAL_SUFFIX, enable_universal_load
from pixelbert_dist.collectives import gather_objects

log = logging.getLogger(__name__)


def _explicit(save_dir: Path, which: str) -> Path:
    path = Path(which)
    if not path.is_dir():
        path = save_dir / which
    if not path.is_dir():
        raise CheckpointError(
            f"no checkpoint folder {which} nor {save_dir / which}; the checkpoints in "
            f"{save_dir}: {list_tags(save_dir) or 'none'}"
        )
    return path


def _candidates(save_dir: Path) -> tuple[list[str], list[str]]:
    """Tags to try newest first (`latest` first), and why `latest` itself could not lead."""
    latest_file = save_dir / LATEST
    tags = list_tags(save_dir)[::-1]
    latest, notes = read_latest(save_dir), []
    if latest == "":
        notes.append(f"{latest_file} is empty (a write was cut short)")
    elif latest is not None and latest not in tags:
        notes.append(f"{latest_file} names {latest!r} but {save_dir / latest} does not exist")
    elif latest is not None:
        tags.remove(latest)
        tags.insert(0, latest)
    elif tags:
        notes.append(f"{latest_file} is missing")
    return tags, notes


def _newest_intact(save_dir: Path, verify: bool, keep_reads: bool) -> Path | None:
    """What `latest` names when it is intact; else the newest intact tag, saying which and why."""
    tags, notes = gather_objects(_candidates(save_dir) if files.rank() == 0 else None)[0]
    for tag in tags:
        problem = shared_load.verify(save_dir / tag, keep_reads) if verify else None
        if problem is None:
            if notes and files.rank() == 0:
                log.warning("resuming from %s, the newest intact checkpoint: %s", save_dir / tag, "; ".join(notes))
            return save_dir / tag
        notes.append(f"{tag} skipped: {problem}")
    if tags or notes:
        raise CheckpointError(
            f"no intact checkpoint in {save_dir}: "
            + "; ".join(notes)
            + ". Point train.resume at a good checkpoint, or start over in a new run_dir"
        )
    return None  # nothing saved yet: a fresh run


def find_checkpoint(
    save_dir: str | Path, which: str = "auto", verify: bool = True, keep_reads: bool = False
) -> Path | None:
    """The tag folder ``which`` names, checked against the sizes and sha256 in its meta.json:
    "none", "auto"/"latest" (`latest`, or the newest intact tag if that is damaged; None when
    nothing was saved yet), a tag, or a path to a tag folder (an error when it is damaged).
    A collective when verifying: each rank reads its share (``shared_load.py``), and with
    ``keep_reads`` keeps it for the load that follows."""
    if which in (None, "none", ""):
        return None
    save_dir = Path(save_dir)
    if which in ("auto", LATEST):
        return _newest_intact(save_dir, verify, keep_reads)
    path = _explicit(save_dir, which)
    problem = shared_load.verify(path, keep_reads) if verify else None
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    return path


def check_world_size(tag_dir: str | Path, world_size: int, universal: bool = False) -> dict:
    """Refuse a checkpoint from another world size unless universal resume was asked for."""
    meta = read_meta(tag_dir)
    saved = meta["world_size"]
    if saved != world_size and not universal:
        raise CheckpointError(
            f"checkpoint {tag_dir} was written by {saved} data-parallel ranks but this run has "
            f"{world_size}: its ZeRO shards, RNG streams and data positions belong to {saved} "
            f"ranks. Resume with the same number of ranks, or pass resume_universal=true to "
            f"convert it with DeepSpeed's universal checkpoint (python -m "
            f"deepspeed.checkpoint.ds_to_universal --input_folder {tag_dir} --output_folder "
            f"{tag_dir}{UNIVERSAL_SUFFIX})."
        )
    return meta


def check_zero_stage(tag_dir: Path, meta: dict, ds_config: dict, universal: bool) -> bool:
    """True when the checkpoint's ZeRO stage differs from the run's and the universal
    checkpoint must bridge it; an error when it differs and may not."""
    if "zero_optimization" not in ds_config:  # fill_deepspeed_config always sets it: nothing to compare
        return False
    saved, now = meta.get("zero_stage", 0), ds_config["zero_optimization"].get("stage", 0)
    if saved == now:
        return False
    if universal and saved in (1, 2) and now in (1, 2):
        return True
    # checked: DeepSpeed 0.19's ZeRO-3 universal load looks for per-rank model files that
    # ds_to_universal does not write (AssertionError in state_dict_factory), so no bridge to 3
    hint = (
        "or pass train.resume_universal=true to convert it through DeepSpeed's universal checkpoint"
        if saved in (1, 2) and now in (1, 2)
        else "or export its weights (python launch/export.py RUN_DIR) and start a new run from them "
        "(model.visual_weights / a fine-tuning export): optimiser state does not cross to or from "
        "ZeRO stages 0 and 3"
    )
    raise CheckpointError(
        f"checkpoint {tag_dir} was saved with ZeRO stage {saved} but this run's DeepSpeed "
        f"config has stage {now}: DeepSpeed cannot load its shards as they are. Resume with "
        f"the stage it was saved with (--deepspeed_config deepspeed_configs/zero{saved}.json), "
        f"{hint}."
    )


def prepare_resume(
    ds_config: dict, save_dir: str | Path, which: str, world_size: int, universal: bool = False
) -> Path | None:
    """Call before ``deepspeed.initialize``: picks and verifies the checkpoint, checks the
    world size and ZeRO stage, and sets the universal load flag in ``ds_config`` when the
    checkpoint came from another world size or stage (and ``universal`` allows it).
    Returns the tag folder, or None for a fresh run. A collective."""
    tag_dir = find_checkpoint(save_dir, which, keep_reads=True)
    if tag_dir is not None:
        meta = check_world_size(tag_dir, world_size, universal)
        other_stage = check_zero_stage(tag_dir, meta, ds_config, universal)
        # ZeRO-0 shards nothing: its checkpoint loads as is on any number of ranks
        if other_stage or (meta["world_size"] != world_size and meta.get("zero_stage", 0) != 0):
            enable_universal_load(ds_config)
    return tag_dir
