"""The trainer process a job task starts: ``python -m pixelbert_dist.jobs.trainer_process
ENTRY ARGS...`` imports ENTRY (``pixelbert_dist.train.run``) and calls its ``main(ARGS)``.

A module of its own, imported by nothing: ``python -m`` on a module the package already
imported would run a second copy of it."""

from __future__ import annotations

import importlib
import signal
import sys


def main(argv: list[str]) -> int:
    # Slurm may signal every process of a step; USR2 is for the submitit task, which
    # forwards it as SIGUSR1. Left at its default, USR2 would kill the trainer unsaved.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    entry, rest = argv[0], argv[1:]
    code = int(importlib.import_module(entry).main(rest) or 0)
    from pixelbert_dist.distributed.env import close_process_group  # torch: loaded by the run

    close_process_group()  # a finished run: its group goes before the interpreter does
    return code


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    from pixelbert_dist.distributed.env import exit_process

    exit_process(exit_code)  # at once, without the slow interpreter teardown: the job task waits for it
