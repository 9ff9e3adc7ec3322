"""Submit pre-training to Slurm (or this machine) through submitit.

``submit`` validates everything first (options, pre-training arguments, every sweep
point's run config), snapshots the code, then hands one ``PretrainTask`` per job to
submitit: one job, or a job array for a sweep. What Slurm refuses comes back as one
``SubmitError`` line with Slurm's own words and what to change.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import socket
import sys
from pathlib import Path

import submitit

from pixelbert_dist.jobs.options import SubmitConfig, SubmitError, check_script_path, validate_options
from pixelbert_dist.jobs.plan import parse_pretrain_args, plan_jobs
from pixelbert_dist.jobs.snapshot import snapshot_code
from pixelbert_dist.jobs.task import RANK_VARS, PretrainTask

# Slurm's refusals, and what to change for each (matched on sbatch's message)
_HINTS = {
    "Invalid generic resource": "this cluster has no such GPUs: use --gpus-per-node 0 for CPU "
    "nodes, or a partition with GPUs",
    "Invalid partition": "pick one that `sinfo` lists (--partition)",
    "Requested node configuration is not available": "ask for fewer CPUs/GPUs/memory per node "
    "or tasks (see `sinfo -N -l`)",
    "Node count specification invalid": "ask for at most the partition's node count (--nodes)",
    "Invalid account": "use an account `sacctmgr show assoc user=$USER` lists (--account)",
    "Invalid qos": "use a QOS your account may use (--qos)",
    "time limit": "ask for less --time (the partition's MaxTime: `sinfo -o '%P %l'`)",
    "Unable to contact slurm controller": "the controller is down or SLURM_CONF points elsewhere; check `sinfo`",
}


def slurm_parameters(opts: SubmitConfig, minutes: int, code_dir: Path) -> dict:
    """SlurmExecutor.update_parameters(...) arguments (also used for --dry-run)."""
    params = dict(
        job_name=opts.job_name,
        time=minutes,
        nodes=opts.nodes,
        ntasks_per_node=opts.tasks,
        cpus_per_task=opts.cpus_per_task,
        signal_delay_s=opts.signal_delay_s,
        # submitit requeues with `scontrol requeue`: allowed even where the
        # cluster's default (JobRequeue) says no
        additional_parameters={"requeue": True},
        # one rank's exit (a hang exit, a crash) ends the step instead of leaving the rest waiting
        srun_args=["--kill-on-bad-exit=1"],
        setup=[
            f"cd {shlex.quote(str(code_dir))}",
            f"export PYTHONPATH={shlex.quote(str(code_dir))}${{PYTHONPATH:+:$PYTHONPATH}}",
        ],
    )
    if opts.gpus_per_node:  # no gres line at all on CPU nodes: many clusters define none
        params["gpus_per_node"] = opts.gpus_per_node
    for name in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(opts, name) is not None:
            params[name] = getattr(opts, name)
    return params


def _submitit_folder(opts: SubmitConfig) -> Path:
    return Path(opts.output_dir).resolve() / "submitit" / "%j"


def sbatch_script(opts: SubmitConfig, minutes: int, code_dir: Path, num_jobs: int) -> str:
    """The sbatch file submitit would write (a job array when ``num_jobs`` > 1)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = _submitit_folder(opts)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(
        command=command,
        folder=folder,
        map_count=num_jobs if num_jobs > 1 else None,
        **slurm_parameters(opts, minutes, code_dir),
    )


def _executor(opts: SubmitConfig, minutes: int, code_dir: Path):
    folder = _submitit_folder(opts)
    if not opts.local:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=opts.max_requeues)
        executor.update_parameters(**slurm_parameters(opts, minutes, code_dir))
        return executor
    import torch

    executor = submitit.LocalExecutor(folder, max_num_timeout=opts.max_requeues)
    executor.update_parameters(
        tasks_per_node=opts.tasks,
        nodes=1,
        timeout_min=minutes,
        gpus_per_node=min(opts.gpus_per_node, torch.cuda.device_count()),
        signal_delay_s=opts.signal_delay_s,
        setup=[f"cd {shlex.quote(str(code_dir))}"],
    )
    return executor


