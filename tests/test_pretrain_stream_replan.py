"""A streamed run that loses a node and gets it back: 2 ranks, resumed on 1, resumed on 2
again, each through the real `deepspeed` launcher (CPU ranks over gloo, ZeRO-2, two loader
workers and a shuffle buffer per rank, ``train.resume_universal=true``). Every run
completes; each resume says on rank 0, in one line, how many samples it repeats and skips,
within the shards in flight and one shuffle buffer per old stream."""

from __future__ import annotations

import logging
import math
import re

import pytest

from pixelbert_dist.checkpoint.files import read_meta
from pixelbert_dist.data.format.shards import ShardWriter
from tests.data_helpers import make_jpeg
from pixelbert_dist.config import load_config
from pixelbert_dist.train.config import RunConfig
from tests.pretrain_helpers import fast_overrides, run_launcher, train_losses

SHARDS, PER_SHARD, BUFFER, WORKERS, IN_FLIGHT = 12, 6, 5, 2, 2
LINE = re.compile(
    r"streamed position re-planned from (\d+) rank\(s\) x (\d+) worker\(s\) x batch 4 to (\d+) rank\(s\) .*?: "
    r"(\d+) samples repeated .*?, (\d+) skipped"
)


@pytest.fixture(scope="module")
def pattern(tmp_path_factory) -> str:
    """12 streamed shards of 6 samples (with index sidecars), as a brace pattern."""
    folder = tmp_path_factory.mktemp("replan") / "train"
    with ShardWriter(folder, "train", samples_per_shard=PER_SHARD) as writer:
        for i in range(SHARDS * PER_SHARD):
            key = f"img{i:04d}"
            writer.write(key, make_jpeg(40 + i % 7, 52 - i % 5, i), {"key": key, "captions": [f"caption {i}"]})
    return f"{folder}/train-{{000000..{SHARDS - 1:06d}}}.tar"


def overrides(run_dir, pattern, steps: int, workers: int = WORKERS) -> list[str]:
    return fast_overrides(run_dir, {"train": pattern}, steps=steps, val=False) + [
        "train.export=false",
        "data.epoch_samples=64",  # 8 batches of 4 a rank on 2 ranks, 16 on 1
        f"data.num_workers={workers}",
        f"data.shuffle_buffer={BUFFER}",
        f"data.shards_in_flight={IN_FLIGHT}",
    ]


def launch(run_dir, pattern, steps: int, ranks: int, resume: bool) -> str:
    """One run of ``steps`` in all on ``ranks`` ranks (a resume: from the latest checkpoint,
    re-planned where the world size changed); its output, after it exited 0."""
    args = overrides(run_dir, pattern, steps)
    if resume:
        args += ["train.resume=latest", "train.resume_universal=true"]
    args = ["--deepspeed_config", "deepspeed_configs/zero2.json", *args]
    proc = run_launcher("launch/pretrain.py", args, num_ranks=ranks)
    for line in (proc.stdout + proc.stderr).splitlines():
        if "re-planned" in line:
            print(line)  # shown with pytest -s
    return proc.stdout + proc.stderr


def replanned(output: str, old_ranks: int, new_ranks: int) -> tuple[int, int]:
    """The repeated and skipped counts of the one re-plan line (rank 0's)."""
    found = LINE.findall(output)
    assert len(found) == 1, output[-4000:]
    old, workers, new, repeated, skipped = map(int, found[0])
    assert (old, workers, new) == (old_ranks, WORKERS, new_ranks)
    return repeated, skipped


@pytest.mark.launcher
@pytest.mark.slow
def test_two_ranks_to_one_and_back_complete_with_the_cost_said(pattern, tmp_path):
    run_dir = tmp_path / "run"
    launch(run_dir, pattern, steps=3, ranks=2, resume=False)
    to_one = launch(run_dir, pattern, steps=8, ranks=1, resume=True)  # 24 samples seen: batch 6 of 16
    repeated, skipped = replanned(to_one, 2, 1)
    streams = 2 * WORKERS
    assert 0 < repeated <= streams * IN_FLIGHT * PER_SHARD and skipped <= streams * (BUFFER - 1), (repeated, skipped)
    assert "of 12 shards left" in to_one

    back = launch(run_dir, pattern, steps=12, ranks=2, resume=True)  # 44 seen: batch 5 of 8, then epoch 1
    repeated, skipped = replanned(back, 1, 2)
    assert repeated <= WORKERS * IN_FLIGHT * PER_SHARD and skipped <= WORKERS * (BUFFER - 1), (repeated, skipped)

    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 13))
    assert all(math.isfinite(loss) for loss in losses.values())
    worlds = {step: read_meta(run_dir / "checkpoints" / f"step_{step:08d}")["world_size"] for step in (8, 12)}
    assert worlds == {8: 1, 12: 2}


@pytest.mark.slow
@pytest.mark.usefixtures("dist_env")
def test_another_worker_count_on_the_same_ranks_is_replanned_with_resume_universal(pattern, tmp_path, caplog):
    """One rank, 2 loader workers, then 3: refused as before without
    ``train.resume_universal`` (tests/test_pretrain_stream.py), re-planned with it."""
    from pixelbert_dist.train.trainer import Trainer

    def trainer(steps, *extra, workers=WORKERS):
        cfg = load_config(RunConfig, None, [*overrides(tmp_path / "run", pattern, steps, workers), *extra])
        return Trainer(cfg, "deepspeed_configs/zero2.json")

    trainer(3).fit()
    with caplog.at_level(logging.WARNING, logger="pixelbert_dist.train.resume"):
        resumed = trainer(6, "train.resume=latest", "train.resume_universal=true", workers=3)
    lines = [r.getMessage() for r in caplog.records if "re-planned" in r.getMessage()]
    assert len(lines) == 1 and "from 1 rank(s) x 2 worker(s) x batch 4 to 1 rank(s) x 3 worker(s)" in lines[0]
    repeated, skipped = map(int, re.search(r"(\d+) samples repeated .*?, (\d+) skipped", lines[0]).groups())
    assert repeated <= WORKERS * IN_FLIGHT * PER_SHARD and skipped <= WORKERS * (BUFFER - 1)
    assert resumed.state["step"] == 3 and resumed.train_loader.batches_done == 3
    resumed.fit()
    assert sorted(train_losses(tmp_path / "run")) == list(range(1, 7))
