"""Damaged samples at training time: detect, replace deterministically, report.

A sample is damaged when its bytes fail the index checks (``readers.indexed.ShardIndex.read``:
short read, CRC mismatch, missing JPEG markers) or, for the backends that can tell, when
its JPEG does not decode. It is then replaced by the first sound sample among
``REPLACE_TRIES`` others drawn by a hash of its index: a pure function of the data, so a
resumed run makes the same replacements, and the batch keeps its size (ranks stay in
step). Each occurrence is returned as a ``Damaged`` event for the loader to count.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from pixelbert_dist.data.base import hash_unit
from pixelbert_dist.data.format.index import ShardFormatError

REPLACE_TRIES = 16


@dataclass(frozen=True)
class Damaged:
    where: str  # "SHARD.tar:KEY"
    reason: str
    index: int


def candidates(i: int, n: int):
    """Sample ``i`` first, then its deterministic stand-ins."""
    yield i
    for attempt in range(1, REPLACE_TRIES + 1):
        yield int(hash_unit("replace", i, attempt) * n)


def resolve(index, i: int, decode: Callable | None = None, known_bad: dict | None = None):
    """``(sample, decoded, events)`` for the first sound candidate of ``i``.

    ``decode(sample)`` (optional) raises ValueError/OSError for an undecodable JPEG;
    ``known_bad`` maps sample indices to a reason found earlier (e.g. by a decoder
    that only reports a whole failed batch)."""
    events: list[Damaged] = []
    for c in candidates(i, len(index)):
        sample = index.read(c)
        reason = (known_bad or {}).get(c) or sample.damage
        decoded = None
        if reason is None and decode is not None:
            try:
                decoded = decode(sample)
            except (ValueError, OSError) as err:
                reason = f"undecodable JPEG ({err})"
        if reason is None:
            return sample, decoded, events
        events.append(Damaged(index.where(c, sample.key), reason, c))
    raise ShardFormatError(
        f"sample {i} and its {REPLACE_TRIES} stand-ins are all damaged "
        f"(first: {events[0].where}: {events[0].reason}); is the split "
        "mostly damaged? verify it with read_manifest(DIR, verify=True)"
    )


class DecodedBatch(NamedTuple):
    """What an image backend's ``samples()`` yields per batch: the images, the samples
    actually used (after replacements, JPEG bytes dropped), their flips, the events."""

    images: torch.Tensor
    sizes: torch.Tensor
    samples: list
    flips: list
    damaged: list


def without_jpeg(sample):
    return dataclasses.replace(sample, jpeg=b"")
