"""The files of a checkpoint: written whole or not at all, and checked before a resume.

A save goes to a hidden ``.step_XXXXXXXX.tmp`` folder; once every rank wrote its
shards and ``meta.json`` records the size and sha256 of every file, rank 0 renames the
folder into place and only then moves ``latest``. A kill at any moment leaves either the
previous checkpoint named by ``latest`` or the new one, never a half-written folder.

Hashing is spread over the ranks: at save, each rank hashes the files it wrote itself
(``staging.write_staged``), while they are still in its page cache; at resume, each rank
checks what it reads for the load (``shared_load.py``), and a meta.json of the older format
(no file table) is checked here, rank r taking files r, r + W, ... of the sorted list.
The ranks then agree on the first problem any of them found.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import torch.distributed as tdist

from pixelbert_dist.collectives import gather_objects

META = "meta.json"
TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or resumed as asked."""


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def world() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def file_digest(path: Path) -> dict:
    with open(path, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new file, never half


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_folder(save_dir: Path, tag: str) -> Path:
    return save_dir / f".{tag}{TMP_SUFFIX}"


def tag_of_tmp(tmp: Path) -> str:
    return tmp.name[1 : -len(TMP_SUFFIX)]


def prepare_tmp(save_dir: Path, tag: str) -> Path:
    """Rank 0: the empty temporary folder for ``tag`` (a leftover of a killed save goes)."""
    tmp = tmp_folder(save_dir, tag)
    try:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoints to {save_dir}: {err.strerror or err} (is the folder writable?)"
        ) from None
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Rank 0: rename the finished temporary folder into place. A folder of the same tag
    already there (a step trained again after resuming an older tag) is moved aside first
    and deleted after."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(save_dir: Path) -> None:
    """Temporary folders of saves that were killed (rank 0, after a successful save)."""
    for path in save_dir.glob(f".step_*{TMP_SUFFIX}"):
        shutil.rmtree(path, ignore_errors=True)


# ---- reading and checking --------------------------------------------------------


def read_meta(tag_dir: str | Path) -> dict:
    path = Path(tag_dir) / META
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {tag_dir} is not a complete checkpoint of this "
            f"project (it is written last, after every rank saved)"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}): the checkpoint's record is damaged") from None
    if not isinstance(meta, dict) or not {"step", "world_size"} <= set(meta):
        raise CheckpointError(f"{path} lacks 'step' and 'world_size': not a meta.json of this project")
    return meta


def _check_file(path: Path, entry: dict) -> str | None:
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{path} has {size} bytes, meta.json recorded {entry['size']} (truncated or overwritten)"
    if file_digest(path)["sha256"] != entry["sha256"]:
        return f"{path}: sha256 differs from the one meta.json recorded (the file is corrupted)"
    return None


def _check_readable(path: Path) -> str | None:
    """A torch file of a checkpoint without a file table, read through without unpickling
    anything: torch.save writes a zip whose members carry CRC-32s."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"{path} cannot be read ({err}): truncated or overwritten (an older meta.json without sizes and sha256)"
    return f"{path}: its member {bad} fails its CRC check (the file is corrupted)" if bad else None


def verify(tag_dir: Path) -> str | None:
    """What is wrong with ``tag_dir`` (the first problem, named by file), or None when it is
    intact. A collective: every rank checks its share of the files."""
    try:
        meta = read_meta(tag_dir)
        files = meta.get("files")
        if files is not None:
            names = sorted(files)
            problems = [p for name in names[rank() :: world()] if (p := _check_file(tag_dir / name, files[name]))]
        else:  # an older meta.json records no files: read each through, checking its zip CRCs
            names = sorted(p.name for p in Path(tag_dir).iterdir() if p.suffix == ".pt" and p.is_file())
            problems = [p for name in names[rank() :: world()] if (p := _check_readable(tag_dir / name))]
    except CheckpointError as err:
        problems = [str(err)]
    found = [p for mine in gather_objects(problems) for p in mine]
    return found[0] if found else None
