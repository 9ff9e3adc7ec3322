"""Checkpoints through DeepSpeed: save, keep the last K, resume exactly, stop on a signal.

Layout of ``save_dir``::

    step_00000100/            one DeepSpeed tag (model, optimizer and scheduler shards)
        meta.json             step, world size, ZeRO stage, config, size + sha256 of every file
    .step_00000200.tmp/       a save in progress (renamed to step_00000200/ when whole)
    latest                    the tag to resume from; moves only after the rename

A resume verifies the files against meta.json; ``auto`` falls back to the newest intact
checkpoint (saying which and why), an explicit tag that fails is an error naming the file.

The ``client_state`` handed to DeepSpeed carries the trainer's state and, gathered from
every rank, each rank's RNG states and its own extra state (e.g. its data loader
position), so rank r resumes with rank r's streams. A checkpoint written at another
data-parallel world size is refused with an error, unless the caller asks for
DeepSpeed's universal checkpoint (ZeRO 1/2), which re-partitions the shards; its
converter only knows Adam state, so the CNN's SGD momentum is dressed as Adam's for
the conversion and renamed back after (checked: 2 ranks -> 1 gives the same losses).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)

from pixelbert_dist.checkpoint import files
from pixelbert_dist.checkpoint.files import META, CheckpointError, read_meta
from pixelbert_dist.checkpoint.universal import UNIVERSAL_SUFFIX, enable_universal_load
from pixelbert_dist.checkpoint.universal import to_universal as _to_universal
from pixelbert_dist.collectives import all_reduce_max, gather_objects

log = logging.getLogger(__name__)
TAG_RE = re.compile(r"^step_(\d{8})$")
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def config_fingerprint(cfg: Any) -> str:
    """A short hash of a (JSON-able) config dict, to tell when a resume changed the config."""
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---- RNG -------------------------------------------------------------------------


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


# ---- save ------------------------------------------------------------------------


def list_tags(save_dir: str | Path) -> list[str]:
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    return sorted(p.name for p in save_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def read_latest(save_dir: str | Path) -> str | None:
    path = Path(save_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def _prune(save_dir: Path, keep_last: int, protect: str) -> list[str]:
    if keep_last <= 0:
        return []
    tags = list_tags(save_dir)
    doomed = [t for t in tags[:-keep_last] if t != protect]
    for tag in doomed:
        shutil.rmtree(save_dir / tag, ignore_errors=True)
        shutil.rmtree(save_dir / f"{tag}{UNIVERSAL_SUFFIX}", ignore_errors=True)
    return doomed


def save_checkpoint(
    engine,
    save_dir: str | Path,
    step: int,
    client_state: dict,
    keep_last: int,
    rank_state: dict | None = None,
    meta: dict | None = None,
) -> Path:
    """Save on every rank (a collective); returns the tag folder.

    ``client_state``: the trainer's state (rank 0's copy is kept); ``rank_state``: what
    differs per rank (e.g. its data loader position), kept for every rank; ``meta``:
    extra JSON entries for ``meta.json`` (e.g. the run config). ``keep_last`` <= 0 keeps
    everything. Written to a temporary folder, renamed into place, then ``latest`` moves
    (see ``checkpoint.files``).
    """
    save_dir = Path(save_dir)
    tag = tag_for(step)
    tmp = files.tmp_folder(save_dir, tag)
    error = None
    if files.rank() == 0:
        try:
            files.prepare_tmp(save_dir, tag)
        except CheckpointError as err:
            error = str(err)
    error = gather_objects(error)[0]  # every rank stops alike on an unwritable folder
    if error:
        raise CheckpointError(error)
    ranks = gather_objects({"rng": rng_state(), "state": rank_state})
    state = dict(client_state, step=step, world_size=engine.dp_world_size, rank_states=ranks)
    # ds_to_universal refuses a checkpoint without this entry; a model with no tensor or
    # pipeline parallelism needs nothing in it but the format version
    state.setdefault(UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    engine.save_checkpoint(str(save_dir), tag=tmp.name, client_state=state, save_latest=False)
    table = files.record_files(tmp)  # each rank hashes its own files; also the barrier
    if files.rank() == 0:
        record = {
            "step": step,
            "world_size": engine.dp_world_size,
            "zero_stage": engine.zero_optimization_stage(),
            "config_fingerprint": client_state.get("config_fingerprint"),
            **(meta or {}),
            "files": table,
        }
        files.write_text_atomic(tmp / META, json.dumps(record, indent=2) + "\n")
        files.publish(tmp, save_dir / tag)
        files.write_text_atomic(save_dir / LATEST, tag + "\n")  # only now: the folder is whole
        _prune(save_dir, keep_last, protect=tag)
        files.remove_leftovers(save_dir)
    _barrier()  # nobody reads `latest` or the pruned folders while rank 0 is at work
    return save_dir / tag


# ---- choosing the checkpoint to resume --------------------------------------------


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


def _newest_intact(save_dir: Path, verify: bool) -> Path | None:
    """What `latest` names when it is intact; else the newest intact tag, saying which and why."""
    tags, notes = gather_objects(_candidates(save_dir) if files.rank() == 0 else None)[0]
    for tag in tags:
        problem = files.verify(save_dir / tag) if verify else None
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


def find_checkpoint(save_dir: str | Path, which: str = "auto", verify: bool = True) -> Path | None:
    """The tag folder ``which`` names, checked against the sizes and sha256 in its meta.json:
    "none", "auto"/"latest" (`latest`, or the newest intact tag if that is damaged; None when
    nothing was saved yet), a tag, or a path to a tag folder (an error when it is damaged).
    A collective when verifying."""
    if which in (None, "none", ""):
        return None
    save_dir = Path(save_dir)
    if which in ("auto", LATEST):
        return _newest_intact(save_dir, verify)
    path = _explicit(save_dir, which)
    problem = files.verify(path) if verify else None
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
    tag_dir = find_checkpoint(save_dir, which)
    if tag_dir is not None:
        meta = check_world_size(tag_dir, world_size, universal)
        other_stage = check_zero_stage(tag_dir, meta, ds_config, universal)
        # ZeRO-0 shards nothing: its checkpoint loads as is on any number of ranks
        if other_stage or (meta["world_size"] != world_size and meta.get("zero_stage", 0) != 0):
            enable_universal_load(ds_config)
    return tag_dir


def resume(
    engine, save_dir: str | Path, which: str = "auto", universal: bool = False, verify: bool = True
) -> dict | None:
    """Load model, optimizer, scheduler and RNG states; the client_state, or None for a fresh run.

    The returned dict holds what ``save_checkpoint`` got as ``client_state``, plus
    ``rank_state`` (this rank's own saved state; None after a world-size change) and
    ``rank_states`` (the states every saved rank passed, in rank order). ``verify=False``
    when ``which`` is a folder ``prepare_resume`` already verified.
    """
    tag_dir = find_checkpoint(save_dir, which, verify)
    if tag_dir is None:
        return None
    meta = check_world_size(tag_dir, engine.dp_world_size, universal)
    same_world = meta["world_size"] == engine.dp_world_size
    load_dir, tag = tag_dir.parent, tag_dir.name
    if engine.load_universal_checkpoint():
        tag = _to_universal(tag_dir).name
    elif not same_world and meta.get("zero_stage", 0) != 0:
        raise CheckpointError(
            "a universal resume needs the DeepSpeed config flag "
            "checkpoint.load_universal=true before deepspeed.initialize "
            "(prepare_resume sets it)"
        )
    load_path, client_state = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    client_state = dict(client_state or {})
    ranks = client_state.pop("rank_states", None) or []
    client_state["rank_states"] = [r["state"] for r in ranks]  # every saved rank's own state
    if same_world and len(ranks) == files.world():
        mine = ranks[files.rank()]
        set_rng_state(mine["rng"])
        client_state["rank_state"] = mine["state"]
    else:
        warnings.warn(
            f"resumed {tag_dir} from {meta['world_size']} ranks on {engine.dp_world_size}: "
            f"per-rank RNG and data positions are not restored",
            stacklevel=2,
        )
        client_state["rank_state"] = None
    return client_state


# ---- signals ---------------------------------------------------------------------


class GracefulExit:
    """SIGTERM, SIGINT (Ctrl-C), SIGUSR1 (Slurm's warning before a time limit) and SIGHUP
    (the launcher is gone: ``distributed/launcher_watch.py``) only set a flag; a second
    SIGINT gets Python's default (KeyboardInterrupt) to abort at once.

    The trainer calls ``should_exit()`` at the same step on every rank; it all-reduces
    the flag so that all ranks stop together (a rank that left alone would leave the
    others hanging in the next collective), then saves and exits 0. The first time the
    ranks agree, one line is logged.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)):
        self.signals = signals
        self.received: int | None = None
        self.announced = False
        self._previous: dict[int, Any] = {}

    def install(self) -> "GracefulExit":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "GracefulExit":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            signal.default_int_handler(signum, frame)  # Ctrl-C twice: stop now, without a save
        self.received = signum  # nothing else here: a handler runs between two bytecodes

    @property
    def requested(self) -> bool:
        return self.received is not None

    def should_exit(self) -> bool:
        """True on every rank as soon as any rank got a signal (a collective call)."""
        return self.agreed(all_reduce_max(1.0 if self.requested else 0.0) > 0)

    def agreed(self, stop: bool) -> bool:
        """``stop``: whether any rank got a signal, as the caller all-reduced it (the
        trainer folds the flag into its step's one all-reduce); said once."""
        if stop and not self.announced:
            self.announced = True
            source = signal.Signals(self.received).name if self.requested else "a signal on another rank"
            if self.received == signal.SIGHUP:
                source += ": the launcher or the terminal is gone"
            log.info("stop requested (%s): saving a checkpoint, then exiting", source)
        return stop
