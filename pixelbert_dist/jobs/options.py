"""The scheduler options of a submission, and the checks that run before anything
reaches Slurm: every string that ends up in the sbatch script is validated here."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess


class SubmitError(ValueError):
    """A submission refused (before the scheduler, or by it): one line to show the user."""


@dataclasses.dataclass
class SubmitConfig:
    nodes: int = 1
    gpus_per_node: int = 8  # GPUs asked per node; 0: CPU nodes (gloo), no gres line
    tasks_per_node: int | None = None  # None: one task per GPU (one on a CPU node)
    cpus_per_task: int = 8
    mem: str | None = None  # Slurm --mem, e.g. "480G"; None: the partition default
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time: str = "24:00:00"  # any Slurm time form: MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
    job_name: str = "pixelbert"
    output_dir: str = "runs/submit"
    sweep: tuple[str, ...] = ()  # "key=v1,v2": one job per value (several: the product)
    local: bool = False  # submitit's local executor: tasks_per_node tasks here
    dry_run: bool = False  # print the sbatch script, submit nothing
    max_requeues: int = 10  # time-outs a job may survive (submitit's max_num_timeout;
    # preemptions do not count)
    max_restarts: int = 3  # failures (hang, crashed rank, lost node) after progress that requeue the job
    signal_delay_s: int = 180  # USR2 this long before the time limit: time to save
    stop_timeout_s: int = 150  # how long checkpoint() waits for the trainer to save
    rendezvous_timeout_s: int = 300  # the ranks must meet within this, or the job fails

    @property
    def tasks(self) -> int:
        """Tasks per node: as given, else one per GPU, else one."""
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1


_TIME_FORMS = [  # (regex, field names) for the forms sbatch --time accepts
    (r"(\d+)", ("m",)),
    (r"(\d+):(\d+)", ("m", "s")),
    (r"(\d+):(\d+):(\d+)", ("h", "m", "s")),
    (r"(\d+)-(\d+)", ("d", "h")),
    (r"(\d+)-(\d+):(\d+)", ("d", "h", "m")),
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
                raise SubmitError(f"--time {text!r}: {name}={parts[name]} is out of range (must be < {limits[name]})")
        seconds = ((parts.get("d", 0) * 24 + parts.get("h", 0)) * 60 + parts.get("m", 0)) * 60 + parts.get("s", 0)
        if seconds <= 0:
            raise SubmitError(f"--time {text!r} is zero: give the job some time")
        return -(-seconds // 60)
    raise SubmitError(
        f"--time {text!r} is not a Slurm time: use MM, MM:SS, HH:MM:SS, D-HH, "
        f"D-HH:MM or D-HH:MM:SS (e.g. 2-00:00:00 for two days)"
    )


_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
# what may not appear in a path written into the sbatch script: a newline ends the
# #SBATCH header and starts a line of shell; '%' is Slurm's filename pattern; a space
# splits an #SBATCH option
_UNSAFE_PATH = re.compile(r"[\x00-\x1f\x7f%\s]")


def check_script_path(flag: str, path: str) -> None:
    """Refuse a path sbatch would misread (it is written into the script as text)."""
    bad = _UNSAFE_PATH.search(str(path))
    if bad:
        raise SubmitError(
            f"{flag} {str(path)!r} holds {bad.group()!r}: a path written into the "
            f"sbatch script may not contain whitespace, control characters or '%'; "
            f"choose another folder"
        )


def _slurm_partitions() -> set[str] | None:
    """The partitions ``sinfo`` knows, or None where there is no sinfo to ask."""
    sinfo = shutil.which("sinfo")
    if not sinfo:
        return None
    try:
        out = subprocess.run([sinfo, "-h", "-o", "%R"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    return {line.strip() for line in out.splitlines() if line.strip()}


def _check_counts(opts: SubmitConfig) -> None:
    for name in ("nodes", "cpus_per_task", "max_requeues", "max_restarts", "rendezvous_timeout_s"):
        value = getattr(opts, name)
        if not isinstance(value, int) or value < (0 if name in ("max_requeues", "max_restarts") else 1):
            raise SubmitError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
    if not isinstance(opts.gpus_per_node, int) or opts.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node must be >= 0 (0: CPU nodes), got {opts.gpus_per_node!r}")
    tasks = opts.tasks
    if not isinstance(tasks, int) or tasks < 1:
        raise SubmitError(f"--tasks-per-node must be >= 1, got {tasks!r}")
    if opts.gpus_per_node and opts.gpus_per_node % tasks:
        raise SubmitError(
            f"--gpus-per-node {opts.gpus_per_node} is not a multiple of "
            f"--tasks-per-node {tasks}: every task needs the same number of GPUs "
            f"(leave --tasks-per-node out for one task per GPU)"
        )
    if opts.local and opts.nodes != 1:
        raise SubmitError("--local runs on this machine only: use --nodes 1")


def _check_names(opts: SubmitConfig) -> None:
    if opts.partition is not None:
        if not re.fullmatch(rf"{_NAME}(,{_NAME})*", opts.partition):
            raise SubmitError(
                f"--partition {opts.partition!r} is not a Slurm partition name "
                f"(letters, digits, '_', '-', '.'; several joined by commas)"
            )
        known = None if opts.local or opts.dry_run else _slurm_partitions()
        missing = sorted(set(opts.partition.split(",")) - known) if known else []
        if missing:
            raise SubmitError(f"--partition: {missing} unknown to this cluster; sinfo lists {sorted(known)}")
    for name in ("account", "qos", "constraint", "job_name"):
        value = getattr(opts, name)
        if value is not None and (not value or re.search(r"[\x00-\x1f\x7f'\"\s%]", value)):
            raise SubmitError(
                f"--{name.replace('_', '-')} {value!r} is empty or holds quotes, whitespace, control characters or '%'"
            )
    if opts.mem is not None and not re.fullmatch(r"\d+[KMGT]?", opts.mem.upper()):
        raise SubmitError(
            f"--mem {opts.mem!r}: use Slurm's form, a number with an optional "
            f"K/M/G/T suffix (e.g. 480G); 0 asks for all of a node's memory"
        )
    check_script_path("--output-dir", opts.output_dir)


def validate_options(opts: SubmitConfig) -> int:
    """Check the scheduler options; return the time limit in minutes."""
    _check_counts(opts)
    _check_names(opts)
    if not 0 < opts.stop_timeout_s < opts.signal_delay_s:
        raise SubmitError(
            f"--stop-timeout-s {opts.stop_timeout_s} must be positive and shorter "
            f"than --signal-delay-s {opts.signal_delay_s}: Slurm kills the job that "
            f"long after its USR2, saved or not"
        )
    minutes = parse_slurm_time(opts.time)
    if opts.signal_delay_s >= minutes * 60:
        raise SubmitError(
            f"--signal-delay-s {opts.signal_delay_s} is not shorter than --time "
            f"{opts.time!r}: the job would be told to stop before it starts"
        )
    return minutes
