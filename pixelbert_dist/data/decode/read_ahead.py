"""Read ahead on a background thread: ``prefetched(items, depth)`` pulls ``items`` on a
reader thread and keeps at most ``depth`` of them ready, so the consumer (DALI's
``external_source`` callback, which runs on the trainer's main thread inside
``pipe.run()``) only pops items whose shard reads (opens, ``pread``, page faults of
the index maps on a shared file system) are already done.

The consumer sees what it would have seen from ``items`` itself: the items in order,
then the end (StopIteration) or the exception ``items`` raised, after the items before
it. ``close()`` (also on garbage collection) stops the reader and waits for it: it
finishes the item it is reading, at most, then exits; whatever was read ahead is
dropped. The reader holds no reference to the ``Prefetched`` object, so dropping the
last reference is enough to stop it.

Cost: one thread per live ``Prefetched`` and up to ``depth + 1`` items held (the ready
ones and the one being read).
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

_ITEM, _END, _ERROR = 0, 1, 2


def prefetched(items: Iterable, depth: int) -> "Prefetched":
    return Prefetched(items, depth)


class Prefetched(Iterator):
    """``items``, read on a background thread ``depth`` ahead (module docstring)."""

    def __init__(self, items: Iterable, depth: int):
        self._ready: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(
            target=_read, args=(iter(items), self._ready, self._stop), name="pixelbert-read-ahead", daemon=True
        )
        self._thread.start()

    def __next__(self):
        if self._ended:
            raise StopIteration
        kind, value = self._ready.get()
        if kind == _ITEM:
            return value
        self._ended = True
        self._thread.join()
        if kind == _ERROR:
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the reader and wait for it (drops what it read ahead)."""
        self._ended = True
        self._stop.set()
        _drain(self._ready)  # frees the reader if it waits to put; it then sees the stop
        if threading.current_thread() is not self._thread:  # a GC pass may run on the reader
            self._thread.join()
        _drain(self._ready)

    def __del__(self):
        if hasattr(self, "_thread"):
            self.close()


def _read(items: Iterator, ready: queue.Queue, stop: threading.Event) -> None:
    """The reader thread: each put is followed by a look at ``stop``, and ``close``
    empties the queue after setting it, so a put never waits on a closed consumer."""
    try:
        for item in items:
            ready.put((_ITEM, item))
            if stop.is_set():
                return
    except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
        ready.put((_ERROR, err))
        return
    ready.put((_END, None))


def _drain(ready: queue.Queue) -> None:
    while True:
        try:
            ready.get_nowait()
        except queue.Empty:
            return
