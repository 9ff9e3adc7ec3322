"""launch/submit.py against a real Slurm 22.05 cluster (tests/slurm/cluster.sh): two CPU
nodes, one gloo rank each, ZeRO-2, the demo config cut to a few dozen steps.

Jobs run side by side where they can (the cluster has 2 CPUs per node, each job asks one
per task) so the lane costs a few job lengths, not one per test."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest
from slurm_helpers import (
    cluster_reason,
    job_record,
    job_records,
    scontrol,
    task_log,
    train_rows,
    trainers_frozen,
    wait_final,
    wait_log_line,
    wait_train_steps,
)

from pixelbert_dist.jobs import cli as submit_cli

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slurm
if cluster_reason():  # one line for the whole lane, not one per test
    pytest.skip(cluster_reason(), allow_module_level=True)

DS = "deepspeed_configs/zero2.json"
STEPS = 30


def nodes(count: int) -> tuple[str, ...]:
    """CPU nodes (no gres), one core per task, room to save after the signal."""
    return tuple(
        f"--nodes {count} --gpus-per-node 0 --cpus-per-task 1 --time 10 --signal-delay-s 60 --stop-timeout-s 45".split()
    )


TWO_NODES, ONE_NODE = nodes(2), nodes(1)


def pretrain_args(shards: Path, *extra: str, steps: int = STEPS, export: bool = False) -> list[str]:
    """The demo config, cut down: a few dozen steps, no periodic eval or save."""
    return [
        "--deepspeed_config",
        DS,
        "--config",
        "launch/configs/demo_cpu.yaml",
        f"data.train_shards={shards}/train",
        f"data.val_shards={shards}/val",
        f"train.max_steps={steps}",
        "train.micro_batch=8",
        "train.log_every=1",
        "train.eval_every=100000",
        "train.save_every=100000",
        "train.retrieval_size=0",
        "train.eval_batches=1",
        f"train.export={str(export).lower()}",
        "schedule.warmup_steps=2",
        "data.backend=pil",
        "data.num_workers=0",
        *extra,
    ]


def submit(capsys, out_dir: Path, *opts: str, pretrain: list[str]) -> list[str]:
    rc = submit_cli.main([*opts, "--partition", "debug", "--output-dir", str(out_dir), "--", *pretrain])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return re.findall(r"submitted job (\S+):", captured.out)


def test_sbatch_refusal_is_one_line(slurm_env, capsys, tmp_path):
    """This cluster has no GPUs: sbatch refuses a GPU job, and the user sees one line."""
    rc = submit_cli.main(
        [
            "--nodes",
            "1",
            "--gpus-per-node",
            "1",
            "--cpus-per-task",
            "1",
            "--time",
            "5",
            "--output-dir",
            str(tmp_path / "out"),
            "--",
            "--deepspeed_config",
            DS,
            "data.train_shards=/data/x",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "sbatch refused the job" in err
    assert "Invalid generic resource" in err
    assert "--gpus-per-node 0" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def two_node_jobs(cluster, cli_shards, tmp_path_factory):
    """An uninterrupted 2-node run (with its export) and the same run that the time limit
    will interrupt, submitted together."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(cluster))
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        mp.delenv(key, raising=False)
    mp.chdir(REPO)
    root = tmp_path_factory.mktemp("two_node")
    jobs = {}
    for name, export in (("reference", True), ("timelimit", False)):
        rc = submit_cli.main(
            [
                *TWO_NODES,
                "--partition",
                "debug",
                "--output-dir",
                str(root / name),
                "--",
                *pretrain_args(cli_shards, export=export),
            ]
        )
        assert rc == 0
        (record,) = json.loads((root / name / "jobs.json").read_text())
        jobs[name] = (root / name, record["job_id"])
    yield jobs
    mp.undo()


