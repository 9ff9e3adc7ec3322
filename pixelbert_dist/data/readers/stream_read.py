"""Reading one streamed shard: its samples in tar order (``Raw``), grouped by webdataset's
rule (``format.members``: this project's shards and img2dataset's alike), checked against
its index sidecar when it has one, a failed read retried after a back-off from where it
broke (``read_shard``); and a shard's sidecar alone (``shard_check``: its sample count), so
that a resume can step over shards without reading them.

What never becomes a sample is noted for the loader to count and log (``Skipped`` in the
errors list): a sample without an image, and a tar that ends early (cut by a crashed
download): read up to the damage, then left, never a crash. A local file is known cut at
once; a stream when a second read breaks at the same sample (a cut transfer would not)."""

from __future__ import annotations

import tarfile
import time
from typing import Iterator, NamedTuple

from pixelbert_dist.data.format.members import (
    DEFAULT_CAPTION_KEY,
    TRUNCATION,
    group_members,
    has_caption,
    tar_members,
)
from pixelbert_dist.data.readers.stream_urls import open_shard, protocol, retryable, seekable
from pixelbert_dist.data.readers.stream_check import ShardCheck, fetch

BACKOFF_S = 0.5


class Raw(NamedTuple):
    key: str
    jpeg: bytes  # the image's bytes: JPEG, or PNG / WebP in foreign shards
    meta: bytes | None  # the sample's .json member, if any
    url: str
    damage: str | None = None  # why the index check rejects the image
    checked: bool = False  # whether an index sidecar checked it
    text: bytes | None = None  # the sample's .txt member, if any


class Skipped(NamedTuple):
    """A note for the loader (in the errors list, beside read-error lines): something
    of a shard that never became a sample."""

    kind: str  # SKIP_KINDS
    where: str  # url:key, or the shard's url
    detail: str


class Dotted(NamedTuple):
    """A note: a member name with more than one dot, cut by webdataset's key rule."""

    name: str
    key: str
    field: str
    url: str


NO_IMAGE, NO_CAPTION, TRUNCATED = "no_image", "no_caption", "truncated_tar"
SKIP_KINDS = (NO_IMAGE, NO_CAPTION, TRUNCATED)


def _members(url: str, check: ShardCheck | None, notes: list, skip: int, caption_key: str) -> Iterator[Raw]:
    """The shard's samples with an image, from the ``skip``-th on; samples without one are
    noted (``Skipped``) past that point. With an index sidecar and a store that can seek,
    the read starts where row ``skip`` can be met first (a ranged read); else those before
    are read past, unchecked."""
    start = check.start_of(skip) if check is not None and skip and seekable(url) else 0
    met, dotted = (skip, []) if start else (0, [])

    def on_dotted(name: str, key: str, field: str) -> None:
        if not dotted:  # once a shard read: the loader says it once in all
            dotted.append(name)
            notes.append(Dotted(name, key, field, url))

    broke: list[Exception] = []
    with open_shard(url, start) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for sample in group_members(tar_members(tar, broke), on_dotted):
            if sample.image is None or (check is not None and not _listed(check, start, sample, caption_key)):
                # a sidecar's rows are the samples with both (format.foreign_index); what a ranged
                # read meets before its first row was noted by the read that passed it
                if met > skip or (met == skip and not start):
                    kind, what = (NO_IMAGE, "no jpg/jpeg/png/webp member") if sample.image is None else (NO_CAPTION, "")
                    notes.append(Skipped(kind, f"{url}:{sample.key}", what or "no caption (its index lists none)"))
                continue
            met += 1
            if met > skip:
                offset = start + sample.image_offset  # the tar's, not this read's
                damage = check.damage(sample.key, offset, sample.image) if check is not None else None
                yield Raw(sample.key, sample.image, sample.meta, url, damage, check is not None, sample.text)
    if broke:
        raise broke[0]
    if check is not None:
        check.finish(met)


def _listed(check: ShardCheck, start: int, sample, caption_key: str) -> bool:
    """Whether the sidecar lists this sample (a row at its image): a sidecar's rows are the
    samples with a caption by the rule it was indexed for (``format.foreign_index``: the
    default, or a ``--caption-key``; this project's own shards: all). One it leaves out must
    lack a caption by the default rule or by ``caption_key``; else the sidecar does not fit
    its tar, and ``damage`` says so."""
    offset = start + sample.image_offset
    if check.lists(offset):
        return True
    if has_caption(sample.text, sample.meta) and has_caption(sample.text, sample.meta, caption_key):
        check.damage(sample.key, offset, sample.image)  # raises: no row starts there
    return False


UNREAD = object()


def read_shard(
    url: str, retries: int, errors: list, check=UNREAD, first_row: int = 0, caption_key: str = DEFAULT_CAPTION_KEY
) -> Iterator[Raw]:
    """The samples of one shard from row ``first_row`` on, checked against its index
    sidecar when it has one (``check``: fetched already, by ``shard_check``; which samples
    it lists: ``_listed``, with ``data.caption_key``); a failed read
    (of either) is retried after a back-off, skipping the samples already yielded
    (``errors`` collects one line per failure). Skipped rows are not read where the
    sidecar says where the next one starts and the store can seek (``_members``)."""
    done, attempt, broke_at = first_row, 0, None
    while True:
        try:
            if check is UNREAD:
                check = fetch(url)
            for raw in _members(url, check, errors, done, caption_key):
                done += 1
                yield raw
            return
        except Exception as err:
            if _truncated(url, err, done, broke_at):
                errors.append(
                    Skipped(TRUNCATED, url, f"read up to the damage, after {done} samples: {type(err).__name__}: {err}")
                )
                return
            broke_at = done if isinstance(err, TRUNCATION) else None
            attempt += 1
            _back_off(url, err, attempt, retries, errors, " (its index sidecar)" if check is UNREAD else "")


def _truncated(url: str, err: Exception, done: int, broke_at: int | None) -> bool:
    """Whether the tar itself ends early (or stops being a tar): the module docstring."""
    if not isinstance(err, TRUNCATION):
        return False
    return protocol(url) in ("", "file") or broke_at == done


def shard_check(url: str, retries: int, errors: list) -> ShardCheck | None:
    """The index sidecar of the shard at ``url`` (one small read, retried as a shard's
    are; ``len`` of it: the shard's sample count); None where it has none."""
    for attempt in range(1, retries + 2):
        try:
            return fetch(url)
        except Exception as err:
            _back_off(url, err, attempt, retries, errors, " (its index sidecar)")


def _back_off(url: str, err: Exception, attempt: int, retries: int, errors: list, what: str) -> None:
    """After failed read ``attempt`` of ``url`` (or its sidecar: ``what``): raise unless
    the error is worth retrying and retries are left, else note it and wait."""
    if isinstance(err, FileNotFoundError):
        raise FileNotFoundError(f"{url}: no such shard ({err})") from None
    if not retryable(err):
        raise err
    errors.append(f"{url}{what}: {type(err).__name__}: {err}")
    if attempt > retries:
        raise OSError(f"{url}: read failed {attempt} times, last: {err}{what}") from None
    time.sleep(BACKOFF_S * 2 ** (attempt - 1))
