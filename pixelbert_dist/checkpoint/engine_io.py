"""One tag through DeepSpeed: what a save puts in it, how it is committed, how it loads.

The ``client_state`` handed to DeepSpeed carries the trainer's state (rank 0's copy is
kept). What differs per rank (its RNG streams, its data loader position) goes to that
rank's own small file ``rank_RRRRR_state.pt``: stored once, not in every rank's model
file (under ZeRO-3 each rank writes a model file, and a gathered table in each would be
O(world^2) bytes). Checkpoints of the earlier format (a ``rank_states`` table in the
client state) still load.

A commit: every rank has written and hashed its own files; rank 0 gathers the tables,
writes ``meta.json``, renames the folder into place, moves ``latest`` and prunes.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import random
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

from pixelbert_dist.checkpoint import files, shared_load
from pixelbert_dist.checkpoint.files import META, CheckpointError
from pixelbert_dist.checkpoint.layout import LATEST, prune
from pixelbert_dist.checkpoint.shared_load import TagReads, shared_file_reads
from pixelbert_dist.checkpoint.staging import HostBuffers, Staged, stage_engine_save, write_staged

log = logging.getLogger(__name__)


def rank_state_name(rank: int) -> str:
    return f"rank_{rank:05d}_state.pt"


def config_fingerprint(cfg: Any) -> str:
    """A short hash of a (JSON-able) config dict, to tell when a resume changed the config."""
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def rng_state() -> dict:
    """Every RNG stream of this process, in types a ``weights_only`` load accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else np.asarray(keys)
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def stage(engine, tmp: Path, step: int, client_state: dict, rank_state: dict | None, buffers: HostBuffers) -> Staged:
    """Every rank (a collective): DeepSpeed's files of this tag, and this rank's own
    state file, copied to host memory (``buffers``; nothing written yet)."""
    state = dict(client_state, step=step, world_size=engine.dp_world_size)
    # ds_to_universal refuses a checkpoint without this entry; a model with no tensor or
    # pipeline parallelism needs nothing in it but the format version
    state.setdefault(UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})
    staged = stage_engine_save(engine, tmp, state, buffers)
    staged.add(tmp / rank_state_name(files.rank()), {"rng": rng_state(), "state": copy.deepcopy(rank_state)})
    return staged


def _gather(obj, group) -> list:
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [obj]
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj, group=group)
    return out


def write_and_commit(staged: Staged, record: dict, keep_last: int, group=None) -> None:
    """Every rank writes and hashes its own staged files; rank 0 gathers the tables and
    completes the checkpoint: ``meta.json``, the rename into place, ``latest``, retention.
    A failure on any rank is raised on every rank. ``group``: the process group to
    gather on (a background save has its own)."""
    try:
        own, error = write_staged(staged), None
    except Exception as err:  # noqa: BLE001 - shared with every rank below
        own, error = {}, str(err) if isinstance(err, CheckpointError) else f"{type(err).__name__}: {err}"
    results = _gather((error, own), group)
    errors = [e for e, _ in results if e]
    if errors:
        raise CheckpointError(f"saving {staged.tmp} failed: {errors[0]}")
    if files.rank() == 0:
        _complete(staged.tmp, {name: e for _, table in results for name, e in table.items()}, record, keep_last)


def _complete(tmp: Path, table: dict, record: dict, keep_last: int) -> None:
    for entry in os.scandir(tmp):  # files DeepSpeed wrote itself (its recovery scripts): rank 0's
        if entry.is_file() and entry.name not in table and entry.name != META:
            table[entry.name] = files.file_digest(Path(entry.path))
    save_dir, tag = tmp.parent, files.tag_of_tmp(tmp)
    files.write_text_atomic(tmp / META, json.dumps({**record, "files": dict(sorted(table.items()))}, indent=2) + "\n")
    files.publish(tmp, save_dir / tag)
    files.write_text_atomic(save_dir / LATEST, tag + "\n")  # only now: the folder is whole
    prune(save_dir, keep_last, protect=tag)
    files.remove_leftovers(save_dir)


def _load_rank_state(tag_dir: Path, rank: int, reads: TagReads) -> dict | None:
    name = rank_state_name(rank)
    if name in reads.held:
        return torch.load(io.BytesIO(reads.held[name]), map_location="cpu", weights_only=True)
    path = tag_dir / name
    if not path.is_file():
        return None
    reads.bytes_read += path.stat().st_size
    return torch.load(path, map_location="cpu", weights_only=True)


def _reads_for(tag_dir: Path, universal: bool) -> TagReads:
    """This rank's verified reads of ``tag_dir``: kept from the verification that chose it,
    else read now (a collective; a damaged tag is an error). A universal resume loads the
    converted folder from the file system instead."""
    kept = shared_load.take(tag_dir)
    if universal:
        return TagReads(tag_dir)
    if kept is not None:
        return kept
    table = files.read_meta(tag_dir).get("files")
    if table is None:  # the older format: DeepSpeed reads the files (the shared ones once, broadcast)
        return TagReads(tag_dir)
    reads = shared_load.read_tag(tag_dir, table)
    if reads.problem:
        raise CheckpointError(f"checkpoint {tag_dir} is damaged: {reads.problem}")
    return reads


def load(engine, tag_dir: Path, same_world: bool, universal_tag: str | None) -> tuple[dict, int]:
    """DeepSpeed's load of ``tag_dir`` (or its universal conversion): the client state
    with ``rank_state`` (this rank's own saved state; None after a world-size change), and
    the checkpoint bytes this rank read from the file system, its verification included
    (``shared_load.py``: about its own share)."""
    tag = universal_tag or tag_dir.name
    reads = _reads_for(tag_dir, universal_tag is not None)
    with shared_file_reads(engine, reads):
        load_path, client_state = engine.load_checkpoint(
            str(tag_dir.parent), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )

    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    client_state = dict(client_state or {})
    older = client_state.pop("rank_states", None) or []  # the earlier format: a table in the client state
    mine = None
    if same_world:
        mine = _load_rank_state(tag_dir, files.rank(), reads)
        if mine is None and len(older) == files.world():
            mine = older[files.rank()]
    reads.held.clear()  # the memory goes now, not at the next resume
    if mine is not None:
        set_rng_state(mine["rng"])
        client_state["rank_state"] = mine["state"]
    else:
        warnings.warn(
            f"resumed {tag_dir} from {client_state.get('world_size')} ranks on {engine.dp_world_size}: "
            f"per-rank RNG and data positions are not restored",
            stacklevel=3,
        )
        client_state["rank_state"] = None
    return client_state, reads.bytes_read
