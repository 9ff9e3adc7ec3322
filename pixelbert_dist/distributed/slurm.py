"""Submit pre-training to Slurm (or this machine) through submitit.

One submitit task per GPU. Each task exports the rank environment with
``submitit.helpers.TorchDistributedEnvironment`` and runs the trainer
(``pixelbert_dist.train.run.main``) in a child process, for one reason: on a time limit
or a preemption submitit calls ``checkpoint()`` from a signal handler on rank 0, and a
DeepSpeed checkpoint is a collective that cannot run inside a handler. So
``checkpoint()`` sends SIGUSR1 to the trainer (every rank stops at the same step, since
the trainer all-reduces the flag), waits until it has saved and exited, and hands
submitit a copy of itself to requeue; the requeued job resumes from the latest
checkpoint because the run config says ``train.resume=auto``.

The package, launch/, deepspeed_configs/ and the run's config files are copied into
``<output-dir>/code/`` at submission and the job imports from there, so editing the
repository while a job waits in the queue changes nothing.
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from pixelbert_dist.metrics import git_commit

REPO = Path(__file__).resolve().parents[2]
CODE_DIRS = ("pixelbert_dist", "launch", "deepspeed_configs")
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ENTRY = "pixelbert_dist.train.run"


class SubmitError(ValueError):
    """A submission refused before anything reached the scheduler."""


@dataclasses.dataclass
class SubmitConfig:
    nodes: int = 1
    gpus_per_node: int = 8           # = tasks per node (one task per GPU)
    cpus_per_task: int = 8
    mem: str | None = None           # Slurm --mem, e.g. "480G"; None: the partition default
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str = "24:00:00"           # any Slurm time form: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
    job_name: str = "pixelbert"
    output_dir: str = "runs/submit"
    sweep: tuple[str, ...] = ()      # "key=v1,v2": one job per value (several: the product)
    local: bool = False              # submitit's local executor: gpus_per_node tasks here
    dry_run: bool = False            # print the sbatch script, submit nothing
    max_requeues: int = 10           # time-outs a job may survive (submitit's max_num_timeout;
                                     # preemptions do not count)
    signal_delay_s: int = 180        # USR2 this long before the time limit: time to save
    stop_timeout_s: int = 150        # how long checkpoint() waits for the trainer to save


# ---- validation ----------------------------------------------------------------------

_TIME_FORMS = [  # (regex, field names) for the forms sbatch --time accepts
    (r"(\d+)", ("m",)), (r"(\d+):(\d+)", ("m", "s")), (r"(\d+):(\d+):(\d+)", ("h", "m", "s")),
    (r"(\d+)-(\d+)", ("d", "h")), (r"(\d+)-(\d+):(\d+)", ("d", "h", "m")),
    (r"(\d+)-(\d+):(\d+):(\d+)", ("d", "h", "m", "s")),
]


def parse_slurm_time(text: str) -> int:
    """Minutes (rounded up) of a Slurm time limit; refuses what sbatch would refuse."""
    text = str(text).strip()
    for pattern, names in _TIME_FORMS:
        match = re.fullmatch(pattern, text)
        if not match:
            continue
        parts = dict(zip(names, map(int, match.groups())))
        # the leading field may be large ("90" minutes); the ones after it are bounded
        limits = {"h": 24, "m": 60, "s": 60}
        for name in names[1:]:
            if parts[name] >= limits[name]:
                raise SubmitError(f"--time {text!r}: {name}={parts[name]} is out of range "
                                  f"(must be < {limits[name]})")
        seconds = (((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60
                   + parts.get("s", 0))
        if seconds <= 0:
            raise SubmitError(f"--time {text!r} is zero: give the job some time")
        return -(-seconds // 60)
    raise SubmitError(f"--time {text!r} is not a Slurm time: use MM, MM:SS, HH:MM:SS, D-HH, "
                      f"D-HH:MM or D-HH:MM:SS (e.g. 2-00:00:00 for two days)")


_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"


def _slurm_partitions() -> set[str] | None:
    """The partitions ``sinfo`` knows, or None where there is no sinfo to ask."""
    sinfo = shutil.which("sinfo")
    if not sinfo:
        return None
    try:
        out = subprocess.run([sinfo, "-h", "-o", "%R"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return {line.strip() for line in out.splitlines() if line.strip()}


def validate_options(opts: SubmitConfig) -> int:
    """Check the scheduler options; return the time limit in minutes."""
    for name in ("nodes", "cpus_per_task", "max_requeues"):
        value = getattr(opts, name)
        if not isinstance(value, int) or value < (0 if name == "max_requeues" else 1):
            raise SubmitError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not isinstance(opts.gpus_per_node, int) or opts.gpus_per_node < 1:
        raise SubmitError(f"--gpus-per-node must be >= 1 (it is also the number of tasks per "
                          f"node), got {opts.gpus_per_node!r}")
    if opts.local and opts.nodes != 1:
        raise SubmitError("--local runs on this machine only: use --nodes 1")
    if opts.partition is not None:
        if not re.fullmatch(rf"{_NAME}(,{_NAME})*", opts.partition):
            raise SubmitError(f"--partition {opts.partition!r} is not a Slurm partition name "
                              f"(letters, digits, '_', '-', '.'; several joined by commas)")
        known = None if opts.local or opts.dry_run else _slurm_partitions()
        missing = sorted(set(opts.partition.split(",")) - known) if known else []
        if missing:
            raise SubmitError(f"--partition: {missing} unknown to this cluster; sinfo lists "
                              f"{sorted(known)}")
    for name in ("account", "qos", "constraint", "job_name"):
        value = getattr(opts, name)
        if value is not None and (not value or any(c in value for c in "\n\r'\"")):
            raise SubmitError(f"--{name.replace('_', '-')} {value!r} is empty or holds quotes/newlines")
    if opts.mem is not None and not re.fullmatch(r"\d+[KMGT]?", opts.mem.upper()):
        raise SubmitError(f"--mem {opts.mem!r}: use Slurm's form, a number with an optional "
                          f"K/M/G/T suffix (e.g. 480G); 0 asks for all of a node's memory")
    if not 0 < opts.stop_timeout_s < opts.signal_delay_s:
        raise SubmitError(f"--stop-timeout-s {opts.stop_timeout_s} must be positive and shorter "
                          f"than --signal-delay-s {opts.signal_delay_s}: Slurm kills the job that "
                          f"long after its USR2, saved or not")
    minutes = parse_slurm_time(opts.time)
    if opts.signal_delay_s >= minutes * 60:
        raise SubmitError(f"--signal-delay-s {opts.signal_delay_s} is not shorter than --time "
                          f"{opts.time!r}: the job would be told to stop before it starts")
    return minutes


# ---- the pre-training arguments and sweeps --------------------------------------------

@dataclasses.dataclass
class PretrainArgs:
    deepspeed_config: str
    config: str | None
    overrides: list[str]

    def argv(self, extra: list[str] = ()) -> list[str]:
        out = ["--deepspeed_config", self.deepspeed_config]
        if self.config:
            out += ["--config", self.config]
        return out + list(self.overrides) + list(extra)


def parse_pretrain_args(argv: list[str]) -> PretrainArgs:
    """The arguments of launch/pretrain.py: --deepspeed_config PATH [--config YAML] [k=v ...]."""
    ds, cfg, overrides, i = None, None, [], 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--deepspeed_config", "--config"):
            if not eq:
                if i + 1 >= len(argv):
                    raise SubmitError(f"{name} needs a value")
                value, i = argv[i + 1], i + 1
            ds, cfg = (value, cfg) if name == "--deepspeed_config" else (ds, value)
        elif arg.startswith("--local_rank"):
            i += 0 if "=" in arg else 1  # the deepspeed launcher's; meaningless here
        elif arg.startswith("-") or "=" not in arg:
            raise SubmitError(f"pre-training argument {arg!r} is neither --deepspeed_config, "
                              f"--config nor key=value")
        else:
            overrides.append(arg)
        i += 1
    if not ds:
        raise SubmitError("the pre-training arguments (after --) need --deepspeed_config PATH, "
                          "e.g. -- --deepspeed_config deepspeed_configs/zero2.json")
    return PretrainArgs(ds, cfg, overrides)


def _split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ``['a', 'b', '[1,2]']``: commas inside brackets belong to a value."""
    values, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    return values + [current]


