"""launch/submit.py and pixelbert_dist.jobs: validation, dry-run, sweeps,
the code snapshot, the task environment, and a real 2-task local job that is
interrupted (as at a time limit), checkpoints, requeues and resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pixelbert_dist.distributed.env import free_port
from pixelbert_dist.jobs import cli as submit_cli
from pixelbert_dist.jobs import snapshot, submission
from pixelbert_dist.jobs import task as job_task
from pixelbert_dist.jobs.options import SubmitError, parse_slurm_time
from pixelbert_dist.jobs.plan import expand_sweep

REPO = Path(__file__).resolve().parents[1]

DS = "deepspeed_configs/zero2.json"


def _cli(capsys, tmp_path, *opts, pretrain=(DS, "data.train_shards=/data/x")):
    ds, *overrides = pretrain
    rc = submit_cli.main([*opts, "--output-dir", str(tmp_path / "out"), "--", "--deepspeed_config", ds, *overrides])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "text,minutes", [("90", 90), ("5:30", 6), ("01:00:00", 60), ("2-00", 2880), ("1-12:30", 2190), ("0-00:00:59", 1)]
)
def test_slurm_time_forms(text, minutes):
    assert parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "25:61:00", "1-24:00", "0", "00:00:00", "-5"])
def test_slurm_time_refused(text):
    with pytest.raises(SubmitError, match="--time"):
        parse_slurm_time(text)


def test_dry_run_prints_the_sbatch_script(capsys, tmp_path):
    rc, out, _ = _cli(
        capsys,
        tmp_path,
        "--dry-run",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--cpus-per-task",
        "12",
        "--time",
        "2-00:00:00",
        "--partition",
        "gpu",
        "--account",
        "vision",
        "--mem",
        "480G",
        "--job-name",
        "pb-r50",
    )
    assert rc == 0
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --time=2880",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=vision",
        "#SBATCH --mem=480G",
        "#SBATCH --job-name=pb-r50",
        "#SBATCH --signal=USR2@180",
        "#SBATCH --requeue",
        "srun --unbuffered",
    ]:
        assert line in out, line
    code = tmp_path / "out" / "code"
    assert f"cd {code}" in out
    assert f"export PYTHONPATH={code}" in out  # runs from the snapshot
    assert "--array" not in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_sweep_makes_one_job_per_value(capsys, tmp_path):
    rc, out, _ = _cli(capsys, tmp_path, "--dry-run", "--sweep", "optim.lr=1e-4,2e-4,3e-4")
    assert rc == 0
    assert "#SBATCH --array=0-2%3" in out
    jobs = [line for line in out.splitlines() if line.startswith("# job ")]
    assert len(jobs) == 3
    run_dirs = {line.split("run_dir=")[1] for line in jobs}
    assert len(run_dirs) == 3
    for value in ("1e-4", "2e-4", "3e-4"):
        assert sum(f"optim.lr={value} " in line for line in jobs) == 1
    # several keys make the product; commas inside brackets belong to one value
    points = expand_sweep(["a=1,2", "schedule.milestones=[25,35],[30,38]"])
    assert len(points) == 4
    assert ["a=1", "schedule.milestones=[25,35]"] in points


@pytest.mark.parametrize(
    "opts,pretrain,message",
    [
        (["--time", "25:61:00"], (DS,), "--time"),
        (["--time", "forever"], (DS,), "not a Slurm time"),
        (["--partition", "gpu;rm -rf"], (DS,), "--partition"),
        (["--mem", "lots"], (DS,), "--mem"),
        (["--nodes", "0"], (DS,), "--nodes"),
        (["--local", "--nodes", "2"], (DS,), "--local"),
        (["--stop-timeout-s", "300"], (DS,), "--stop-timeout-s"),
        ([], ("deepspeed_configs/missing.json",), "missing.json does not exist"),
        (["--sweep", "optim.no_such_key=1,2"], (DS,), "optim.no_such_key"),
        (["--sweep", "optim.lr="], (DS,), "--sweep"),
        ([], (DS, "train.micro_batch=0"), "micro_batch"),
    ],
)
def test_bad_input_is_refused_before_submission(capsys, tmp_path, opts, pretrain, message):
    rc, _, err = _cli(capsys, tmp_path, *opts, pretrain=(*pretrain, "data.train_shards=/data/x"))
    assert rc == 2
    assert message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "port, opts, message",
    [
        ("busy", (), "is in use on this machine"),
        ("http", (), "is not a port number"),
        ("free", ("--sweep", "optim.lr=1e-4,2e-4"), "would be shared by 2 local jobs"),
    ],
)
def test_an_exported_master_port_that_cannot_serve_is_refused(capsys, tmp_path, monkeypatch, port, opts, message):
    """submit.py --local uses an exported MASTER_PORT, or says why it cannot: never drops it."""
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        value = {"busy": str(held.getsockname()[1]), "http": "http", "free": str(free_port())}[port]
        monkeypatch.setenv("MASTER_PORT", value)
        rc, _, err = _cli(capsys, tmp_path, "--local", "--gpus-per-node", "0", *opts)
    assert rc == 2
    assert f"MASTER_PORT={value!r}" in err if port == "http" else f"MASTER_PORT={value} (exported here)" in err
    assert message in err
    assert "unset MASTER_PORT" in err
    assert not (tmp_path / "out").exists()


def test_missing_separator_and_stray_argument(capsys, tmp_path):
    assert submit_cli.main(["--dry-run"]) == 2
    assert "after --" in capsys.readouterr().err
    rc, _, err = _cli(capsys, tmp_path, "--dry-run", pretrain=(DS, "--bogus"))
    assert rc == 2
    assert "--bogus" in err


def test_cpu_nodes_and_tasks_per_node(capsys, tmp_path):
    """--gpus-per-node 0: CPU nodes, one task each, no gres line; tasks apart from GPUs."""
    rc, out, _ = _cli(capsys, tmp_path, "--dry-run", "--nodes", "2", "--gpus-per-node", "0")
    assert rc == 0
    assert "#SBATCH --ntasks-per-node=1" in out
    assert "gpus" not in out
    assert "gres" not in out
    rc, out, _ = _cli(capsys, tmp_path, "--dry-run", "--gpus-per-node", "8", "--tasks-per-node", "2")
    assert rc == 0
    assert "#SBATCH --ntasks-per-node=2" in out
    assert "#SBATCH --gpus-per-node=8" in out
    rc, _, err = _cli(capsys, tmp_path, "--dry-run", "--gpus-per-node", "0", "--tasks-per-node", "2")
    assert rc == 0
    rc, _, err = _cli(capsys, tmp_path, "--gpus-per-node", "8", "--tasks-per-node", "3")
    assert rc == 2
    assert "not a multiple of --tasks-per-node 3" in err


@pytest.mark.parametrize(
    "output_dir,bad", [("runs/a\nsrun rm -rf ~", "\n"), ("runs/a\rb", "\r"), ("runs/100%j", "%"), ("runs/my run", " ")]
)
def test_paths_in_the_script_are_validated(capsys, tmp_path, output_dir, bad):
    """A newline in --output-dir would end the #SBATCH header and run a line of shell."""
    rc = submit_cli.main(
        [
            "--dry-run",
            "--output-dir",
            str(tmp_path / output_dir),
            "--",
            "--deepspeed_config",
            DS,
            "data.train_shards=/data/x",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "--output-dir" in err
    assert repr(bad) in err
    assert len(err.strip().splitlines()) == 1


def test_visible_gpus_are_shared_among_the_node_tasks():
    assert job_task._visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 1, 2) == "2,3"
    assert job_task._visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 3, 4) == "3"
    assert job_task._visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, 0, 1) == "0,1,2,3"
    assert job_task._visible_gpus({"CUDA_VISIBLE_DEVICES": "0"}, 0, 1) is None


