"""Checkpoints through a real DeepSpeed engine (one gloo rank): save, prune, resume exactly, signals."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from pixelbert_dist.checkpoint.shared_load import _listed_pattern, bytes_per_rank, owner, plan_reads
from pixelbert_dist.checkpoint import checkpointer
from pixelbert_dist.checkpoint import choose
from pixelbert_dist.checkpoint import engine_io
from pixelbert_dist.checkpoint import layout
from pixelbert_dist.checkpoint.files import CheckpointError
from pixelbert_dist.checkpoint.files import read_meta
from pixelbert_dist.checkpoint.universal import to_universal
from pixelbert_dist.collectives import gather_objects
from pixelbert_dist.train.signals import GracefulExit
from pixelbert_dist.train.window import AccumulationWindow
from pixelbert_dist.distributed.ds_config import fill_deepspeed_config
from pixelbert_dist.train.optim import build_optimizer
from pixelbert_dist.train.config import OptimConfig
from pixelbert_dist.train.schedule import build_scheduler
from pixelbert_dist.train.config import ScheduleConfig

CONFIGS = Path(__file__).resolve().parents[1] / "deepspeed_configs"
GLOO_ABORT = "terminate called without an active exception"
pytestmark = pytest.mark.usefixtures("dist_env")


class DropoutNet(nn.Module):
    """Dropout and a random pick in forward: a resume that forgot the RNG would show."""

    def __init__(self, random_ops: bool = True):
        super().__init__()
        self.random_ops = random_ops
        self.visual = nn.Module()
        self.visual.backbone = nn.Conv2d(3, 6, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.proj = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 3)

    def forward(self, images, labels):
        pixels = self.visual.backbone(images).flatten(2)
        if not self.random_ops:  # deterministic: comparable across world sizes
            return nn.functional.cross_entropy(self.head(self.norm(self.proj(pixels.mean(-1)))), labels)
        keep = torch.randperm(pixels.shape[-1])[:16]  # like Pixel-BERT's pixel sampling
        hidden = self.norm(self.proj(self.drop(pixels[..., keep].mean(-1))))
        noise = float(np.random.rand()) + random.random()  # python and numpy streams too
        return nn.functional.cross_entropy(self.head(hidden), labels) * (1.0 + 1e-3 * noise)


BATCHES = [
    (
        torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(i)),
        torch.tensor([i % 3, (i + 1) % 3, (i + 2) % 3, i % 3]),
    )
    for i in range(6)
]


def _engine(
    stage: int,
    seed: int,
    grad_accum: int = 1,
    world_size: int = 1,
    universal_from=None,
    micro_batch: int = 4,
    random_ops: bool | None = None,
):
    import deepspeed

    torch.manual_seed(seed)
    model = DropoutNet(random_ops=universal_from is None and world_size == 1 if random_ops is None else random_ops)
    opt = build_optimizer(model, OptimConfig())
    sched = build_scheduler(
        opt, ScheduleConfig(warmup_steps=2, milestones_epochs=[0.4]), steps_per_epoch=10, total_steps=6
    )  # /10 at step 4
    ds = fill_deepspeed_config(
        CONFIGS / f"zero{stage}.json",
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        world_size=world_size,
        grad_clip=1.0,
    )
    ds["bf16"]["enabled"] = False  # fp32 so a resumed run must match to rounding
    if universal_from is not None:
        choose.prepare_resume(ds, universal_from, "auto", world_size, universal=True)
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


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_resume_continues_like_an_uninterrupted_run(run_dir, stage):
    _seed_all(7)
    engine, opt = _engine(stage, seed=0)
    reference = _train(engine, opt, range(6))

    _seed_all(7)
    engine, opt = _engine(stage, seed=0)
    first = _train(engine, opt, range(3))
    assert first == reference[:3]
    checkpointer.save_checkpoint(
        engine,
        run_dir,
        3,
        {"trainer": {"step": 3}, "config_fingerprint": "abc"},
        keep_last=2,
        rank_state={"data": {"batches_seen": 3}},
    )

    _seed_all(123)  # a new process: other RNG streams, another init
    engine, opt = _engine(stage, seed=99)
    state = checkpointer.resume(engine, run_dir, "auto")
    assert state["trainer"] == {"step": 3}
    assert state["step"] == 3
    assert state["world_size"] == 1
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
        path = checkpointer.save_checkpoint(engine, run_dir, step, {"config_fingerprint": "f00"}, keep_last=2)
        assert path == run_dir / f"step_{step:08d}"
        assert (run_dir / "latest").read_text() == f"step_{step:08d}\n"
    assert layout.list_tags(run_dir) == ["step_00000003", "step_00000004"]
    meta = json.loads((run_dir / "step_00000004" / "meta.json").read_text())
    written = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in (run_dir / "step_00000004").iterdir()
        if p.name != "meta.json"
    }
    assert meta == {"step": 4, "world_size": 1, "zero_stage": 2, "config_fingerprint": "f00", "files": written}
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]  # the atomic write left nothing
    # pruning never deletes the tag `latest` names, even when it sorts first
    (run_dir / "latest").write_text("step_00000003\n")
    assert layout.prune(run_dir, 1, protect="step_00000003") == []
    assert layout.list_tags(run_dir) == ["step_00000003", "step_00000004"]


def test_resume_choices_and_bad_checkpoints(run_dir):
    engine, opt = _engine(1, seed=0)
    assert checkpointer.resume(engine, run_dir, "none") is None
    assert checkpointer.resume(engine, run_dir, "auto") is None  # nothing saved yet: a fresh run
    _train(engine, opt, [0])
    checkpointer.save_checkpoint(engine, run_dir, 1, {}, keep_last=0)
    with pytest.raises(CheckpointError, match=r"no checkpoint folder step_9.*step_00000001"):
        checkpointer.resume(engine, run_dir, "step_9")
    assert checkpointer.resume(engine, run_dir, str(run_dir / "step_00000001"))["step"] == 1
    (run_dir / "step_00000001" / "meta.json").unlink()  # as if a rank died mid-save
    with pytest.raises(CheckpointError, match="meta.json is missing"):
        checkpointer.resume(engine, run_dir, "step_00000001")


def test_other_world_size_is_refused(run_dir):
    engine, opt = _engine(2, seed=0)
    _train(engine, opt, [0])
    tag = checkpointer.save_checkpoint(engine, run_dir, 1, {}, keep_last=3)
    meta = json.loads((tag / "meta.json").read_text())
    (tag / "meta.json").write_text(json.dumps({**meta, "world_size": 8}))
    with pytest.raises(
        CheckpointError,
        match=r"written by 8 data-parallel ranks but this run "
        r"has 1.*ds_to_universal",
    ):
        checkpointer.resume(engine, run_dir, "auto")
    ds: dict = {}
    with pytest.raises(CheckpointError, match="written by 8"):
        choose.prepare_resume(ds, run_dir, "auto", world_size=1)
    assert choose.prepare_resume(ds, run_dir, "auto", world_size=1, universal=True) == tag
    assert ds == {"checkpoint": {"load_universal": True}}
    # a universal resume of ZeRO-3 shards is refused up front, on every rank
    (tag / "meta.json").write_text(json.dumps({**meta, "world_size": 8, "zero_stage": 3}))
    with pytest.raises(CheckpointError, match="ZeRO stage 3.*supported from ZeRO 1 and 2"):
        to_universal(tag)
    assert not (run_dir / "step_00000001_universal").exists()
    # ZeRO-0 shards nothing: no conversion, it loads as is
    (tag / "meta.json").write_text(json.dumps({**meta, "world_size": 8, "zero_stage": 0}))
    ds = {}
    assert choose.prepare_resume(ds, run_dir, "auto", world_size=1, universal=True) == tag
    assert ds == {}


def test_graceful_exit_on_sigint_like_sigterm_and_says_so(caplog):
    with GracefulExit() as stop, caplog.at_level("INFO", logger="pixelbert_dist"):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: a save, not a KeyboardInterrupt
        assert stop.received == signal.SIGINT
        assert stop.should_exit()
        assert stop.should_exit()
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C aborts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert caplog.text.count("stop requested (SIGINT): saving a checkpoint") == 1


def test_graceful_exit_on_sigusr1_and_sigterm():
    before = signal.getsignal(signal.SIGUSR1)
    with GracefulExit() as stop:
        assert not stop.should_exit()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested
        assert stop.received == signal.SIGUSR1
        assert stop.should_exit()  # all-reduced over the (one-rank) group
    assert signal.getsignal(signal.SIGUSR1) is before
    with GracefulExit() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.received == signal.SIGTERM


def test_rng_state_round_trip_and_fingerprint():
    _seed_all(3)
    state = engine_io.rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(1).item())
    _seed_all(4)
    engine_io.set_rng_state(state)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected
    assert engine_io.config_fingerprint({"a": 1, "b": [2]}) == engine_io.config_fingerprint({"b": [2], "a": 1})
    assert engine_io.config_fingerprint({"a": 1}) != engine_io.config_fingerprint({"a": 2})


# ---- world-size change through DeepSpeed's universal checkpoint -------------------
# Two gloo ranks (a torchrun subprocess running this file) train 6 steps of global
# batch 4 and save after step 3; one rank with 2 accumulation micro-steps resumes it.
# Same global batches, so the losses and lrs after the resume must match the 2-rank run.
# The same subprocess checks that GracefulExit's flag is agreed over real ranks.


def _global_step(engine, opt, step: int, micro_rows: list[int]) -> tuple[float, list[float]]:
    images, labels = BATCHES[step]
    losses = []
    for r in micro_rows:  # each micro-batch is 2 of the batch's 4 rows
        loss = engine(images[2 * r : 2 * r + 2], labels[2 * r : 2 * r + 2])
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    loss = torch.stack(losses).mean()
    if torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(loss)
        loss /= torch.distributed.get_world_size()
    return loss.item(), [g["lr"] for g in opt.param_groups]


def _two_rank_save(save_dir: str, stage: int) -> None:
    from pixelbert_dist.distributed.env import init_distributed

    env = init_distributed()
    engine, opt = _engine(stage, seed=0, world_size=2, micro_batch=2)
    out = [_global_step(engine, opt, step, [env.rank]) for step in range(3)]
    checkpointer.save_checkpoint(engine, save_dir, 3, {"trainer": {"step": 3}}, keep_last=2)
    out += [_global_step(engine, opt, step, [env.rank]) for step in range(3, 6)]
    with GracefulExit() as stop:  # only rank 1 is signalled; both must agree to stop
        calm = stop.should_exit()
        if env.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        agreed = stop.should_exit()
    window = AccumulationWindow([], torch.device("cpu"), 1e4)
    window.open()  # one rank's save-due flag (the loop passes rank 0's clock) reaches every rank
    save_due = [window.agree(2, False, save_due=env.rank == r)[2] for r in (0, 1)]
    # a resume on the same 2 ranks: the shared model file is read by rank 0 alone and broadcast
    engine, opt = _engine(stage, seed=99, world_size=2, micro_batch=2)
    state, read = checkpointer.resume_engine(engine, Path(save_dir) / "step_00000003")
    resumed = [_global_step(engine, opt, step, [env.rank]) for step in range(3, 6)]
    reads = gather_objects(read)
    if env.rank == 0:
        result = {"steps": out, "exit_before": calm, "exit_after": agreed, "rank0_signalled": stop.requested}
        result.update(save_due=save_due, resumed=resumed, resumed_step=state["step"], bytes_read=reads)
        (Path(save_dir) / "reference.json").write_text(json.dumps(result))


@pytest.mark.launcher
def test_universal_resume_on_another_world_size(run_dir, caplog):
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # faulthandler: a native abort prints every thread's Python stack
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    for attempt in (1, 2):
        proc = subprocess.run([*cmd, __file__, str(run_dir), "2"], capture_output=True, text=True, timeout=300, env=env)
        if proc.returncode == 0 or GLOO_ABORT not in proc.stderr or attempt == 2:
            break
        # In 2 CI runs of 3 (never in 35 runs here) rank 0 aborted at exit, after its work
        # (faulthandler: the main thread, no Python frame left): gloo's threads in exit-time
        # destructors. The child now closes its group first, as a finished run does; should
        # an abort come back all the same, run again once and say so in a warning.
        warnings.warn(f"two ranks aborted ({GLOO_ABORT!r}); run again once:\n{proc.stderr[-4000:]}", stacklevel=1)
        shutil.rmtree(run_dir)
        run_dir.mkdir()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((run_dir / "reference.json").read_text())
    reference = result["steps"]
    # the signal reached rank 1 only, yet the all-reduced flag stopped rank 0 too
    assert (result["exit_before"], result["exit_after"], result["rank0_signalled"]) == (False, True, False)
    assert result["save_due"] == [True, True]  # set on rank 0, then on rank 1: both ranks saw it
    meta = read_meta(run_dir / "step_00000003")
    assert meta["world_size"] == 2
    # resumed on 2 ranks: the same losses; each rank read its own files and its part of the
    # shared ones (verification included), every byte of the checkpoint read once in all
    assert result["resumed_step"] == 3
    assert [loss for loss, _ in result["resumed"]] == pytest.approx([loss for loss, _ in reference[3:]], rel=1e-6)
    sizes = {name: entry["size"] for name, entry in meta["files"].items()}
    own = [sum(size for name, size in sizes.items() if owner(name, 2) == r) for r in (0, 1)]
    assert sum(result["bytes_read"]) == sum(sizes.values())
    assert result["bytes_read"] == bytes_per_rank(plan_reads(sizes, 2))
    assert all(read > mine for read, mine in zip(result["bytes_read"], own))  # both read part of the model file
    assert max(result["bytes_read"]) <= 1.1 * sum(sizes.values()) / 2

    engine, opt = _engine(2, seed=5, grad_accum=2, micro_batch=2, universal_from=run_dir)
    assert engine.load_universal_checkpoint()
    with pytest.warns(UserWarning, match="from 2 ranks on 1"), caplog.at_level("INFO", logger="pixelbert_dist"):
        state = checkpointer.resume(engine, run_dir, "auto", universal=True)
    assert re.search(r"universal conversion of step_00000003: \d+\.\d s", caplog.text)
    assert state["trainer"] == {"step": 3}
    assert state["rank_state"] is None
    assert (run_dir / "step_00000003_universal" / "meta.json").is_file()
    for step, (loss, lrs) in zip(range(3, 6), reference[3:]):
        got_loss, got_lrs = _global_step(engine, opt, step, [0, 1])
        assert got_loss == pytest.approx(loss, rel=1e-5), f"step {step}"
        assert got_lrs == pytest.approx(lrs)


# ---- saves that cannot be half-read, resumes that check what they read --------------


def _save_steps(run_dir, steps, stage=2):
    engine, opt = _engine(stage, seed=0)
    for step in steps:
        _train(engine, opt, [step % 6])
        checkpointer.save_checkpoint(engine, run_dir, step, {"trainer": {"step": step}}, keep_last=0)
    return engine


def _killed_save(save_dir: str) -> None:
    """Save step 1, then save step 1 again (as a stop signal on a save step once did) and
    die by SIGKILL halfway through writing the first file of the second save."""
    from pixelbert_dist.distributed.env import init_distributed

    init_distributed()
    engine = _save_steps(Path(save_dir), [1])
    real_save = torch.save

    def dying_save(obj, fh, *args, **kwargs):  # the checkpoint writer saves into an open file
        real_save(obj, fh, *args, **kwargs)
        fh.flush()
        os.ftruncate(fh.fileno(), os.fstat(fh.fileno()).st_size // 2)
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = dying_save
    checkpointer.save_checkpoint(engine, save_dir, 1, {"trainer": {"step": 1}}, keep_last=0)


def test_a_full_disk_is_one_line_naming_the_device_and_the_folder():
    from pixelbert_dist.checkpoint.staging import device_of, write_file

    with pytest.raises(CheckpointError) as err:  # /dev/full: every write fails with ENOSPC, as a full disk does
        write_file(Path("/dev/full"), {"weights": torch.zeros(100_000)})
    assert str(err.value).startswith(f"no space left on {device_of(Path('/dev'))} at /dev: ")
    assert "\n" not in str(err.value) and "previous checkpoint is intact" in str(err.value)
    assert device_of(Path("/dev")) != "?"


@pytest.mark.slow
def test_a_kill_during_a_save_leaves_latest_on_an_intact_checkpoint(run_dir):
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "1",
        __file__,
        str(run_dir),
        "kill",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert (run_dir / ".step_00000001.tmp").is_dir(), proc.stderr[-3000:]
    assert (run_dir / "latest").read_text() == "step_00000001\n"
    assert choose.find_checkpoint(run_dir, "auto") == run_dir / "step_00000001"  # verified: sizes and sha256
    engine, _ = _engine(2, seed=1)
    assert checkpointer.resume(engine, run_dir, "auto")["trainer"] == {"step": 1}
    checkpointer.save_checkpoint(engine, run_dir, 2, {}, keep_last=0)
    assert not list(run_dir.glob(".*tmp"))  # the next good save clears the leftover


def _model_file(tag_dir: Path) -> Path:
    return next(p for p in tag_dir.iterdir() if p.name.endswith("model_states.pt"))


def test_an_older_meta_json_without_a_file_table_is_verified_by_reading(run_dir, caplog):
    _save_steps(run_dir, [1, 2])
    for tag in ("step_00000001", "step_00000002"):  # the format before the file table
        meta = read_meta(run_dir / tag)
        del meta["files"]
        (run_dir / tag / "meta.json").write_text(json.dumps(meta))
    assert choose.find_checkpoint(run_dir, "auto") == run_dir / "step_00000002"
    broken = _model_file(run_dir / "step_00000002")
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # truncated
    with caplog.at_level("WARNING", logger="pixelbert_dist"):
        assert choose.find_checkpoint(run_dir, "auto") == run_dir / "step_00000001"
    assert f"step_00000002 skipped: {broken} cannot be read" in caplog.text
    with pytest.raises(CheckpointError, match=rf"step_00000002 is damaged: {broken} cannot be read"):
        choose.find_checkpoint(run_dir, "step_00000002")
    flipped = next((run_dir / "step_00000001").glob("*optim_states.pt"))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, same size
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{flipped}: its member .* fails its CRC check"):
        choose.find_checkpoint(run_dir, "step_00000001")


def test_a_resume_reads_each_byte_once_and_checks_it(run_dir):
    _save_steps(run_dir, [1])
    sizes = {name: entry["size"] for name, entry in read_meta(run_dir / "step_00000001")["files"].items()}
    engine, _ = _engine(2, seed=1)
    # the verification that picks the tag keeps what it read; the load reads nothing more
    tag_dir = choose.find_checkpoint(run_dir, "auto", keep_reads=True)
    assert checkpointer.resume_engine(engine, tag_dir)[1] == sum(sizes.values())
    # a load without a verification before it checks what it reads all the same
    flipped = next((run_dir / "step_00000001").glob("*optim_states.pt"))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"step_00000001 is damaged: {flipped}: sha256 differs"):
        checkpointer.resume_engine(engine, tag_dir)


def test_a_resume_names_the_zero_files_from_the_table_without_a_stat(run_dir, monkeypatch):
    """DeepSpeed stats every rank's optimizer file on every rank (W^2 at a resume); the
    tag's file table names them instead, the older pattern included."""
    _save_steps(run_dir, [1])
    engine, _ = _engine(2, seed=1)
    tag_dir = choose.find_checkpoint(run_dir, "auto", keep_reads=True)
    real_stat, probed = os.stat, []

    def recording_stat(path, *args, **kwargs):
        probed.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", recording_stat)
    assert checkpointer.resume_engine(engine, tag_dir)[0]["trainer"] == {"step": 1}
    monkeypatch.undo()
    assert probed and not [p for p in probed if "optim_states" in p]  # other files are still stat'd
    assert "_get_all_zero_checkpoint_names" not in engine.__dict__  # DeepSpeed's own method again
    new, old = "zero_pp_rank_3_mp_rank_00_optim_states.pt", "zero_pp_rank_3_mp_rank_00optim_states.pt"
    assert _listed_pattern(f"/c/{new}", frozenset({new, old})) == f"/c/{new}"
    assert _listed_pattern(f"/c/{new}", frozenset({old})) == f"/c/{old}"
    assert _listed_pattern(f"/c/{new}", frozenset()) == f"/c/{new}"  # missing: DeepSpeed names it in its error