def expand_sweep(sweep: tuple[str, ...] | list[str]) -> list[list[str]]:
    """``["lr=1e-4,2e-4", "train.micro_batch=8,16"]`` -> one override list per job."""
    axes = []
    for spec in sweep:
        key, eq, values = spec.partition("=")
        vals = [v.strip() for v in _split_values(values)] if eq else []
        if not key.strip() or not vals or any(v == "" for v in vals):
            raise SubmitError(f"--sweep {spec!r}: use key=v1,v2[,...] with no empty value")
        axes.append([f"{key.strip()}={v}" for v in vals])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def _label(overrides: list[str]) -> str:
    text = "_".join(o.replace("=", "-") for o in overrides) or "run"
    return re.sub(r"[^A-Za-z0-9_.-]+", "", text)[:120]


def validate_run_config(args: PretrainArgs, extra: list[str]):
    """Load the run config as the trainer will, so a bad key fails here, not in the queue."""
    from pixelbert_dist.config import ConfigError, load_config
    from pixelbert_dist.distributed.ds_config import load_deepspeed_json
    from pixelbert_dist.train.config import RunConfig

    try:
        load_deepspeed_json(args.deepspeed_config)
        cfg = load_config(RunConfig, args.config, list(args.overrides) + list(extra))
        return cfg.validate()
    except (ConfigError, ValueError, TypeError) as err:
        raise SubmitError(str(err)) from None


