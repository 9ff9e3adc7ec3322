"""What every loader shares, apart from how it reads images: the loader protocol the
trainer relies on, the resumable state, the epoch-plan cache, the per-batch accounting
and the seeded draws. ``loader`` (the epoch-plan loader) and ``dali_wds`` (DALI's own
reader) both build on this module and never on each other.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from pixelbert_dist.data.decode.images import padded_batch_size
from pixelbert_dist.data.readers.plan import PLAN_ORDER

STATE_VERSION = 1
log = logging.getLogger("pixelbert_dist.data")


@runtime_checkable
class BatchLoader(Protocol):
    """What a trainer may use of a loader: one epoch per iteration, the epoch protocol,
    a JSON-able state, and counters to log (``padding_fraction``, ``damaged``)."""

    backend: str
    epoch: int
    batches_done: int
    damaged: int

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[dict]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def hash_unit(*words) -> float:
    """A uniform number in [0, 1) from the words (stable across processes and runs)."""
    digest = hashlib.blake2b("\x1f".join(map(str, words)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def batch_generator(seed: int, epoch: int, global_batch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch, global_batch]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


class LoaderState:
    """The epoch protocol and a JSON-able state ``{epoch, batches_done}`` plus a
    fingerprint that refuses a restore into a loader of another shape. Subclasses give
    ``_fingerprint()``."""

    state_name = "data loader"
    resume_hint = "the same shards, world size, batch size and data config"

    def __init__(self):
        self.epoch, self.batches_done = 0, 0

    def _fingerprint(self) -> dict:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.batches_done = int(epoch), 0

    def state_dict(self) -> dict:
        """Plain JSON-able dict: safe in a DeepSpeed checkpoint without pickle."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches_done": self.batches_done, **self._fingerprint()}

    def gathered_state(self) -> dict:
        """What rank 0's copy of the state adds from every rank (a collective, called on
        every rank at each save): what a resume on another world size needs beyond rank
        0's own position. Nothing, unless a loader's position differs per rank."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"{self.state_name} state version {state.get('version')!r} is not {STATE_VERSION}")
        mismatched = {k: (state.get(k), v) for k, v in self._fingerprint().items() if state.get(k) != v}
        if mismatched:
            raise ValueError(
                f"{self.state_name} state does not match this loader "
                f"(key: (saved, now)): {mismatched}; resume with {self.resume_hint}"
            )
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])


class PlannedLoader(LoaderState):
    """A LoaderState whose epochs follow a plan (``readers.plan.epoch_plan``), cached per
    epoch. Subclasses give ``_new_plan(epoch)`` and ``_fingerprint()``. The state names
    the plan's order (``plan_order``): a state saved under another order resumes only at
    an epoch boundary, where no batch of the old order is left to replay."""

    def __init__(self):
        super().__init__()
        self._plan_cache: tuple[int, object] | None = None

    plan_order = PLAN_ORDER  # the order's name; a loader whose order depends on its config overrides it

    def state_dict(self) -> dict:
        return {**super().state_dict(), "plan_order": self.plan_order}

    def load_state_dict(self, state: dict) -> None:
        before = self.epoch, self.batches_done
        super().load_state_dict(state)
        saved = state.get("plan_order")
        if saved != self.plan_order and 0 < self.batches_done < len(self):
            at = f"batch {self.batches_done} of epoch {self.epoch}"
            self.epoch, self.batches_done = before
            raise ValueError(
                f"{self.state_name} state has plan_order {saved!r}, this run orders epochs by "
                f"{self.plan_order!r} (readers/plan.py): resuming at {at} would read other samples than "
                "the saved run. Resume from a checkpoint at an epoch boundary, or with the code "
                "(and data.shard_window) that saved it"
            )
        if saved != self.plan_order:
            log.info("%s state of plan_order %r resumed at an epoch boundary", self.state_name, saved)

    def _new_plan(self, epoch: int):
        raise NotImplementedError

    def plan(self, epoch: int | None = None):
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            self._plan_cache = None  # never hold two epochs' plans at once
            self._plan_cache = (epoch, self._new_plan(epoch))
        return self._plan_cache[1]

    def __len__(self) -> int:
        return len(self.plan())


class BatchAccounting:
    """Padding and damage counters, shared by the loaders that yield image batches.

    ``damaged`` counts damaged samples met (and replaced) so far in this process; each
    shard:key is named once in the log."""

    damage_action = "replaced by a deterministic stand-in"

    def _init_accounting(self, device: torch.device) -> None:
        self.device = device
        self.valid_pixels, self.total_pixels, self.batches_seen = 0, 0, 0
        self.damaged = 0
        self._named_damage: set[str] = set()

    @property
    def padding_fraction(self) -> float:
        """Padded / all image pixels over the batches yielded so far (0 if none)."""
        return 1.0 - self.valid_pixels / self.total_pixels if self.total_pixels else 0.0

    def _record_damage(self, events) -> int:
        for event in events:
            self.damaged += 1
            if event.where not in self._named_damage:
                self._named_damage.add(event.where)
                log.warning(
                    "damaged sample %s: %s; %s (counted in loader.damaged)",
                    event.where,
                    event.reason,
                    self.damage_action,
                )
        return len(events)

    def _count_pixels(self, images: torch.Tensor, sizes: torch.Tensor) -> None:
        expected = padded_batch_size(sizes.numpy())
        if tuple(images.shape[2:]) != expected:
            raise RuntimeError(f"{self.backend}: batch padded to {tuple(images.shape[2:])}, expected {expected}")
        self.valid_pixels += int((sizes[:, 0] * sizes[:, 1]).sum())
        self.total_pixels += images.shape[0] * images.shape[2] * images.shape[3]
        self.batches_seen += 1

    def _to_device(self, batch: dict) -> dict:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
