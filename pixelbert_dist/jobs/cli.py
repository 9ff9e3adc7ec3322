"""Submit Pixel-BERT pre-training to Slurm with submitit (or run it here with --local).

    python launch/submit.py --nodes 8 --gpus-per-node 8 --partition gpu --time 2-00:00:00 \\
        --output-dir runs/r50_zero2 -- --deepspeed_config deepspeed_configs/zero2.json \\
        --config launch/configs/pretrain_r50.yaml
    python launch/submit.py --dry-run ...                 # print the sbatch script only
    python launch/submit.py --sweep optim.lr=1e-4,2e-4 ... # a job array, one job per value
    python launch/submit.py --nodes 2 --gpus-per-node 0 --cpus-per-task 1 --time 10 \\
        -- --deepspeed_config deepspeed_configs/zero2.json --config launch/configs/demo_cpu.yaml
                                                          # CPU nodes: one gloo task per node
    python launch/submit.py --local --gpus-per-node 0 --tasks-per-node 2 --time 20 -- \\
        --deepspeed_config deepspeed_configs/zero2.json --config launch/configs/demo_cpu.yaml

Everything after ``--`` is what launch/pretrain.py takes. `launch/submit.py` and the
`pixelbert-submit` console script run this module's ``main``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pixelbert_dist.jobs.options import SubmitConfig, SubmitError


def parse(argv: list[str]) -> tuple[SubmitConfig, list[str]]:
    defaults = SubmitConfig()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        usage="%(prog)s [options] -- --deepspeed_config PATH [--config YAML] [key=value ...]",
    )
    helps = {
        "gpus_per_node": "GPUs per node; 0: CPU nodes (gloo), no GPU asked",
        "tasks_per_node": "tasks (ranks) per node; default one per GPU, one on CPU nodes",
        "rendezvous_timeout_s": "the ranks must meet within this, else the job fails",
        "max_requeues": "time-outs a job may survive by requeueing itself",
        "max_restarts": "failures after progress (a hang, a crashed rank, a lost node) a job may survive "
        "by requeueing itself",
        "signal_delay_s": "Slurm sends USR2 this long before the time limit",
        "stop_timeout_s": "how long the trainer may take to save when told to stop",
        "mem": "memory per node, Slurm's form (480G)",
        "time": "time limit: MM, HH:MM:SS, D-HH:MM, ...",
        "output_dir": "code snapshot, submitit logs, jobs.json (and run/ unless run_dir=)",
    }
    for name in (
        "nodes",
        "gpus_per_node",
        "tasks_per_node",
        "cpus_per_task",
        "max_requeues",
        "max_restarts",
        "signal_delay_s",
        "stop_timeout_s",
        "rendezvous_timeout_s",
    ):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=getattr(defaults, name),
            help=helps.get(name, "") + f" (default {getattr(defaults, name)})",
        )
    for name in ("mem", "partition", "account", "qos", "constraint", "time", "job_name", "output_dir"):
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=getattr(defaults, name),
            help=helps.get(name, "") + f" (default {getattr(defaults, name)})",
        )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="one job per value (repeat for the product of several keys)",
    )
    parser.add_argument(
        "--local", action="store_true", help="run here with submitit's local executor, --tasks-per-node tasks"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch script only")
    split = argv.index("--") if "--" in argv else len(argv)
    ns = parser.parse_args(argv[:split])  # --help prints and exits here
    if split == len(argv):
        raise SubmitError(
            "put the pre-training arguments after --, e.g. -- --deepspeed_config deepspeed_configs/zero2.json"
        )
    opts = SubmitConfig(**{**vars(ns), "sweep": tuple(ns.sweep)})
    return opts, argv[split + 1 :]


def _error_tail(path: Path, lines: int = 15) -> str:
    """The end of a task's stderr log, without submitit's own report of the failure."""
    if not path.is_file():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()
    cut = next((i for i, line in enumerate(text) if "submitit ERROR" in line), len(text))
    return "\n".join(text[:cut][-lines:])


class LogTail:
    """The complete lines a task has added to one of its log files since the last look."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial = path, 0, b""

    def new_lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as log:
            log.seek(self.offset)
            data = log.read()
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [line.decode(errors="replace") for line in lines]


def follow_rank0(job, label: str, poll_s: float = 1.0) -> None:
    """Print rank 0's log lines (its stdout to stdout, its stderr to stderr) as the job
    writes them, until it ends: a local run is no silent wait between "submitted" and
    "finished"."""
    paths = job.task(0).paths
    tails = [(LogTail(paths.stdout), sys.stdout), (LogTail(paths.stderr), sys.stderr)]
    while True:
        done = job.done()  # before the last read: lines written before it ended are shown
        for tail, stream in tails:
            for line in tail.new_lines():
                print(f"{label} {line}", file=stream, flush=True)
        if done:
            return
        time.sleep(poll_s)


def _wait_local(jobs: list) -> int:
    """The local executor's jobs die with this process: follow them, and show what failed."""
    failed = 0
    for job in jobs:
        follow_rank0(job, "[rank 0]" if len(jobs) == 1 else f"[job {job.job_id} rank 0]")
        try:
            job.results()  # one result per task
            print(f"job {job.job_id} finished")
        except Exception:  # noqa: BLE001 - report every job, then fail
            failed += 1
            print(f"job {job.job_id} failed", file=sys.stderr)
            for index in range(job.num_tasks):
                stderr = job.task(index).paths.stderr
                if "Traceback" in (stderr.read_text(errors="replace") if stderr.is_file() else ""):
                    print(f"--- task {index}, last lines of {stderr}:\n{_error_tail(stderr)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        opts, pretrain_argv = parse(sys.argv[1:] if argv is None else argv)
        from pixelbert_dist.jobs.submission import submit  # after parsing: --help imports no torch

        jobs = submit(opts, pretrain_argv)
    except SubmitError as err:
        print(f"submit.py: error: {err}", file=sys.stderr)
        return 2
    for job in jobs:
        print(f"submitted job {job.job_id}: logs in {job.paths.folder}")
    return _wait_local(jobs) if opts.local else 0
