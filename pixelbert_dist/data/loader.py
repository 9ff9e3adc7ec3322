"""``build_loader``: the one factory behind every image backend.

A ``Loader`` iterates over ONE epoch of this rank's batches (the batch contract in the
package README: images, image_sizes, input_ids, attention_mask, token_type_ids,
mlm_labels, itm_labels, keys, plus ``is_pad`` marking wrap-around repeats that
evaluation must exclude, see ``sampling`` for the epoch/rank rules, and ``captions``,
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

Epoch protocol: ``set_epoch(e)`` for a new ``e`` starts that epoch at batch 0; for the
current epoch it keeps the position (so ``load_state_dict`` then ``set_epoch`` of the
same epoch resumes). Iterating a finished epoch again starts it over.
"""
from __future__ import annotations

import argparse
import hashlib
import time
from typing import Iterator

import numpy as np
import torch

from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.data.images import padded_batch_size, swap_left_right
from pixelbert_dist.data.sampling import PlannedSample, ShardIndex, epoch_plan

STATE_VERSION = 1


def _hash_unit(*words) -> float:
    """A uniform number in [0, 1) from the words (stable across processes and runs)."""
    digest = hashlib.blake2b("\x1f".join(map(str, words)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


def batch_generator(seed: int, epoch: int, global_batch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch, global_batch]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class PlannedLoader:
    """What every planned loader shares: a cached epoch plan, the epoch protocol of the
    module docstring, and a JSON-able state ``{epoch, batches_done}`` plus a fingerprint
    that refuses a restore into a loader of another shape. Subclasses give
    ``_new_plan(epoch)`` and ``_fingerprint()``."""

    state_name = "data loader"
    resume_hint = "the same shards, world size, batch size and data config"

    def __init__(self):
        self.epoch, self.batches_done = 0, 0
        self._plan_cache: tuple[int, list] | None = None

    def _new_plan(self, epoch: int) -> list[list[PlannedSample]]:
        raise NotImplementedError

    def _fingerprint(self) -> dict:
        raise NotImplementedError

    def plan(self, epoch: int | None = None) -> list[list[PlannedSample]]:
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = (epoch, self._new_plan(epoch))
        return self._plan_cache[1]

    def __len__(self) -> int:
        return len(self.plan())

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = int(epoch), 0

    def state_dict(self) -> dict:
        """Plain JSON-able dict: safe in a DeepSpeed checkpoint without pickle."""
        return {"version": STATE_VERSION, "epoch": self.epoch,
                "batches_done": self.batches_done, **self._fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.state_name} state version {state.get('version')!r} is not "
                             f"{STATE_VERSION}")
        mismatched = {k: (state.get(k), v) for k, v in self._fingerprint().items()
                      if state.get(k) != v}
        if mismatched:
            raise ValueError(f"{self.state_name} state does not match this loader "
                             f"(key: (saved, now)): {mismatched}; resume with {self.resume_hint}")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])


class Loader(PlannedLoader):
    """One rank's view of a shard directory; see the module docstring."""

    def __init__(self, cfg: DataConfig, index: ShardIndex, images, collator, batch_size: int,
                 rank: int, world_size: int, train: bool, device: torch.device):
        self.cfg, self.index, self.images, self.collator = cfg, index, images, collator
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.train, self.device = train, device
        self.backend = images.name
        super().__init__()
        self.valid_pixels, self.total_pixels, self.batches_seen = 0, 0, 0

    # -- plan and state ---------------------------------------------------------------
    def _new_plan(self, epoch: int) -> list[list[PlannedSample]]:
        aspect = self.index.aspect_ratios() if self.cfg.bucketing else None
        return epoch_plan(len(self.index), epoch=epoch, seed=self.cfg.seed, rank=self.rank,
                          world_size=self.world_size, batch_size=self.batch_size,
                          shuffle=self.train and self.cfg.shuffle,
                          drop_last=self.train and self.cfg.drop_last, aspect=aspect,
                          bucket_window=self.cfg.bucket_window)

    def _fingerprint(self) -> dict:
        return {"num_samples": len(self.index), "world_size": self.world_size,
                "batch_size": self.batch_size, "seed": self.cfg.seed,
                "shuffle": self.train and self.cfg.shuffle, "bucketing": self.cfg.bucketing,
                "drop_last": self.train and self.cfg.drop_last}

    @property
    def padding_fraction(self) -> float:
        """Padded / all image pixels over the batches yielded so far (0 if none)."""
        return 1.0 - self.valid_pixels / self.total_pixels if self.total_pixels else 0.0

    # -- batches ----------------------------------------------------------------------
    def _flip(self, key: str) -> bool:
        return self.train and self.cfg.hflip and _hash_unit(self.cfg.seed, self.epoch, key, "flip") < 0.5

    def _text(self, batch: list[PlannedSample], k: int, flips: list[bool]) -> dict:
        captions, image_ids, keys = [], [], []
        for planned, flip in zip(batch, flips):
            meta, key = self.index.meta(planned.index), self.index.samples[planned.index].key
            caps = meta["captions"]
            caption = caps[int(_hash_unit(self.cfg.seed, self.epoch, key, "caption") * len(caps))]
            captions.append(swap_left_right(caption) if flip else caption)
            image_ids.append(str(meta.get("image_id", key)))
            keys.append(key)
        generator = batch_generator(self.cfg.seed, self.epoch, k * self.world_size + self.rank)
        out = self.collator(captions, image_ids, generator)
        out["keys"] = keys
        out["captions"] = captions
        out["is_pad"] = torch.tensor([p.is_pad for p in batch], dtype=torch.bool)
        return out

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan()
        start = self.batches_done if self.batches_done < len(plan) else 0
        self.batches_done = start
        flips = [[self._flip(self.index.samples[p.index].key) for p in b] for b in plan[start:]]
        work = [[(p.index, f) for p, f in zip(b, fl)] for b, fl in zip(plan[start:], flips)]
        for k, (images, sizes) in enumerate(self.images.batches(work), start):
            batch = self._text(plan[k], k, flips[k - start])
            batch["images"], batch["image_sizes"] = images, sizes
            self._count_pixels(images, sizes)
            self.batches_done = k + 1
            yield self._to_device(batch)

    def _count_pixels(self, images: torch.Tensor, sizes: torch.Tensor) -> None:
        expected = padded_batch_size(sizes.numpy())
        if tuple(images.shape[2:]) != expected:
            raise RuntimeError(f"{self.backend}: batch padded to {tuple(images.shape[2:])}, "
                               f"expected {expected}")
        self.valid_pixels += int((sizes[:, 0] * sizes[:, 1]).sum())
        self.total_pixels += images.shape[0] * images.shape[2] * images.shape[3]
        self.batches_seen += 1

    def _to_device(self, batch: dict) -> dict:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                for k, v in batch.items()}


