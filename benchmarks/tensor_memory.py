"""Live tensor memory on a CPU, the measure ``torch.cuda.max_memory_allocated`` gives on a GPU.

A process's resident size is a poor measure of what activation checkpointing saves: it
counts the interpreter and libraries, and glibc keeps freed pages. The allocator itself
knows better: under ``torch.profiler`` with ``profile_memory=True`` the CPU allocator
reports every allocation and free (address and size) of the profiled thread, which on a
CPU is also where the autograd engine runs the backward. ``AllocationTrace`` reads that
timeline back: the peak of the bytes the region allocated and had not yet freed, and the
bytes still live at the end of a named phase (after the forward: what the forward keeps
for the backward).

    with AllocationTrace() as trace:
        with trace.phase("forward"):
            loss = model(batch)["loss"]
        loss.backward()
    trace.peak_bytes(), trace.bytes_after("forward")

Only blocks that the region allocates are counted (a free of an older one is not): add
what was live before it, ``live_bytes(...)`` (each storage once), for the total.
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


def _ops(event, depth: int = 3) -> str:
    """The innermost ``depth`` ops around ``event``, outermost first."""
    names = []
    while event.parent is not None and len(names) < depth:
        event = event.parent
        names.append(event.name)
    return " > ".join(reversed(names))


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
        self._ops: list[str] = []  # the ops an allocation or free happened in
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
        events = []
        for event in _walk(roots):
            if event.tag == _EventType.Allocation:
                fields = event.extra_fields
                if fields.device.type == "cpu":
                    events.append((event.start_time_ns, fields.ptr, fields.alloc_size, _ops(event)))
            elif event.name.startswith("phase::"):
                self._phases[event.name.removeprefix("phase::")] = (event.start_time_ns, event.end_time_ns)
        own: dict[int, int] = {}  # address: bytes of the blocks this region allocated
        live = 0
        for time_ns, ptr, size, ops in sorted(events, key=lambda e: e[:3]):
            if size > 0:
                own[ptr] = size
                live += size
            elif ptr in own:  # a block from before the region is not ours to subtract
                live -= own.pop(ptr)
            else:
                continue
            self._times.append(time_ns)
            self._totals.append(live)
            self._ops.append(ops)

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

    def peak_ops(self) -> str:
        """Where the peak was reached: the ops around the allocation that reached it."""
        return self._ops[self._totals.index(self.peak_bytes())] if self._totals else ""

    def bytes_after(self, phase: str) -> int:
        """Bytes allocated inside the region and still live when ``phase`` ended."""
        index = bisect.bisect_right(self._times, self._span(phase)[1])
        return self._totals[index - 1] if index else 0
