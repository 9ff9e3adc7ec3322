"""Checkpoints through a real DeepSpeed engine (one gloo rank): save, prune, resume exactly, signals."""
from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pixelbert_dist import checkpoint as ckpt
from pixelbert_dist.distributed.ds_config import fill_deepspeed_config
from pixelbert_dist.train.optim import OptimConfig, build_optimizer
from pixelbert_dist.train.schedule import ScheduleConfig, build_scheduler

CONFIGS = Path(__file__).resolve().parents[1] / "deepspeed_configs"
pytestmark = pytest.mark.usefixtures("dist_env")


class DropoutNet(nn.Module):
    """Dropout and a random pick in forward: a resume that forgot the RNG would show."""

    def __init__(self):
        super().__init__()
        self.visual = nn.Module()
        self.visual.backbone = nn.Conv2d(3, 6, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.proj = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, images, labels):
        pixels = self.visual.backbone(images).flatten(2)
        keep = torch.randperm(pixels.shape[-1])[:16]  # like Pixel-BERT's pixel sampling
        hidden = self.norm(self.proj(self.drop(pixels[..., keep].mean(-1))))
        noise = float(np.random.rand()) + random.random()  # python and numpy streams too
        return nn.functional.cross_entropy(self.head(hidden), labels) * (1.0 + 1e-3 * noise)


BATCHES = [(torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(i)),
            torch.tensor([i % 3, (i + 1) % 3, (i + 2) % 3, i % 3])) for i in range(6)]


def _engine(stage: int, seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = DropoutNet()
    opt = build_optimizer(model, OptimConfig())
    sched = build_scheduler(opt, ScheduleConfig(warmup_steps=2, milestones_epochs=[0.4]),
                            steps_per_epoch=10, total_steps=6)  # /10 at step 4
    ds = fill_deepspeed_config(CONFIGS / f"zero{stage}.json", micro_batch=4, grad_accum=1,
                               world_size=1, grad_clip=1.0)
    ds["bf16"]["enabled"] = False  # fp32 so a resumed run must match to rounding
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds)
    return engine, opt


def _train(engine, opt, steps) -> list[tuple[float, list[float]]]:
    out = []
    for step in steps:
        loss = engine(*BATCHES[step])
        engine.backward(loss)
        engine.step()
        out.append((loss.item(), [g["lr"] for g in opt.param_groups]))
    return out


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_continues_like_an_uninterrupted_run(run_dir, stage):
    _seed_all(7)
    engine, opt = _engine(stage, seed=0)
    reference = _train(engine, opt, range(6))

    _seed_all(7)
    engine, opt = _engine(stage, seed=0)
    first = _train(engine, opt, range(3))
    assert first == reference[:3]
    ckpt.save_checkpoint(engine, run_dir, 3, {"trainer": {"step": 3}, "config_fingerprint": "abc"},
                         keep_last=2, rank_state={"data": {"batches_seen": 3}})

    _seed_all(123)  # a new process: other RNG streams, another init
    engine, opt = _engine(stage, seed=99)
    state = ckpt.resume(engine, run_dir, "auto")
    assert state["trainer"] == {"step": 3} and state["step"] == 3 and state["world_size"] == 1
    assert state["rank_state"] == {"data": {"batches_seen": 3}}
    resumed = _train(engine, opt, range(state["step"], 6))
    for (loss, lrs), (ref_loss, ref_lrs) in zip(resumed, reference[3:]):
        assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
        assert lrs == pytest.approx(ref_lrs)
    assert resumed[1][1][0] == pytest.approx(reference[2][1][0] / 10)  # the milestone survived


def test_save_keeps_last_k_and_moves_latest(run_dir):
    engine, opt = _engine(2, seed=0)
    for step in (1, 2, 3, 4):
        _train(engine, opt, [step])
        path = ckpt.save_checkpoint(engine, run_dir, step, {"config_fingerprint": "f00"}, keep_last=2)
        assert path == run_dir / f"step_{step:08d}"
        assert (run_dir / "latest").read_text() == f"step_{step:08d}\n"
    assert ckpt.list_tags(run_dir) == ["step_00000003", "step_00000004"]
    meta = json.loads((run_dir / "step_00000004" / "meta.json").read_text())
    assert meta == {"step": 4, "world_size": 1, "zero_stage": 2, "config_fingerprint": "f00"}
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]  # the atomic write left nothing
    # pruning never deletes the tag `latest` names, even when it sorts first
    (run_dir / "latest").write_text("step_00000003\n")
    assert ckpt._prune(run_dir, 1, protect="step_00000003") == []
    assert ckpt.list_tags(run_dir) == ["step_00000003", "step_00000004"]


def test_resume_choices_and_bad_checkpoints(run_dir):
    engine, opt = _engine(1, seed=0)
    assert ckpt.resume(engine, run_dir, "none") is None
    assert ckpt.resume(engine, run_dir, "auto") is None  # nothing saved yet: a fresh run
    _train(engine, opt, [0])
    ckpt.save_checkpoint(engine, run_dir, 1, {}, keep_last=0)
    with pytest.raises(ckpt.CheckpointError, match=r"no checkpoint folder step_9.*step_00000001"):
        ckpt.resume(engine, run_dir, "step_9")
    assert ckpt.resume(engine, run_dir, str(run_dir / "step_00000001"))["step"] == 1
    (run_dir / "step_00000001" / "meta.json").unlink()  # as if a rank died mid-save
    with pytest.raises(ckpt.CheckpointError, match="meta.json is missing"):
        ckpt.resume(engine, run_dir, "step_00000001")


def test_other_world_size_is_refused(run_dir):
    engine, opt = _engine(2, seed=0)
    _train(engine, opt, [0])
    tag = ckpt.save_checkpoint(engine, run_dir, 1, {}, keep_last=3)
    meta = json.loads((tag / "meta.json").read_text())
    (tag / "meta.json").write_text(json.dumps({**meta, "world_size": 8}))
    with pytest.raises(ckpt.CheckpointError, match=r"written by 8 data-parallel ranks but this run "
                                                   r"has 1.*ds_to_universal"):
        ckpt.resume(engine, run_dir, "auto")
    ds: dict = {}
    with pytest.raises(ckpt.CheckpointError, match="written by 8"):
        ckpt.prepare_resume(ds, run_dir, "auto", world_size=1)
    assert ckpt.prepare_resume(ds, run_dir, "auto", world_size=1, universal=True) == tag
    assert ds == {"checkpoint": {"load_universal": True}}
    # DeepSpeed's converter handles Adam-only state; ours has the CNN's SGD momentum
    with pytest.raises(ckpt.CheckpointError, match="expects Adam state"):
        ckpt._to_universal(tag)
    assert not (run_dir / "step_00000001_universal").exists()


def test_graceful_exit_on_sigusr1_and_sigterm():
    before = signal.getsignal(signal.SIGUSR1)
    with ckpt.GracefulExit() as stop:
        assert not stop.should_exit()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.received == signal.SIGUSR1
        assert stop.should_exit()  # all-reduced over the (one-rank) group
    assert signal.getsignal(signal.SIGUSR1) is before
    with ckpt.GracefulExit() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM


def test_rng_state_round_trip_and_fingerprint():
    _seed_all(3)
    state = ckpt.rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    _seed_all(4)
    ckpt.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
    assert ckpt.config_fingerprint({"a": 1, "b": [2]}) == ckpt.config_fingerprint({"b": [2], "a": 1})
    assert ckpt.config_fingerprint({"a": 1}) != ckpt.config_fingerprint({"a": 2})
