"""Where this process sits in the job: rank, world size and rendezvous address.

Four ways to be started are understood, in this order of precedence:

* the ``deepspeed`` launcher and ``torchrun``: both export RANK / LOCAL_RANK /
  WORLD_SIZE / MASTER_ADDR / MASTER_PORT (the launcher also LOCAL_SIZE, torchrun
  LOCAL_WORLD_SIZE and TORCHELASTIC_RUN_ID);
* Slurm (``srun python ...``, also what submitit does): SLURM_PROCID, SLURM_NTASKS,
  SLURM_LOCALID, SLURM_NTASKS_PER_NODE; the master is the first host of
  SLURM_JOB_NODELIST and the port is derived from the job id so every task agrees;
* a plain ``python script.py``: rank 0 of 1 on 127.0.0.1 with a free port (DeepSpeed
  would otherwise go looking for mpi4py).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
import socket
import subprocess
from typing import Mapping

import torch


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # "deepspeed" | "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    raw = environ.get(key)
    if raw is None or raw == "":
        if default is None:
            raise ValueError(f"environment variable {key} is not set")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def first_host(nodelist: str) -> str:
    """First host of a Slurm nodelist: ``node[01-04,07],gpu5`` -> ``node01``.

    Used only when ``scontrol`` is not on PATH; handles the usual forms (a prefix
    followed by one bracketed range list) without trying to be a full parser.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("SLURM_JOB_NODELIST is empty")
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):  # the first top-level comma ends the first item
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end]
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", item)
    if not match:
        return item
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def _slurm_master(environ: Mapping[str, str]) -> str:
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    if not nodelist:
        return "127.0.0.1"
    scontrol = shutil.which("scontrol")
    if scontrol:
        try:
            out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass  # fall back to parsing the nodelist ourselves
    return first_host(nodelist)


def _slurm_tasks_per_node(environ: Mapping[str, str], world_size: int) -> int:
    # "4" or "4(x2)" or "2(x3),1": the first count is ours on a homogeneous job
    for key in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        raw = environ.get(key)
        if raw:
            match = re.match(r"\d+", raw)
            if match:
                return int(match.group())
    return world_size


def _from_launcher(environ: Mapping[str, str]) -> DistEnv:
    world = _int(environ, "WORLD_SIZE")
    local_world = _int(environ, "LOCAL_WORLD_SIZE", _int(environ, "LOCAL_SIZE", world))
    launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in environ else "deepspeed"
    return DistEnv(rank=_int(environ, "RANK"), local_rank=_int(environ, "LOCAL_RANK", 0),
                   world_size=world, local_world_size=local_world,
                   master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=_int(environ, "MASTER_PORT", 29500), launcher=launcher)


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    world = _int(environ, "SLURM_NTASKS")
    job_id = _int(environ, "SLURM_JOB_ID", 0)
    # every task computes the same port from the job id; jobs sharing a node rarely collide
    port = _int(environ, "MASTER_PORT", 15000 + job_id % 20000)
    return DistEnv(rank=_int(environ, "SLURM_PROCID"), local_rank=_int(environ, "SLURM_LOCALID", 0),
                   world_size=world, local_world_size=_slurm_tasks_per_node(environ, world),
                   master_addr=environ.get("MASTER_ADDR") or _slurm_master(environ),
                   master_port=port, launcher="slurm")


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (``os.environ`` by default)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _from_launcher(environ)
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return _from_slurm(environ)
    port = _int(environ, "MASTER_PORT", 0) or free_port()
    return DistEnv(master_addr=environ.get("MASTER_ADDR", "127.0.0.1"), master_port=port)


def export_env(env: DistEnv) -> None:
    """Write the variables torch's ``env://`` rendezvous and DeepSpeed read."""
    os.environ.update({
        "RANK": str(env.rank), "LOCAL_RANK": str(env.local_rank),
        "WORLD_SIZE": str(env.world_size), "LOCAL_WORLD_SIZE": str(env.local_world_size),
        "MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port),
    })


def backend_for() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", env.local_rank % max(1, torch.cuda.device_count()))
    return torch.device("cpu")


def share_cpu_threads(env: DistEnv, environ: Mapping[str, str] | None = None) -> int:
    """CPU ranks: split this node's cores among its ranks unless OMP_NUM_THREADS says
    otherwise. Every process otherwise starts one thread per core, and two ranks on two
    cores run four threads that stall each other (the CPU demo ran 2x slower)."""
    environ = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // max(1, env.local_world_size))
    torch.set_num_threads(threads)
    return threads


def init_distributed(env: DistEnv | None = None) -> DistEnv:
    """Start the process group once; later calls return at once.

    Never destroy the group inside one process: DeepSpeed keeps references to the
    groups it made, and a second init after a destroy breaks it.
    """
    import deepspeed
    import deepspeed.comm as dist

    env = env or detect_env()
    if dist.is_initialized():
        return env
    export_env(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for(env))
    else:
        share_cpu_threads(env)
    deepspeed.init_distributed(dist_backend=backend_for(), auto_mpi_discovery=False,
                               verbose=False)
    return env
