"""The launcher's variables parsed right: deepspeed, torchrun, Slurm, a plain process."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixelbert_dist.distributed import env as envmod
from pixelbert_dist.distributed.env import DistEnv, detect_env, device_for, first_host

_LAUNCH_VARS = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "LOCAL_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_LOCALID",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_JOB_NODELIST",
    "SLURM_NODELIST",
    "SLURM_JOB_ID",
)


@pytest.fixture
def clean_env(monkeypatch):
    for key in _LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_deepspeed_launcher(clean_env):
    for key, value in dict(
        RANK="3",
        LOCAL_RANK="1",
        WORLD_SIZE="4",
        LOCAL_SIZE="2",
        MASTER_ADDR="10.1.2.3",
        MASTER_PORT="29611",
        CROSS_RANK="1",
    ).items():
        clean_env.setenv(key, value)
    assert detect_env() == DistEnv(
        rank=3,
        local_rank=1,
        world_size=4,
        local_world_size=2,
        master_addr="10.1.2.3",
        master_port=29611,
        launcher="deepspeed",
    )


def test_torchrun(clean_env):
    for key, value in dict(
        RANK="5",
        LOCAL_RANK="1",
        WORLD_SIZE="8",
        LOCAL_WORLD_SIZE="4",
        MASTER_ADDR="host0",
        MASTER_PORT="29400",
        TORCHELASTIC_RUN_ID="abc",
    ).items():
        clean_env.setenv(key, value)
    env = detect_env()
    assert env == DistEnv(5, 1, 8, 4, "host0", 29400, "torchrun")
    assert env.num_nodes == 2
    assert not env.is_main


def test_launcher_wins_over_slurm(clean_env):
    # `srun deepspeed ...` or torchrun inside an allocation: the launcher's ranks are the truth
    for key, value in dict(RANK="1", WORLD_SIZE="2", MASTER_PORT="1234", SLURM_PROCID="0", SLURM_NTASKS="1").items():
        clean_env.setenv(key, value)
    assert detect_env().launcher == "deepspeed"
    assert detect_env().rank == 1


def test_slurm(clean_env, monkeypatch):
    monkeypatch.setattr(envmod.shutil, "which", lambda name: None)  # no scontrol: parse ourselves
    for key, value in dict(
        SLURM_PROCID="6",
        SLURM_NTASKS="8",
        SLURM_LOCALID="2",
        SLURM_NTASKS_PER_NODE="4(x2)",
        SLURM_JOB_NODELIST="gpu[07-08]",
        SLURM_JOB_ID="123456",
    ).items():
        clean_env.setenv(key, value)
    env = detect_env()
    assert env == DistEnv(
        rank=6,
        local_rank=2,
        world_size=8,
        local_world_size=4,
        master_addr="gpu07",
        master_port=20000 + 123456 % 12000,
        launcher="slurm",
    )


def test_slurm_uses_scontrol_when_present(clean_env, tmp_path):
    fake = tmp_path / "scontrol"  # a stand-in that answers like `scontrol show hostnames`
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'nodeA\\nnodeB\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    clean_env.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for key, value in dict(
        SLURM_PROCID="0",
        SLURM_NTASKS="2",
        SLURM_TASKS_PER_NODE="1(x2)",
        SLURM_JOB_NODELIST="weird-list",
        SLURM_JOB_ID="7",
    ).items():
        clean_env.setenv(key, value)
    env = detect_env()
    assert env.master_addr == "nodeA"
    assert env.local_world_size == 1
    assert env.master_port == 20007


@pytest.mark.parametrize(
    "nodelist,first",
    [
        ("node[01-04]", "node01"),
        ("node[3,5-7]", "node3"),
        ("a01,b02", "a01"),
        ("gpu[1-2],cpu[3-4]", "gpu1"),
        ("single", "single"),
        ("rack1-n[010-012]", "rack1-n010"),
    ],
)
def test_first_host(nodelist, first):
    assert first_host(nodelist) == first


def test_single_process_gets_a_free_port(clean_env):
    env = detect_env()
    assert (env.rank, env.world_size, env.launcher, env.master_addr) == (0, 1, "single", "127.0.0.1")
    with socket.socket() as sock:  # the port was free: we can bind it
        sock.bind(("127.0.0.1", env.master_port))
    clean_env.setenv("MASTER_PORT", "29555")
    assert detect_env().master_port == 29555


def test_bad_value_names_the_variable(clean_env):
    clean_env.setenv("RANK", "zero")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"RANK='zero' is not an integer"):
        detect_env()


def test_init_distributed_is_idempotent_and_device(dist_env):
    from pixelbert_dist.distributed.env import init_distributed

    assert torch.distributed.is_initialized()
    assert torch.distributed.get_world_size() == 1
    group = torch.distributed.group.WORLD
    init_distributed(DistEnv(master_port=1))  # a second call must not re-initialise
    assert torch.distributed.group.WORLD is group
    assert torch.distributed.get_backend() == ("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():
        assert device_for(dist_env) == torch.device("cpu")


def test_cpu_ranks_split_the_cores_unless_omp_says_otherwise():
    from pixelbert_dist.distributed.env import share_cpu_threads

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        assert share_cpu_threads(DistEnv(local_world_size=2), environ={}) == max(1, cores // 2)
        assert torch.get_num_threads() == max(1, cores // 2)
        assert share_cpu_threads(DistEnv(local_world_size=4 * cores), environ={}) == 1
        torch.set_num_threads(1)  # OMP_NUM_THREADS set by the user: theirs is kept
        assert share_cpu_threads(DistEnv(local_world_size=1), environ={"OMP_NUM_THREADS": "1"}) == 1
    finally:
        torch.set_num_threads(before)


def test_rendezvous_on_a_held_port_fails_at_once_with_the_reason():
    """Rank 0 cannot serve on a port another process holds: a RendezvousError naming the
    address, the port, where they came from and what the OS said."""
    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    port = holder.getsockname()[1]
    env = DistEnv(
        rank=0, world_size=2, master_addr="127.0.0.1", master_port=port, source="MASTER_PORT from the environment"
    )
    try:
        with pytest.raises(envmod.RendezvousError) as err:
            envmod.rendezvous(env, timeout_s=5)
    finally:
        holder.close()
    message = str(err.value)
    assert f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}" in message
    assert "They came from: MASTER_PORT from the environment" in message
    assert "address already in use" in message


@pytest.mark.slow
def test_rendezvous_with_a_silent_master_ends_within_the_bound(tmp_path):
    """A client whose master accepts and never answers (another job's stale socket) would
    wait forever in torch's store: the bound ends it, and the process exits 1 (a
    subprocess: the stuck store thread makes the process leave with os._exit)."""
    script = tmp_path / "rdzv.py"
    script.write_text(
        "import socket, sys, time\n"
        "from pixelbert_dist.distributed.env import DistEnv, RendezvousError, rendezvous\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "env = DistEnv(rank=1, world_size=2, master_addr='127.0.0.1',\n"
        "              master_port=s.getsockname()[1], source='a test')\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    rendezvous(env, timeout_s=2)\n"
        "except RendezvousError as err:\n"
        "    print(f'{time.monotonic() - start:.1f}', err, flush=True)\n"
        "    sys.exit(1)\n"
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(envmod.__file__).parents[2])},
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    seconds, message = proc.stdout.split(" ", 1)
    assert float(seconds) < 10  # the bound (2 s) and a margin for a busy machine
    assert "did not complete within 2 s" in message
    assert "no answer from the master" in message


@pytest.mark.slow
def test_two_cpu_ranks_leave_no_shared_memory_files(tmp_path):
    """DeepSpeed's shared-memory all-reduce still works once init_distributed has unlinked
    its /dev/shm names, and the ranks leave none of those files behind."""
    script = tmp_path / "ranks.py"
    script.write_text(
        "import sys, torch, deepspeed.comm as dist\n"
        "from pixelbert_dist.distributed.env import DistEnv, init_distributed\n"
        "rank, port = int(sys.argv[1]), int(sys.argv[2])\n"
        "init_distributed(DistEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2,\n"
        "                         master_addr='127.0.0.1', master_port=port))\n"
        "t = torch.full((4,), float(rank + 1))\n"
        "dist.inference_all_reduce(t)  # the shared-memory path\n"
        "print(t.tolist(), flush=True)\n"
    )
    port = envmod.free_port()
    environ = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    environ.update(LOCAL_SIZE="2", PYTHONPATH=str(Path(envmod.__file__).parents[2]))  # as the launcher sets it
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environ,
        )
        for r in range(2)
    ]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    for rank, (out, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == "[3.0, 3.0, 3.0, 3.0]"
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*"))


def test_job_ports_stay_below_the_ephemeral_range():
    """A master port derived from the job id never lies where Linux picks the local ports
    of connections and gloo's listeners (in CI, submitit's pick for job 184, 41461, was
    held by another job's process and the rendezvous failed); consecutive jobs get
    consecutive ports."""
    job_port = envmod.job_port
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert max(job_port(i) for i in range(0, 50_000, 7)) < low
    assert min(job_port(i) for i in range(0, 50_000, 7)) >= 1024
    assert job_port("185") == job_port(184) + 1


def test_more_local_ranks_than_gpus_is_refused_in_one_line(capsys, monkeypatch):
    """`deepspeed --num_gpus 2` on a 1-GPU machine: both ranks would land on cuda:0 and NCCL
    stop with "Duplicate GPU detected"; refused before any rendezvous. A Slurm task bound
    to its own GPU sees it as cuda:0, whatever its local id."""
    from pixelbert_dist.distributed.env import LocalRanksError, cuda_index
    from pixelbert_dist.train.run import refusals_as_one_line

    two = {"world_size": 2, "local_world_size": 2}
    assert cuda_index(DistEnv(rank=1, local_rank=1, launcher="deepspeed", **two), gpus=2) == 1
    assert cuda_index(DistEnv(rank=3, local_rank=3, world_size=4, local_world_size=4, launcher="slurm"), gpus=1) == 0
    for launcher in ("deepspeed", "torchrun"):
        for rank in (0, 1):  # every rank stops, rank 0 too (which alone would fit)
            with pytest.raises(LocalRanksError, match=r"2 ranks on this node .* but 1 GPU\(s\) visible"):
                cuda_index(DistEnv(rank=rank, local_rank=rank, launcher=launcher, **two), gpus=1)

    def start():
        cuda_index(DistEnv(local_rank=0, launcher="deepspeed", **two), gpus=1)

    monkeypatch.setenv("RANK", "0")
    assert refusals_as_one_line("pretrain", start) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pretrain: 2 ranks on this node") and "--num_gpus 1" in err[0]
