"""``train.profile_steps``: a ``torch.profiler`` trace of a few optimiser steps into the
run folder, and on CUDA a snapshot of the allocator's history over the same steps.

The trace (``RUN/profile/rank<R>.<time>.pt.trace.json``, one per rank) is what
``torch.profiler.tensorboard_trace_handler`` writes: TensorBoard's profiler plugin, Perfetto
and chrome://tracing read it. Each profiled step is a ``ProfilerStep#N`` range, N the
optimiser step. The memory snapshot (``memory_rank<R>_steps_A-B.pickle``) opens in
https://pytorch.org/memory_viz. The profiler starts one step early where it can (a warm-up
step, recorded and dropped) so that the first traced step carries no start-up cost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity, profile, tensorboard_trace_handler

log = logging.getLogger(__name__)


class StepProfiler:
    """Call ``after_step(step)`` with the count of optimiser steps done: once before the
    first step (the resumed step) and after every step; ``close()`` when training ends."""

    def __init__(self, steps: tuple[int, int] | None, run_dir: Path, rank: int, device: torch.device, total: int):
        """``steps``: (first, last) to trace, cut at ``total``, the run's last step."""
        self.first, self.last = (steps[0], min(steps[1], total)) if steps else (0, -1)
        self.folder, self.rank, self.device = Path(run_dir) / "profile", rank, device
        self.prof: profile | None = None

    def after_step(self, done: int) -> None:
        if self.prof is not None:
            if done >= self.last:
                self.close()  # closes ProfilerStep#done and saves
            else:
                self.prof.step()  # closes ProfilerStep#done, opens the next
        elif self.first - 1 <= done + 1 <= self.last and done + 1 >= 1:
            self._start(done + 1)

    def _start(self, step: int) -> None:
        """Start at ``step`` (about to run), a warm-up step when it comes before ``first``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.prof = profile(
            activities=activities,
            # asked with the profiler's step count: 0 at construction, then optimiser steps
            schedule=lambda n: self._action(max(n, step)),
            on_trace_ready=tensorboard_trace_handler(str(self.folder), worker_name=f"rank{self.rank}"),
            record_shapes=True,
            profile_memory=True,
        )
        self.prof.step_num = step  # counts optimiser steps from here: ProfilerStep#N is step N
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self.prof.start()
        if self.rank == 0:
            log.info("profiling optimiser steps %d-%d into %s", max(step, self.first), self.last, self.folder)

    def _action(self, step: int) -> ProfilerAction:
        """What the profiler does during optimiser step ``step``."""
        if step < self.first:
            return ProfilerAction.WARMUP
        if step < self.last:
            return ProfilerAction.RECORD
        return ProfilerAction.RECORD_AND_SAVE if step == self.last else ProfilerAction.NONE

    def close(self) -> None:
        """Stop and write the trace (and the memory snapshot); a run that ends or stops
        inside the range writes what it recorded."""
        if self.prof is None:
            return
        self.prof.stop()
        self.prof = None
        if self.device.type == "cuda":
            out = self.folder / f"memory_rank{self.rank}_steps_{self.first}-{self.last}.pickle"
            torch.cuda.memory._dump_snapshot(str(out))
            torch.cuda.memory._record_memory_history(enabled=None)
        if self.rank == 0:
            log.info("profile written to %s (tensorboard --logdir %s)", self.folder, self.folder)
        self.first, self.last = 0, -1  # once per run