def test_slurm_refusal_is_one_line_with_a_hint():
    message = "sbatch: error: Invalid generic resource (gres) specification\n"
    err = submission.slurm_error("sbatch", message)
    assert str(err) == (
        "sbatch refused the job: sbatch: error: Invalid generic resource (gres) "
        "specification -> this cluster has no such GPUs: use --gpus-per-node 0 "
        "for CPU nodes, or a partition with GPUs"
    )


def test_code_snapshot_is_isolated(tmp_path):
    outside = tmp_path / "my.yaml"
    outside.write_text("train:\n  micro_batch: 4\n")
    copies = snapshot.snapshot_code(tmp_path / "code", [DS, str(outside)])
    code = tmp_path / "code"
    assert (code / "pixelbert_dist" / "jobs" / "task.py").is_file()
    assert (code / "launch" / "submit.py").is_file()
    assert copies[DS] == str(code / DS)
    outside.write_text("train:\n  micro_batch: 64\n")  # a later edit does not reach the job
    assert "micro_batch: 4" in Path(copies[str(outside)]).read_text()
    assert not list(code.rglob("__pycache__"))
    assert json.loads((code / "SNAPSHOT.json").read_text())["commit"]
    with pytest.raises(SubmitError, match="already exists"):
        snapshot.snapshot_code(code, [DS])


