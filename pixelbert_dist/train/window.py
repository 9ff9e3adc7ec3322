"""One accumulation window of the hot loop: the micro-batches of one optimiser step.

Nothing in a window waits for the device before its boundary: each loss's finiteness
and the logged metric sums accumulate as device tensors, and the boundary reads them,
with the stop flag of a signal, in one all-reduce + one host copy (the step's only host
sync, at any world size). A window with a NaN/inf loss on any rank is dropped whole on
every rank: no update, no lr step, and BatchNorm's running statistics as they were at its
start.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from pixelbert_dist.collectives import collective_device
from pixelbert_dist.metrics import MetricSums


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses in a row: the run stops (on every rank) instead of diverging."""


def loss_is_bad(loss: torch.Tensor, max_loss: float) -> torch.Tensor:
    """NaN/inf, or a finite blow-up above ``train.max_loss``: skipped and counted alike."""
    return ~torch.isfinite(loss) | (loss.abs() > max_loss)


@contextlib.contextmanager
def update_left_out(engine, optimizer: torch.optim.Optimizer):
    """One ``engine.step()`` with DeepSpeed's bookkeeping (gradient release, micro-step and
    global-step counters, offload buffers) but without the weight update: the base
    optimiser's ``step`` is shadowed by a no-op (ZeRO 1-3, BF16_Optimizer and the plain
    engine all call it as ``optimizer.step()``) and the lr scheduler is hidden from the
    engine. DeepSpeed has no public "drop this accumulation window" call."""
    wrapped = optimizer.__dict__.get("step")  # torch's lr scheduler wraps the instance's step
    scheduler, engine.lr_scheduler = engine.lr_scheduler, None
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        engine.lr_scheduler = scheduler
        if wrapped is None:
            del optimizer.step
        else:
            optimizer.step = wrapped


class AccumulationWindow:
    """What a window must agree on across ranks (any bad loss) and be able to undo
    (BatchNorm statistics), plus its metric sums and sample count."""

    def __init__(self, batchnorms: list[torch.nn.Module], device: torch.device, max_loss: float):
        self.batchnorms, self.device, self.max_loss = batchnorms, device, max_loss
        self.reset()

    def reset(self) -> None:
        self.sums, self.samples = MetricSums(), 0
        self._bad: torch.Tensor | None = None
        self._bn_saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def open(self) -> None:
        """Before each forward; the window's first one copies every BatchNorm running
        statistic (device copies, no sync; none with FrozenBN)."""
        if self._bad is None:
            modules = [m for m in self.batchnorms if m.training]
            self._bn_saved = [(buf, buf.clone()) for module in modules for buf in module.buffers()]
            self._bad = torch.zeros((), dtype=torch.int32, device=self.device)

    def add(self, loss: torch.Tensor, sums: dict, samples: int) -> None:
        self._bad += loss_is_bad(loss.detach(), self.max_loss).to(torch.int32)
        self.sums.add(sums)
        self.samples += samples

    def agree(self, world: int, stop_requested: bool, save_due: bool = False) -> tuple[int, bool, bool]:
        """The number of bad micro-batches of the rank that had most (the ranks must agree:
        a rank that steps alone waits for the others forever), whether any rank was asked
        to stop, and whether a time-based save is due (only rank 0 passes it true): all in
        one all-reduce, the step's one host sync."""
        bad = self._bad.to(torch.float32).reshape(1)
        flags = torch.cat([bad, bad.new_full((1,), float(stop_requested)), bad.new_full((1,), float(save_due))])
        if world > 1:
            flags = flags.to(collective_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad, stop, due = flags.tolist()  # the one host sync of the step
        return int(bad), stop > 0, due > 0

    def restore_batchnorm(self) -> None:
        """The window's forwards folded NaN into BatchNorm's statistics: put them back."""
        with torch.no_grad():
            for buf, saved in self._bn_saved:
                buf.copy_(saved)