def test_resume_verifies_files_and_falls_back_to_the_newest_intact(run_dir, caplog):
    _save_steps(run_dir, [1, 2, 3])
    engine, _ = _engine(2, seed=1)
    broken = _model_file(run_dir / "step_00000003")
    broken.write_bytes(broken.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING", logger="pixelbert_dist"):
        assert checkpointer.resume(engine, run_dir, "auto")["step"] == 2
    assert "resuming from" in caplog.text
    assert "step_00000002" in caplog.text
    assert f"step_00000003 skipped: {broken} has 100 bytes" in caplog.text
    with pytest.raises(CheckpointError, match=rf"step_00000003 is damaged: {broken} has 100 bytes"):
        checkpointer.resume(engine, run_dir, "step_00000003")
    flipped = next((run_dir / "step_00000002").glob("*optim_states.pt"))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit, same size: loads fine, trains to garbage
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{flipped}: sha256 differs"):
        choose.find_checkpoint(run_dir, "step_00000002")
    assert choose.find_checkpoint(run_dir, "auto") == run_dir / "step_00000001"
    (run_dir / "latest").write_text("")
    caplog.clear()
    with caplog.at_level("WARNING", logger="pixelbert_dist"):
        assert choose.find_checkpoint(run_dir, "auto") == run_dir / "step_00000001"
    assert "latest is empty" in caplog.text
    (run_dir / "step_00000001" / "meta.json").write_text('{"step": 1, "world_')
    with pytest.raises(
        CheckpointError,
        match=r"no intact checkpoint.*latest is empty.*"
        r"step_00000001/meta.json is not valid JSON",
    ):
        choose.find_checkpoint(run_dir, "auto")


def test_a_zero_stage_change_is_refused_or_bridged(run_dir):
    _save_steps(run_dir, [1], stage=2)
    ds3 = fill_deepspeed_config(CONFIGS / "zero3.json", micro_batch=4, grad_accum=1, world_size=1, grad_clip=1.0)
    for universal in (False, True):  # DeepSpeed's ZeRO-3 universal load cannot read the conversion
        with pytest.raises(
            CheckpointError,
            match=r"saved with ZeRO stage 2 but this run's DeepSpeed "
            r"config has stage 3.*zero2.json.*launch/export.py",
        ):
            choose.prepare_resume(ds3, run_dir, "auto", world_size=1, universal=universal)
    ds1 = fill_deepspeed_config(CONFIGS / "zero1.json", micro_batch=4, grad_accum=1, world_size=1, grad_clip=1.0)
    with pytest.raises(CheckpointError, match=r"stage 2 .* stage 1.*resume_universal=true"):
        choose.prepare_resume(ds1, run_dir, "auto", world_size=1)
    # bridged: the ZeRO-2 checkpoint loads under ZeRO-1 and trains on like a ZeRO-2 resume
    same, opt2 = _engine(2, seed=5, random_ops=False)
    checkpointer.resume(same, run_dir, "auto")
    expected = _train(same, opt2, [1, 2])
    bridged, opt1 = _engine(1, seed=5, universal_from=run_dir)
    assert bridged.load_universal_checkpoint()
    assert checkpointer.resume(bridged, run_dir, "auto", universal=True)["step"] == 1
    for (loss, lrs), (ref_loss, ref_lrs) in zip(_train(bridged, opt1, [1, 2]), expected):
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert lrs == pytest.approx(ref_lrs)


def _killed_async_save(save_dir: str) -> None:
    """Save step 2 in the background (completes), train on, start the background save of
    step 4 with a writer slowed down (the test-only hook), train steps 4 and 5 while it is
    in flight, report their losses, and wait to be killed."""
    from pixelbert_dist.checkpoint.staging import SLOW_WRITER_ENV
    from pixelbert_dist.distributed.env import init_distributed

    init_distributed()
    _seed_all(7)
    engine, opt = _engine(2, seed=0)
    saver = checkpointer.Checkpointer(Path(save_dir).parent, folder=save_dir, keep_last=0, async_save=True)
    saver.attach(engine)
    losses = _train(engine, opt, range(2))
    saver.save(2, {"trainer": {"step": 2}}, rank_state={"data": {"batches_seen": 2}})
    saver.wait()
    losses += _train(engine, opt, range(2, 4))
    os.environ[SLOW_WRITER_ENV] = "600"
    saver.save(4, {"trainer": {"step": 4}}, rank_state={"data": {"batches_seen": 4}})
    losses += _train(engine, opt, range(4, 6))  # the step loop goes on while step 4 is written
    report = {"pid": os.getpid(), "losses": losses, "blocked": saver.last_blocked_seconds}
    (Path(save_dir) / "report.json").write_text(json.dumps(report))
    time.sleep(600)


@pytest.mark.slow
def test_a_kill_during_an_async_save_resumes_from_the_previous_one_and_loses_nothing(run_dir):
    import subprocess

    _seed_all(7)
    engine, opt = _engine(2, seed=0)
    reference = _train(engine, opt, range(6))

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*cmd, __file__, str(run_dir), "async_kill"], env=env, stderr=subprocess.PIPE, text=True)
    report, deadline = run_dir / "report.json", time.monotonic() + 300
    while not report.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert report.is_file(), proc.communicate(timeout=60)[1][-3000:] if proc.poll() is not None else "no report"
    child = json.loads(report.read_text())
    os.kill(child["pid"], signal.SIGKILL)  # while step 4 is still being written
    proc.communicate(timeout=120)
    # the background saves left training alone: the same losses as a run without saves
    assert [loss for loss, _ in child["losses"]] == pytest.approx([loss for loss, _ in reference], rel=1e-6)
    assert (run_dir / ".step_00000004.tmp").is_dir() and not (run_dir / "step_00000004").exists()
    assert (run_dir / "latest").read_text() == "step_00000002\n"

    _seed_all(123)  # a new process: other RNG streams, another init
    engine, opt = _engine(2, seed=99)
    state = checkpointer.resume(engine, run_dir, "auto")  # verified: sizes and sha256
    assert state["trainer"] == {"step": 2} and state["rank_state"] == {"data": {"batches_seen": 2}}
    resumed = _train(engine, opt, range(2, 6))
    for (loss, lrs), (ref_loss, ref_lrs) in zip(resumed, reference[2:]):
        assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-7)
        assert lrs == pytest.approx(ref_lrs)


