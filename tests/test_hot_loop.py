"""The training loop's hot path (one gloo rank, real DeepSpeed engines): host syncs per
optimizer step, a partly non-finite accumulation window dropped without a trace, and
FLOPs charged at each batch's own padded size."""

import json
from pathlib import Path

import pytest
import torch

from benchmarks.host_syncs import HostSyncs
from pixelbert_dist.config import load_config
from pixelbert_dist.model.flops import training_flops_per_sample
from pixelbert_dist.train.config import RunConfig
from tests.fixtures_data import make_synthetic_shards
from tests.pretrain_helpers import fast_overrides, poison_images, run_launcher, train_losses

PACKAGE = Path(__file__).resolve().parents[1] / "pixelbert_dist"
LEFT_OUT = ("_log_train", "save", "evaluate_during", "finish")  # per log / save / eval period, not per step


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_synthetic_shards(tmp_path_factory.mktemp("shards"), num=48, samples_per_shard=16)


def trainer(shards, run_dir, *extra, stage: int = 2):
    from pixelbert_dist.train.trainer import Trainer

    overrides = fast_overrides(run_dir, shards, val=False) + ["train.export=false", "train.save_every=0", *extra]
    return Trainer(load_config(RunConfig, None, overrides), f"deepspeed_configs/zero{stage}.json")


def loop_syncs(syncs: HostSyncs) -> list[str]:
    """The calls that would sync a GPU's host made by the project's own code (not
    DeepSpeed's, which the bare loop makes too, nor the data loader's host-side
    collation), inside the training loop but outside the periodic logging / saving."""
    calls = []
    for call in syncs.calls:
        path, names = Path(call.caller.filename), {frame.name for frame in call.stack}
        if PACKAGE in path.parents and PACKAGE / "data" not in path.parents:
            if "_run_epoch" in names and not set(LEFT_OUT) & names:
                calls.append(f"{call.what} from {path.name}:{call.caller.lineno}")
    return calls


@pytest.mark.slow
def test_one_host_sync_per_optimizer_step(dist_env, shards, tmp_path):
    """8 micro-batches in 4 windows of 2: the loop's own syncs are 4 (one per optimizer
    step, at the accumulation boundary), not one or more per micro-batch as before."""
    run = trainer(shards, tmp_path / "run", "train.max_steps=4", "train.grad_accum=2", "train.log_every=4")
    micro_batches = []
    to_device = run.to_device
    run.to_device = lambda batch: micro_batches.append(1) or to_device(batch)
    with HostSyncs("cpu") as syncs:
        run.fit()
    calls = loop_syncs(syncs)
    assert run.state["step"] == 4
    assert len(micro_batches) == 8
    assert len(calls) == 4, calls
    assert all(call.startswith("tolist from window.py") for call in calls), calls
    losses = train_losses(tmp_path / "run")
    assert list(losses) == [4]
    assert torch.isfinite(torch.tensor(losses[4]))  # the metrics were reduced at log time


@pytest.mark.launcher
@pytest.mark.slow
def test_one_host_sync_per_optimizer_step_on_two_ranks(shards, tmp_path):
    """The same at 2 ranks, where the step's all-reduce really runs: per optimizer step one
    all-reduce (the bad-loss count and the stop flag together) and its one host copy, on
    each rank; the stop flag once had an all-reduce and a copy of its own."""
    run_launcher("tests/dist/hot_loop_syncs.py", [str(tmp_path), str(shards["train"])])
    for rank in (0, 1):
        result = json.loads((tmp_path / f"syncs_{rank}.json").read_text())
        assert (result["steps"], result["micro_batches"]) == (4, 8), result
        calls = result["calls"]
        assert sorted(call.split(" from ")[0] for call in calls) == ["all_reduce"] * 4 + ["tolist"] * 4, calls
        assert all(" from window.py:" in call for call in calls), calls


@pytest.mark.parametrize(
    "stage",
    [
        2,
        pytest.param(0, marks=pytest.mark.slow),
        pytest.param(1, marks=pytest.mark.slow),
        pytest.param(3, marks=pytest.mark.slow),
    ],
)
@pytest.mark.slow
def test_a_partly_nonfinite_window_is_dropped_whole(dist_env, shards, tmp_path, stage):
    """With 2 micro-batches per step and trained BatchNorm: a window whose second
    micro-batch is NaN leaves exactly what a window of two NaN micro-batches leaves (the
    finite one's gradients and BatchNorm updates are dropped with it), under every ZeRO
    stage, and training goes on to the asked step count with the lr schedule not advanced
    by the skipped window."""
    extra = ("train.max_steps=3", "train.grad_accum=2", "model.overrides.freeze_bn=false")
    runs = {}
    for name, bad in (("both", (2, 3)), ("second", (3,))):
        run = trainer(shards, tmp_path / name, *extra, stage=stage)
        assert run.batchnorms, "the test needs BatchNorm running statistics"
        poison_images(run, lambda i, bad=bad: i in bad)
        run.fit()
        runs[name] = run
    assert runs["both"].state["nonfinite_skipped"] == 2
    assert runs["second"].state["nonfinite_skipped"] == 1
    assert runs["both"].state["step"] == runs["second"].state["step"] == 3
    assert runs["both"].state["samples"] == runs["second"].state["samples"] == 3 * 2 * 4  # skipped ones not counted
    assert runs["both"].scheduler.last_epoch == 3  # 3 applied steps; DeepSpeed counted the skipped one too
    assert train_losses(tmp_path / "both") == train_losses(tmp_path / "second")
    both, second = (dict(runs[k].engine.module.state_dict()) for k in ("both", "second"))
    for key, value in both.items():
        assert torch.isfinite(value.float()).all(), key
        torch.testing.assert_close(value, second[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_each_batch_is_charged_its_own_flops(dist_env, shards, tmp_path):
    """Two batches of different padded sizes are charged their own FLOPs (as
    FlopCounterMode counts them), and the meter's window sums them."""
    run = trainer(shards, tmp_path / "run", "train.max_steps=1")
    batch = next(iter(run.train_loader))
    height, width = batch["images"].shape[-2:]
    bigger = dict(batch, images=torch.nn.functional.pad(batch["images"], (0, 64, 0, 128)))
    size, text_len, cfg = len(batch["keys"]), batch["input_ids"].shape[1], run.engine.module.config
    expected = [
        size * training_flops_per_sample(cfg, (h, w), text_len)
        for h, w in ((height, width), (height + 128, width + 64))
    ]
    assert expected[1] > expected[0]
    charged = [run.batch_flops(batch), run.batch_flops(bigger)]
    assert charged == pytest.approx(expected, rel=1e-9)
    run.meter.reset()
    for b in (batch, bigger):
        run.meter.add(size, 0.0, 0.1, run.batch_flops(b))
    assert run.meter.flops == pytest.approx(sum(expected), rel=1e-9)
    # the train log's TFLOP/s is the window's FLOPs over its time
    run.fit()
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["tflops_per_gpu"] > 0
