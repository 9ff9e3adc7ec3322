"""Ranks that notice their launcher is gone, and stop as on SIGTERM instead of training on.

A stop signal sent to the ``deepspeed`` command (or a launcher killed outright) used to
end only that process: its ranks, reparented, trained on to the end, orphaned, holding
the GPUs. Each rank of a launched run now

* asks Linux for SIGHUP when its parent (the launcher: ``deepspeed.launcher.launch``,
  torchrun's agent, a job task) exits (``prctl(PR_SET_PDEATHSIG)``, through ctypes);
* under the ``deepspeed`` command, whose runner is the launcher's parent, also polls that
  the launcher still has the parent it had (the runner's death does not reach the ranks
  otherwise), and sends itself SIGHUP when it does not.

The trainer's signal handling (``checkpoint.GracefulExit``) takes SIGHUP like SIGTERM: every
rank agrees at the next step, saves, and exits. Linux only; elsewhere nothing is watched.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)
PARENT_DEATH_SIGNAL = signal.SIGHUP
_PR_SET_PDEATHSIG = 1
_POLL_S = 2.0


def _parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` from /proc, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state": ppid


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _ask_parent_death_signal() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(PARENT_DEATH_SIGNAL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _gone(why: str) -> None:
    log.warning("%s: this rank saves and stops as on SIGTERM", why)
    os.kill(os.getpid(), PARENT_DEATH_SIGNAL)


def _poll_runner(launcher: int, runner: int) -> None:
    while True:
        threading.Event().wait(_POLL_S)
        if _parent_of(launcher) != runner:
            _gone(f"the deepspeed command (pid {runner}) that started this run's launcher is gone")
            return


def watch_launcher() -> None:
    """Start watching this process's launcher (once, in a launched rank)."""
    if not sys.platform.startswith("linux") or getattr(watch_launcher, "started", False):
        return
    watch_launcher.started = True
    launcher = os.getppid()
    if not _ask_parent_death_signal():
        log.warning("prctl(PR_SET_PDEATHSIG) failed: a dead launcher will not stop this rank")
    elif os.getppid() != launcher:  # it died before the request: no signal will come
        _gone(f"the launcher (pid {launcher}) is gone")
        return
    runner = _parent_of(launcher)
    if runner and "deepspeed.launcher.launch" in _cmdline(launcher):
        threading.Thread(target=_poll_runner, args=(launcher, runner), name="launcher-watch", daemon=True).start()
