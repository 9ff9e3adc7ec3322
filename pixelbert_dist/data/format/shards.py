"""The shard format: WebDataset tar files plus a manifest.

A split directory holds ``NAME-000000.tar, NAME-000001.tar, ...`` whose members are
``KEY.jpg`` then ``KEY.json`` for each sample (the WebDataset layout that DALI's
``fn.readers.webdataset``, OpenCLIP and LAION use), a ``manifest.json`` that lists the
shards with their sample counts, sha256, byte size and index sidecar (``format.index``:
offsets, sizes, width, height and a CRC per sample, so no reader scans a tar), and ``skipped.jsonl`` with one
``{"file", "reason", "kind"}`` line per input that did not make it into the shards (kind
``image``: an image not written; ``caption``: a caption dropped; the manifest counts both;
``shard``: a foreign tar indexed up to its damage, ``format.foreign_index``).

Shards are written to ``*.tar.tmp`` and renamed when complete, so a crash never leaves
a half shard that looks finished. Tar headers carry no time stamps or owners, so the
same samples always give byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from pixelbert_dist.data.format.index import IndexBuilder, ShardFormatError, index_name, num_rows, scan_tar

FORMAT = "pixelbert-wds-1"
MANIFEST = "manifest.json"
SKIPPED = "skipped.jsonl"
# Keys become tar member names ``KEY.jpg``: WebDataset splits the key at the first dot.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,90}$")
_HASH_CHUNK = 1 << 20


@dataclass
class ShardInfo:
    file: str
    num_samples: int
    sha256: str
    size: int = 0  # bytes of the tar (a cheap truncation check at start-up)
    index: str = ""  # the index sidecar's file name; "" for shards made before indexes


@dataclass
class Manifest:
    name: str
    num_samples: int
    shards: list[ShardInfo]
    source: str = ""
    skipped: int = 0  # entries in skipped.jsonl: images_skipped + captions_dropped (+ damaged foreign tars)
    format: str = FORMAT
    images_skipped: int = 0  # inputs not written (missing, unreadable, no caption, duplicate)
    captions_dropped: int = 0  # captions left out (empty, or naming an unknown image)
    # Foreign shards (format.foreign_index): the data.caption_key their index rows were
    # chosen by; "" for this project's own shards, whose rows point at the .json (any key reads).
    caption_key: str = ""
    # Where the manifest was read from; not written into the file.
    directory: Path | None = field(default=None, compare=False, repr=False)

    def shard_paths(self) -> list[Path]:
        base = self.directory if self.directory is not None else Path(".")
        return [base / s.file for s in self.shards]

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("directory")
        if not out["caption_key"]:
            out.pop("caption_key")  # own shards' manifests stay as they were
        return {"format": out.pop("format"), **out}


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise ShardFormatError(
            f"sample key {key!r} must be 1-90 characters of [A-Za-z0-9_-] "
            "(no dots: WebDataset splits member names at the first dot)"
        )
    return key


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; returns the offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def write_shard(path: str | Path, samples: Iterable[tuple[str, bytes, dict]]) -> ShardInfo:
    """Write ``(key, jpeg_bytes, meta)`` samples to the tar ``path`` and its index
    sidecar, atomically (the index is renamed into place before the tar)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    index = IndexBuilder()
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpeg, meta in samples:
                check_key(key)
                jpg_at = _add_member(tar, f"{key}.jpg", jpeg)
                raw = encode_meta(meta)
                index.add(jpg_at, jpeg, _add_member(tar, f"{key}.json", raw), len(raw), meta)
        index.save(path.with_name(index_name(path.name)))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return ShardInfo(
        file=path.name,
        num_samples=len(index.columns),
        sha256=sha256_file(path),
        size=path.stat().st_size,
        index=index_name(path.name),
    )


