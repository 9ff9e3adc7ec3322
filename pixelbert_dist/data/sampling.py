"""Which samples each rank reads, in which order and batches, for every epoch.

Every backend (DALI, nvjpeg, PIL) draws its batches from ``epoch_plan`` and reads the
bytes through ``ShardIndex``, so they see the same samples in the same order, and the
loader state is just ``(epoch, batches consumed)``: exact resume needs no backend state.

The epoch plan (``N`` samples, ``W`` ranks, batch ``B``):

* order: a permutation of the N samples seeded by ``(seed, epoch)`` (identity without
  shuffling), the same on every rank, so one epoch covers every sample;
* default (``drop_last=False``, always in evaluation): the order is extended to
  ``ceil(N / W) * W`` slots by wrapping around to its start, as torch's
  DistributedSampler does. The at most ``W - 1`` extra slots are repeats flagged
  ``is_pad=True``: training uses them (a repeat is harmless), evaluation must exclude
  them. No sample is ever dropped, and every rank gets the same number of batches of the
  same sizes (the last batch may be partial), so collectives never hang;
* ``drop_last=True`` (training only): the order is cut to a multiple of ``W * B``; up
  to ``W * B - 1`` samples are skipped in that epoch, different ones each epoch;
* rank ``r`` takes slots ``r, r + W, r + 2W, ...`` and cuts them into batches of B;
* bucketing: within windows of ``bucket_window`` batches, the rank's samples are sorted
  by aspect ratio before cutting, and the window's full batches are then shuffled, so
  batches hold similar shapes (less padding) while the data order stays random.
"""
from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pixelbert_dist.data.shards import ShardFormatError, read_manifest


@dataclass(frozen=True)
class PlannedSample:
    index: int      # into ShardIndex
    is_pad: bool    # a wrap-around repeat (see the module docstring)


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return _rng(seed, epoch).permutation(n) if shuffle else np.arange(n)


def _bucketed(slots: list[PlannedSample], aspect: np.ndarray, batch_size: int,
              window: int, rng: np.random.Generator | None) -> list[list[PlannedSample]]:
    """Sort each window by aspect ratio, cut into batches, shuffle the full batches."""
    batches: list[list[PlannedSample]] = []
    step = window * batch_size
    for start in range(0, len(slots), step):
        chunk = slots[start:start + step]
        chunk = sorted(chunk, key=lambda s: float(aspect[s.index]))  # stable
        cut = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
        full = [b for b in cut if len(b) == batch_size]
        if rng is not None:
            full = [full[i] for i in rng.permutation(len(full))]
        batches.extend(full + [b for b in cut if len(b) < batch_size])
    return batches


def epoch_plan(num_samples: int, *, epoch: int, seed: int, rank: int, world_size: int,
               batch_size: int, shuffle: bool = True, drop_last: bool = False,
               aspect: np.ndarray | None = None,
               bucket_window: int = 16) -> list[list[PlannedSample]]:
    """This rank's batches for ``epoch`` (see the module docstring for the rules)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_size < 1 or num_samples < 1:
        raise ValueError(f"need batch_size >= 1 and samples >= 1 (got {batch_size}, {num_samples})")
    order = _epoch_order(num_samples, seed, epoch, shuffle)
    if drop_last:
        total = num_samples // (world_size * batch_size) * world_size * batch_size
        if total == 0:
            raise ValueError(f"drop_last with {num_samples} samples < world_size x batch_size "
                             f"= {world_size * batch_size} leaves no batch")
    else:
        total = -(-num_samples // world_size) * world_size
    slots = [PlannedSample(int(order[i % num_samples]), i >= num_samples)
             for i in range(rank, total, world_size)]
    if aspect is not None:
        rng = _rng(seed, epoch, rank, 1) if shuffle else None
        return _bucketed(slots, aspect, batch_size, bucket_window, rng)
    return [slots[i:i + batch_size] for i in range(0, len(slots), batch_size)]


@dataclass(frozen=True)
class SampleRef:
    key: str
    shard: int          # index into ShardIndex.paths
    jpg: tuple[int, int]   # (offset, size) of KEY.jpg's bytes in the tar
    meta: tuple[int, int]  # (offset, size) of KEY.json's bytes


def _scan_tar(path: Path, shard: int, expected: int) -> list[SampleRef]:
    """Offsets of every KEY.jpg / KEY.json pair; reads tar headers only."""
    refs: list[SampleRef] = []
    pending = None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                if ext == "jpg" and pending is None:
                    pending = (key, (member.offset_data, member.size))
                elif ext == "json" and pending is not None and pending[0] == key:
                    refs.append(SampleRef(key, shard, pending[1], (member.offset_data, member.size)))
                    pending = None
                else:
                    raise ShardFormatError(f"{path}: unexpected member {member.name!r} "
                                           "(expected KEY.jpg followed by KEY.json)")
    except (tarfile.TarError, EOFError) as err:
        raise ShardFormatError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from None
    if pending is not None or len(refs) != expected:
        raise ShardFormatError(f"{path}: holds {len(refs)} complete samples, the manifest "
                               f"says {expected} (truncated shard? rebuild it)")
    return refs


class ShardIndex:
    """Random access to the samples of a split directory (tar offsets, no extraction).

    File descriptors are opened lazily per process, so a copy inherited by a
    DataLoader worker opens its own.
    """

    def __init__(self, directory: str | Path):
        manifest = read_manifest(directory)
        self.directory = Path(directory)
        self.paths = manifest.shard_paths()
        self.samples: list[SampleRef] = []
        for shard, (info, path) in enumerate(zip(manifest.shards, self.paths)):
            self.samples.extend(_scan_tar(path, shard, info.num_samples))
        if not self.samples:
            raise ShardFormatError(f"{directory}: the manifest lists no samples")
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._aspect: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, shard: int, span: tuple[int, int]) -> bytes:
        if self._pid != os.getpid():  # forked: never share file offsets with the parent
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        data = os.pread(fd, span[1], span[0])
        if len(data) != span[1]:
            raise ShardFormatError(f"{self.paths[shard]}: short read at offset {span[0]} "
                                   "(shard changed since it was indexed?)")
        return data

    def jpeg(self, index: int) -> bytes:
        ref = self.samples[index]
        return self._read(ref.shard, ref.jpg)

    def meta(self, index: int) -> dict:
        ref = self.samples[index]
        try:
            meta = json.loads(self._read(ref.shard, ref.meta))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ShardFormatError(f"{self.paths[ref.shard]}: {ref.key}.json is not valid "
                                   f"JSON ({err})") from None
        if not isinstance(meta, dict) or not meta.get("captions"):
            raise ShardFormatError(f"{self.paths[ref.shard]}: {ref.key}.json has no 'captions'")
        return meta

    def aspect_ratios(self) -> np.ndarray:
        """width / height of every sample, from its KEY.json (read once, for bucketing)."""
        if self._aspect is None:
            values = []
            for i, ref in enumerate(self.samples):
                meta = self.meta(i)
                try:
                    values.append(float(meta["width"]) / float(meta["height"]))
                except (KeyError, TypeError, ValueError, ZeroDivisionError):
                    raise ShardFormatError(f"{self.paths[ref.shard]}: {ref.key}.json needs "
                                           "positive 'width' and 'height' for bucketing") from None
            self._aspect = np.asarray(values, dtype=np.float64)
        return self._aspect

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state
