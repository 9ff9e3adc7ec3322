"""The run folder and resume rules through the real Trainer (one gloo rank, DeepSpeed
ZeRO-2): a stop signal on a save step, re-running a command over a finished run, changed
learning rates on resume, the lock, short runs, bad input, and a world-size change."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from pixelbert_dist.checkpoint import checkpointer
from pixelbert_dist.checkpoint import choose
from pixelbert_dist.checkpoint.files import CheckpointError
from pixelbert_dist.checkpoint.files import read_meta
from pixelbert_dist.config import ConfigError, load_config
from pixelbert_dist.train.config import RunConfig
from tests.pretrain_helpers import REPO, fast_overrides, launch_env, poison_images, signal_at, train_losses

pytestmark = [pytest.mark.usefixtures("dist_env"), pytest.mark.slow]


def trainer(run_dir, shards, *extra, steps=4):
    from pixelbert_dist.train.trainer import Trainer

    overrides = fast_overrides(run_dir, shards, steps=steps, val=False) + [
        "train.export=false",
        "train.save_every=2",
        *extra,
    ]
    return Trainer(load_config(RunConfig, None, overrides), "deepspeed_configs/zero2.json")


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@contextmanager
def counting_saves(monkeypatch):
    steps, real = [], checkpointer.Checkpointer.save

    def save(self, step, *args, **kwargs):
        if self.saved_step != step:  # a save, not the no-op of a step saved already
            steps.append(step)
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpointer.Checkpointer, "save", save)
    yield steps


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_on_a_save_step_saves_once(shards, tmp_path, monkeypatch, caplog, sig):
    run = trainer(tmp_path / "run", shards, steps=6)
    signal_at(run, 1, sig)  # arrives during step 2, a save step
    with counting_saves(monkeypatch) as saved, caplog.at_level("INFO", logger="pixelbert_dist"):
        run.fit()
    assert saved == [2]
    assert run.state["step"] == 2
    assert f"stop requested ({signal.Signals(sig).name})" in caplog.text
    assert choose.find_checkpoint(tmp_path / "run" / "checkpoints", "auto").name == "step_00000002"


def test_saves_on_the_clock_beside_the_step_interval(shards, tmp_path, monkeypatch):
    """train.save_every_minutes: a save whenever that much time passed since the last one
    (here: every step), beside train.save_every; 0 turns the clock off."""
    timed = trainer(tmp_path / "timed", shards, "train.save_every=0", "train.save_every_minutes=1e-9", steps=3)
    with counting_saves(monkeypatch) as saved:
        timed.fit()
    assert saved == [1, 2, 3]
    assert choose.find_checkpoint(tmp_path / "timed" / "checkpoints", "auto").name == "step_00000003"
    untimed = trainer(tmp_path / "untimed", shards, "train.save_every=0", "train.save_every_minutes=0", steps=3)
    with counting_saves(monkeypatch) as saved:
        untimed.fit()
    assert saved == [3]  # the end of the run only


def test_rerunning_a_command_never_overwrites_a_finished_run(shards, tmp_path):
    run_dir = tmp_path / "run"
    trainer(run_dir, shards).fit()
    finished = rows(run_dir)
    with pytest.raises(
        CheckpointError,
        match=r"holds a finished run \(step 4, its final step\).*new "
        r"run_dir.*train.resume=latest",
    ):
        trainer(run_dir, shards)
    with pytest.raises(CheckpointError, match=r"holds a finished run"):
        trainer(run_dir, shards, steps=6)  # the README's command with other settings: refused alike
    with pytest.raises(CheckpointError, match=r"train.resume=none would start a new run.*step_00000004"):
        trainer(run_dir, shards, "train.resume=none")
    with pytest.raises(CheckpointError, match="nothing to train: .*step 4 .* 4 steps"):
        trainer(run_dir, shards, "train.resume=latest")
    assert rows(run_dir) == finished  # none of the refused runs touched the record
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 4

    # rows a crashed attempt logged after the checkpoint move aside; steps never repeat
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 5, "split": "train", "loss": 99.0}) + "\n")
    with SummaryWriter(str(run_dir / "tensorboard")) as crashed:  # ... and to TensorBoard
        crashed.add_scalar("train/loss", 99.0, 5)
    more = trainer(run_dir, shards, "train.resume=latest", steps=6)
    assert more.state["step"] == 4
    more.fit()
    steps = [r["step"] for r in rows(run_dir) if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [json.loads(line)["loss"] for line in (run_dir / "metrics.superseded.jsonl").open()] == [99.0]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in shown] == [1, 2, 3, 4, 5, 6]  # the resumed run purged the crashed step 5
    assert dict(shown)[5] != 99.0
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 6
    assert yaml.safe_load((run_dir / "config.until_step_00000004.yaml").read_text())["train"]["max_steps"] == 4


def test_changed_learning_rates_apply_from_the_resumed_step(shards, tmp_path, caplog):
    run_dir = tmp_path / "run"
    first = trainer(run_dir, shards, steps=6)
    signal_at(first, 1)
    first.fit()  # stopped at step 2 (warm-up of 2 steps done)
    with pytest.raises(
        CheckpointError,
        match=r"another config \(optim.lr: 0.0001 -> 5e-05\).*"
        r"train.resume=latest to continue that run from step 2",
    ):
        trainer(run_dir, shards, "optim.lr=5e-5", steps=6)  # train.resume=auto: the same run only
    with caplog.at_level("WARNING"):
        resumed = trainer(
            run_dir,
            shards,
            "train.resume=latest",
            "optim.lr=5e-5",
            "optim.cnn_lr=2e-3",
            "optim.weight_decay=0.05",
            steps=6,
        )
    assert "optim.lr: 0.0001 -> 5e-05" in caplog.text
    assert "applied from step 2" in caplog.text
    groups = {g["name"]: g for g in resumed.optimizer.param_groups}
    assert groups["transformer_decay"]["lr"] == pytest.approx(5e-5)
    assert groups["cnn"]["lr"] == pytest.approx(2e-3)
    assert groups["transformer_decay"]["weight_decay"] == 0.05
    resumed.fit()
    logged = {r["step"]: r for r in rows(run_dir) if r["split"] == "train"}
    assert logged[2]["lr_transformer_decay"] == pytest.approx(1e-4)
    assert [logged[s]["lr_transformer_decay"] for s in (3, 4, 5, 6)] == pytest.approx([5e-5] * 4)
    assert [logged[s]["lr_cnn"] for s in (3, 6)] == pytest.approx([2e-3] * 2)


def test_a_second_run_on_one_folder_is_refused_and_a_dead_holder_is_taken_over(shards, tmp_path, caplog):
    from pixelbert_dist.checkpoint.run_folder import RunFolderError

    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; "
            "from pixelbert_dist.checkpoint.run_folder import RunLock; lock = RunLock(Path(sys.argv[1])).acquire(); "
            "print('locked', flush=True); time.sleep(600)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=launch_env(),
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError, match=rf"in use by another run \(host \S+, pid {holder.pid}, since"):
            trainer(run_dir, shards)
        assert not (run_dir / "checkpoints").exists()
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock file stays behind
        holder.wait()
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="pixelbert_dist.checkpoint.run_folder"):
        run = trainer(run_dir, shards)
    assert f"took over the stale lock {run_dir / 'run.lock'}" in caplog.text
    assert f"pid {holder.pid}" in caplog.text
    run.fit()
    assert not (run_dir / "run.lock").exists()  # released at the end


def test_a_finite_blow_up_is_flagged_and_the_message_says_no_checkpoint_exists(shards, tmp_path):
    from pixelbert_dist.train.window import NonFiniteLossError

    run = trainer(tmp_path / "run", shards, "train.max_loss=1.0", "train.max_nonfinite_in_row=2")  # losses ~8
    with pytest.raises(NonFiniteLossError, match=r"above train.max_loss=1.*no checkpoint was written yet"):
        run.fit()
    assert not (tmp_path / "run" / "checkpoints").exists()
    run = trainer(tmp_path / "other", shards, "train.max_nonfinite_in_row=2", steps=6)
    poison_images(run, lambda i: i >= 2)
    with pytest.raises(NonFiniteLossError, match=r"the last checkpoint \(.*step_00000002\) is untouched"):
        run.fit()


def test_warmup_longer_than_the_run_is_clamped_with_one_warning(shards, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        run = trainer(tmp_path / "run", shards, "schedule.warmup_steps=20", "schedule.kind=cosine", steps=4)
    assert caplog.text.count("warm-up clamped to 4 steps") == 1
    run.fit()
    lrs = [r["lr_transformer_decay"] for r in rows(tmp_path / "run") if r["split"] == "train"]
    # the rate logged after step k is the next step's: (k + 1) / 4 of the peak, the peak from step 3 on
    assert lrs == pytest.approx([5e-5, 7.5e-5, 1e-4, 1e-4])


def test_bad_input_names_the_key_or_the_folder(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"'train.micro_batch': expected int, got 4.5"):
        load_config(RunConfig, None, ["train.micro_batch=4.5"])
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    subprocess.run(["chattr", "+i", str(checkpoints)], check=True)  # read-only, even for root
    try:
        with pytest.raises(
            ValueError,
            match=r"checkpoints is not writable: Operation not permitted\): "
            r"checkpoints go there",
        ):
            trainer(tmp_path / "run", shards)
    finally:
        subprocess.run(["chattr", "-i", str(checkpoints)], check=True)


def test_export_of_a_pruned_tag_lists_the_tags_there(shards, tmp_path):
    run_dir = tmp_path / "run"
    trainer(run_dir, shards, "train.keep_last=1").fit()
    proc = subprocess.run(
        [sys.executable, "launch/export.py", str(run_dir), "--tag", "step_00000002"],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert f"no checkpoint step_00000002 in {run_dir / 'checkpoints'}" in proc.stderr
    assert "checkpoints there: step_00000004" in proc.stderr
    assert "resume" not in proc.stderr


def test_the_data_plan_of_two_ranks_continues_on_one(shards):
    """After b batches of B on each of W ranks, one rank with batch W*B continues with exactly
    the samples the W ranks had not read yet (the re-plan of a universal resume)."""
    from pixelbert_dist.data.readers.plan import epoch_plan
    from pixelbert_dist.train.resume import replan_data_state

    def plan(rank, world, batch):
        return epoch_plan(40, epoch=1, seed=3, rank=rank, world_size=world, batch_size=batch)

    done = 3
    seen = {s.index for r in (0, 1) for b in plan(r, 2, 4)[:done] for s in b}
    state = replan_data_state(
        {"epoch": 1, "batches_done": done, "batch_size": 4, "world_size": 2},
        {"epoch": 0, "batches_done": 0, "batch_size": 8, "world_size": 1},
    )
    assert state == {"epoch": 1, "batches_done": 3, "batch_size": 8, "world_size": 1}
    rest = [s.index for b in plan(0, 1, 8)[state["batches_done"] :] for s in b]
    assert not seen & set(rest)
    assert seen | set(rest) == set(range(40))
    assert len(rest) == 40 - len(seen)
    assert replan_data_state(state, dict(state)) is state  # same shape: untouched


@pytest.mark.launcher
def test_universal_resume_from_two_ranks_to_one_through_the_launcher(shards, tmp_path):
    from tests.pretrain_helpers import deepspeed_cmd, run_launcher

    run_dir = tmp_path / "run"
    args = [
        "--deepspeed_config",
        "deepspeed_configs/zero2.json",
        *fast_overrides(run_dir, shards, steps=4, val=False),
        "train.export=false",
    ]
    run_launcher("launch/pretrain.py", args)  # 2 ranks x batch 4: 32 samples in 4 steps
    proc = subprocess.run(
        deepspeed_cmd(
            "launch/pretrain.py",
            [*args, "train.max_steps=8", "train.resume=latest", "train.resume_universal=true"],
            num_ranks=1,
        ),
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (
        "data position re-planned from 2 rank(s) x batch 4 to 1 rank(s) x batch 4: epoch 0 continues over "
        "the " in proc.stdout + proc.stderr
    )
    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 9))
    assert all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    assert read_meta(run_dir / "checkpoints" / "step_00000008")["world_size"] == 1


def test_global_batch_sets_the_accumulation_for_the_world_size(run_dir, shards):
    run = trainer(run_dir, shards, "train.global_batch=8", "train.micro_batch=2", steps=2)
    assert run.cfg.train.grad_accum == 4  # 8 pairs = 2 x 4 x 1 rank
    assert run.engine.gradient_accumulation_steps() == 4
    run.fit()
    assert run.state["step"] == 2
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["global_batch"] == 8
