"""``ShardIndex``: random access to the samples of a split directory through the index
sidecars (``format.index``), with nothing read per sample at start-up.

Opening a split costs one manifest read and nothing per shard: on a shared file system
a ``stat`` per shard per rank is a metadata storm (10^5 shards x 512 ranks). A shard is
opened the first time a sample of it is read; its size is then checked against the
manifest with ``fstat`` on the open descriptor (a truncated shard is named there, and
its cut samples are replaced as damaged), and its index is memory-mapped (a bounded LRU of maps and descriptors, as a
10^5-shard split would otherwise exhaust the process's map count). A sample's bytes come
from one ``pread`` of its tar: header (for the key), image, caption member (``.json``;
or ``.txt`` in foreign shards, ``format.foreign_index``). The training order reads
shards in runs (``readers.plan.ShardWindowOrder``), so opens grow with the shards read,
not the samples.

File descriptors are opened lazily per process, so a copy inherited by a DataLoader
worker opens its own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from pixelbert_dist.data.format import index as fmt_index
from pixelbert_dist.data.format.index import (
    BLOCK,
    CRC32,
    HEIGHT,
    INDEX_COMMAND,
    JPG_BLOCK,
    JPG_SIZE,
    JSON_BLOCK,
    JSON_SIZE,
    WIDTH,
    ShardFormatError,
)
from pixelbert_dist.data.format.members import (
    DEFAULT_CAPTION_KEY,
    META_TYPE,
    TEXT_TYPE,
    NoCaption,
    caption_meta,
    field_type,
    split_member,
)
from pixelbert_dist.data.format.shards import read_manifest

log = logging.getLogger("pixelbert_dist.data")
MAX_OPEN_SHARDS = 64  # index maps and tar descriptors kept open per process
OTHER_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"RIFF")  # PNG, WebP


@dataclass(frozen=True)
class SampleRef:
    key: str
    shard: int  # index into ShardIndex.paths
    jpg: tuple[int, int]  # (offset, size) of KEY.jpg's bytes in the tar
    meta: tuple[int, int]  # (offset, size) of KEY.json's bytes


@dataclass(frozen=True)
class Sample:
    """One sample's bytes as read; ``damage`` names what is wrong with them, if anything."""

    index: int
    key: str
    jpeg: bytes
    meta_raw: bytes
    damage: str | None
    meta_type: str = META_TYPE  # the caption member's type: json, or txt (foreign shards)


class _Refs(Sequence):
    """``index.samples[i]``: a SampleRef made on demand (no list of N objects)."""

    def __init__(self, index: "ShardIndex"):
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self._index.ref(int(i))

    def __iter__(self) -> Iterator[SampleRef]:
        return (self._index.ref(i) for i in range(len(self)))


