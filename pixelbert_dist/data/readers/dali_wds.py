"""The ``dali_reader="webdataset"`` mode: DALI's own ``fn.readers.webdataset`` reads the
tars, sharded by rank, and exact resume goes through DALI pipeline checkpointing.

How it differs from the default ``external`` mode (``dali.py``, one global epoch plan
shared by every backend):

* Sharding is DALI's: rank ``r`` of ``W`` reads the contiguous samples
  ``[floor(s*N/W), floor((s+1)*N/W))`` of shard ``s``, shuffled inside the reader's
  ``initial_fill`` buffer (DALI's default, 1024 samples), not globally. Each epoch gets
  a fresh pipeline seeded by ``(seed, epoch)``; in training the shard moves on by one
  each epoch (``s = (r + epoch) % W``, what DALI's ``stick_to_shard=False`` would do), so
  over ``W`` epochs every rank sees every part of the data. The order differs from the
  other backends' and a state of one mode never restores the other.
* Epoch end: shards differ in size by at most one sample. ``pad_last_batch=True`` makes
  DALI repeat a shard's last sample until the shard holds ``ceil(N/W)`` samples (reader
  meta ``epoch_size_padded``) and its last batch is full: ``ceil(ceil(N/W) / B)`` batches
  of ``B`` on every rank (a short shard may get a batch made only of repeats), so
  every rank runs the same number of batches and collectives never hang. Rows at a
  position past the shard's size are those repeats: they carry ``is_pad=True``, training
  uses them, evaluation must not count them. No sample is ever dropped, except with
  ``drop_last`` in training, where each rank runs ``floor(floor(N/W) / B)`` full batches.
* hflip: the reader decides the sample order inside DALI, so the flip cannot be a hash of
  the key computed before decode. ``fn.random.coin_flip`` (p=0.5, seeded by the
  pipeline seed) draws it, the flag comes back as an output and the caption's
  left/right swap follows it. The op is there with p=0 when flipping is off, so the
  sample order does not depend on ``hflip``.
* Every rank uses the same pipeline seed (a rank shuffles and flips its own samples with
  the same pattern as the others: harmless, the samples differ). That makes the DALI
  checkpoint rank-independent (checked by the tests), so rank 0's loader state, which is
  what DeepSpeed keeps, restores every rank, as in the external mode.

Everything else follows the loader contract (``loader.py``): captions chosen by
``(seed, epoch, key)``, MLM/ITM draws by ``batch_generator(seed, epoch, k * W + r)``,
images normalised and zero-padded to x64, ``image_sizes``, ``keys``, ``captions``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from pixelbert_dist.data.base import STATE_VERSION as BASE_STATE_VERSION
from pixelbert_dist.data.base import BatchAccounting, LoaderState, batch_generator, hash_unit
from pixelbert_dist.data.decode.dali import _to_torch, dali_available
from pixelbert_dist.data.decode.damage import Damaged
from pixelbert_dist.data.decode.images import MEAN_255, PAD_MULTIPLE, STD_255, swap_left_right
from pixelbert_dist.data.format.index import crc32
from pixelbert_dist.data.format.index import ShardFormatError
from pixelbert_dist.data.format.members import NoCaption, caption_meta

STATE_VERSION = "webdataset-1"  # never equal to loader.STATE_VERSION: the modes refuse each other
INDEX_DIR = ".dali_index"  # next to the tars when that directory is writable
READER = "Reader"


# -- DALI index files ---------------------------------------------------------------
def _index_text(index, shard: int) -> str:
    """DALI's webdataset index (format v1.2, what its ``wds2idx`` writes): a header
    ``v1.2 N``, then per sample ``ext offset size name`` for each component."""
    refs = (index.ref(i) for i in range(int(index.starts[shard]), int(index.starts[shard + 1])))
    lines = [f"jpg {s.jpg[0]} {s.jpg[1]} {s.key}.jpg json {s.meta[0]} {s.meta[1]} {s.key}.json" for s in refs]
    return "".join([f"v1.2 {len(lines)}\n"] + [line + "\n" for line in lines])


def _is_current(path: Path, tar: Path, count: int) -> bool:
    """An index file written after the tar, for as many samples, is reused as it is
    (rewriting it would read every sample's tar header at every start)."""
    if not path.is_file() or path.stat().st_mtime < Path(tar).stat().st_mtime:
        return False
    with open(path) as f:
        return f.readline().split() == ["v1.2", str(count)]


def index_dir(shards_dir: str | Path) -> Path:
    """``DIR/.dali_index`` if the shard directory is writable, else a folder under the
    system temp dir named by the shard directory's path (the shards are never touched)."""
    shards_dir = Path(shards_dir).resolve()
    if os.access(shards_dir, os.W_OK):
        return shards_dir / INDEX_DIR
    digest = hashlib.sha256(str(shards_dir).encode()).hexdigest()[:16]
    # Per user: another user's folder of the same name is never read or written.
    return Path(tempfile.gettempdir()) / f"pixelbert_dali_index-{os.getuid()}" / digest


def write_index_files(index) -> list[str]:
    """One DALI index per tar, from the shard index sidecars. Without them DALI rescans
    every tar at each pipeline build (one per epoch here). A file is written only when
    missing or older than its tar; the write is atomic, so ranks sharing a node can all
    call this."""
    folder = index_dir(index.directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, tar in enumerate(index.paths):
        path = folder / (Path(tar).name + ".idx")
        count = int(index.starts[shard + 1] - index.starts[shard])
        if not _is_current(path, tar, count):
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(_index_text(index, shard))
            os.replace(tmp, path)
        paths.append(str(path))
    return paths


# -- epoch geometry -------------------------------------------------------------------
def shard_bounds(num_samples: int, shard: int, num_shards: int) -> tuple[int, int]:
    """The sample range DALI's readers give shard ``shard`` of ``num_shards``."""
    return shard * num_samples // num_shards, (shard + 1) * num_samples // num_shards


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int, drop_last: bool) -> int:
    if drop_last:
        return num_samples // world_size // batch_size
    per_rank = -(-num_samples // world_size)  # ceil: the last rank's share is padded
    return -(-per_rank // batch_size)


def epoch_seed(seed: int, epoch: int) -> int:
    """The pipeline seed of an epoch: the same on every rank (see the module docstring)."""
    return int(np.random.SeedSequence([seed, epoch, 0x57D5]).generate_state(1)[0]) & 0x7FFFFFFF


def _build_pipeline(
    paths,
    index_paths,
    *,
    shard_id: int,
    num_shards: int,
    batch_size: int,
    shuffle: bool,
    flip: bool,
    seed: int,
    shorter: int,
    max_size: int,
    num_threads: int,
    prefetch: int,
    device_id: int | None,
    checkpoint: bytes | None,
):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        seed=seed,
        exec_dynamic=True,
        enable_checkpointing=True,
    )
    def pipe():
        jpegs, metas = fn.readers.webdataset(
            paths=paths,
            index_paths=index_paths,
            ext=["jpg", "json"],
            missing_component_behavior="error",
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=shuffle,
            pad_last_batch=True,
            stick_to_shard=True,
            name=READER,
        )
        source = fn.get_property(jpegs, key="source_info")  # "TAR:OFFSET:KEY.jpg"
        mirror = fn.random.coin_flip(probability=0.5 if flip else 0.0, dtype=types.INT32)
        images = fn.decoders.image(jpegs, device="mixed" if device_id is not None else "cpu", output_type=types.RGB)
        # The resize rule of images.resized_size, antialiased as in dali.py / PIL.
        images = fn.resize(
            images, resize_shorter=shorter, max_size=max_size, antialias=True, interp_type=types.INTERP_LINEAR
        )
        sizes = images.shape()
        images = fn.crop_mirror_normalize(
            images, mirror=mirror, mean=list(MEAN_255), std=list(STD_255), output_layout="CHW", dtype=types.FLOAT
        )
        images = fn.pad(images, axes=(1, 2), align=PAD_MULTIPLE, fill_value=0.0)
        return images, sizes, metas, source, mirror, jpegs

    built = pipe(checkpoint=checkpoint)
    built.build()
    return built


def _key_of(source) -> str:
    name = np.asarray(source).tobytes().decode("utf-8").rsplit(":", 1)[-1]
    return name.rsplit("/", 1)[-1].partition(".")[0]


def _meta_of(raw, key: str, directory, caption_key: str) -> dict:
    try:
        return caption_meta(None, np.asarray(raw).tobytes(), caption_key)
    except NoCaption as err:
        raise ShardFormatError(f"{directory}: {key}.json: {err}") from None


class WebdatasetLoader(LoaderState, BatchAccounting):
    """A loader (``base.BatchLoader``) whose samples come from DALI's webdataset reader
    (module docstring). It has no epoch plan: the order lives inside DALI. A JPEG whose
    bytes no longer match the index's CRC is replaced by another row of its batch and
    counted (``damaged``); a truncated shard or an undecodable JPEG still stops DALI's
    reader here (the default ``dali_reader='external'`` replaces those too). The state adds
    ``dali_checkpoint``: base64 of ``Pipeline.checkpoint()`` taken after exactly
    ``batches_done`` batches (DALI accounts for its prefetch queue; the tests check it).
    """

    def __init__(
        self, cfg, index, collator, batch_size: int, rank: int, world_size: int, train: bool, device: torch.device
    ):
        if not dali_available():
            raise RuntimeError(
                "data.dali_reader='webdataset' needs NVIDIA DALI (pip install "
                "nvidia-dali-cuda130); use data.backend='pil' without it"
            )
        device_id = (device.index or 0) if device.type == "cuda" else None
        self.backend = "dali-gpu-wds" if device_id is not None else "dali-cpu-wds"
        self.cfg, self.index, self.collator = cfg, index, collator
        self.batch_size, self.rank, self.world_size, self.train = batch_size, rank, world_size, train
        super().__init__()
        self._init_accounting(device)
        self.device_id = device_id
        self.index_paths = write_index_files(index)
        self._shard_of = {str(path): shard for shard, path in enumerate(index.paths)}
        self.shuffle = train and cfg.shuffle
        self.drop_last = train and cfg.drop_last
        if len(self) == 0:
            raise ValueError(
                f"drop_last with {len(index)} samples over {world_size} ranks of batch {batch_size} leaves no batch"
            )
        self._pipe, self._pipe_at = None, None  # live pipeline, (epoch, batches) it is at
        self._loaded: tuple[int, int, bytes] | None = None  # a restored checkpoint

    # -- geometry and state -----------------------------------------------------------
    def __len__(self) -> int:
        return batches_per_epoch(len(self.index), self.world_size, self.batch_size, self.drop_last)

    def shard(self, epoch: int | None = None) -> int:
        """The DALI shard this rank reads in ``epoch``."""
        epoch = self.epoch if epoch is None else epoch
        return (self.rank + epoch) % self.world_size if self.shuffle else self.rank

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            super().set_epoch(epoch)
            self._pipe = self._pipe_at = self._loaded = None

    def _fingerprint(self) -> dict:
        return {
            "num_samples": len(self.index),
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.cfg.seed,
            "shuffle": self.shuffle,
            "bucketing": self.cfg.bucketing,
            "drop_last": self.drop_last,
            "dali_reader": "webdataset",
            "hflip": self.train and self.cfg.hflip,
        }

    def _checkpoint(self) -> bytes | None:
        """DALI's checkpoint for the current position (None where none is needed)."""
        if self.batches_done == 0 or self.batches_done >= len(self):
            return None
        if self._pipe is not None and self._pipe_at == (self.epoch, self.batches_done):
            return self._pipe.checkpoint()
        if self._loaded is not None and self._loaded[:2] == (self.epoch, self.batches_done):
            return self._loaded[2]
        raise RuntimeError(
            f"no DALI checkpoint for epoch {self.epoch} batch "
            f"{self.batches_done}: the position was set by hand; the "
            "webdataset reader resumes only where it stopped or was restored"
        )

    def state_dict(self) -> dict:
        checkpoint = self._checkpoint()
        return {
            **super().state_dict(),
            "version": STATE_VERSION,
            "dali_checkpoint": None if checkpoint is None else base64.b64encode(checkpoint).decode("ascii"),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data loader state version {state.get('version')!r} is not "
                f"{STATE_VERSION!r}: it was saved by another data.dali_reader "
                "mode, whose sample order differs"
            )
        raw, encoded = None, state.get("dali_checkpoint")
        if encoded is not None:
            try:
                raw = base64.b64decode(encoded, validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ValueError("data loader state: 'dali_checkpoint' is not base64") from None
        if raw is None and 0 < int(state.get("batches_done", 0)) < len(self):
            raise ValueError(
                f"data loader state stops inside epoch {state.get('epoch')} "
                f"(batch {state['batches_done']} of {len(self)}) but has no "
                "'dali_checkpoint' to resume the DALI reader from"
            )
        super().load_state_dict({**state, "version": BASE_STATE_VERSION})
        self._pipe = self._pipe_at = None
        self._loaded = None if raw is None else (self.epoch, self.batches_done, raw)

    # -- batches ----------------------------------------------------------------------
    def _stand_ins(self, sources, raw, keys: list[str]) -> tuple[list[int], list[Damaged]]:
        """Which row each row of a batch takes: its own, or, for a JPEG whose bytes no
        longer match the index's CRC, the next sound row of the same batch (DALI has
        decoded it already; the batch keeps its size and resume its DALI checkpoint)."""
        bad, events = set(), []
        for row, (source, data) in enumerate(zip(sources, raw)):
            path, offset, _ = np.asarray(source).tobytes().decode("utf-8").rsplit(":", 2)
            stored = self.index.crc_at(self._shard_of[path], int(offset))
            if stored is None or crc32(np.asarray(data).tobytes()) != stored:
                bad.add(row)
                events.append(
                    Damaged(
                        f"{Path(path).name}:{keys[row]}",
                        "checksum mismatch (bytes changed after the shard was written)",
                        -1,
                    )
                )
        n = len(keys)
        if len(bad) == n:
            raise ShardFormatError(f"every sample of a batch is damaged ({events[0].where}, ...)")
        return [next(j % n for j in range(i, i + n) if j % n not in bad) for i in range(n)], events

    def _build(self, checkpoint: bytes | None):
        pipe = self._build_pipeline(checkpoint)
        meta = pipe.reader_meta(READER)
        # The epoch geometry (is_pad, len) is computed from the manifest's count; DALI
        # must have found the same samples in the tars and padded every shard alike.
        padded = self.world_size * -(-len(self.index) // self.world_size)
        if (meta["epoch_size"], meta["epoch_size_padded"]) != (len(self.index), padded):
            raise ShardFormatError(
                f"{self.index.directory}: DALI's webdataset reader sees "
                f"{meta['epoch_size']} samples (padded "
                f"{meta['epoch_size_padded']}), the manifest "
                f"{len(self.index)} (padded {padded})"
            )
        return pipe

    def _build_pipeline(self, checkpoint: bytes | None):
        try:
            return _build_pipeline(
                [str(p) for p in self.index.paths],
                self.index_paths,
                shard_id=self.shard(),
                num_shards=self.world_size,
                batch_size=self.batch_size,
                shuffle=self.shuffle,
                flip=self.train and self.cfg.hflip,
                seed=epoch_seed(self.cfg.seed, self.epoch),
                shorter=self.cfg.image_shorter,
                max_size=self.cfg.image_max,
                num_threads=max(1, self.cfg.num_workers),
                prefetch=max(1, self.cfg.prefetch),
                device_id=self.device_id,
                checkpoint=checkpoint,
            )
        except RuntimeError as err:
            if checkpoint is None:
                raise
            raise ValueError(
                f"DALI could not restore the loader state's 'dali_checkpoint' "
                f"(saved with another DALI version or pipeline?): {err}"
            ) from None

    def _collate_text(self, metas: list[dict], keys: list[str], flips: list[bool], k: int, shard_size: int) -> dict:
        captions, image_ids = [], []
        for meta, key, flip in zip(metas, keys, flips):
            caps = meta["captions"]
            caption = caps[int(hash_unit(self.cfg.seed, self.epoch, key, "caption") * len(caps))]
            captions.append(swap_left_right(caption) if flip else caption)
            image_ids.append(str(meta.get("image_id", key)))
        generator = batch_generator(self.cfg.seed, self.epoch, k * self.world_size + self.rank)
        out = self.collator(captions, image_ids, generator)
        out["keys"], out["captions"] = keys, captions
        positions = torch.arange(k * self.batch_size, (k + 1) * self.batch_size)
        out["is_pad"] = positions >= shard_size
        return out

    def __iter__(self) -> Iterator[dict]:
        total = len(self)
        if self.batches_done >= total:
            self.batches_done = 0
        start = self.batches_done
        pipe = self._build(self._checkpoint())
        self._pipe, self._pipe_at, self._loaded = pipe, (self.epoch, start), None
        begin, end = shard_bounds(len(self.index), self.shard(), self.world_size)
        for k in range(start, total):
            images, sizes, metas, sources, mirror, raw = pipe.run()
            keys = [_key_of(s) for s in sources]
            rows, damaged = self._stand_ins(sources, raw, keys)
            keys = [keys[r] for r in rows]
            metas = [_meta_of(metas[r], key, self.index.directory, self.cfg.caption_key) for r, key in zip(rows, keys)]
            flips = [bool(np.asarray(mirror[r])) for r in rows]
            batch = self._collate_text(metas, keys, flips, k, end - begin)
            batch["images"] = _to_torch(images, self.device)[rows]
            batch["image_sizes"] = torch.tensor(np.stack([np.asarray(sizes[r])[:2] for r in rows]), dtype=torch.int64)
            batch["damaged"] = self._record_damage(damaged)
            self._count_pixels(batch["images"], batch["image_sizes"])
            self.batches_done = k + 1
            if self._pipe is pipe:
                self._pipe_at = (self.epoch, k + 1)
            yield self._to_device(batch)
