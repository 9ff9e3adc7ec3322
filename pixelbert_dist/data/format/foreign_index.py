"""Index sidecars and a manifest for foreign webdataset shards (img2dataset, OpenCLIP,
DataComp), written beside the tars, which are never rewritten:

    python launch/make_shards.py index /data/cc3m     # 00000.tar ... -> 00000.idx.npy ..., manifest.json
    python launch/make_shards.py index /data/cc3m --caption-key caption_en   # captions from a JSON field

Each tar is mapped and walked once (``tarfile`` over its headers, the member bytes sliced
from the map; ``format.members``: webdataset's grouping): a row per sample with an image
and a caption by the rule of ``caption_key`` (``data.caption_key``; default ``txt``: the
``.txt``, else the JSON's ``caption`` / ``captions``; any other value: that field of the
JSON), holding the image's offset, size and CRC32, its width and height from the image
header (``format.image_size``: nothing is decoded), and the caption member's offset and
size (the ``.txt`` when the default rule finds one there, else the ``.json``: the reader
tells them apart by the member's name). Samples without image or caption, and the damage
of a cut tar (indexed up to it), go to ``skipped.jsonl`` by kind.

The key is a property of the whole index, recorded in the manifest (``caption_key``): it
decides which samples are rows, so an index made for one key cannot serve another (the
loader refuses a mismatch, naming the command that indexes again). One caption member per
row keeps a row at 28 bytes (28 GB at 10^9 samples); rows holding both the ``.txt`` and
the ``.json`` would cost 36, and still list the wrong samples for any other key. The split then reads in the indexed
mode (exact shuffle, resume and bucketing; DALI through the external source) and streams
with CRC checks and O(1) resume.

Shards are indexed in parallel worker processes; each finished shard is appended to
``index-progress.jsonl``, so a rerun after a crash indexes only the rest (a shard whose
size changed since, or that was indexed for another caption key, is indexed again). The
manifest is written last and the progress file removed: a folder with a manifest is
finished.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import mmap
import multiprocessing
import os
import shlex
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from pixelbert_dist.data.format.image_size import image_size
from pixelbert_dist.data.format.index import INDEX_COMMAND, IndexBuilder, ShardFormatError, index_name
from pixelbert_dist.data.format.members import DEFAULT_CAPTION_KEY, Member, group_members, has_caption
from pixelbert_dist.data.format.shards import MANIFEST, Manifest, ShardInfo, write_manifest, write_skipped

PROGRESS = "index-progress.jsonl"
SOURCE = "webdataset"
log = logging.getLogger("pixelbert_dist.data")


def _members(tar: tarfile.TarFile, data: mmap.mmap, broke: list) -> Iterator[Member]:
    """The file members of a tar opened in seekable mode (tarfile seeks over the data,
    as a header walk does), their bytes sliced from the mapped file. A member whose data
    runs past the end of the file, or a tar without its end-of-archive blocks (cut at a
    member boundary, where tarfile just stops), goes to ``broke``."""
    for member in tar:
        if not member.isfile():
            continue
        end = member.offset_data + member.size
        if end > len(data):
            broke.append(EOFError(f"{member.name} ends at byte {end}, past the end of the file ({len(data)} bytes)"))
            return
        yield Member(member.name, data[member.offset_data : end], member.offset_data)
    if len(data) - tar.offset < 2 * tarfile.BLOCKSIZE:
        broke.append(EOFError(f"no end-of-archive blocks after byte {tar.offset} (cut between members)"))


def scan_foreign(path: str | Path, caption_key: str = DEFAULT_CAPTION_KEY) -> dict:
    """Index one foreign tar for ``caption_key``: writes ``NAME.idx.npy`` beside it,
    returns its progress record (file, num_samples, sha256, size, index, caption_key,
    skipped entries)."""
    path = Path(path)
    builder, skipped, broke = IndexBuilder(), [], []
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ShardFormatError(f"{path}: an empty file, not a tar")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            digest = hashlib.sha256(data).hexdigest()
            try:
                with tarfile.open(path, "r:") as tar:
                    for sample in group_members(_members(tar, data, broke)):
                        _add_sample(builder, skipped, path, sample, caption_key)
            except tarfile.ReadError as err:  # not a tar from its first block on
                broke.append(err)
    if broke:
        reason = f"truncated_tar: indexed up to the damage ({type(broke[0]).__name__}: {broke[0]})"
        skipped.append({"file": path.name, "reason": reason, "kind": "shard"})
    builder.save(path.with_name(index_name(path.name)))
    return {
        "file": path.name,
        "num_samples": len(builder.columns),
        "sha256": digest,
        "size": path.stat().st_size,
        "index": index_name(path.name),
        "caption_key": caption_key,
        "skipped": skipped,
    }


def _add_sample(builder: IndexBuilder, skipped: list, path: Path, sample, caption_key: str) -> None:
    where = f"{path.name}:{sample.key}"
    if sample.image is None:
        skipped.append({"file": where, "reason": "no_image: no jpg/jpeg/png/webp member", "kind": "image"})
    elif not has_caption(sample.text, sample.meta, caption_key):
        looked = "no .txt, nor caption(s)" if caption_key == DEFAULT_CAPTION_KEY else f"no {caption_key!r}"
        skipped.append({"file": where, "reason": f"no_caption: {looked} in its .json", "kind": "image"})
    else:
        _add_row(builder, sample, caption_key)


def _add_row(builder: IndexBuilder, sample, caption_key: str) -> None:
    if sample.text is not None and caption_key == DEFAULT_CAPTION_KEY:
        caption_at, caption_size = sample.text_offset, len(sample.text)
    else:
        caption_at, caption_size = sample.meta_offset, len(sample.meta)
    width, height = image_size(sample.image)
    builder.add(sample.image_offset, sample.image, caption_at, caption_size, {"width": width, "height": height})


def _done_before(directory: Path, caption_key: str) -> dict[str, dict]:
    """The progress records of shards a crashed run finished (and still as they were)
    for ``caption_key``; those of another key are indexed again, said once."""
    progress = directory / PROGRESS
    if not progress.is_file():
        return {}
    latest = {}  # a shard indexed again (another key, a changed tar) has a later line
    for line in progress.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        latest[record["file"]] = record
    done, other_keys = {}, {}
    for name, record in latest.items():
        tar, sidecar = directory / name, directory / record["index"]
        made_for = record.get("caption_key", DEFAULT_CAPTION_KEY)
        if made_for != caption_key:
            other_keys[name] = made_for
        elif tar.is_file() and sidecar.is_file() and tar.stat().st_size == record["size"]:
            done[name] = record
    if other_keys:
        keys = ", ".join(repr(k) for k in sorted(set(other_keys.values())))
        log.warning(
            "%s: %d shard(s) in %s were indexed for caption key %s, not %r: indexing them again",
            directory,
            len(other_keys),
            PROGRESS,
            keys,
            caption_key,
        )
    return done


def index_foreign(
    directory: str | Path,
    workers: int | None = None,
    progress: Callable[[dict], None] | None = None,
    caption_key: str = DEFAULT_CAPTION_KEY,
) -> Manifest:
    """Index every ``*.tar`` of ``directory`` for ``caption_key`` (module docstring);
    returns the manifest."""
    directory = Path(directory)
    if not caption_key.strip():
        raise ShardFormatError(f"{directory}: an empty caption key (give a JSON field, or leave out --caption-key)")
    if (directory / MANIFEST).is_file():
        raise ShardFormatError(f"{directory} has a {MANIFEST} already: index it with --force, or delete the manifest")
    tars = sorted(directory.glob("*.tar"))
    if not tars:
        raise ShardFormatError(f"{directory}: no .tar files to index")
    done = _done_before(directory, caption_key)
    todo = [t for t in tars if t.name not in done]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    with open(directory / PROGRESS, "a") as log_file:
        for record in _scan_all(todo, workers, caption_key):
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            done[record["file"]] = record
            if progress is not None:
                progress(record)
    records = [done[t.name] for t in tars]
    shards = [ShardInfo(r["file"], r["num_samples"], r["sha256"], r["size"], r["index"]) for r in records]
    entries = [{"kind": "image", **entry} for r in records for entry in r["skipped"]]  # older progress: no kind
    skipped = write_skipped(directory, entries)
    manifest = Manifest(directory.name, sum(s.num_samples for s in shards), shards, SOURCE, skipped)
    manifest.images_skipped = sum(entry["kind"] == "image" for entry in entries)  # samples left out of the index
    manifest.caption_key = caption_key
    manifest.directory = directory
    write_manifest(directory, manifest)
    (directory / PROGRESS).unlink()
    return manifest


def _scan_all(todo: list[Path], workers: int, caption_key: str):
    scan = functools.partial(scan_foreign, caption_key=caption_key)
    if workers == 1:
        yield from map(scan, todo)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap_unordered(scan, todo)


def reindex_command(directory: str | Path, caption_key: str) -> str:
    """The command that indexes ``directory`` again for ``caption_key``."""
    command = f"{INDEX_COMMAND} {shlex.quote(str(directory))}"
    if caption_key != DEFAULT_CAPTION_KEY:
        command += f" --caption-key {shlex.quote(caption_key)}"
    return command + " --force"


def caption_key_mismatch(directory: str | Path, indexed_for: str, wanted: str) -> str | None:
    """One line saying that a foreign folder indexed for caption key ``indexed_for`` (its
    manifest's; "" in manifests made before the key was recorded: the default) cannot be
    read with ``data.caption_key=wanted``, and how to index it again; None if they agree."""
    indexed_for = indexed_for or DEFAULT_CAPTION_KEY
    if indexed_for == wanted:
        return None
    return (
        f"data.caption_key={wanted!r}: {directory} was indexed for caption key {indexed_for!r} "
        f"(its {MANIFEST}: the rows are the samples with that caption); index it again for "
        f"{wanted!r}: `{reindex_command(directory, wanted)}`, or set data.caption_key={indexed_for!r}"
    )