def test_time_limit_checkpoints_requeues_and_resumes(two_node_jobs):
    """The job's time runs out mid-training: Slurm's USR2 -> the trainer saves -> submitit
    requeues -> the same job resumes from `latest` and completes, every step logged once
    and the losses after the resume equal the uninterrupted run's."""
    out, job_id = two_node_jobs["timelimit"]
    metrics = out / "run" / "metrics.jsonl"
    wait_train_steps(metrics, 2, job_id)
    # 28 steps take ~20 s on a fast 2-core machine, and slurmctld sends the time-limit
    # signal only at its next check (every 30 s): the trainers wait, frozen, for it. The
    # limit goes to 2 minutes past the elapsed ones, so the signal (due 60 s before it)
    # comes within 90 s and always at least 30 s before the limit itself.
    with trainers_frozen(job_id, count=2):
        elapsed = _seconds(job_record(job_id)["RunTime"])
        scontrol("update", f"jobid={job_id}", f"TimeLimit={elapsed // 60 + 2}")
        wait_log_line(out, job_id, "asking the trainer", timeout_s=150)
    deadline = time.monotonic() + 300
    while int(job_record(job_id)["Restarts"]) == 0:  # wait for the requeue
        assert job_record(job_id)["JobState"] not in ("COMPLETED", "FAILED"), (
            "the job ended instead of being requeued",
            task_log(out, job_id, 0, "err")[-3000:],
        )
        assert time.monotonic() < deadline, "no requeue within 300 s of the time-limit signal"
        time.sleep(1)
    scontrol("update", f"jobid={job_id}", "TimeLimit=10")  # the next attempt gets its time back
    record = wait_final(job_id)
    assert record["JobState"] == "COMPLETED", task_log(out, job_id, 0, "err")[-3000:]
    assert int(record["Restarts"]) >= 1
    rank0 = task_log(out, job_id, 0)
    assert "asking the trainer" in rank0
    assert "[submit] attempt 1 rank 0/2" in rank0
    rows = train_rows(metrics)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # none lost, none repeated
    tags = sorted(p.name for p in (out / "run" / "checkpoints").glob("step_*"))
    stopped_at = int(tags[0].split("_")[1])
    assert 2 <= stopped_at < STEPS, tags
    ref_out, ref_id = two_node_jobs["reference"]
    assert wait_final(ref_id)["JobState"] == "COMPLETED"
    reference = {r["step"]: r["loss"] for r in train_rows(ref_out / "run" / "metrics.jsonl")}
    resumed = {r["step"]: r["loss"] for r in rows if r["step"] > stopped_at}
    # same ranks, same data order, gloo on CPU: the resumed run is the same run, bit for bit
    assert resumed == {s: reference[s] for s in resumed}