# ---- code snapshot -------------------------------------------------------------------

def snapshot_code(dest: Path, files: list[str], repo: Path = REPO) -> dict[str, str]:
    """Copy the code and ``files`` into ``dest``; map each file to its absolute copy."""
    if dest.exists():
        raise SubmitError(f"{dest} already exists: a queued job may be running from it. "
                          f"Choose a new --output-dir (resuming goes by run_dir=, not by this folder)")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in CODE_DIRS:
        if (repo / name).is_dir():
            shutil.copytree(repo / name, dest / name, ignore=ignore)
    copies = {}
    for index, name in enumerate(files):
        src = Path(name).resolve()
        try:
            target = dest / src.relative_to(repo.resolve())
        except ValueError:  # outside the repository: keep it apart, numbered
            target = dest / "configs" / f"{index}_{src.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        copies[name] = str(target)
    (dest / "SNAPSHOT.json").write_text(json.dumps(
        {"source": str(repo), "commit": git_commit(repo), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
         "files": copies}, indent=2) + "\n")
    return copies


# ---- the task each Slurm/local task runs ------------------------------------------------

def _task_environment(cpus_per_task: int, code_dir: str) -> dict[str, str]:
    """The trainer's environment: rank variables, CUDA device, NCCL/OMP defaults."""
    dist = submitit.helpers.TorchDistributedEnvironment()
    env = dict(os.environ)
    env.update(MASTER_ADDR=dist.master_addr, MASTER_PORT=str(dist.master_port),
               RANK=str(dist.rank), WORLD_SIZE=str(dist.world_size),
               LOCAL_RANK=str(dist.local_rank), LOCAL_WORLD_SIZE=str(dist.local_world_size))
    # Slurm gives every task of a node all its GPUs: keep the one of this local rank
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
    if len(visible) > dist.local_rank and len(visible) > 1:
        env["CUDA_VISIBLE_DEVICES"] = visible[dist.local_rank]
    defaults = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a dead peer raises instead of hanging
                "NCCL_DEBUG": "WARN", "OMP_NUM_THREADS": str(cpus_per_task),
                "PYTHONUNBUFFERED": "1"}
    for key, value in defaults.items():
        env.setdefault(key, value)  # what the user exported wins
    env["PYTHONPATH"] = os.pathsep.join([code_dir] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class PretrainTask(submitit.helpers.Checkpointable):
    """One task of a (multi-node) pre-training job; requeued by submitit on a time-out."""

    def __init__(self, argv: list[str], code_dir: str, workdir: str, cpus_per_task: int = 8,
                 stop_timeout_s: int = 600, entry: str = ENTRY):
        self.argv, self.code_dir, self.workdir = list(argv), code_dir, workdir
        self.cpus_per_task, self.stop_timeout_s, self.entry = cpus_per_task, stop_timeout_s, entry
        self.attempt = 0
        self._child: subprocess.Popen | None = None
        self._sigterm = False

    def __getstate__(self) -> dict:  # a process handle does not travel to the requeued job
        return {**self.__dict__, "_child": None, "_sigterm": False}

    def command(self) -> list[str]:
        # -P: the working directory (the user's checkout) must not shadow the snapshot
        return [sys.executable, "-P", "-m", __name__, "--child", self.entry, *self.argv]

    def __call__(self) -> int:
        env = _task_environment(self.cpus_per_task, self.code_dir)
        print(f"[submit] attempt {self.attempt} rank {env['RANK']}/{env['WORLD_SIZE']} "
              f"master {env['MASTER_ADDR']}:{env['MASTER_PORT']} code {self.code_dir}", flush=True)
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            self._child = subprocess.Popen(self.command(), cwd=self.workdir, env=env)
            # poll, never a blocking wait(): Popen.wait() holds a lock that checkpoint(),
            # running in a signal handler on this thread, would then wait on forever
            while (rc := self._child.poll()) is None:
                time.sleep(0.5)
        finally:
            signal.signal(signal.SIGTERM, previous)
        if rc != 0:
            raise RuntimeError(f"the trainer exited with code {rc} (attempt {self.attempt}); "
                               f"see this task's log above")
        if self._sigterm:  # preempted: the trainer saved on SIGTERM; wait for USR2 to requeue
            time.sleep(min(self.stop_timeout_s, 180))
        return rc

    def _on_sigterm(self, signum, frame) -> None:
        # Slurm's preemption SIGTERM reaches the trainer itself; only remember it here
        self._sigterm = True

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 at USR2: stop the trainer (it saves), then requeue."""
        child = self._child
        if child is not None and child.poll() is None:
            print(f"[submit] time limit or preemption: asking the trainer (pid {child.pid}) to "
                  f"save and stop", flush=True)
            child.send_signal(signal.SIGUSR1)
            if not _reap(child, self.stop_timeout_s):
                print(f"[submit] the trainer did not stop within {self.stop_timeout_s}s: killed; "
                      f"the requeued job resumes from the previous checkpoint", flush=True)
                child.kill()
                _reap(child, 30)
        # whatever the first attempt resumed from, a requeued one goes on from the latest
        argv = self.argv if self.argv[-1:] == ["train.resume=auto"] else self.argv + ["train.resume=auto"]
        fresh = PretrainTask(argv, self.code_dir, self.workdir, self.cpus_per_task,
                             self.stop_timeout_s, self.entry)
        fresh.attempt = self.attempt + 1
        return submitit.helpers.DelayedSubmission(fresh, *args, **kwargs)


def _reap(child: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for ``child`` with waitpid itself (no Popen lock: see __call__)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
        except ChildProcessError:  # reaped already
            return True
        if pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return True
        time.sleep(0.2)
    return False


def _child_main(argv: list[str]) -> int:
    """The trainer process: ``python -m pixelbert_dist.distributed.slurm --child ENTRY ...``."""
    # Slurm may signal every process of a step; USR2 is for the submitit task, which
    # forwards it as SIGUSR1. Left at its default, USR2 would kill the trainer unsaved.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    entry, rest = argv[1], argv[2:]
    return int(importlib.import_module(entry).main(rest) or 0)


# ---- planning and submitting ---------------------------------------------------------

@dataclasses.dataclass
class JobPlan:
    label: str
    argv: list[str]
    run_dir: str


def plan_jobs(opts: SubmitConfig, args: PretrainArgs) -> list[JobPlan]:
    """One job per sweep point, each validated and with its own run_dir."""
    out_dir = Path(opts.output_dir).resolve()
    user_run_dir = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("run_dir=")), None)
    points = expand_sweep(opts.sweep)
    plans = []
    for point in points:
        if len(points) == 1:
            run_dir = user_run_dir or str(out_dir / "run")
        else:
            run_dir = str(Path(user_run_dir or out_dir / "runs") / _label(point))
        extra = point + [f"run_dir={Path(run_dir).resolve()}"]
        validate_run_config(args, extra)
        plans.append(JobPlan(_label(point), args.argv(extra), str(Path(run_dir).resolve())))
    return plans


def slurm_parameters(opts: SubmitConfig, minutes: int, code_dir: Path) -> dict:
    """SlurmExecutor.update_parameters(...) arguments (also used for --dry-run)."""
    params = dict(job_name=opts.job_name, time=minutes, nodes=opts.nodes,
                  ntasks_per_node=opts.gpus_per_node, gpus_per_node=opts.gpus_per_node,
                  cpus_per_task=opts.cpus_per_task, signal_delay_s=opts.signal_delay_s,
                  # submitit requeues with `scontrol requeue`: allowed even where the
                  # cluster's default (JobRequeue) says no
                  additional_parameters={"requeue": True},
                  setup=[f"cd {shlex.quote(str(code_dir))}",
                         f"export PYTHONPATH={shlex.quote(str(code_dir))}${{PYTHONPATH:+:$PYTHONPATH}}"])
    for name in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(opts, name) is not None:
            params[name] = getattr(opts, name)
    return params


def sbatch_script(opts: SubmitConfig, minutes: int, code_dir: Path, num_jobs: int) -> str:
    """The sbatch file submitit would write (a job array when ``num_jobs`` > 1)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(opts.output_dir).resolve() / "submitit" / "%j"
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder,
                               map_count=num_jobs if num_jobs > 1 else None,
                               **slurm_parameters(opts, minutes, code_dir))