if __name__ == "__main__":  # the subprocess halves of the universal and the kill tests, under torchrun
    if sys.argv[2] == "kill":
        _killed_save(sys.argv[1])
    elif sys.argv[2] == "async_kill":
        _killed_async_save(sys.argv[1])
    else:
        from pixelbert_dist.distributed.env import close_process_group

        _two_rank_save(sys.argv[1], int(sys.argv[2]))
        close_process_group()  # as a finished run does: exit-time destructors aborted rank 0 (SIGABRT)


def test_host_staging_keeps_shapes_and_named_tuples():
    """DeepSpeed's model states hold torch.Size shapes (zero_to_fp32 calls .numel() on them):
    the async save's host copy must keep their type, and copy tensors, not alias them."""
    from collections import namedtuple

    from pixelbert_dist.checkpoint.staging import HostBuffers

    Pair = namedtuple("Pair", "a b")
    weight = torch.ones(2, 3)
    state = {"param_shapes": [{"w": torch.Size([2, 3])}], "pair": Pair(weight, (1, 2)), "plain": (weight,)}
    copied = HostBuffers().copy(state, ())
    shape = copied["param_shapes"][0]["w"]
    assert isinstance(shape, torch.Size) and shape.numel() == 6
    assert isinstance(copied["pair"], Pair) and copied["pair"].b == (1, 2)
    assert torch.equal(copied["plain"][0], weight) and copied["plain"][0] is not weight
