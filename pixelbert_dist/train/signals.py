"""A clean stop on a signal: the handler only sets a flag; the loop asks at every step,
every rank alike, and saves before it exits.

The trainer folds the flag into its step's one all-reduce (``window.py``) and hands the
result to ``agreed``; ``should_exit`` is the stand-alone collective.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

from pixelbert_dist.collectives import all_reduce_max

log = logging.getLogger(__name__)


class GracefulExit:
    """SIGTERM, SIGINT (Ctrl-C), SIGUSR1 (Slurm's warning before a time limit) and SIGHUP
    (the launcher is gone: ``distributed/launcher_watch.py``) only set a flag; a second
    SIGINT gets Python's default (KeyboardInterrupt) to abort at once.

    The trainer calls ``should_exit()`` at the same step on every rank; it all-reduces
    the flag so that all ranks stop together (a rank that left alone would leave the
    others hanging in the next collective), then saves and exits 0. The first time the
    ranks agree, one line is logged.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)):
        self.signals = signals
        self.received: int | None = None
        self.announced = False
        self._previous: dict[int, Any] = {}

    def install(self) -> "GracefulExit":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "GracefulExit":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            signal.default_int_handler(signum, frame)  # Ctrl-C twice: stop now, without a save
        self.received = signum  # nothing else here: a handler runs between two bytecodes

    @property
    def requested(self) -> bool:
        return self.received is not None

    def should_exit(self) -> bool:
        """True on every rank as soon as any rank got a signal (a collective call)."""
        return self.agreed(all_reduce_max(1.0 if self.requested else 0.0) > 0)

    def agreed(self, stop: bool) -> bool:
        """``stop``: whether any rank got a signal, as the caller all-reduced it (the
        trainer folds the flag into its step's one all-reduce); said once."""
        if stop and not self.announced:
            self.announced = True
            source = signal.Signals(self.received).name if self.requested else "a signal on another rank"
            if self.received == signal.SIGHUP:
                source += ": the launcher or the terminal is gone"
            log.info("stop requested (%s): saving a checkpoint, then exiting", source)
        return stop