def test_task_environment(monkeypatch, tmp_path):
    for key, value in dict(
        SUBMITIT_EXECUTOR="local",
        SUBMITIT_LOCAL_JOB_ID="4242",
        SUBMITIT_LOCAL_NTASKS="2",
        SUBMITIT_LOCAL_JOB_NUM_NODES="1",
        SUBMITIT_LOCAL_NODEID="0",
        SUBMITIT_LOCAL_GLOBALID="1",
        SUBMITIT_LOCAL_LOCALID="1",
        CUDA_VISIBLE_DEVICES="4,5",
        NCCL_DEBUG="INFO",
        PYTHONPATH="/elsewhere",
    ).items():
        monkeypatch.setenv(key, value)
    for key in ("MASTER_PORT", "OMP_NUM_THREADS", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "RANK"):
        monkeypatch.delenv(key, raising=False)
    env = job_task._task_environment(6, str(tmp_path))
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("1", "1", "2")
    assert env["CUDA_VISIBLE_DEVICES"] == "5"  # this task's GPU only
    assert env["NCCL_DEBUG"] == "INFO"  # the user's choice stays
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert env["OMP_NUM_THREADS"] == "6"
    assert env["PYTHONPATH"] == f"{tmp_path}{os.pathsep}/elsewhere"
    assert env["MASTER_PORT"] == str(20000 + 4242)  # from the job id: the same on every task, below 32768
    assert job_task._task_environment(6, str(tmp_path))["MASTER_PORT"] == env["MASTER_PORT"]


# ---- a real local job -----------------------------------------------------------------


def _task_processes(root: psutil.Process) -> list[psutil.Process]:
    return [p for p in root.children(recursive=True) if "submitit.core._submit" in " ".join(p.cmdline())]


def _train_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["step"] for r in rows if r["split"] == "train"]


