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

The rendezvous is bounded: a rank that cannot reach MASTER_ADDR:MASTER_PORT within
PIXELBERT_RENDEZVOUS_TIMEOUT_S (300 s by default) stops with a RendezvousError naming
the address, the port and where they came from, instead of retrying until the job's
time limit (and spending a requeue on a job that never reached step 1).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Mapping

import torch

from pixelbert_dist.distributed.launcher_watch import watch_launcher
from pixelbert_dist.distributed.op_build import announce_op_build

RENDEZVOUS_TIMEOUT_VAR = "PIXELBERT_RENDEZVOUS_TIMEOUT_S"
RENDEZVOUS_SOURCE_VAR = "PIXELBERT_RENDEZVOUS_SOURCE"  # set by job launchers: how they chose
DEFAULT_RENDEZVOUS_TIMEOUT_S = 300.0


class RendezvousError(RuntimeError):
    """The ranks could not meet at MASTER_ADDR:MASTER_PORT within the bound."""


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"  # "deepspeed" | "torchrun" | "slurm" | "single"
    # how master_addr / master_port were chosen, for error messages (not part of equality)
    source: str = dataclasses.field(default="", compare=False)

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


def _scontrol(*args: str) -> str:
    """``scontrol ARGS`` output, or "" where there is no scontrol or it fails."""
    scontrol = shutil.which("scontrol")
    if not scontrol:
        return ""
    try:
        return subprocess.run([scontrol, *args], capture_output=True, text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return ""


def slurm_master(environ: Mapping[str, str]) -> tuple[str, str]:
    """The rendezvous host of a Slurm job and how it was found.

    The first node of SLURM_JOB_NODELIST, at the address Slurm itself reaches it by
    (its NodeAddr): a node name need not resolve outside Slurm (two slurmd on one host,
    clusters whose NodeAddr is an IP or a fabric interface).
    """
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    if not nodelist:
        return "127.0.0.1", "no SLURM_JOB_NODELIST: this machine"
    hosts = _scontrol("show", "hostnames", nodelist).split()
    host = hosts[0] if hosts else first_host(nodelist)
    match = re.search(r"\bNodeAddr=(\S+)", _scontrol("show", "node", "-o", host))
    if match and match.group(1) not in ("(null)", host):
        return match.group(1), f"NodeAddr of {host}, the first node of SLURM_JOB_NODELIST={nodelist}"
    return host, f"the first node of SLURM_JOB_NODELIST={nodelist}"


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
    return DistEnv(
        rank=_int(environ, "RANK"),
        local_rank=_int(environ, "LOCAL_RANK", 0),
        world_size=world,
        local_world_size=local_world,
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(environ, "MASTER_PORT", 29500),
        launcher=launcher,
        source=environ.get(RENDEZVOUS_SOURCE_VAR) or f"exported by the {launcher} launcher",
    )


# Below Linux's ephemeral ports (32768-60999 by default), which the OS hands out to the
# local end of outgoing connections and to gloo's listeners: a master port in that range
# can be held by a running process (submitit's own pick, 20000-60000, once was in CI).
JOB_PORTS = range(20000, 32000)


def job_port(job_id: str | int) -> int:
    """The MASTER_PORT every task of a job derives alike from the job id (Slurm's
    SLURM_JOB_ID, unique also for an array task): consecutive jobs get consecutive ports,
    so jobs sharing a node collide only 12,000 job ids apart."""
    return JOB_PORTS[int(job_id) % len(JOB_PORTS)]


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    world = _int(environ, "SLURM_NTASKS")
    job_id = _int(environ, "SLURM_JOB_ID", 0)
    port = _int(environ, "MASTER_PORT", job_port(job_id))
    port_how = (
        "MASTER_PORT from the environment" if environ.get("MASTER_PORT") else f"port derived from SLURM_JOB_ID={job_id}"
    )
    if environ.get("MASTER_ADDR"):
        addr, addr_how = environ["MASTER_ADDR"], "MASTER_ADDR from the environment"
    else:
        addr, addr_how = slurm_master(environ)
    return DistEnv(
        rank=_int(environ, "SLURM_PROCID"),
        local_rank=_int(environ, "SLURM_LOCALID", 0),
        world_size=world,
        local_world_size=_slurm_tasks_per_node(environ, world),
        master_addr=addr,
        master_port=port,
        launcher="slurm",
        source=f"{addr_how}; {port_how}",
    )


def detect_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables (``os.environ`` by default)."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return _from_launcher(environ)
    if "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:
        return _from_slurm(environ)
    port = _int(environ, "MASTER_PORT", 0) or free_port()
    return DistEnv(
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=port,
        source="a single process: this machine and a free port unless MASTER_ADDR/PORT set",
    )


def export_env(env: DistEnv) -> None:
    """Write the variables torch's ``env://`` rendezvous and DeepSpeed read."""
    os.environ.update(
        {
            "RANK": str(env.rank),
            "LOCAL_RANK": str(env.local_rank),
            "WORLD_SIZE": str(env.world_size),
            "LOCAL_WORLD_SIZE": str(env.local_world_size),
            "MASTER_ADDR": env.master_addr,
            "MASTER_PORT": str(env.master_port),
        }
    )


def backend_for() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


class LocalRanksError(RuntimeError):
    """More ranks on a node than GPUs, where every rank sees all of them."""


def cuda_index(env: DistEnv, gpus: int) -> int:
    """This rank's GPU among the ``gpus`` it sees.

    Under the deepspeed launcher, torchrun or a plain start every rank of a node sees all
    of its GPUs: more local ranks than GPUs would put two ranks on one (the deepspeed
    runner starts ``--num_gpus`` ranks whatever the machine has, and NCCL then stops with
    "Duplicate GPU detected"), refused here in one line before any rendezvous. A Slurm
    task may be bound to its own GPU (--gpus-per-task, --gpu-bind), which it sees as
    cuda:0: its local id is taken modulo what it sees (submit.py checks the counts)."""
    if env.launcher == "slurm":
        return env.local_rank % max(1, gpus)
    if env.local_world_size > gpus or env.local_rank >= gpus:
        raise LocalRanksError(
            f"{env.local_world_size} ranks on this node (local rank {env.local_rank}, {env.launcher} launcher) "
            f"but {gpus} GPU(s) visible: two ranks would share a GPU (NCCL: 'Duplicate GPU detected'); "
            f"start at most {gpus} per node (deepspeed --num_gpus {gpus}, torchrun --nproc_per_node {gpus})"
        )
    return env.local_rank


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", cuda_index(env, torch.cuda.device_count()))
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


def rendezvous_timeout_s(environ: Mapping[str, str] | None = None) -> float:
    environ = os.environ if environ is None else environ
    raw = environ.get(RENDEZVOUS_TIMEOUT_VAR, "")
    try:
        value = float(raw) if raw else DEFAULT_RENDEZVOUS_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{RENDEZVOUS_TIMEOUT_VAR}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise ValueError(f"{RENDEZVOUS_TIMEOUT_VAR}={raw!r} must be positive")
    return value


def _meet(env: DistEnv, timeout_s: float) -> "torch.distributed.TCPStore":
    store = torch.distributed.TCPStore(
        env.master_addr,
        env.master_port,
        env.world_size,
        is_master=env.rank == 0,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=True,
    )
    # a client "connects" to whatever listens on the port (another job's server, a stale
    # socket): only a round trip through a real store proves the meeting
    store.set(f"pixelbert/rendezvous/{env.rank}", "1")
    store.wait([f"pixelbert/rendezvous/{r}" for r in range(env.world_size)])
    return store


def _exit_now(code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rendezvous(env: DistEnv, timeout_s: float, then: timedelta = timedelta(minutes=30)) -> "torch.distributed.TCPStore":
    """Meet every rank at MASTER_ADDR:MASTER_PORT (rank 0 serves) within ``timeout_s``.

    torch's own ``env://`` rendezvous retries for the whole process-group timeout (30
    min), longer than many time limits, and a client talking to a socket that never
    answers waits forever: the meeting runs in a thread with its own bound, and the
    store gets the usual timeout (``then``) once everyone is in.
    """
    outcome: dict = {}

    def meet() -> None:
        try:
            outcome["store"] = _meet(env, timeout_s)
        except (RuntimeError, OSError, ValueError) as err:
            outcome["error"] = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]

    thread = threading.Thread(target=meet, name="rendezvous", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)  # the store's own timeouts usually fire first
    if thread.is_alive():
        # the stuck thread sits in C++: a normal interpreter exit would abort on it
        atexit.register(_exit_now, 1)
    if "store" not in outcome:
        reason = outcome.get("error", "no answer from the master")
        raise RendezvousError(
            f"rank {env.rank} of {env.world_size}: the rendezvous at MASTER_ADDR={env.master_addr} "
            f"MASTER_PORT={env.master_port} did not complete within {timeout_s:g} s ({reason}). "
            f"They came from: {env.source or env.launcher}. Check that every node resolves and "
            f"reaches {env.master_addr}:{env.master_port} and that no other process holds the port "
            f"(set MASTER_ADDR/MASTER_PORT to choose them; {RENDEZVOUS_TIMEOUT_VAR} sets the bound)"
        )
    outcome["store"].set_timeout(then)
    return outcome["store"]


def init_distributed(env: DistEnv | None = None, timeout_s: float | None = None) -> DistEnv:
    """Start the process group once; later calls return at once. ``timeout_s`` bounds
    each collective (None: DeepSpeed's 10 min, or DEEPSPEED_TIMEOUT); the trainer sets a
    long one for start-up, then ``set_collective_timeout`` once it trains.

    Never destroy the group inside one process: DeepSpeed keeps references to the
    groups it made, and a second init after a destroy breaks it.
    """
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.constants import default_pg_timeout

    pg_timeout = default_pg_timeout if timeout_s is None else timedelta(seconds=timeout_s)
    env = env or detect_env()
    if dist.is_initialized():
        return env
    export_env(env)
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for(env))
    else:
        share_cpu_threads(env)
    if not torch.distributed.is_initialized():
        store = rendezvous(env, rendezvous_timeout_s(), then=pg_timeout)
        torch.distributed.init_process_group(
            backend_for(), store=store, rank=env.rank, world_size=env.world_size, timeout=pg_timeout
        )
    announce_op_build()  # a first CPU run compiles an op here, for a minute
    # DeepSpeed adopts the group torch already has
    deepspeed.init_distributed(dist_backend=backend_for(), auto_mpi_discovery=False, verbose=False)
    if env.launcher != "single":
        watch_launcher()  # a rank whose launcher dies saves and stops instead of training on
    if not torch.cuda.is_available():
        _unlink_cpu_allreduce_buffer(env)
    return env


