"""``build_loader``: the one factory behind every image backend.

A ``Loader`` iterates over ONE epoch of this rank's batches (the batch contract in the
package README: images, image_sizes, input_ids, attention_mask, token_type_ids,
mlm_labels, itm_labels, keys, plus ``is_pad`` marking wrap-around repeats that
evaluation must exclude, see ``readers.plan`` for the epoch/rank rules, and ``captions``,
each image's own caption after any flip swap, for debugging: ITM-negative rows are
tokenised from another row's caption).

Everything random is a pure function of the config seed and the position, never of
the backend or of worker timing:
* sample order: ``(seed, epoch)``; caption choice and flip: ``(seed, epoch, key)``;
* MLM/ITM draws: a generator seeded by ``(seed, epoch, global batch index)`` where the
  global index is ``batch * world_size + rank``.
So the state is ``{epoch, batches_done}`` (plus fingerprints to refuse a mismatched
restore), and a restored loader, in a fresh object or with another backend, yields
exactly the batches an uninterrupted run would have. Every rank consumes the same
number of batches, so the state is identical on all ranks: rank 0's copy (what
DeepSpeed keeps as ``client_state``) restores any rank.

Damaged samples (a JPEG changed inside a finished shard, a truncated shard, an
undecodable JPEG) never stop a run: ``damage`` replaces each by a deterministic
stand-in, ``loader.damaged`` counts them, ``batch["damaged"]`` says how many in that
batch, and each shard:key is named once in the log.

Epoch protocol: ``set_epoch(e)`` for a new ``e`` starts that epoch at batch 0; for the
current epoch it keeps the position (so ``load_state_dict`` then ``set_epoch`` of the
same epoch resumes). Iterating a finished epoch again starts it over.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import astuple, dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from pixelbert_dist.config import ConfigError
from pixelbert_dist.data.base import (
    BatchAccounting,
    BatchLoader,
    PlannedLoader,
    batch_generator,
    hash_unit,
)
from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.data.decode.dali import DaliImages
from pixelbert_dist.data.format.foreign_index import SOURCE as FOREIGN_SOURCE
from pixelbert_dist.data.format.foreign_index import caption_key_mismatch
from pixelbert_dist.data.readers.dali_wds import WebdatasetLoader
from pixelbert_dist.data.decode.images import swap_left_right
from pixelbert_dist.data.readers.plan import PLAN_ORDER, EpochPlan, Replan, epoch_plan, shard_window_order
from pixelbert_dist.data.readers.indexed import ShardIndex
from pixelbert_dist.data.decode.stream_pixels import stream_images
from pixelbert_dist.data.readers.stream import StreamLoader
from pixelbert_dist.data.readers.stream_urls import is_stream
from pixelbert_dist.data.text import TextCollator, load_tokenizer
from pixelbert_dist.data.decode.torch_loader import PilImages, nvjpeg_images

_hash_unit = hash_unit  # the name other modules imported before base.py existed


@dataclass(frozen=True)
class FlipRule:
    """Whether the image of ``key`` is flipped this epoch (picklable, for workers)."""

    seed: int
    epoch: int
    enabled: bool

    def __call__(self, key: str) -> bool:
        return self.enabled and hash_unit(self.seed, self.epoch, key, "flip") < 0.5


class BatchText:
    """The text half of a batch from the samples' keys and metadata: the caption choice
    (a hash of seed, epoch and key), its left/right swap under a flip, and the MLM/ITM
    collation seeded by the global batch index. Shared by the indexed and streaming loaders."""

    def __init__(self, cfg: DataConfig, collator, rank: int, world_size: int, train: bool):
        self.cfg, self.collator = cfg, collator
        self.rank, self.world_size, self.train = rank, world_size, train

    def flip_rule(self, epoch: int) -> FlipRule:
        return FlipRule(self.cfg.seed, epoch, self.train and self.cfg.hflip)

    def __call__(self, keys: list[str], metas: list[dict], flips: list[bool], is_pad, k: int, epoch: int) -> dict:
        captions, image_ids = [], []
        for key, meta, flip in zip(keys, metas, flips):
            caps = meta["captions"]
            caption = caps[int(hash_unit(self.cfg.seed, epoch, key, "caption") * len(caps))]
            captions.append(swap_left_right(caption) if flip else caption)
            image_ids.append(str(meta.get("image_id", key)))
        generator = batch_generator(self.cfg.seed, epoch, k * self.world_size + self.rank)
        out = self.collator(captions, image_ids, generator)
        out["keys"] = list(keys)
        out["captions"] = captions
        out["is_pad"] = torch.as_tensor(np.asarray(is_pad, dtype=bool)).clone()
        return out


class PlanBatches(Sequence):
    """The sample-index arrays of a plan's batches from ``start`` on (what the image
    backends' ``samples()`` read)."""

    def __init__(self, plan: EpochPlan, start: int):
        self.plan, self.start = plan, start

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def __getitem__(self, k: int):
        return self.plan[self.start + k].indices