def images_backend(cfg: DataConfig, index: ShardIndex, batch_size: int, device: torch.device):
    args = (index, batch_size, cfg.image_shorter, cfg.image_max)
    if cfg.backend == "dali":
        from pixelbert_dist.data.dali import DaliImages

        return DaliImages(*args, num_threads=cfg.num_workers, prefetch=cfg.prefetch,
                          device=device)
    if cfg.backend == "nvjpeg":
        from pixelbert_dist.data.torch_loader import nvjpeg_images

        return nvjpeg_images(*args, device=device)
    from pixelbert_dist.data.torch_loader import PilImages

    return PilImages(*args, num_workers=cfg.num_workers, prefetch=cfg.prefetch, device=device)


def build_loader(cfg: DataConfig, shards_dir, batch_size: int, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", train: bool = True,
                 tokenizer=None) -> Loader:
    """A Loader over ``shards_dir`` for this rank. ``train=False`` is evaluation: no
    shuffle, no flip, no MLM masking or ITM negatives, and no sample ever dropped."""
    from pixelbert_dist.data.text import TextCollator, load_tokenizer

    cfg.validate()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    index = ShardIndex(shards_dir)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.vocab_dir)
    collator = TextCollator(tokenizer, cfg.max_text_len, cfg.mlm_prob if train else 0.0,
                            cfg.itm_neg_prob if train else 0.0)
    if cfg.backend == "dali" and cfg.dali_reader == "webdataset":
        # DALI's own reader + pipeline checkpoints (dali_wds.py), instead of the epoch plan.
        from pixelbert_dist.data.dali_wds import WebdatasetLoader

        return WebdatasetLoader(cfg, index, collator, batch_size, rank, world_size, train, device)
    images = images_backend(cfg, index, batch_size, device)
    return Loader(cfg, index, images, collator, batch_size, rank, world_size, train, device)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Read a few batches and print shapes, "
                                     "padding and images/s.")
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
    cfg = DataConfig(train_shards=args.shards, backend=args.backend, image_shorter=args.shorter,
                     image_max=args.max_size, bucketing=args.bucketing, num_workers=args.workers)
    loader = build_loader(cfg, args.shards, args.batch_size, device=args.device)
    print(f"{args.shards}: {len(loader.index)} samples, {len(loader)} batches/epoch, "
          f"backend {loader.backend}")
    images, start = 0, time.perf_counter()
    for i, batch in enumerate(loader):
        if i == args.batches:
            break
        images += batch["images"].shape[0]
        print(f"batch {i}: images {tuple(batch['images'].shape)} input_ids "
              f"{tuple(batch['input_ids'].shape)} keys {batch['keys'][:3]}...")
    seconds = time.perf_counter() - start
    print(f"{images} images in {seconds:.2f}s = {images / seconds:.1f} img/s "
          f"(incl. start-up); padding fraction {loader.padding_fraction:.3f}")


if __name__ == "__main__":
    main()
