"""Run a benchmark's measurement as multi-node Slurm jobs, through the repo's job layer.

A benchmark hands ``submit_each`` one ``EntryCall`` per job (a module, a function in it,
its argument list). Each job has ``--nodes`` nodes with one task each; every task calls
the function, which starts the process group with ``init_distributed()``: rank, world
size and rendezvous come from Slurm's variables as they do for any Slurm task
(``pixelbert_dist.distributed.env``: SLURM_PROCID / SLURM_NTASKS, the first node's
NodeAddr, a port derived from the job id). The sbatch options are the job layer's
(``pixelbert_dist.jobs``: ``SubmitConfig``, its checks and ``slurm_parameters``); the
jobs of one submission share a name and run one after another (``--dependency
singleton``), so two measurements never share the CPUs.

``wait_all`` follows the jobs with ``scontrol`` (submitit asks ``sacct``, which a
cluster without accounting storage cannot answer) and returns each job's Slurm record
and every task's return value; past its timeout it cancels the jobs still there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import re
import subprocess
import time
from pathlib import Path

import submitit

from benchmarks.common import ROOT
from pixelbert_dist.jobs.options import SubmitConfig, validate_options

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclasses.dataclass(frozen=True)
class EntryCall:
    """``module.function(argv)`` in a Slurm task; pickled by name, imported there."""

    module: str
    function: str
    argv: tuple[str, ...]

    def __call__(self):
        return getattr(importlib.import_module(self.module), self.function)(list(self.argv))


def add_slurm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Slurm (--slurm: one job per config, one task per node)")
    group.add_argument("--slurm", action="store_true", help="submit the configs as Slurm jobs and wait for them")
    group.add_argument("--nodes", type=int, default=2)
    group.add_argument("--partition", default=None)
    group.add_argument("--time", default="20", help="time limit per job (Slurm's forms)")
    group.add_argument("--cpus-per-task", type=int, default=1)
    group.add_argument("--slurm-dir", default=None, help="submitit's folder (default: <out>/slurm)")
    group.add_argument("--job-timeout-s", type=float, default=3600, help="give up waiting after this long")


def submit_config(args: argparse.Namespace, job_name: str) -> SubmitConfig:
    return SubmitConfig(
        nodes=args.nodes,
        gpus_per_node=0,  # gloo over CPUs: no gres line
        tasks_per_node=1,
        cpus_per_task=args.cpus_per_task,
        partition=args.partition,
        time=args.time,
        job_name=job_name,
        output_dir=str(args.slurm_dir),
    )


def _executor(opts: SubmitConfig) -> submitit.SlurmExecutor:
    # jobs.submission and jobs.task import torch: here, not at the top, so --help answers without it
    from pixelbert_dist.jobs.submission import slurm_parameters

    minutes = validate_options(opts)
    params = slurm_parameters(opts, minutes, ROOT)
    # the job layer's setup puts the repo root on PYTHONPATH: EntryCall's modules import there
    params["setup"] = params["setup"] + [f"export OMP_NUM_THREADS={opts.cpus_per_task}"]
    params["dependency"] = "singleton"  # one job of this name at a time
    executor = submitit.SlurmExecutor(Path(opts.output_dir).resolve() / "%j", max_num_timeout=0)
    executor.update_parameters(**params)
    return executor


def submit_each(calls: list[EntryCall], opts: SubmitConfig) -> list[submitit.Job]:
    """One job per call; Slurm's refusal comes back as one SubmitError line."""
    from pixelbert_dist.jobs.submission import slurm_error
    from pixelbert_dist.jobs.task import RANK_VARS

    executor = _executor(opts)
    # sbatch hands the job this environment: a rank of ours must not leak into it
    saved = {k: os.environ.pop(k) for k in RANK_VARS if k in os.environ}
    try:
        return [executor.submit(call) for call in calls]
    except submitit.core.utils.FailedJobError as err:
        raise slurm_error("sbatch", str(err)) from None
    finally:
        os.environ.update(saved)


def job_state(job_id: str) -> dict[str, str]:
    """The fields of ``scontrol -o show job ID`` (state, nodes, run time, exit code)."""
    out = subprocess.run(
        ["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0]))


def wait_all(jobs: list[submitit.Job], timeout_s: float, poll_s: float = 5.0) -> list[dict]:
    """Wait for every job; per job its Slurm record and its tasks' results (or errors)."""
    deadline = time.monotonic() + timeout_s
    records: dict[str, dict] = {}
    while len(records) < len(jobs):
        for job in jobs:
            if job.job_id in records:
                continue
            fields = job_state(job.job_id)
            if fields["JobState"] in FINAL:
                records[job.job_id] = _record(job, fields)
                print(f"job {job.job_id}: {fields['JobState']} on {fields['NodeList']} in {fields['RunTime']}")
        if len(records) < len(jobs):
            if time.monotonic() > deadline:
                left = [job for job in jobs if job.job_id not in records]
                for job in left:  # leave nothing queued behind a measurement given up on
                    job.cancel(check=False)
                raise TimeoutError(f"gave up after {timeout_s:g} s and cancelled {[j.job_id for j in left]}")
            time.sleep(poll_s)
    return [records[job.job_id] for job in jobs]


def _record(job: submitit.Job, fields: dict[str, str]) -> dict:
    return {
        "job_id": job.job_id,
        "state": fields["JobState"],
        "nodes": fields["NodeList"],
        "run_time": fields["RunTime"],
        "exit_code": fields["ExitCode"],
        "tasks": [_task_outcome(job.task(i)) for i in range(job.num_tasks)],
    }


def _task_outcome(task: submitit.Job) -> dict:
    """A task's return value from its result file, or the end of its error log. Read
    directly: ``job.results()`` would wait on sacct for a task that wrote no result."""
    path = task.paths.result_pickle
    if path.exists():
        outcome, value = submitit.core.utils.pickle_load(path)
        if outcome == "success":
            return {"result": value}
        return {"error": str(value)[-2000:]}
    log = task.paths.stderr.read_text(errors="replace") if task.paths.stderr.exists() else ""
    return {"error": f"no result file ({path}); end of its log:\n{log[-2000:]}"}