def _executor(opts: SubmitConfig, minutes: int, code_dir: Path):
    folder = Path(opts.output_dir).resolve() / "submitit" / "%j"
    if not opts.local:
        executor = submitit.SlurmExecutor(folder, max_num_timeout=opts.max_requeues)
        executor.update_parameters(**slurm_parameters(opts, minutes, code_dir))
        return executor
    import torch

    executor = submitit.LocalExecutor(folder, max_num_timeout=opts.max_requeues)
    executor.update_parameters(
        tasks_per_node=opts.gpus_per_node, nodes=1, timeout_min=minutes,
        gpus_per_node=min(opts.gpus_per_node, torch.cuda.device_count()),
        signal_delay_s=opts.signal_delay_s,
        setup=[f"cd {shlex.quote(str(code_dir))}"])
    return executor


def submit(opts: SubmitConfig, pretrain_argv: list[str]) -> list:
    """Validate everything, snapshot the code, submit; the submitit jobs (none on a dry run)."""
    minutes = validate_options(opts)
    args = parse_pretrain_args(pretrain_argv)
    plans = plan_jobs(opts, args)
    out_dir = Path(opts.output_dir).resolve()
    code_dir = out_dir / "code"
    if opts.dry_run and opts.local:
        print(f"# local: {len(plans)} job(s) of {opts.gpus_per_node} task(s), {minutes} min each")
    elif opts.dry_run:
        print(sbatch_script(opts, minutes, code_dir, len(plans)))
    if opts.dry_run:
        for plan in plans:
            print(f"# job {plan.label}: {shlex.join(plan.argv)}")
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [f for f in (args.deepspeed_config, args.config) if f]
    copies = snapshot_code(code_dir, files)
    tasks = [PretrainTask([copies.get(a, a) for a in plan.argv], str(code_dir), os.getcwd(),
                          opts.cpus_per_task, opts.stop_timeout_s) for plan in plans]
    executor = _executor(opts, minutes, code_dir)
    saved = {k: os.environ.pop(k) for k in RANK_VARS if opts.local and k in os.environ}
    try:  # a local job must not inherit this process's rendezvous (e.g. inside a test run)
        # several tasks: one job array (Slurm) / one controller each (local)
        jobs = [executor.submit(tasks[0])] if len(tasks) == 1 else executor.submit_array(tasks)
    finally:
        os.environ.update(saved)
    record = [{"job_id": job.job_id, "label": p.label, "run_dir": p.run_dir, "argv": t.argv}
              for job, p, t in zip(jobs, plans, tasks)]
    (out_dir / "jobs.json").write_text(json.dumps(record, indent=2) + "\n")
    return jobs


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    sys.exit(_child_main(sys.argv[1:]))
