"""The background half of an asynchronous save: one thread, one save in flight.

The thread writes this rank's staged files, fsyncs and hashes them, and commits the
checkpoint (rank 0: ``meta.json``, the rename into place, ``latest``, retention). Ranks
agree through a process group of their own (gloo): a collective in this thread must
never share a group with the step loop's collectives in the main thread.

A failure on any rank reaches every rank (the error rides in the gathered table) and is
raised by the next ``wait()``: at the next save, at a stop or at the end of the run. A
process killed while the thread writes leaves the hidden ``.step_*.tmp`` folder, and
``latest`` on the previous complete checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch.distributed as tdist

from pixelbert_dist.checkpoint.files import CheckpointError

log = logging.getLogger(__name__)


class BackgroundWriter:
    """``start(job)`` runs ``job(group)`` in a thread after the previous one finished."""

    def __init__(self):
        self.group = None
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            self.group = tdist.new_group(backend="gloo")  # a collective: every rank, same order
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_seconds = 0.0  # how long the last background write took

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, job: Callable) -> None:
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(job,), name="checkpoint-writer", daemon=True)
        self._thread.start()

    def _run(self, job: Callable) -> None:
        start = time.perf_counter()
        try:
            job(self.group)
        except BaseException as err:  # noqa: BLE001 - raised in the main thread by wait()
            self._error = err
        self.last_seconds = time.perf_counter() - start

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CheckpointError):
                raise CheckpointError(str(error)) from None
            raise CheckpointError(f"the background checkpoint save failed: {type(error).__name__}: {error}") from error
