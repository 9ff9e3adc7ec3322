"""A per-rank hang watchdog: a run that stops making progress ends within a bound.

At 64 nodes a stuck rank (a dead NIC, a hung file system, a GPU that stopped answering)
otherwise holds every node until the process-group timeout, or the time limit. The
trainer reports progress: every optimizer step (two attribute stores, no lock, no
syscall) and the start of each slower phase (start-up, save, evaluation), which gets its
own, longer bound. A daemon thread looks every few seconds; when a phase outlives its
bound it writes one line naming the rank, its host and the phase, dumps every thread's
Python stack (faulthandler), and ends the process with ``HANG_EXIT_CODE`` through
``os._exit``: a rank stuck in a collective sits in C++ that a normal exit would wait on.

Which rank hung? The ranks that wait for it fire too (their collective never returns), so
each rank also writes an "alive at" time into the rendezvous store every few seconds
(``Heartbeats``, a thread of its own); a rank that fires reads them all and names the
ranks gone silent, or rank 0 when its store stops answering. A frozen rank names itself
when it runs again (Slurm sends SIGCONT before it kills).

Should the hang hold the GIL (so that no Python thread runs), faulthandler's own C
thread, re-armed by the watchdog on each look, dumps the stacks and exits (code 1) a
grace period later.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
import threading
import time

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 86  # distinct from Python's 1, a signal's 128+N and the CLI's 2
_GRACE_S = 30.0  # after the Python watchdog's bound, faulthandler's C thread fires


class Heartbeats:
    """Every rank's last "alive at" wall time in the store (rank 0 serves it)."""

    def __init__(self, store, rank: int, world: int, every_s: float = 5.0):
        self.store, self.rank, self.world, self.every_s = store, rank, world, every_s
        self.hosts = [f"?{r}" for r in range(world)]  # the caller fills them in once gathered
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self.store.set(self._key(rank), repr(time.time()))  # before any peer could read it

    @staticmethod
    def _key(rank: int) -> str:
        return f"pixelbert/alive/{rank}"

    def start(self) -> "Heartbeats":
        self._thread.start()
        return self

    def _beat(self) -> None:
        while True:
            try:
                self.store.set(self._key(self.rank), repr(time.time()))
            except Exception:  # a store gone (a finished run's group): nothing left to tell
                return
            time.sleep(self.every_s)

    def silent_ranks(self, wait_s: float = 5.0) -> str:
        """A sentence naming the ranks whose heartbeat stopped (read within ``wait_s``)."""
        keys = [self._key(r) for r in range(self.world)]
        found: dict = {}
        reader = threading.Thread(target=lambda: found.update(beats=self.store.multi_get(keys)), daemon=True)
        reader.start()
        reader.join(wait_s)
        if "beats" not in found:
            return f"the store on rank 0 (host {self.hosts[0]}) does not answer: rank 0 is hung, or has exited"
        now, late = time.time(), []
        for rank, raw in enumerate(found["beats"]):
            age = now - float(raw.decode())
            if age > 3 * self.every_s:
                late.append(f"rank {rank} (host {self.hosts[rank]}) silent for {age:.0f} s")
        return "; ".join(late) if late else "every rank's heartbeat is fresh (stuck in a collective or I/O, not frozen)"


class HangWatchdog:
    """``progress(step)`` after each optimizer step; ``phase(name, bound_s)`` before a slow
    phase (the next ``progress`` ends it). ``timeout_s`` <= 0 turns the watchdog off."""

    def __init__(
        self,
        timeout_s: float,
        rank: int,
        world: int,
        first_phase_s: float | None = None,
        heartbeats: Heartbeats | None = None,
    ):
        self.timeout_s, self.rank, self.world, self.heartbeats = float(timeout_s), rank, world, heartbeats
        self.host = socket.gethostname()
        self.enabled = self.timeout_s > 0
        self._poll_s = min(5.0, max(0.2, self.timeout_s / 12))
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        # (what, bound, start): replaced whole, so the thread never reads half an update
        self._state = ("start-up (until the first optimizer step)", first_phase_s or self.timeout_s, time.monotonic())

    def start(self) -> "HangWatchdog":
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self._poll_s)
            self._thread = None
        faulthandler.cancel_dump_traceback_later()

    def __enter__(self) -> "HangWatchdog":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def progress(self, step: int) -> None:
        """An optimizer step completed: the next must within ``timeout_s``."""
        self._state = (f"training (after step {step})", self.timeout_s, time.monotonic())

    def phase(self, what: str, bound_s: float) -> None:
        """A phase that may take longer than a step begins (a save, an evaluation)."""
        self._state = (what, max(bound_s, self.timeout_s), time.monotonic())

    def _watch(self) -> None:
        while not self._stopped.wait(self._poll_s):
            what, bound, start = self._state
            waited = time.monotonic() - start
            if waited > bound:
                self._fire(what, bound, waited)
            # the backstop if this thread cannot run again (the GIL held by the hang)
            faulthandler.dump_traceback_later(bound - waited + _GRACE_S + self._poll_s, exit=True)

    def describe(self, what: str, bound: float, waited: float) -> str:
        return (
            f"[watchdog] rank {self.rank} of {self.world} on host {self.host} (pid {os.getpid()}): "
            f"no progress for {waited:.0f} s in {what} (bound {bound:g} s, train.hang_timeout_s="
            f"{self.timeout_s:g}); every thread's stack follows, then exit code {HANG_EXIT_CODE}. Started again "
            "(a job of launch/submit.py requeues itself), the run resumes from its latest checkpoint"
        )

    def _fire(self, what: str, bound: float, waited: float) -> None:
        line = self.describe(what, bound, waited)
        try:
            log.error("%s", line)  # ERROR: shown on every rank
            if self.heartbeats is not None:
                log.error("[watchdog] heartbeats: %s", self.heartbeats.silent_ranks())
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            sys.stderr.flush()
            sys.stdout.flush()
        finally:
            os._exit(HANG_EXIT_CODE)
