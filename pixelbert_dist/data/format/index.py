"""The per-shard index sidecar: where each sample lies in its tar, without reading the tar.

``NAME-000000.tar`` gets ``NAME-000000.idx.npy``: a ``uint32`` array of shape
``(len(FIELDS), n)``, one column per sample in tar order, written by ``write_shard``
(or by ``python launch/make_shards.py index DIR`` for shards made before indexes
existed) and listed in the manifest. 28 bytes a sample, column-major so that bucketing
reads only the width/height rows, and mmap-able: a rank maps a shard's index only when
it reads from that shard. Offsets are stored in 512-byte tar blocks (every member's data
starts on a block), so 32 bits address tars up to 2 TiB. ``crc32`` is zlib's CRC of the
JPEG bytes: the cheap, sure check that the bytes are still the ones the builder wrote.
The sample's key is not stored: it is the name in the tar header just before its JPEG.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from pathlib import Path

import numpy as np

FIELDS = ("jpg_block", "jpg_size", "json_block", "json_size", "width", "height", "crc32")
JPG_BLOCK, JPG_SIZE, JSON_BLOCK, JSON_SIZE, WIDTH, HEIGHT, CRC32 = range(len(FIELDS))
BLOCK = 512
SUFFIX = ".idx.npy"
INDEX_COMMAND = "python launch/make_shards.py index"


class ShardFormatError(ValueError):
    """A shard directory, manifest, index or shard file that does not follow the format
    (defined here, the lowest module of the format; ``shards`` re-exports it)."""


def index_name(tar_name: str) -> str:
    """``train-000003.tar`` -> ``train-000003.idx.npy``."""
    stem = tar_name[:-4] if tar_name.endswith(".tar") else tar_name
    return stem + SUFFIX


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _dimension(meta: dict, name: str) -> int:
    try:
        value = int(meta.get(name, 0))
    except (TypeError, ValueError):
        return 0
    return value if 0 < value < 2**32 else 0


class IndexBuilder:
    """Collects one column per sample while a shard is written or scanned."""

    def __init__(self):
        self.columns: list[tuple[int, ...]] = []

    def add(self, jpg_offset: int, jpeg: bytes, json_offset: int, json_size: int, meta: dict) -> None:
        if jpg_offset % BLOCK or json_offset % BLOCK:
            raise ValueError(f"tar member data at offsets {jpg_offset}/{json_offset} is not {BLOCK}-byte aligned")
        self.columns.append(
            (
                jpg_offset // BLOCK,
                len(jpeg),
                json_offset // BLOCK,
                json_size,
                _dimension(meta, "width"),
                _dimension(meta, "height"),
                crc32(jpeg),
            )
        )

    def array(self) -> np.ndarray:
        out = np.zeros((len(FIELDS), len(self.columns)), dtype=np.uint32)
        if self.columns:
            out[:] = np.asarray(self.columns, dtype=np.uint64).T
        return out

    def save(self, path: str | Path) -> Path:
        """Atomic write (tmp + rename): a half index never looks finished."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, self.array())
        os.replace(tmp, path)
        return path


def load(path: str | Path, mmap: bool = True) -> np.ndarray:
    return _checked(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False), path)


def _checked(array: np.ndarray, where) -> np.ndarray:
    if array.dtype != np.uint32 or array.ndim != 2 or array.shape[0] != len(FIELDS):
        raise ShardFormatError(
            f"{where}: not a shard index (dtype {array.dtype}, shape {array.shape}; expected uint32 ({len(FIELDS)}, n))"
        )
    return array


def from_bytes(data: bytes, where: str) -> np.ndarray:
    """An index read whole from a stream (streaming mode), named ``where`` in errors. Its
    samples must lie in tar order (rising offsets): a reader matches them by offset."""
    try:
        array = _checked(np.load(io.BytesIO(data), allow_pickle=False), where)
    except (ValueError, EOFError, OSError) as err:
        if isinstance(err, ShardFormatError):
            raise
        raise ShardFormatError(f"{where}: not a shard index ({len(data)} bytes; {err})") from None
    if np.any(np.diff(array[JPG_BLOCK].astype(np.int64)) <= 0):
        raise ShardFormatError(f"{where}: not a shard index (its sample offsets do not rise in tar order)")
    return array


def num_rows(path: str | Path) -> int:
    return load(path).shape[1]


def header_name(header: bytes) -> str:
    """The member name in a 512-byte USTAR header (a PAX header before it may hold a
    longer one; the USTAR field holds names of up to 100 characters whole)."""
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
    return f"{prefix}/{name}" if prefix else name


def header_key(header: bytes) -> str:
    """The sample key from the 512-byte USTAR header of ``KEY.jpg``."""
    return header_name(header).rsplit("/", 1)[-1].partition(".")[0]


def scan_tar(path: str | Path, expected: int | None = None) -> IndexBuilder:
    """Index a finished shard: one sequential pass over its members (JPEG bytes for the
    checksum, KEY.json for width/height). For shards made before indexes existed."""
    path = Path(path)
    builder, pending = IndexBuilder(), None
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                data = tar.extractfile(member).read()
                if ext == "jpg" and pending is None:
                    _check_header(path, member)
                    pending = (key, member.offset_data, data)
                elif ext == "json" and pending is not None and pending[0] == key:
                    meta = json.loads(data)
                    builder.add(
                        pending[1], pending[2], member.offset_data, member.size, meta if isinstance(meta, dict) else {}
                    )
                    pending = None
                else:
                    raise ShardFormatError(
                        f"{path}: unexpected member {member.name!r} (expected KEY.jpg followed by KEY.json)"
                    )
    except (tarfile.TarError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardFormatError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from None
    if pending is not None or (expected is not None and len(builder.columns) != expected):
        raise ShardFormatError(
            f"{path}: holds {len(builder.columns)} complete samples, the "
            f"manifest says {expected} (truncated shard? rebuild it)"
        )
    return builder


def _check_header(path: Path, member: tarfile.TarInfo) -> None:
    """The loader reads a key from the header right before the data: it must be there."""
    with open(path, "rb") as f:
        f.seek(member.offset_data - BLOCK)
        got = header_key(f.read(BLOCK))
    if got != member.name.rpartition("/")[2].partition(".")[0]:
        raise ShardFormatError(
            f"{path}: member {member.name!r} has extended tar headers (long "
            "names?); rewrite the shard in USTAR format (launch/make_shards.py)"
        )
