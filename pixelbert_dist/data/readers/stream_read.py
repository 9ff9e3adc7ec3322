"""Reading one streamed shard: its samples in tar order (``Raw``), checked against its
index sidecar when it has one, a failed read retried after a back-off from where it broke
(``read_shard``); and a shard's sidecar alone (``shard_check``: its sample count), so that
a resume can step over shards without reading them."""

from __future__ import annotations

import tarfile
import time
from typing import Iterator, NamedTuple

from pixelbert_dist.data.readers.stream_urls import open_shard, retryable
from pixelbert_dist.data.readers.stream_check import ShardCheck, fetch

BACKOFF_S = 0.5


class Raw(NamedTuple):
    key: str
    jpeg: bytes
    meta: bytes
    url: str
    damage: str | None = None  # why the index check rejects the JPEG
    checked: bool = False  # whether an index sidecar checked it


def _members(url: str, check: ShardCheck | None, skip: int = 0) -> Iterator[Raw]:
    """The shard's samples from the ``skip``-th on (those before are read past, unchecked)."""
    met = 0
    with open_shard(url) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        pending = None
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            data = tar.extractfile(member).read()
            if ext == "jpg":
                pending = (key, data, member.offset_data)
            elif ext == "json" and pending is not None and pending[0] == key:
                met += 1
                if met > skip:
                    damage = check.damage(key, pending[2], pending[1]) if check is not None else None
                    yield Raw(key, pending[1], data, url, damage, check is not None)
                pending = None
    if check is not None:
        check.finish(met)


UNREAD = object()


def read_shard(url: str, retries: int, errors: list, check=UNREAD) -> Iterator[Raw]:
    """The samples of one shard, checked against its index sidecar when it has one
    (``check``: fetched already, by ``shard_check``); a failed read (of either) is retried
    after a back-off, skipping the samples already yielded (``errors`` collects one line
    per failure)."""
    done, attempt = 0, 0
    while True:
        try:
            if check is UNREAD:
                check = fetch(url)
            for raw in _members(url, check, skip=done):
                done += 1
                yield raw
            return
        except Exception as err:
            attempt += 1
            _back_off(url, err, attempt, retries, errors, " (its index sidecar)" if check is UNREAD else "")


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