class Loader(PlannedLoader, BatchAccounting):
    """One rank's view of a shard directory; see the module docstring."""

    def __init__(
        self,
        cfg: DataConfig,
        index: ShardIndex,
        images,
        collator,
        batch_size: int,
        rank: int,
        world_size: int,
        train: bool,
        device: torch.device,
    ):
        self.cfg, self.index, self.images, self.collator = cfg, index, images, collator
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.train = train
        self.backend = images.name
        self.text = BatchText(cfg, collator, rank, world_size, train)
        self.replans: tuple[Replan, ...] = ()
        super().__init__()
        self._init_accounting(device)

    # -- plan and state ---------------------------------------------------------------
    @property
    def _windowed(self) -> bool:
        return self.train and self.cfg.shuffle and self.cfg.shard_window > 0

    def _new_plan(self, epoch: int) -> EpochPlan:
        aspect = self.index.aspect_of if self.cfg.bucketing else None
        return epoch_plan(
            len(self.index),
            epoch=epoch,
            seed=self.cfg.seed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            shuffle=self.train and self.cfg.shuffle,
            drop_last=self.train and self.cfg.drop_last,
            aspect=aspect,
            bucket_window=self.cfg.bucket_window,
            shard_counts=self.index.counts if self._windowed else None,
            shard_window=self.cfg.shard_window,
            replans=self.replans if epoch == self.epoch else (),
        )

    @property
    def plan_order(self) -> str:
        return shard_window_order(self.cfg.shard_window) if self._windowed else PLAN_ORDER

    def state_dict(self) -> dict:
        """Beyond the fingerprint: what a re-plan at another world size needs (the block
        each rank reads, the bucketing window it rounds to, earlier re-plans)."""
        state = super().state_dict()
        if self._windowed:
            state["per_rank"] = self.plan().per_rank
            state["bucket_window"] = self.cfg.bucket_window if self.cfg.bucketing else 1
            state["replans"] = [astuple(r) for r in self.replans]
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.replans = tuple(Replan(*r) for r in state.get("replans", ()))
        self._plan_cache = None

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.replans = ()  # a re-plan continues one epoch; the next starts whole
        super().set_epoch(epoch)

    def _fingerprint(self) -> dict:
        return {
            "num_samples": len(self.index),
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.cfg.seed,
            "shuffle": self.train and self.cfg.shuffle,
            "bucketing": self.cfg.bucketing,
            "drop_last": self.train and self.cfg.drop_last,
        }

    # -- batches ----------------------------------------------------------------------
    def _flip_rule(self) -> FlipRule:
        return self.text.flip_rule(self.epoch)

    def _flip(self, key: str) -> bool:
        return self._flip_rule()(key)

    def _text(self, samples, flips: list[bool], is_pad, k: int) -> dict:
        metas = [self.index.meta(sample.index, sample) for sample in samples]
        return self.text([s.key for s in samples], metas, flips, is_pad, k, self.epoch)

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan()
        start = self.batches_done if self.batches_done < len(plan) else 0
        self.batches_done = start
        decoded = self.images.samples(PlanBatches(plan, start), self._flip_rule())
        for k, got in enumerate(decoded, start):
            batch = self._text(got.samples, got.flips, plan[k].is_pad, k)
            batch["images"], batch["image_sizes"] = got.images, got.sizes
            batch["damaged"] = self._record_damage(got.damaged)
            self._count_pixels(got.images, got.sizes)
            self.batches_done = k + 1
            yield self._to_device(batch)


