"""The run folder: one run at a time (a lock), writable before training starts, and a
record that a resume or a re-run never silently rewrites.

* ``RunLock``: rank 0 holds an ``flock`` on ``RUN_DIR/run.lock`` (holder's host, pid and
  start time inside). The kernel drops the lock when its process dies, so a stale lock
  file from a killed run is taken over (and said so); a live holder is a clear error.
  Where the file system has no ``flock``, a holder on this host is checked by pid.
* ``supersede_rows``: a run resumed at step S moves the ``metrics.jsonl`` rows of steps
  after S (logged before a crash, about to be trained again) to
  ``metrics.superseded.jsonl``: no step appears twice, nothing is lost.
* ``record_config``: ``config.yaml`` is the config in effect; a resume that changed it
  keeps the previous one as ``config.until_step_XXXXXXXX.yaml``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import tempfile
import time
from pathlib import Path

from pixelbert_dist.config import ConfigError

log = logging.getLogger(__name__)
LOCK = "run.lock"
METRICS, SUPERSEDED = "metrics.jsonl", "metrics.superseded.jsonl"


class RunFolderError(RuntimeError):
    """A run folder this run may not use as asked."""


def check_run_dir_writable(run_dir: Path) -> None:
    """Fail before any training, on every rank alike (so no rank waits for a failed one),
    when the run folder or its checkpoint folder cannot be written. Creates nothing that
    stays: a run refused later (a contradictory config, say) leaves no empty folder behind."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    for folder in (existing, run_dir / "checkpoints"):
        if not folder.exists():
            continue
        problem = _unwritable(folder)
        if problem:
            what = "checkpoints" if folder.name == "checkpoints" else "checkpoints, logs and the export"
            raise ConfigError(f"run_dir={str(run_dir)!r} is not a writable folder ({problem}): {what} go there")


def _unwritable(folder: Path) -> str | None:
    if not folder.is_dir():
        return f"{folder} is a file"
    try:  # the real test: permissions, a read-only mount, an immutable folder, root or not
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as err:
        return f"{folder} is not writable: {err.strerror or err}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``RunLock(run_dir).acquire()`` on rank 0; ``release()`` when the run ends."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            return {}

    def _busy(self, holder: dict) -> RunFolderError:
        who = f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"
        return RunFolderError(
            f"{self.path.parent} is in use by another run ({who}; lock file {self.path}): two runs in one "
            "folder would interleave their metrics, move each other's `latest` and prune each other's "
            "checkpoints. Use another run_dir, or stop that run first."
        )

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._busy(self._holder()) from None
            except OSError as err:  # no flock here (some network file systems)
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                holder = self._holder()
                if (
                    holder.get("host") == socket.gethostname()
                    and _pid_alive(int(holder.get("pid", -1)))
                    and holder.get("pid") != os.getpid()
                ):
                    os.close(fd)
                    raise self._busy(holder) from None
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the file was replaced between open and lock: try again
        previous = self._holder()
        if previous.get("pid") and previous.get("pid") != os.getpid():
            log.warning(
                "took over the stale lock %s of a run that is no longer running (host %s, pid %s)",
                self.path,
                previous.get("host"),
                previous.get("pid"),
            )
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            ).encode(),
            0,
        )
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still holding it: nobody locks the file we delete
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __del__(self):  # a trainer dropped without fit() (an error in a test, say) frees the folder
        try:
            self.release()
        except Exception:  # noqa: BLE001 - at interpreter exit the kernel frees it anyway
            pass


def supersede_rows(run_dir: Path, step: int) -> int:
    """Move the metric rows of steps after ``step`` to metrics.superseded.jsonl (rank 0,
    before logging starts); returns how many moved."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            later = json.loads(line).get("step", 0) > step
        except (json.JSONDecodeError, AttributeError):
            later = False  # not ours to judge: left where it is
        (moved if later else keep).append(line)
    if moved:
        with open(path.with_name(SUPERSEDED), "a") as fh:
            fh.writelines(moved)
        tmp = path.with_name(f".{METRICS}.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
        log.info(
            "%d metric row(s) after step %d moved to %s: those steps run again",
            len(moved),
            step,
            path.with_name(SUPERSEDED),
        )
    return len(moved)


def record_config(path: Path, text: str, step: int) -> None:
    """Write ``config.yaml``; a different one already there (a resume with other settings)
    is kept as ``config.until_step_XXXXXXXX.yaml``."""
    if path.is_file() and path.read_text() != text:
        kept = path.with_name(f"{path.stem}.until_step_{step:08d}{path.suffix}")
        os.replace(path, kept)
        log.info("the run's config changed at step %d: the previous one is kept as %s", step, kept)
    path.write_text(text)
