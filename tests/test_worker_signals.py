"""Loader workers and stop signals: a SIGTERM (Slurm's scancel or time limit signal every
process of the step) leaves a worker running, so the trainer can save; the DataLoader's
shutdown still ends it, and an interpreter exit with live workers (multiprocessing
terminates, then joins them) does not hang."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import torch

from pixelbert_dist.data.decode.torch_loader import data_loader
from tests.pretrain_helpers import REPO


class SlowPids(torch.utils.data.IterableDataset):
    """The worker's pid, forever, one item every 20 ms."""

    def __iter__(self):
        import os

        while True:
            time.sleep(0.02)
            yield torch.tensor([os.getpid()])


def _ended(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_a_sigterm_leaves_the_worker_serving_and_the_shutdown_ends_it():
    batches = iter(data_loader(SlowPids(), num_workers=1, prefetch=2, pin_memory=False))
    pid = int(next(batches)[0])
    subprocess.run(["kill", "-TERM", str(pid)], check=True)  # another process, as slurmstepd
    assert not _ended(pid, 1.0)
    assert int(next(batches)[0]) == pid  # still serving
    batches._shutdown_workers()  # what the trainer's end of an epoch (or the iterator's GC) does
    assert _ended(pid, 10.0)


@pytest.mark.slow
def test_an_exit_with_live_workers_does_not_hang():
    script = textwrap.dedent(
        """
        import os, time
        import torch
        from pixelbert_dist.data.decode.torch_loader import data_loader

        class Pids(torch.utils.data.IterableDataset):
            def __iter__(self):
                while True:
                    time.sleep(0.02)
                    yield torch.tensor([os.getpid()])

        LIVE = iter(data_loader(Pids(), num_workers=2, prefetch=2, pin_memory=False))
        print(int(next(LIVE)[0]), flush=True)  # a module global: alive at interpreter exit
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.split()[0]) > 0