def slurm_error(command: str, message: str) -> SubmitError:
    """One line from a Slurm command's failure: what it said, and what to change."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    said = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
    hint = next(
        (h for key, h in _HINTS.items() if key.lower() in said.lower()), "fix the option it names and submit again"
    )
    return SubmitError(f"{command} refused the job: {said or 'no message'} -> {hint}")


def local_master_port(environ, jobs: int) -> int | None:
    """The MASTER_PORT exported here, for a --local job to use, checked: a port number,
    free on this machine, and one job only (local jobs run at once); None when none is
    exported (the job derives one from its id)."""
    text = environ.get("MASTER_PORT")
    if not text:
        return None
    unset = "unset MASTER_PORT (the job then takes 20000 + its job id mod 12000)"
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise SubmitError(f"MASTER_PORT={text!r} (exported here) is not a port number: export one, or {unset}")
    if jobs > 1:
        raise SubmitError(
            f"MASTER_PORT={text} (exported here) would be shared by {jobs} local jobs that run at once: {unset}"
        )
    with socket.socket() as probe:
        try:
            probe.bind(("", int(text)))
        except OSError as err:
            raise SubmitError(
                f"MASTER_PORT={text} (exported here) is in use on this machine ({err.strerror}): "
                f"export a free port, or {unset}"
            ) from None
    return int(text)


def _send(executor, tasks: list[PretrainTask], local: bool) -> list:
    """Submit (one job, or an array) with Slurm's refusal turned into a SubmitError. A
    local job inherits this environment: not the rank variables of a process group this
    one may be in (e.g. inside a test run), but an exported MASTER_PORT (checked)."""
    saved = {k: os.environ.pop(k) for k in RANK_VARS if local and k in os.environ and k != "MASTER_PORT"}
    captured = io.StringIO()  # submitit prints sbatch's stderr itself: keep it for our line
    try:
        with contextlib.redirect_stderr(captured):
            return [executor.submit(tasks[0])] if len(tasks) == 1 else executor.submit_array(tasks)
    except submitit.core.utils.FailedJobError as err:
        raise slurm_error("sbatch", str(err) or captured.getvalue()) from None
    except FileNotFoundError as err:
        raise SubmitError(
            f"{err.filename or 'sbatch'} not found: this machine is not a Slurm "
            f"submit host (use --local to run here, --dry-run to see the script)"
        ) from None
    finally:
        os.environ.update(saved)


def submit(opts: SubmitConfig, pretrain_argv: list[str]) -> list:
    """Validate everything, snapshot the code, submit; the submitit jobs (none on a dry run)."""
    minutes = validate_options(opts)
    check_script_path("python", sys.executable)  # the interpreter's path is in the script too
    args = parse_pretrain_args(pretrain_argv)
    plans = plan_jobs(opts, args)
    port = local_master_port(os.environ, len(plans)) if opts.local else None
    if port is not None:
        print(f"local job: rendezvous on port {port} (MASTER_PORT exported here)")
    out_dir = Path(opts.output_dir).resolve()
    code_dir = out_dir / "code"
    if opts.dry_run and opts.local:
        print(f"# local: {len(plans)} job(s) of {opts.tasks} task(s), {minutes} min each")
    elif opts.dry_run:
        print(sbatch_script(opts, minutes, code_dir, len(plans)))
    if opts.dry_run:
        for plan in plans:
            print(f"# job {plan.label}: {shlex.join(plan.argv)}")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [f for f in (args.deepspeed_config, args.config) if f]
    copies = snapshot_code(code_dir, files)
    tasks = [
        PretrainTask(
            [copies.get(a, a) for a in plan.argv],
            str(code_dir),
            os.getcwd(),
            opts.cpus_per_task,
            opts.stop_timeout_s,
            run_dir=plan.run_dir,
            rendezvous_timeout_s=opts.rendezvous_timeout_s,
            max_restarts=opts.max_restarts,
        )
        for plan in plans
    ]
    jobs = _send(_executor(opts, minutes, code_dir), tasks, opts.local)
    record = [
        {"job_id": job.job_id, "label": p.label, "run_dir": p.run_dir, "argv": t.argv}
        for job, p, t in zip(jobs, plans, tasks)
    ]
    (out_dir / "jobs.json").write_text(json.dumps(record, indent=2) + "\n")
    return jobs
