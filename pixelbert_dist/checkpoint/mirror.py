"""A copy of every finished checkpoint at an fsspec URL (``s3://bucket/run/``, any
fsspec protocol), and the way back when the local run folder has none.

``push_later`` runs on rank 0 after the local save is complete and hands the tag to an
upload thread of its own: the next save waits for the previous save's local writing only,
never for an upload (a slow object store would otherwise stretch every save to the
upload's time). The tag's files are hard-linked into a hidden ``.mirror.step_X`` folder
first, so that local retention may delete the tag while its upload runs. One upload runs
and one waits; a newer tag replaces the waiting one (the mirror keeps the newest). Each
upload sends the tag's files, its ``meta.json`` (the same sha256 manifest) after them,
then the mirror's ``latest``: a copy cut short leaves the mirror's ``latest`` on the
previous complete tag. A failed upload is logged; the next save's upload tries again.

``restore_if_missing`` downloads the tag the mirror's ``latest`` names into an empty local
folder and checks every file against the manifest; the normal verification of a resume
then runs on it as on any local checkpoint. The endpoint and credentials come from the
usual AWS variables (``AWS_ENDPOINT_URL``, ...).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

from pixelbert_dist.checkpoint import files
from pixelbert_dist.checkpoint.files import META, CheckpointError
from pixelbert_dist.checkpoint.layout import LATEST, list_tags
from pixelbert_dist.collectives import gather_objects

log = logging.getLogger(__name__)


class Mirror:
    """The remote folder ``url`` holding copies of the run's checkpoints."""

    def __init__(self, url: str):
        import fsspec  # the s3 extra: only runs with a mirror need it

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._waiting: tuple[Path, str] | None = None  # (files to upload, tag) not started yet
        self.last_error: str | None = None  # of the last upload; None when it went through

    def _remote(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def push(self, tag_dir: Path, tag: str | None = None) -> None:
        """Copy a complete local tag (under the name ``tag``), manifest last, then move the
        mirror's ``latest``."""
        tag = tag or tag_dir.name
        manifest = files.read_meta(tag_dir)["files"]
        for name in manifest:
            self.fs.put_file(str(tag_dir / name), self._remote(tag, name))
        self.fs.put_file(str(tag_dir / META), self._remote(tag, META))
        self.fs.pipe_file(self._remote(LATEST), (tag + "\n").encode())
        log.info("checkpoint %s mirrored to %s/%s", tag, self.url, tag)

    def push_later(self, tag_dir: Path) -> None:
        """Rank 0: upload ``tag_dir`` in the background (see the module doc)."""
        if self._thread is None:  # the first upload of this process: links a killed one left
            for stale in tag_dir.parent.glob(".mirror.step_*"):
                shutil.rmtree(stale, ignore_errors=True)
        held = _hard_links(tag_dir)
        with self._lock:
            if self._waiting is not None:
                log.warning("checkpoint %s not mirrored: %s is newer", self._waiting[1], tag_dir.name)
                _drop(*self._waiting)
            self._waiting = (held, tag_dir.name)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._upload_all, name="checkpoint-mirror", daemon=True)
                self._thread.start()

    def _upload_all(self) -> None:
        while True:
            with self._lock:
                if self._waiting is None:
                    return
                (held, tag), self._waiting = self._waiting, None
            try:
                self.push(held, tag)
                self.last_error = None
            except Exception as err:  # noqa: BLE001 - an upload never stops training; logged
                self.last_error = f"mirroring {tag} to {self.url} failed: {type(err).__name__}: {err}"
                log.error("%s (the local checkpoint is intact; the next save's upload tries again)", self.last_error)
            finally:
                _drop(held, tag)

    def wait(self) -> None:
        """Block until the uploads asked for are done (the end of a run)."""
        thread = self._thread
        if thread is not None:
            thread.join()

    def latest(self) -> str | None:
        try:
            return self.fs.cat_file(self._remote(LATEST)).decode().strip() or None
        except FileNotFoundError:
            return None

    def _download(self, tag: str, local: Path) -> None:
        tmp = files.tmp_folder(local, tag)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = json.loads(self.fs.cat_file(self._remote(tag, META)))
        for name, entry in meta.get("files", {}).items():
            self.fs.get_file(self._remote(tag, name), str(tmp / name))
            got = files.file_digest(tmp / name)
            if got != entry:
                raise CheckpointError(
                    f"{self.url}/{tag}/{name}: {got['size']} bytes, sha256 {got['sha256'][:12]}.. but its "
                    f"meta.json recorded {entry['size']} bytes, {entry['sha256'][:12]}..: the mirror's copy is damaged"
                )
        files.write_text_atomic(tmp / META, json.dumps(meta, indent=2) + "\n")
        files.publish(tmp, local / tag)
        files.write_text_atomic(local / LATEST, tag + "\n")

    def restore_if_missing(self, local: Path) -> None:
        """Every rank (a collective): when ``local`` holds no checkpoint, rank 0 fetches the
        mirror's latest one into it; an error (a damaged copy) is raised on every rank."""
        error = None
        if files.rank() == 0 and not list_tags(local):
            try:
                tag = self.latest()
                if tag is not None:
                    log.info("no local checkpoint in %s: fetching %s/%s", local, self.url, tag)
                    os.makedirs(local, exist_ok=True)
                    self._download(tag, local)
            except (OSError, CheckpointError, ValueError) as err:
                error = f"cannot resume from the mirror {self.url}: {err}"
        error = gather_objects(error)[0]
        if error:
            raise CheckpointError(error)


def _hard_links(tag_dir: Path) -> Path:
    """The files of ``tag_dir`` linked into a hidden sibling folder (no bytes copied), which
    outlives the tag's deletion by retention; the tag itself where links are refused."""
    held = tag_dir.with_name(f".mirror.{tag_dir.name}")
    shutil.rmtree(held, ignore_errors=True)
    try:
        held.mkdir()
        for name in [*files.read_meta(tag_dir)["files"], META]:
            os.link(tag_dir / name, held / name)
    except OSError as err:
        shutil.rmtree(held, ignore_errors=True)
        log.warning("uploading %s from its folder (hard links refused: %s)", tag_dir, err)
        return tag_dir
    return held


def _drop(held: Path, tag: str) -> None:
    if held.name == f".mirror.{tag}":
        shutil.rmtree(held, ignore_errors=True)