@pytest.mark.launcher
def test_local_job_checkpoints_on_timeout_and_resumes(tmp_path, cli_shards):
    """2 tasks over gloo; USR2 (what submitit's controller sends before the time limit)
    reaches the tasks mid-run: rank 0's checkpoint() stops the trainer, which saves;
    the job requeues and the second attempt continues from the saved step."""
    out, total = tmp_path / "out", 10
    env = {k: v for k, v in os.environ.items() if k not in job_task.RANK_VARS}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    cmd = [
        sys.executable,
        str(REPO / "launch" / "submit.py"),
        "--local",
        "--gpus-per-node",
        "2",
        "--cpus-per-task",
        "1",
        "--time",
        "20",
        "--output-dir",
        str(out),
        "--",
        "--deepspeed_config",
        DS,
        "--config",
        "launch/configs/demo_cpu.yaml",
        f"data.train_shards={cli_shards}/train",
        f"data.val_shards={cli_shards}/val",
        f"train.max_steps={total}",
        "train.save_every=1000",
        "train.micro_batch=4",
        "train.log_every=1",
        "train.retrieval_size=0",
        "train.eval_batches=1",
        "train.export=false",
        "schedule.warmup_steps=1",
        "data.backend=pil",
        "data.num_workers=0",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 240
        while len(_train_steps(metrics)) < 3:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "the local job made no progress"
            time.sleep(0.2)
        tasks = _task_processes(psutil.Process(proc.pid))
        assert len(tasks) == 2
        for task in tasks:
            task.send_signal(signal.SIGUSR2)
        log, _ = proc.communicate(timeout=240)
    finally:  # on a failure, leave no controller or task behind
        for child in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            child.kill()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    (job_dir,) = [p for p in (out / "submitit").iterdir() if p.name.isdigit()]
    rank0 = (job_dir / f"{job_dir.name}_0_log.out").read_text()
    rank0_err = (job_dir / f"{job_dir.name}_0_log.err").read_text()
    assert "[submit] attempt 0 rank 0/2" in rank0
    assert "[submit] attempt 1 rank 0/2" in rank0
    assert "asking the trainer" in rank0
    # the first attempt stopped at step s and saved it; the second went on from s + 1:
    # every step logged once, none repeated, none skipped
    assert _train_steps(metrics) == list(range(1, total + 1))
    tags = sorted(p.name for p in (out / "run" / "checkpoints").glob("step_*"))
    assert tags[-1] == f"step_{total:08d}", tags
    assert len(tags) == 2, tags  # the stop's save + the end
    stopped_at = int(tags[0].split("_")[1])
    assert 3 <= stopped_at < total
    assert f"at step {stopped_at}" in rank0_err  # the trainer's "resumed from ... at step s"


@pytest.mark.slow
def test_local_job_failure_prints_the_tasks_error(tmp_path, capsys, monkeypatch):
    """A trainer that dies in a --local job: the console shows the task's last error lines,
    not only "see the log"."""
    for key in job_task.RANK_VARS:
        monkeypatch.delenv(key, raising=False)
    port = free_port()
    monkeypatch.setenv("MASTER_PORT", str(port))  # exported here: the local job uses it
    monkeypatch.chdir(REPO)
    missing = tmp_path / "no_shards_here"
    rc = submit_cli.main(
        [
            "--local",
            "--gpus-per-node",
            "0",
            "--cpus-per-task",
            "1",
            "--time",
            "10",
            "--output-dir",
            str(tmp_path / "out"),
            "--",
            "--deepspeed_config",
            DS,
            "--config",
            "launch/configs/demo_cpu.yaml",
            f"data.train_shards={missing}",
            f"data.val_shards={missing}",
            "train.max_steps=2",
            "data.backend=pil",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    assert f"local job: rendezvous on port {port} (MASTER_PORT exported here)" in out
    # rank 0's log lines, streamed as the task wrote them: its [submit] line names the port
    assert re.search(rf"\[rank 0\] \[submit\] attempt 0 rank 0/1 master \S+:{port} ", out), out
    assert "[rank 0] " in err  # and its stderr (the trainer's log)
    assert "failed" in err
    assert "--- task 0, last lines of" in err
    tail = err.split("--- task 0, last lines of", 1)[1]
    assert str(missing) in tail  # the trainer's own error, naming what is wrong
    assert "submitit ERROR" not in tail


def test_the_trainer_process_closes_its_process_group_after_a_finished_run(tmp_path):
    """A job's trainer process tears the process group down when its run returns, not
    the interpreter's exit-time destructors (where gloo's threads sometimes aborted a
    finished rank: the job then failed after its last step)."""
    (tmp_path / "one_rank_run.py").write_text(
        "import torch.distributed as dist\n"
        "from pixelbert_dist.distributed.env import DistEnv, free_port, rendezvous\n"
        "def main(argv):\n"
        "    env = DistEnv(master_port=free_port())\n"
        "    dist.init_process_group('gloo', store=rendezvous(env, 60), rank=0, world_size=1)\n"
        "    return int(argv[0])\n"
    )
    probe = (
        "import sys, torch.distributed as dist\n"
        "from pixelbert_dist.jobs import trainer_process\n"
        "code = trainer_process.main(['one_rank_run', '3'])\n"
        "print(code, dist.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{REPO}"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3", "False"]
