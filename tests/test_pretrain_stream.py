"""Pre-training over streamed shards (the streaming tests' shards behind a local
http.server) through the real Trainer (one gloo rank, DeepSpeed ZeRO-2, two loader
workers, a shuffle buffer): a SIGTERM mid-epoch and a resume give the uninterrupted run's
micro-batches and losses, in plain and in resampled mode; so does a two-rank run stopped
through the `deepspeed` launcher, each rank from its own stream cursors; a resume with
other loader workers or another shard list is refused with one line naming the change."""

from __future__ import annotations

import json

import pytest

from pixelbert_dist.checkpoint import layout
from pixelbert_dist.config import load_config
from pixelbert_dist.train.config import RunConfig
from tests.pretrain_helpers import (
    fast_overrides,
    record_keys,
    run_launcher,
    signal_at,
    sigterm_launcher,
    train_losses,
)
from tests.stream_helpers import PATTERN, serve, write_stream_shards

pytestmark = [pytest.mark.usefixtures("dist_env"), pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The streaming shards behind a local http.server."""
    with serve(write_stream_shards(tmp_path_factory.mktemp("stream") / "train")) as url:
        yield url


# Plain: 8 batches of 4 an epoch over the 4 shards (22 samples, img0008 does not decode),
# 10 steps cross into epoch 1. Resampled: 2 steps of 2 micro-batches an epoch, 5 steps end
# in epoch 2; its 16-sample epochs draw shards with replacement. Either signal lands while
# the epoch's loader workers are alive (and are signalled too).
MODES = {
    "plain": dict(steps=10, extra=("data.epoch_samples=32",), signal_at=1, stop=2),
    "resampled": dict(
        steps=5,
        extra=("data.epoch_samples=16", "data.resampled=true", "train.grad_accum=2"),
        signal_at=4,  # the first micro-batch of step 3's window: the run stops after step 3
        stop=3,
    ),
}


def stream_overrides(run_dir, url, steps: int, *extra, pattern=PATTERN) -> list[str]:
    return fast_overrides(run_dir, {"train": f"{url}/{pattern}"}, steps=steps, val=False) + [
        "train.export=false",
        "train.save_every=2",
        "data.num_workers=2",
        "data.shuffle_buffer=5",
        "data.hflip=true",
        *extra,
    ]


def trainer(run_dir, url, *extra, steps):
    from pixelbert_dist.train.trainer import Trainer

    overrides = stream_overrides(run_dir, url, steps, *extra)
    return Trainer(load_config(RunConfig, None, overrides), "deepspeed_configs/zero2.json")


@pytest.mark.parametrize("mode", sorted(MODES))
def test_sigterm_mid_epoch_then_resume_matches_uninterrupted_run(server, tmp_path, mode):
    spec = MODES[mode]
    steps, extra = spec["steps"], spec["extra"]
    whole = trainer(tmp_path / "whole", server, *extra, steps=steps)
    expected_keys = record_keys(whole)
    whole.fit()
    expected = train_losses(tmp_path / "whole")
    assert sorted(expected) == list(range(1, steps + 1))

    cut_dir = tmp_path / "cut"
    cut = trainer(cut_dir, server, *extra, steps=steps)
    keys = record_keys(cut)
    signal_at(cut, spec["signal_at"])
    cut.fit()
    stopped_at = cut.state["step"]
    assert stopped_at == spec["stop"], "the signal should stop the run at the end of its step"
    loader = cut.train_loader
    assert 0 < loader.batches_done < len(loader), "the stop should land mid-epoch"
    assert layout.read_latest(cut_dir / "checkpoints") == f"step_{stopped_at:08d}"

    resumed = trainer(cut_dir, server, *extra, steps=steps)  # train.resume=auto
    assert resumed.state["step"] == stopped_at
    assert len(keys) == stopped_at * resumed.cfg.train.grad_accum  # whole windows only
    keys_after = record_keys(resumed)
    resumed.fit()
    assert keys + keys_after == expected_keys
    losses = train_losses(cut_dir)
    assert sorted(losses) == list(range(1, steps + 1))
    for step in range(stopped_at + 1, steps + 1):
        assert losses[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    assert resumed.state["epoch"] == whole.state["epoch"] >= 1


def test_a_resume_with_other_workers_or_other_urls_is_refused_in_one_line(server, tmp_path, capsys):
    from pixelbert_dist.train.run import refusals_as_one_line

    run_dir = tmp_path / "run"
    first = trainer(run_dir, server, "data.epoch_samples=16", steps=4)
    signal_at(first, 0)
    first.fit()  # stopped after step 1, with its checkpoint
    record = {p.name: p.read_text() for p in run_dir.iterdir() if p.is_file() and p.suffix != ".lock"}
    capsys.readouterr()

    def refusal(*extra) -> str:
        assert (
            refusals_as_one_line("pretrain", lambda: trainer(run_dir, server, "data.epoch_samples=16", *extra, steps=4))
            == 2
        )
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    # num_workers may change between runs of one config (housekeeping), not under a streamed position
    assert "'num_workers': (2, 1)" in refusal("data.num_workers=1")
    three = "train-{000000..000002}.tar"
    assert "data.train_shards: " in refusal(f"data.train_shards={server}/{three}")  # resume=auto: same run only
    line = refusal(f"data.train_shards={server}/{three}", "train.resume=latest")
    assert "another shard list (4 URLs" in line
    assert "now (3 URLs" in line
    after = {p.name: p.read_text() for p in run_dir.iterdir() if p.is_file() and p.suffix != ".lock"}
    assert after == record  # the refused runs left the record as it was
    again = trainer(run_dir, server, "data.epoch_samples=16", steps=4)  # the folder still resumes
    assert again.state["step"] == 1
    assert again.train_loader.state_dict()["stream_cursors"] == first.train_loader.state_dict()["stream_cursors"]


@pytest.mark.launcher
def test_two_ranks_sigterm_then_resume_matches_uninterrupted_run(server, tmp_path):
    """Each rank resumes from its own stream cursors: the undecodable img0008, skipped on
    the rank that streams its shard, puts that rank one sample ahead of the other."""
    steps, extra = 10, ("data.epoch_samples=64",)  # 8 steps an epoch: the run crosses into epoch 1

    def args(run_dir):
        return ["--deepspeed_config", "deepspeed_configs/zero2.json", *stream_overrides(run_dir, server, steps, *extra)]

    run_launcher("launch/pretrain.py", args(tmp_path / "whole"))
    expected = train_losses(tmp_path / "whole")
    cut = tmp_path / "cut"
    sigterm_launcher("launch/pretrain.py", args(cut), cut, after_steps=3)
    stopped_at = int((cut / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= stopped_at < steps, "the signal should have stopped the run early"
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    # one rank streams img0008's shard (each time round it): that rank's cursors are ahead
    assert [r["damaged_samples"] >= 1 for r in rows if r["step"] == stopped_at] == [True]

    run_launcher("launch/pretrain.py", args(cut))  # resume=auto
    resumed = train_losses(cut)
    assert sorted(resumed) == list(range(1, steps + 1))
    for step in range(stopped_at + 1, steps + 1):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
