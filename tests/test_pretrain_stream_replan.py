"""A streamed run that loses a node and gets it back: 2 ranks, resumed on 1, resumed on 2
again, each through the real `deepspeed` launcher (CPU ranks over gloo, ZeRO-2, two loader
workers and a shuffle buffer per rank, ``train.resume_universal=true``). Every run
completes; each resume says on rank 0, in one line, how many samples it repeats and skips,
within one shard and one shuffle buffer per old stream."""

from __future__ import annotations

import math
import re

import pytest

from pixelbert_dist.checkpoint.files import read_meta
from pixelbert_dist.data.format.shards import ShardWriter
from tests.data_helpers import make_jpeg
from tests.pretrain_helpers import fast_overrides, run_launcher, train_losses

SHARDS, PER_SHARD, BUFFER, WORKERS = 12, 6, 5, 2
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


def launch(run_dir, pattern, steps: int, ranks: int, resume: bool) -> str:
    """One run of ``steps`` in all on ``ranks`` ranks (a resume: from the latest checkpoint,
    re-planned where the world size changed); its output, after it exited 0."""
    args = fast_overrides(run_dir, {"train": pattern}, steps=steps, val=False) + [
        "train.export=false",
        "data.epoch_samples=64",  # 8 batches of 4 a rank on 2 ranks, 16 on 1
        f"data.num_workers={WORKERS}",
        f"data.shuffle_buffer={BUFFER}",
    ]
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
    assert 0 < repeated <= streams * PER_SHARD and skipped <= streams * (BUFFER - 1), (repeated, skipped)
    assert "of 12 shards left" in to_one

    back = launch(run_dir, pattern, steps=12, ranks=2, resume=True)  # 44 seen: batch 5 of 8, then epoch 1
    repeated, skipped = replanned(back, 1, 2)
    assert repeated <= WORKERS * PER_SHARD and skipped <= WORKERS * (BUFFER - 1), (repeated, skipped)

    losses = train_losses(run_dir)
    assert sorted(losses) == list(range(1, 13))
    assert all(math.isfinite(loss) for loss in losses.values())
    worlds = {step: read_meta(run_dir / "checkpoints" / f"step_{step:08d}")["world_size"] for step in (8, 12)}
    assert worlds == {8: 1, 12: 2}
