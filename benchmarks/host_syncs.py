"""Host syncs of a region of code, each with the Python stack that made it.

On a GPU, torch's sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``) warns at
every call that makes the host wait for the device (a device-to-host copy, ``.item()``,
``nonzero``, a blocking ``cudaStreamSynchronize``...); those warnings are recorded instead
of printed. On a CPU nothing waits, so the calls that would on a GPU are recorded instead:
``Tensor.item / cpu / tolist / numpy / __bool__ / __float__ / __int__`` and
``dist.all_reduce`` (a collective the loop blocks on).

    with HostSyncs(device) as syncs:
        loop()
    len(syncs.calls), syncs.sites()   # how many, and where from
"""

from __future__ import annotations

import collections
import sys
import traceback
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

SYNC_CALLS = [(torch.Tensor, name) for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")]
SYNC_CALLS.append((dist, "all_reduce"))
_CUDA_SYNC_WARNING = "called a synchronizing CUDA operation"
_NOT_CALLERS = (Path(warnings.__file__).name, Path(__file__).name)
_TORCH_DIR = str(Path(torch.__file__).parent)


class Sync(NamedTuple):
    what: str  # the call (CPU), or "cuda sync"
    stack: traceback.StackSummary  # innermost frame (the caller) last

    @property
    def caller(self) -> traceback.FrameSummary:
        return self.stack[-1]


class HostSyncs:
    """Records a ``Sync`` per host sync inside the ``with`` block (see the module docstring
    for what counts as one on each device type)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.calls: list[Sync] = []
        self._undo: list = []

    def __enter__(self) -> "HostSyncs":
        if self.device.type == "cuda":
            self._enter_cuda()
        else:
            for owner, name in SYNC_CALLS:
                original = getattr(owner, name)
                setattr(owner, name, self._recorded(name, original))
                self._undo.append(lambda owner=owner, name=name, original=original: setattr(owner, name, original))
        return self

    def __exit__(self, *exc) -> None:
        while self._undo:
            self._undo.pop()()

    def _enter_cuda(self) -> None:
        self._catch_sync_warnings()
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        self._undo.append(lambda: torch.cuda.set_sync_debug_mode(before))

    def _catch_sync_warnings(self) -> None:
        """Record the sync debug mode's warnings (each one: ``simplefilter("always")``),
        show any other warning as before."""
        caught = warnings.catch_warnings()
        caught.__enter__()
        self._undo.append(lambda: caught.__exit__(None, None, None))
        warnings.simplefilter("always")
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if _CUDA_SYNC_WARNING in str(message):
                self._record("cuda sync", sys._getframe(1))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show

    def _recorded(self, name: str, original):
        def wrapper(*args, **kwargs):
            self._record(name, sys._getframe(1))
            return original(*args, **kwargs)

        return wrapper

    def _record(self, what: str, frame) -> None:
        while frame is not None and Path(frame.f_code.co_filename).name in _NOT_CALLERS:
            frame = frame.f_back  # the warnings machinery between the op and its caller
        self.calls.append(Sync(what, traceback.extract_stack(frame)))

    def sites(self, top: int | None = None) -> dict[str, int]:
        """The calling lines by count (the ``top`` ones, or all): ``file:line (function)``
        of the innermost frame outside torch (a sync inside ``Tensor.__format__`` is charged
        to whoever formatted the tensor)."""
        counts = collections.Counter(_site(call.stack) for call in self.calls)
        return dict(counts.most_common(top))


def _site(stack: traceback.StackSummary) -> str:
    for frame in reversed(stack):
        if not frame.filename.startswith(_TORCH_DIR):
            return f"{_short(frame.filename)}:{frame.lineno} ({frame.name})"
    return f"{_short(stack[-1].filename)}:{stack[-1].lineno} ({stack[-1].name})" if stack else "?"


def _short(path: str) -> str:
    """``pixelbert_dist/train/window.py`` or ``deepspeed/runtime/engine.py``: from the
    package folder on, the rest of a site-packages or checkout path dropped."""
    parts = Path(path).parts
    for package in ("pixelbert_dist", "deepspeed", "benchmarks", "torch"):
        if package in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(package) :])
    return Path(path).name
