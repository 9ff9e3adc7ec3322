"""The two halves of a save: the copy of the state to host memory (the step loop waits
for it), and the writing of that copy (fsync, sha256), which may run in a thread.

``StagingEngine`` stands in for DeepSpeed's checkpoint engine during
``engine.save_checkpoint``: DeepSpeed still decides what goes in which file (so the
format is DeepSpeed's own, and ``load_checkpoint`` reads it back as ever), but each
``save(state, path)`` only copies the tensors to CPU and keeps them. ``write_staged``
then writes the files this rank produced, and only those: every rank knows its own files
and hashes them while they are in its page cache, and no rank stats a file it did not
write (an O(world) cost per rank at save would be O(world^2) over the job).

Why not DeepSpeed 0.19's decoupled / fast-persist engines: the decoupled engine hands the
live state dicts to a per-rank subprocess through a multiprocessing queue without a host
copy (training then updates the tensors it is still writing: no consistent snapshot on
CPU), commits only at the next save or at exit (nowhere to hash, fsync and rename the
folder before ``latest`` moves), and sizes the folder by walking it on every rank. Its
fast-persist writer is synchronous. So the copy and the commit stay here, around
DeepSpeed's own file layout.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from pixelbert_dist.checkpoint.files import CheckpointError

# A test-only pause (seconds) before each file is written, so that a test can kill a
# process while a background save is in flight. Never set in a real run.
SLOW_WRITER_ENV = "PIXELBERT_TEST_SLOW_CHECKPOINT_WRITER"


@dataclass
class Staged:
    """What one rank has to write for one save: ``(path, host copy)`` pairs."""

    tmp: Path  # the hidden folder of the save in progress
    files: list[tuple[Path, object]] = field(default_factory=list)
    seconds: float = 0.0  # the device-to-host copy: what the step loop waited for

    def add(self, path: str | Path, state) -> None:
        self.files.append((Path(path), state))


class HostBuffers:
    """Host tensors reused from one save to the next (as torchtitan's pinned-memory
    staging does): the copy of a later save lands in memory that is already mapped, instead
    of paying a page fault per 4 KiB of a fresh allocation. Safe because one save is in
    flight at a time: the previous save's files are written before the next copy starts."""

    def __init__(self):
        self._tensors: dict[tuple, torch.Tensor] = {}

    def copy(self, item, key: tuple):
        """``item`` with every tensor copied to host memory (containers rebuilt, so later
        changes to the caller's dicts and lists do not reach the copy)."""
        if torch.is_tensor(item):
            held = self._tensors.get(key)
            if held is None or held.shape != item.shape or held.dtype != item.dtype:
                held = self._tensors[key] = torch.empty(item.shape, dtype=item.dtype, device="cpu")
            return held.copy_(item.detach())
        if isinstance(item, dict):
            return type(item)({k: self.copy(v, (*key, k)) for k, v in item.items()})
        if isinstance(item, list):
            return [self.copy(v, (*key, i)) for i, v in enumerate(item)]
        if isinstance(item, torch.Size):  # shapes stay shapes: zero_to_fp32 calls .numel() on them
            return item
        if isinstance(item, tuple):
            values = [self.copy(v, (*key, i)) for i, v in enumerate(item)]
            return type(item)(*values) if hasattr(item, "_fields") else type(item)(values)
        return item


class StagingEngine(CheckpointEngine):
    """DeepSpeed's checkpoint-engine interface: ``save`` copies to CPU and keeps the copy."""

    def __init__(self, staged: Staged, buffers: HostBuffers):
        super().__init__()
        self.name = "StagingEngine"
        self.staged = staged
        self.buffers = buffers

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        start = time.perf_counter()
        self.staged.add(path, self.buffers.copy(state_dict, (Path(path).name,)))
        self.staged.seconds += time.perf_counter() - start

    def load(self, path: str, map_location=None):
        raise NotImplementedError("the staging engine only saves")

    def commit(self, info) -> bool:
        return True

    def preserves_storage_sharing(self) -> bool:
        return False  # save() makes its own copy: DeepSpeed need not clone first


def stage_engine_save(engine, tmp: Path, client_state: dict, buffers: HostBuffers) -> Staged:
    """``engine.save_checkpoint`` into ``tmp`` with every file kept in host memory instead."""
    staged = Staged(tmp)
    real = engine.checkpoint_engine
    engine.checkpoint_engine = StagingEngine(staged, buffers)
    try:
        engine.save_checkpoint(str(tmp.parent), tag=tmp.name, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine = real
    return staged


def device_of(path: Path) -> str:
    """The file system holding ``path`` as the mount table names it (``/dev/nvme0n1p2``,
    ``overlay``, ``lustre``...), or its mount point when the table cannot be read."""
    path, best = os.path.realpath(path), ("", "?")
    try:
        with open("/proc/self/mounts") as fh:
            for line in fh:
                source, point = line.split()[:2]
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best[0]):
                    best = (point, source)
    except OSError:
        pass
    return best[1]


def no_space_error(err: OSError | RuntimeError, path: Path) -> CheckpointError:
    """One line for a full disk (torch says "iostream error" over four tracebacks)."""
    return CheckpointError(
        f"no space left on {device_of(path.parent)} at {path.parent}: the checkpoint was not written "
        f"({getattr(err, 'strerror', None) or err}); the previous checkpoint is intact. "
        "Free space, or lower train.keep_last"
    )


def _is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in ("iostream", "No space left", "write failed"))


def write_file(path: Path, state) -> dict:
    """``torch.save`` to ``path``, fsync'd; its size and sha256 (hashed from the bytes
    just written, still in the page cache)."""
    pause = float(os.environ.get(SLOW_WRITER_ENV, "0") or 0)
    if pause:
        time.sleep(pause)
    try:
        with open(path, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except (OSError, RuntimeError) as err:
        if _is_disk_full(err):
            raise no_space_error(err, path) from None
        raise
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"size": os.path.getsize(path), "sha256": digest}


def write_staged(staged: Staged) -> dict[str, dict]:
    """Write this rank's staged files; ``name -> {size, sha256}`` of each."""
    return {path.name: write_file(path, state) for path, state in staged.files}