def images_backend(cfg: DataConfig, index: ShardIndex, batch_size: int, device: torch.device):
    args = (index, batch_size, cfg.image_shorter, cfg.image_max)
    if cfg.backend == "dali":
        return DaliImages(*args, num_threads=cfg.num_workers, prefetch=cfg.prefetch, device=device)
    if cfg.backend == "nvjpeg":
        return nvjpeg_images(*args, device=device)
    return PilImages(*args, num_workers=cfg.num_workers, prefetch=cfg.prefetch, device=device)


def build_loader(
    cfg: DataConfig,
    shards_dir,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    train: bool = True,
    tokenizer=None,
) -> BatchLoader:
    """A loader over ``shards_dir`` for this rank: a split directory (indexed, any
    backend) or a brace pattern / URL / ``pipe:`` (streaming, ``readers/stream.py``).
    ``train=False`` is evaluation: no shuffle, no flip, no MLM masking or ITM negatives,
    and no sample ever dropped (indexed mode)."""
    cfg.validate()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    if is_stream(shards_dir) and cfg.dali_reader == "webdataset":
        raise ConfigError(
            f"streamed shards ({shards_dir!r}) reach DALI through its external source: "
            "its webdataset reader opens local files only; set data.dali_reader='external'"
        )
    index = None if is_stream(shards_dir) else ShardIndex(shards_dir, cfg.caption_key)
    if index is not None and index.source == FOREIGN_SOURCE:
        mismatch = caption_key_mismatch(shards_dir, index.indexed_caption_key, cfg.caption_key)
        if mismatch is not None:
            raise ConfigError(mismatch)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.vocab_dir)
    collator = TextCollator(
        tokenizer, cfg.max_text_len, cfg.mlm_prob if train else 0.0, cfg.itm_neg_prob if train else 0.0
    )
    if index is None:
        text = BatchText(cfg, collator, rank, world_size, train)
        return StreamLoader(
            cfg,
            str(shards_dir),
            text,
            stream_images(cfg, batch_size, device),
            batch_size,
            rank,
            world_size,
            train,
            device,
        )
    if cfg.backend == "dali" and cfg.dali_reader == "webdataset":
        if index.source == FOREIGN_SOURCE:
            raise ConfigError(
                f"{shards_dir} holds foreign webdataset shards (indexed by make_shards.py index): DALI's "
                "webdataset reader takes KEY.jpg + KEY.json only; set data.dali_reader='external'"
            )
        # DALI's own reader + pipeline checkpoints (dali_wds.py), instead of the epoch plan.
        return WebdatasetLoader(cfg, index, collator, batch_size, rank, world_size, train, device)
    images = images_backend(cfg, index, batch_size, device)
    return Loader(cfg, index, images, collator, batch_size, rank, world_size, train, device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Read a few batches and print shapes, padding and images/s.")
    parser.add_argument("--shards", required=True, help="split directory with manifest.json")
    parser.add_argument("--backend", default="dali", choices=["dali", "nvjpeg", "pil"])
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shorter", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--bucketing", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    cfg = DataConfig(
        train_shards=args.shards,
        backend=args.backend,
        image_shorter=args.shorter,
        image_max=args.max_size,
        bucketing=args.bucketing,
        num_workers=args.workers,
    )
    loader = build_loader(cfg, args.shards, args.batch_size, device=args.device)
    print(f"{args.shards}: {len(loader.index)} samples, {len(loader)} batches/epoch, backend {loader.backend}")
    images, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if i == args.batches:
            break
        images += batch["images"].shape[0]
        print(
            f"batch {i}: images {tuple(batch['images'].shape)} input_ids "
            f"{tuple(batch['input_ids'].shape)} keys {batch['keys'][:3]}..."
        )
    seconds = time.perf_counter() - start
    print(
        f"{images} images in {seconds:.2f}s = {images / seconds:.1f} img/s "
        f"(incl. start-up); padding fraction {loader.padding_fraction:.3f}"
    )


if __name__ == "__main__":
    main()