def _attach_index(directory: Path, info: ShardInfo) -> None:
    """List a shard's index sidecar (and the tar size) when one lies next to it with the
    shard's sample count: builders pass ShardInfo(file, num_samples, sha256) only."""
    sidecar = directory / index_name(info.file)
    if info.index or not sidecar.is_file() or not (directory / info.file).is_file():
        return
    if num_rows(sidecar) == info.num_samples:
        info.index, info.size = sidecar.name, (directory / info.file).stat().st_size


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    for info in manifest.shards:
        _attach_index(Path(directory), info)
    path = Path(directory) / MANIFEST
    tmp = path.with_name(MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    os.replace(tmp, path)
    return path


def write_skipped(directory: str | Path, entries: Iterable[dict]) -> int:
    """Write ``skipped.jsonl``; returns the number of entries."""
    lines = [
        json.dumps({"file": str(e["file"]), "reason": str(e["reason"]), **({"kind": e["kind"]} if "kind" in e else {})})
        for e in entries
    ]
    (Path(directory) / SKIPPED).write_text("".join(line + "\n" for line in lines))
    return len(lines)


def read_skipped(directory: str | Path) -> list[dict]:
    path = Path(directory) / SKIPPED
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _manifest_from_json(data, path: Path) -> Manifest:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ShardFormatError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    try:
        shards = [
            ShardInfo(
                file=str(s["file"]),
                num_samples=int(s["num_samples"]),
                sha256=str(s["sha256"]),
                size=int(s.get("size", 0)),
                index=str(s.get("index", "")),
            )
            for s in data["shards"]
        ]
        manifest = Manifest(
            name=str(data["name"]),
            num_samples=int(data["num_samples"]),
            shards=shards,
            source=str(data.get("source", "")),
            skipped=int(data.get("skipped", 0)),
            images_skipped=int(data.get("images_skipped", 0)),
            captions_dropped=int(data.get("captions_dropped", 0)),
            caption_key=str(data.get("caption_key", "")),
            directory=path.parent,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ShardFormatError(f"{path}: malformed manifest ({type(err).__name__}: {err})") from None
    if sum(s.num_samples for s in shards) != manifest.num_samples:
        raise ShardFormatError(
            f"{path}: num_samples {manifest.num_samples} differs from the "
            f"sum over its shards ({sum(s.num_samples for s in shards)})"
        )
    return manifest


def read_manifest(directory: str | Path, verify: bool = False, check_files: bool = True) -> Manifest:
    """Read ``DIR/manifest.json``; ``check_files``: every shard is there (a ``stat`` per
    shard: the readers skip it and name a missing shard when they open it); ``verify``:
    also every shard's sha256."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ShardFormatError(
            f"{path} not found: {directory} is not a shard directory (build one with launch/make_shards.py)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardFormatError(f"{path}: not valid JSON ({err})") from None
    manifest = _manifest_from_json(data, path)
    for info, shard in zip(manifest.shards, manifest.shard_paths()):
        if not (check_files or verify):
            break
        if not shard.is_file():
            raise ShardFormatError(f"{shard} listed in {path} is missing")
        if verify and sha256_file(shard) != info.sha256:
            raise ShardFormatError(f"{shard}: sha256 does not match {path} (truncated or modified shard; rebuild it)")
    return manifest


def index_split(directory: str | Path, force: bool = False, progress=None) -> int:
    """Write the index sidecar of every shard that has none (all with ``force``) and
    list them in the manifest; returns how many were written. One sequential pass over
    each such tar: run once per split, never on every rank (the loaders refuse a split
    without indexes, naming this)."""
    manifest = read_manifest(directory)
    written = 0
    for info, path in zip(manifest.shards, manifest.shard_paths()):
        sidecar = path.with_name(index_name(info.file))
        if info.index and sidecar.is_file() and not force:
            continue
        scan_tar(path, expected=info.num_samples).save(sidecar)
        info.index, info.size = "", 0  # re-attached (with the tar size) below
        written += 1
        if progress is not None:
            progress(path)
    write_manifest(directory, manifest)
    return written


def iter_shard(path: str | Path) -> Iterator[tuple[str, bytes, dict]]:
    """Yield ``(key, jpeg_bytes, meta)`` from one tar shard, checking the member layout."""
    path = Path(path)
    try:
        with tarfile.open(path, "r") as tar:
            pending: tuple[str, bytes] | None = None
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if ext == "jpg" and pending is None:
                    pending = (key, data)
                elif ext == "json" and pending is not None and pending[0] == key:
                    yield key, pending[1], json.loads(data)
                    pending = None
                else:
                    raise ShardFormatError(
                        f"{path}: unexpected member {member.name!r} (expected KEY.jpg followed by KEY.json)"
                    )
            if pending is not None:
                raise ShardFormatError(f"{path}: {pending[0]}.jpg has no {pending[0]}.json")
    except (tarfile.TarError, EOFError, json.JSONDecodeError) as err:
        raise ShardFormatError(f"{path}: unreadable shard ({type(err).__name__}: {err})") from None


def iter_samples(directory: str | Path) -> Iterator[tuple[str, bytes, dict]]:
    """Yield every ``(key, jpeg_bytes, meta)`` of a split directory, in shard order."""
    for shard in read_manifest(directory).shard_paths():
        yield from iter_shard(shard)


class ShardWriter:
    """Write samples into numbered shards of ``samples_per_shard`` and a manifest.

    Use as a context manager; the manifest is written only when the block ends without
    an exception, so an interrupted run never looks finished.
    """

    def __init__(self, out_dir: str | Path, name: str, samples_per_shard: int = 2000, source: str = ""):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = Path(out_dir)
        self.name, self.source = name, source
        self.samples_per_shard = samples_per_shard
        self.shards: list[ShardInfo] = []
        self.skipped: list[dict] = []
        self._buffer: list[tuple[str, bytes, dict]] = []
        self.manifest: Manifest | None = None  # set when the block ends cleanly

    def __enter__(self) -> "ShardWriter":
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    def write(self, key: str, jpeg: bytes, meta: dict) -> None:
        self._buffer.append((check_key(key), jpeg, meta))
        if len(self._buffer) >= self.samples_per_shard:
            self._flush()

    def skip(self, file: str, reason: str) -> None:
        self.skipped.append({"file": str(file), "reason": reason})

    def _flush(self) -> None:
        if self._buffer:
            path = self.out_dir / shard_name(self.name, len(self.shards))
            self.shards.append(write_shard(path, self._buffer))
            self._buffer = []

    def close(self) -> Manifest:
        self._flush()
        skipped = write_skipped(self.out_dir, self.skipped)
        manifest = Manifest(
            name=self.name,
            num_samples=sum(s.num_samples for s in self.shards),
            shards=list(self.shards),
            source=self.source,
            skipped=skipped,
            directory=self.out_dir,
        )
        write_manifest(self.out_dir, manifest)
        return manifest

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.manifest = self.close()