class ShardIndex:
    """Random access to a split directory's samples (module docstring)."""

    def __init__(self, directory: str | Path, caption_key: str = DEFAULT_CAPTION_KEY):
        manifest = read_manifest(directory, check_files=False)  # no stat per shard (module docstring)
        self.directory = Path(directory)
        self.caption_key = caption_key  # data.caption_key: where ``meta`` finds the captions
        self.source = manifest.source  # "webdataset": foreign shards (format.foreign_index)
        self.indexed_caption_key = manifest.caption_key  # foreign shards: the key their rows were chosen by
        self.paths = manifest.shard_paths()
        for info, path in zip(manifest.shards, self.paths):
            _check_listed(self.directory, info, path)
        self.sizes = [info.size for info in manifest.shards]
        counts = np.asarray([s.num_samples for s in manifest.shards], dtype=np.int64)
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # shard s: [starts[s], starts[s+1])
        if self.starts[-1] == 0:
            raise ShardFormatError(f"{directory}: the manifest lists no samples")
        self._index_files = [self.directory / s.index for s in manifest.shards]
        self.samples = _Refs(self)
        self._reset()

    def _reset(self) -> None:
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._warned: set[int] = set()
        self._pid = os.getpid()
        # the open-shard LRUs are shared with a read-ahead thread (decode.read_ahead):
        # an fd evicted by one thread must not be closed under another's pread
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    # -- where a sample lies ------------------------------------------------------------
    def locate(self, i: int) -> tuple[int, int]:
        """(shard, row in that shard's index) of sample ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside 0..{len(self) - 1}")
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        return shard, i - int(self.starts[shard])

    def _columns(self, shard: int) -> np.ndarray:
        self._check_process()
        with self._lock:
            return self._columns_locked(shard)

    def _columns_locked(self, shard: int) -> np.ndarray:
        array = self._maps.get(shard)
        if array is None:
            array = self._load_index(shard)
            expected = int(self.starts[shard + 1] - self.starts[shard])
            if array.shape[1] != expected:
                raise ShardFormatError(
                    f"{self._index_files[shard]}: {array.shape[1]} rows, the "
                    f"manifest says {expected} samples; rerun "
                    f"`{INDEX_COMMAND} {self.directory} --force`"
                )
            self._maps[shard] = array
            if len(self._maps) > MAX_OPEN_SHARDS:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(shard)
        return array

    def _load_index(self, shard: int) -> np.ndarray:
        try:
            return fmt_index.load(self._index_files[shard])
        except FileNotFoundError:
            raise ShardFormatError(
                f"{self._index_files[shard]} listed in the manifest is missing; "
                f"rerun `{INDEX_COMMAND} {self.directory} --force`"
            ) from None

    def _column(self, i: int) -> tuple[int, np.ndarray]:
        shard, row = self.locate(i)
        return shard, np.asarray(self._columns(shard)[:, row], dtype=np.int64)

    def ref(self, i: int) -> SampleRef:
        shard, col = self._column(i)
        jpg = (int(col[JPG_BLOCK]) * BLOCK, int(col[JPG_SIZE]))
        header = self._pread(shard, jpg[0] - BLOCK, BLOCK)
        return SampleRef(fmt_index.header_key(header), shard, jpg, (int(col[JSON_BLOCK]) * BLOCK, int(col[JSON_SIZE])))

    def crc_at(self, shard: int, jpg_offset: int) -> int | None:
        """The stored CRC of the JPEG whose data starts at ``jpg_offset`` in ``shard``
        (None if no sample starts there): for readers that give a position, not an index."""
        blocks = self._columns(shard)[JPG_BLOCK]
        row = int(np.searchsorted(blocks, jpg_offset // BLOCK))
        if row == len(blocks) or int(blocks[row]) * BLOCK != jpg_offset:
            return None
        return int(self._columns(shard)[CRC32, row])

    def aspect_of(self, indices: np.ndarray) -> np.ndarray:
        """width / height of the given samples, from the index (for bucketing): reads the
        width/height rows of the shards they fall in, nothing else."""
        indices = np.asarray(indices, dtype=np.int64)
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        out = np.empty(len(indices), dtype=np.float64)
        for shard in np.unique(shards):
            where = np.nonzero(shards == shard)[0]
            rows = indices[where] - self.starts[shard]
            columns = self._columns(int(shard))
            width = columns[WIDTH, rows].astype(np.float64)
            height = columns[HEIGHT, rows].astype(np.float64)
            bad = np.nonzero((width == 0) | (height == 0))[0]
            if len(bad):
                key = self.ref(int(indices[where[bad[0]]])).key
                raise ShardFormatError(
                    f"{self.paths[shard]}: {key}.json needs positive 'width' and 'height' for bucketing"
                )
            out[where] = width / height
        return out

    # -- bytes ------------------------------------------------------------------------
    def _check_process(self) -> None:
        if self._pid != os.getpid():  # forked: never share file offsets with the parent
            self._reset()

    def _pread(self, shard: int, offset: int, size: int) -> bytes:
        self._check_process()
        with self._lock:
            return os.pread(self._fd(shard), size, offset)

    def _fd(self, shard: int) -> int:
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = self._open(shard)
            if len(self._fds) > MAX_OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(shard)
        return fd

    def _open(self, shard: int) -> int:
        """A descriptor of the shard's tar, its size checked against the manifest: a
        mismatch is said once per process, and the samples it cut are caught as damaged
        (short reads, CRC) and replaced, as for a shard truncated under a running job."""
        try:
            fd = os.open(self.paths[shard], os.O_RDONLY)
        except FileNotFoundError:
            manifest = self.directory / "manifest.json"
            raise ShardFormatError(f"{self.paths[shard]} listed in {manifest} is missing") from None
        size = os.fstat(fd).st_size
        if size != self.sizes[shard] and shard not in self._warned:
            self._warned.add(shard)
            log.warning(
                "%s: %d bytes, the manifest says %d (truncated or modified shard; rebuild it): "
                "its damaged samples are replaced",
                self.paths[shard],
                size,
                self.sizes[shard],
            )
        return fd

    def read(self, i: int) -> Sample:
        """Header, image and caption member of sample ``i`` (one read when the caption
        follows the image, as in every layout we know), checked against the index:
        ``damage`` says why the image cannot be trusted (short read, checksum, markers)."""
        shard, col = self._column(i)
        jpg_at, jpg_size = int(col[JPG_BLOCK]) * BLOCK, int(col[JPG_SIZE])
        json_at, json_size = int(col[JSON_BLOCK]) * BLOCK, int(col[JSON_SIZE])
        start = jpg_at - BLOCK
        if json_at > jpg_at:
            data = self._pread(shard, start, json_at + json_size - start)
            meta_block = data[json_at - start - BLOCK : json_at - start + json_size]
        else:  # a caption member before its image
            data = self._pread(shard, start, BLOCK + jpg_size)
            meta_block = self._pread(shard, json_at - BLOCK, BLOCK + json_size)
        key = fmt_index.header_key(data[:BLOCK]) if len(data) >= BLOCK else f"#{i}"
        jpeg = data[BLOCK : BLOCK + jpg_size]
        meta, meta_name = meta_block[BLOCK:], fmt_index.header_name(meta_block[:BLOCK])
        damage = _damage(jpeg, jpg_size, len(meta) == json_size, int(col[CRC32]))
        return Sample(i, key, jpeg, meta, damage, field_type(split_member(meta_name)[1]))

    def jpeg(self, i: int) -> bytes:
        """The JPEG bytes of sample ``i``; a damaged sample raises, naming shard and key."""
        sample = self.read(i)
        if sample.damage:
            raise ShardFormatError(f"{self.paths[self.locate(i)[0]]}: {sample.key}.jpg is damaged ({sample.damage})")
        return sample.jpeg

    def meta(self, i: int, sample: Sample | None = None) -> dict:
        """The sample's metadata with its ``captions``: from its ``.json``, or from the
        ``.txt`` a foreign shard's index points at (``format.foreign_index``; an index
        made with ``--caption-key`` points at the ``.json``)."""
        sample = sample if sample is not None else self.read(i)
        if sample.meta_type == TEXT_TYPE:
            where, text, raw = f"{self.paths[self.locate(i)[0]]}: {sample.key}.txt", sample.meta_raw, None
        else:
            where, text, raw = f"{self.paths[self.locate(i)[0]]}: {sample.key}.json", None, sample.meta_raw
        try:
            return caption_meta(text, raw, self.caption_key)
        except NoCaption as err:
            raise ShardFormatError(f"{where}: {err}") from None

    def where(self, i: int, key: str) -> str:
        return f"{self.paths[self.locate(i)[0]].name}:{key}"

    def close(self) -> None:
        if self._pid == os.getpid():
            with self._lock:
                for fd in self._fds.values():
                    os.close(fd)
        self._reset()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_fds"], state["_pid"] = OrderedDict(), OrderedDict(), -1
        del state["_lock"]  # not picklable; ``_check_process`` makes a new one (pid -1)
        return state


def _damage(jpeg: bytes, size: int, meta_complete: bool, crc: int) -> str | None:
    """Why these JPEG bytes cannot be trusted, or None. The CRC is the sure check for bytes
    changed after the shard was written; the markers catch a JPEG truncated before that."""
    if len(jpeg) != size or not meta_complete:
        return f"short read: {len(jpeg)} of {size} bytes (truncated shard)"
    if fmt_index.crc32(jpeg) != crc:
        return "checksum mismatch (bytes changed after the shard was written)"
    if jpeg.startswith(b"\xff\xd8"):
        return None if b"\xff\xd9" in jpeg[-1024:] else "not a complete JPEG (no end marker)"
    if jpeg.startswith(OTHER_IMAGE_MAGIC):  # PNG, WebP (RIFF) in foreign shards
        return None
    return "not an image (no JPEG, PNG or WebP signature)"


def _check_listed(directory: Path, info, path: Path) -> None:
    """What the manifest alone can tell (no file-system call): every shard has a sidecar."""
    if not info.index:
        raise ShardFormatError(
            f"{path}: no index sidecar listed in {directory / 'manifest.json'} "
            f"(shards made before indexes existed); index the split once "
            f"with `{INDEX_COMMAND} {directory}`"
        )
