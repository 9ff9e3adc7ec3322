"""Fine-tuning examples -> batches: images looked up by shard key, text through the tokenizer.

The task files (VQA questions, NLVR2 lines, Karpathy captions) name images by their own
ids; ``KeyedImages`` finds them, by shard key, in one or more shard folders (random
access through ``ShardIndex``, no extraction), and the pre-training image backends
(DALI, PIL, nvjpeg) decode, resize, normalise and pad them exactly as in pre-training.

``TaskLoader`` walks a list of examples in the pre-training loader's epoch plan
(seeded order, sharded by rank, wrap-around repeats flagged ``is_pad``), so its state
is ``{epoch, batches_done}`` and a resumed run sees the batches an uninterrupted run
would have. A task supplies two functions: which images an example needs, and how a
list of examples becomes the text/label part of a batch.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from pixelbert_dist.data.config import DataConfig
from pixelbert_dist.data.loader import images_backend
from pixelbert_dist.data.base import PlannedLoader, batch_generator
from pixelbert_dist.data.readers.plan import epoch_plan
from pixelbert_dist.data.readers.indexed import ShardIndex


class KeyedImages:
    """The samples of several shard folders, addressable by key; the interface the image
    backends read (``samples[i].key``, ``jpeg(i)``, ``meta(i)``)."""

    def __init__(self, folders: Sequence[str]):
        if isinstance(folders, str):
            folders = [folders]
        self.indexes = [ShardIndex(folder) for folder in folders]
        self.samples, self._where, self.position = [], [], {}
        for part, index in enumerate(self.indexes):
            for i, ref in enumerate(index.samples):
                if ref.key in self.position:
                    raise ValueError(f"shard key {ref.key!r} appears in two of the folders {list(folders)}")
                self.position[ref.key] = len(self.samples)
                self.samples.append(ref)
                self._where.append((part, i))

    def __len__(self) -> int:
        return len(self.samples)

    def __contains__(self, key: str) -> bool:
        return key in self.position

    def no_match(self, what: str, wanted: str, rule: str) -> ValueError:
        """The error for task images none of which is in the shards: almost always a key
        rule that differs from the shards' keys, so it shows one wanted key and some found."""
        folders = [str(index.directory) for index in self.indexes]
        found = ", ".join(repr(ref.key) for ref in self.samples[:3])
        wanted = repr(wanted) if wanted else "none (the id is not in the image map)"
        return ValueError(
            f"{what}: 0 images found in the shards {folders} ({len(self)} samples): wanted key "
            f"{wanted} ({rule}), found keys like {found}. make_shards.py keys images coco391895, "
            "flickr30k42, vg1 (NLVR2: dev-850-0-img0): build the shards with it, or set the key "
            "format / image map to the shards' keys"
        )

    def jpeg(self, i: int) -> bytes:
        part, j = self._where[i]
        return self.indexes[part].jpeg(j)

    def meta(self, i: int) -> dict:
        part, j = self._where[i]
        return self.indexes[part].meta(j)


def tokenize(tokenizer, texts: Sequence[str], max_len: int) -> dict:
    """``[CLS] words [SEP] [PAD]..`` as int64 tensors (token types all 0)."""
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    ids = enc["input_ids"].long()
    return {"input_ids": ids, "attention_mask": enc["attention_mask"].long(), "token_type_ids": torch.zeros_like(ids)}


class TaskLoader(PlannedLoader):
    """One rank's batches of ``examples`` for one epoch (see the module docstring).

    ``image_keys(example) -> list[str]``: the shard keys of the images it needs (one for
    VQA and retrieval, two for NLVR2), stacked in that order in ``images``;
    ``collate(examples, generator) -> dict``: its tensors (text, labels); the generator is
    seeded by (seed, epoch, global batch) for anything drawn at random (negatives).
    """

    state_name = "fine-tuning loader"
    resume_hint = "the same task files, shards, world size and batch size"

    def __init__(
        self,
        examples: Sequence,
        images: KeyedImages,
        image_keys: Callable,
        collate: Callable,
        data: DataConfig,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        seed: int = 0,
        shuffle: bool = True,
        device: str | torch.device = "cpu",
        images_per_example: int = 1,
    ):
        if not examples:
            raise ValueError("TaskLoader: no examples (every one skipped, or an empty file?)")
        self.examples, self.images, self.image_keys, self.collate = list(examples), images, image_keys, collate
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.train, self.seed, self.shuffle = train, seed, shuffle and train
        self.device = torch.device(device)
        self.backend = images_backend(data, images, batch_size * images_per_example, self.device)
        super().__init__()

    def _new_plan(self, epoch: int) -> list:
        return epoch_plan(
            len(self.examples),
            epoch=epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
        )

    def _fingerprint(self) -> dict:
        return {
            "num_examples": len(self.examples),
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def _work(self, batch) -> list[tuple[int, bool]]:
        # no flips: "left"/"right" in questions and NLVR2 sentences must stay true
        return [
            (self.images.position[key], False)
            for planned in batch
            for key in self.image_keys(self.examples[planned.index])
        ]

    def __iter__(self) -> Iterator[dict]:
        plan = self.plan()
        start = self.batches_done if self.batches_done < len(plan) else 0
        self.batches_done = start
        work = [self._work(b) for b in plan[start:]]
        for k, (images, sizes) in enumerate(self.backend.batches(work), start):
            chosen = [self.examples[p.index] for p in plan[k]]
            generator = batch_generator(self.seed, self.epoch, k * self.world_size + self.rank)
            batch = self.collate(chosen, generator)
            batch.update(
                images=images,
                image_sizes=sizes,
                examples=chosen,
                is_pad=torch.tensor([p.is_pad for p in plan[k]], dtype=torch.bool),
            )
            self.batches_done = k + 1
            yield batch


def loader_data_config(data, seed: int = 0) -> DataConfig:
    """The pre-training DataConfig the image backends take, from the fine-tuning section."""
    return DataConfig(
        train_shards=data.shards[0],
        backend=data.backend,
        image_shorter=data.image_shorter,
        image_max=data.image_max,
        max_text_len=data.max_text_len,
        num_workers=data.num_workers,
        prefetch=data.prefetch,
        seed=seed,
    ).validate()
