"""A copy of every finished checkpoint at an fsspec URL (``s3://bucket/run/``, any
fsspec protocol), and the way back when the local run folder has none.

``push`` runs on rank 0 after the local save is complete (in the background writer for
an async save): the tag's files first, its ``meta.json`` (the same sha256 manifest) after
them, then the mirror's ``latest``. A copy cut short leaves the mirror's ``latest`` on the
previous complete tag. ``restore_if_missing`` downloads the tag the mirror's ``latest``
names into an empty local folder and checks every file against the manifest; the
normal verification of a resume then runs on it as on any local checkpoint. The
endpoint and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL``, ...).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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

    def _remote(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def push(self, tag_dir: Path) -> None:
        """Rank 0: copy a complete local tag, manifest last, then move the mirror's ``latest``."""
        manifest = files.read_meta(tag_dir)["files"]
        for name in manifest:
            self.fs.put_file(str(tag_dir / name), self._remote(tag_dir.name, name))
        self.fs.put_file(str(tag_dir / META), self._remote(tag_dir.name, META))
        self.fs.pipe_file(self._remote(LATEST), (tag_dir.name + "\n").encode())
        log.info("checkpoint %s mirrored to %s/%s", tag_dir.name, self.url, tag_dir.name)

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