def test_two_node_pretraining_completes(two_node_jobs):
    """ZeRO-2 over gloo, one rank on node1 and one on node2, to the end and its export."""
    out, job_id = two_node_jobs["reference"]
    record = wait_final(job_id)
    assert record["JobState"] == "COMPLETED", task_log(out, job_id, 0, "err")[-3000:]
    assert (record["NumNodes"], record["NodeList"], record["Restarts"]) == ("2", "node[1-2]", "0")
    # the master is node1 at its NodeAddr: node names need not resolve outside Slurm
    assert "[submit] attempt 0 rank 0/2 master 127.0.0.1:" in task_log(out, job_id, 0)
    assert "[submit] attempt 0 rank 1/2" in task_log(out, job_id, 1)
    rows = train_rows(out / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert "final val (step 30)" in task_log(out, job_id, 0, "err")  # the run's closing summary
    export = out / "run" / "export"
    assert (export / "model.safetensors").stat().st_size > 1_000_000
    assert (export / "config.json").is_file()


def test_scancel_saves_and_the_next_submission_continues(slurm_env, cli_shards, capsys, tmp_path):
    run_dir, steps = tmp_path / "run", 12
    args = pretrain_args(cli_shards, "model.preset=tiny", f"run_dir={run_dir}", steps=steps)
    (job_id,) = submit(capsys, tmp_path / "first", *TWO_NODES, pretrain=args)
    wait_train_steps(run_dir / "metrics.jsonl", 2, job_id)
    with trainers_frozen(job_id, count=2):  # 10 tiny steps must not end before the scancel
        subprocess.run(["scancel", job_id], check=True, timeout=30)  # SIGCONT + SIGTERM to every task
    record = wait_final(job_id, release_requeued=False)
    assert record["JobState"] == "CANCELLED"
    assert record["Restarts"] == "0"
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 1, saved  # the trainer saved on Slurm's SIGTERM
    stopped_at = int(saved[0].split("_")[1])
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == saved[0]
    (job_id,) = submit(capsys, tmp_path / "second", *TWO_NODES, pretrain=args + ["train.resume=auto"])
    assert wait_final(job_id)["JobState"] == "COMPLETED", task_log(tmp_path / "second", job_id, 0, "err")[-3000:]
    assert [r["step"] for r in train_rows(run_dir / "metrics.jsonl")] == list(range(1, steps + 1))
    assert f"at step {stopped_at}" in task_log(tmp_path / "second", job_id, 0, "err")


def test_sweep_is_a_job_array(slurm_env, cli_shards, capsys, tmp_path):
    jobs = submit(
        capsys,
        tmp_path / "sweep",
        *ONE_NODE,
        "--sweep",
        "optim.lr=1e-4,2e-4",
        pretrain=pretrain_args(cli_shards, "model.preset=tiny", steps=3),
    )
    assert len(jobs) == 2
    assert len({j.split("_")[0] for j in jobs}) == 1  # one array, two elements
    array_id = jobs[0].split("_")[0]
    for job in jobs:
        wait_final(job)
    records = job_records(array_id)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1"]
    assert {r["JobState"] for r in records} == {"COMPLETED"}
    lrs = []
    for value in ("1e-4", "2e-4"):
        rows = train_rows(tmp_path / "sweep" / "runs" / f"optim.lr-{value}" / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3]
        lrs.append(rows[1]["lr_transformer_decay"])  # step 2: the end of the warm-up
    assert lrs[1] == pytest.approx(2 * lrs[0])


def test_two_node_checkpoint_resumes_on_one_node(two_node_jobs, slurm_env, cli_shards, capsys, tmp_path):
    """The 2-node run's final checkpoint continues as a 1-node job (universal checkpoint,
    the data position re-planned for one rank): 4 more steps, each logged once."""
    ref_out, ref_id = two_node_jobs["reference"]
    assert wait_final(ref_id)["JobState"] == "COMPLETED"
    tag = ref_out / "run" / "checkpoints" / f"step_{STEPS:08d}"
    (job_id,) = submit(
        capsys,
        tmp_path / "one",
        *ONE_NODE,
        pretrain=pretrain_args(
            cli_shards,
            f"train.resume={tag}",
            "train.resume_universal=true",
            f"run_dir={tmp_path / 'run'}",
            steps=STEPS + 4,
        ),
    )
    record = wait_final(job_id)
    assert record["JobState"] == "COMPLETED", task_log(tmp_path / "one", job_id, 0, "err")[-2000:]
    steps = [r["step"] for r in train_rows(tmp_path / "run" / "metrics.jsonl")]
    assert steps == list(range(STEPS + 1, STEPS + 5))


def test_failed_rendezvous_fails_fast_and_is_not_requeued(slurm_env, cli_shards, capsys, tmp_path, monkeypatch):
    """A stale MASTER_PORT exported in the submitting shell names a port another process
    holds on node1 (it accepts and never answers): rank 0 stops with the framework's error,
    rank 1 with its own error within the bound or, sooner, ended by srun's
    --kill-on-bad-exit once rank 0 exited; the job fails instead of requeueing."""
    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    port = holder.getsockname()[1]
    monkeypatch.setenv("MASTER_PORT", str(port))
    try:
        (job_id,) = submit(
            capsys,
            tmp_path / "out",
            *TWO_NODES,
            "--rendezvous-timeout-s",
            "15",
            pretrain=pretrain_args(cli_shards, "model.preset=tiny", steps=3),
        )
        record = wait_final(job_id, timeout_s=300, release_requeued=False)
    finally:
        holder.close()
    assert (record["JobState"], record["Restarts"]) == ("FAILED", "0")
    err = task_log(tmp_path / "out", job_id, 0, "err")
    assert "RendezvousError" in err, err[-2000:]
    assert f"MASTER_PORT={port}" in err, err[-2000:]
    assert "exported where the job was submitted" in err
    err = task_log(tmp_path / "out", job_id, 1, "err")
    own_error = "RendezvousError" in err and f"MASTER_PORT={port}" in err and "within 15 s" in err
    ended_by_srun = "killed by SIGTERM" in err and "not requeued" in err
    assert own_error or ended_by_srun, err[-2000:]
    assert "address already in use" in task_log(tmp_path / "out", job_id, 0, "err")
    assert _seconds(record["RunTime"]) < 240  # startup + the 15 s bound, on a busy 2-core VM


def _seconds(runtime: str) -> int:
    """Slurm's RunTime (``[D-]HH:MM:SS``) in seconds."""
    days, _, clock = runtime.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + s
