"""Live tensor memory on a CPU, the measure ``torch.cuda.max_memory_allocated`` gives on a GPU.

A process's resident size is a poor measure of what activation checkpointing saves: it
counts the interpreter and libraries, and glibc keeps freed pages. The allocator itself
knows better: under ``torch.profiler`` with ``profile_memory=True`` the CPU allocator
reports every allocation and free with its running total of the bytes it handed out while
profiling and has not had back (``total_allocated``, across profiled regions: each trace
counts from its own first event).
``AllocationTrace`` reads that timeline back: the peak of the bytes a step allocated on top
of what was live before it, and the bytes still live at the end of a named phase
(after the forward: what the forward holds for the backward).

    with AllocationTrace() as trace:
        with trace.phase("forward"):
            loss = model(batch)["loss"]
        loss.backward()
    trace.peak_bytes(), trace.bytes_after("forward")

Only tensors that the profiled code allocates are counted; those live before it are
``live_bytes(...)`` (each storage once).
"""

from __future__ import annotations

import bisect
from typing import Iterable

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function


def live_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a view or a tied weight once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if torch.is_tensor(tensor) and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _walk(events):
    for event in events:
        yield event
        yield from _walk(event.children)


class AllocationTrace:
    """The CPU allocator's timeline of one profiled region (see the module docstring)."""

    def __init__(self):
        self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._times: list[int] = []  # ns, sorted
        self._totals: list[int] = []  # bytes allocated since the start and still live
        self._phases: dict[str, tuple[int, int]] = {}  # name: (start, end) ns

    def __enter__(self) -> "AllocationTrace":
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._profile.__exit__(*exc)
        if exc[0] is None:
            self._read(self._profile.profiler.kineto_results.experimental_event_tree())

    def phase(self, name: str):
        """A named region whose end ``bytes_after`` can be asked about."""
        return record_function(f"phase::{name}")

    def _read(self, roots) -> None:
        timeline = []
        for event in _walk(roots):
            if event.tag == _EventType.Allocation:
                fields = event.extra_fields
                if fields.device.type == "cpu":
                    timeline.append((event.start_time_ns, fields.total_allocated, fields.alloc_size))
            elif event.name.startswith("phase::"):
                self._phases[event.name.removeprefix("phase::")] = (event.start_time_ns, event.end_time_ns)
        timeline.sort()
        # The allocator's running total counts every profiled allocation of the process not
        # yet freed, earlier profiled regions' too: measure from where this region began.
        base = timeline[0][1] - timeline[0][2] if timeline else 0
        self._times = [t for t, _, _ in timeline]
        self._totals = [total - base for _, total, _ in timeline]

    def _span(self, phase: str) -> tuple[int, int]:
        if phase not in self._phases:
            raise KeyError(f"no phase {phase!r} was traced (phases: {sorted(self._phases)})")
        return self._phases[phase]

    def peak_bytes(self, phase: str | None = None) -> int:
        """The most bytes allocated in the region and not yet freed at any moment (of
        ``phase`` if given; counting what earlier phases left live)."""
        if phase is None:
            return max(self._totals, default=0)
        start, end = self._span(phase)
        first = bisect.bisect_left(self._times, start)
        last = bisect.bisect_right(self._times, end)
        return max(self._totals[first:last], default=self.bytes_after(phase))

    def bytes_after(self, phase: str) -> int:
        """Bytes allocated inside the region and still live when ``phase`` ended."""
        index = bisect.bisect_right(self._times, self._span(phase)[1])
        return self._totals[index - 1] if index else 0
