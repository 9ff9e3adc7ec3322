"""The index check of streamed shards: each JPEG's bytes against the CRC32 and size its
shard's index sidecar stores (``format.index``), as the indexed loader checks them.

A JPEG whose bytes changed after the shard was written may still decode (a few bytes
changed in the entropy-coded data: libjpeg only warns), so decoding alone would train on
it. ``readers.stream.read_shard`` fetches the sidecar (``readers.stream_urls.read_sidecar``: ~28 bytes a
sample, one small read per shard, retried as the shard's reads are) before the tar and
matches each JPEG to its row by where its data starts in the tar (``offset_data // 512 ==
jpg_block``), not by its rank among the samples, so one sample the reader drops cannot
shift every later check. A changed size or CRC makes the sample damaged; it is skipped as
an undecodable one is, on every backend, since the check runs where the stream is read.

A sidecar that is there but wrong stops the run naming it (``ShardFormatError``, never
retried): one that does not load as an index, or that does not describe its tar (a JPEG
at an offset it has no row for, unless the index left that sample out for want of a
caption: ``stream_read._listed``, which knows ``make_shards.py index --caption-key``).
Falling back to decode-only there would quietly drop the check for a shard whose files
disagree (a tar rebuilt or re-uploaded without its index), and skipping its samples as
damaged would drop the whole shard one warning at a time; the fix is one command
(``make_shards.py index DIR --force``, then upload the sidecars). A stream that ends
before every row was met is a cut transfer (``OSError``: retried).
"""

from __future__ import annotations

import numpy as np

from pixelbert_dist.data.format import index as fmt_index
from pixelbert_dist.data.format.index import (
    BLOCK,
    CRC32,
    INDEX_COMMAND,
    JPG_BLOCK,
    JPG_SIZE,
    JSON_BLOCK,
    JSON_SIZE,
    ShardFormatError,
)
from pixelbert_dist.data.readers.stream_urls import read_sidecar, sidecar_url

CHANGED = "bytes changed after the shard was written"


class ShardCheck:
    """The rows of one streamed shard's sidecar; ``damage`` says what is wrong with a JPEG."""

    def __init__(self, url: str, sidecar: str, index: np.ndarray):
        self.url, self.sidecar = url, sidecar
        self.blocks = np.asarray(index[JPG_BLOCK], dtype=np.int64)
        self.sizes = np.asarray(index[JPG_SIZE], dtype=np.int64)
        self.crcs = np.asarray(index[CRC32], dtype=np.int64)
        json_blocks, json_sizes = (np.asarray(index[f], dtype=np.int64) for f in (JSON_BLOCK, JSON_SIZE))
        # where each row's indexed members (image; .json or .txt) end, in whole blocks
        self.ends = np.maximum(self.blocks + -(-self.sizes // BLOCK), json_blocks + -(-json_sizes // BLOCK)) * BLOCK

    def __len__(self) -> int:
        return len(self.blocks)

    def start_of(self, row: int) -> int:
        """A byte of the tar where a read can start and meet ``row`` as its first sample:
        the end of the row before's indexed members (what lies between, e.g. that row's
        unindexed members, is read past)."""
        return int(self.ends[row - 1]) if row else 0

    def _row(self, offset: int) -> int | None:
        row = int(np.searchsorted(self.blocks, offset // BLOCK))
        if offset % BLOCK or row == len(self.blocks) or self.blocks[row] * BLOCK != offset:
            return None
        return row

    def lists(self, offset: int) -> bool:
        """Whether a row starts at byte ``offset``: the index listed the image there."""
        return self._row(offset) is not None

    def damage(self, key: str, offset: int, jpeg: bytes) -> str | None:
        """None if ``jpeg`` (data at byte ``offset`` of the tar) is the one the builder
        wrote there, else why not."""
        row = self._row(offset)
        if row is None:
            raise ShardFormatError(
                f"{self.sidecar} does not describe its shard {self.url}: no sample starts at "
                f"byte {offset} ({key}.jpg) in it (the tar was rebuilt or replaced after its "
                f"index was made, or indexed with --caption-key for another data.caption_key?): "
                f"rewrite the index with `{INDEX_COMMAND} DIR --force` and upload it"
            )
        if len(jpeg) != self.sizes[row]:
            return f"size mismatch: {len(jpeg)} bytes, the index says {self.sizes[row]} ({CHANGED})"
        if fmt_index.crc32(jpeg) != self.crcs[row]:
            return f"checksum mismatch ({CHANGED})"
        return None

    def finish(self, met: int) -> None:
        """The stream ended having met ``met`` rows: all of them, or it was cut short."""
        if met != len(self):
            raise OSError(
                f"{self.url}: the stream ended after {met} of the {len(self)} samples its index "
                f"{self.sidecar} lists (a cut transfer, or a tar that is not the indexed one)"
            )


def fetch(url: str) -> ShardCheck | None:
    """The check of the shard at ``url``, or None where it has no sidecar."""
    sidecar = sidecar_url(url)
    data = read_sidecar(sidecar) if sidecar is not None else None
    if data is None:
        return None
    return ShardCheck(url, sidecar, fmt_index.from_bytes(data, f"index sidecar {sidecar}"))


def why_unchecked(url: str) -> str:
    """For the one log line about shards streamed without a sidecar."""
    sidecar = sidecar_url(url)
    if sidecar is None:
        return "pipe: commands and URLs not ending in .tar get none"
    return f"none at {sidecar}"