def set_collective_timeout(seconds: float) -> None:
    """Every process group's collectives (DeepSpeed's own groups too, which torch gives a
    30 min default) time out after ``seconds`` from now on: a dead or frozen peer then
    ends a waiting rank with an error instead of holding it (torchtitan's pattern: long
    for the first collectives, short in training)."""
    from torch.distributed import distributed_c10d as c10d

    if not torch.distributed.is_initialized():
        return
    timeout = timedelta(seconds=seconds)
    for group in list(c10d._world.pg_map):  # no public list of the groups
        if group.rank() >= 0:  # a group this rank belongs to
            group.set_timeout(timeout)


def close_process_group() -> None:
    """Tear the process group down before the interpreter does, at the end of a process
    that was one run and ended well (the command line, a job's trainer process): left to
    exit-time destructors, gloo's threads sometimes end a finished rank with "terminate
    called without an active exception" (SIGABRT, or exit 250), and its job is marked
    failed. Not inside tests, which keep one group per session (``init_distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> None:
    """End a run's process at once, once it is done (checkpoint written, logs closed, group
    closed): the atexit handlers run, then ``os._exit`` skips the interpreter's teardown.
    That teardown (the garbage collector freeing the engine, the groups' C++ objects) took
    ~20 s after a stop at 2 gloo ranks and ~7 s at 1, while a launcher that stops its ranks
    waits, then SIGKILLs them at 30 s (DeepSpeed's)."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _unlink_cpu_allreduce_buffer(env: DistEnv) -> None:
    """DeepSpeed's CPU all-reduce (all ranks on one host) maps a 66 MB /dev/shm file per
    rank and never unlinks it: every multi-rank CPU run left its files behind (19 GB of
    them filled a dev machine's memory). Once every rank has mapped its peers' files
    (DeepSpeed's init waits for them; the barrier waits for every rank's init), the names
    can go: the mappings live until the processes end."""
    if env.world_size > 1:
        torch.distributed.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{env.master_addr}_{env.master_port}_{env.rank}"
    Path("/dev/shm", name).unlink(missing_ok=True)
