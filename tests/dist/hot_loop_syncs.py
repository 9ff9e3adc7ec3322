"""Run by test_hot_loop under `deepspeed --num_gpus 2`: 4 optimizer steps of 2 micro-batches
each on two ranks, every host sync recorded; each rank writes the loop's own syncs (and
its steps and micro-batches) to syncs_<rank>.json."""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from benchmarks.host_syncs import HostSyncs
from pixelbert_dist.config import load_config
from pixelbert_dist.train.config import RunConfig
from pixelbert_dist.train.trainer import Trainer
from tests.pretrain_helpers import fast_overrides
from tests.test_hot_loop import loop_syncs


def main(out_dir: str, train: str) -> None:
    overrides = fast_overrides(Path(out_dir) / "run", {"train": train}, steps=4, val=False)
    extra = ["train.export=false", "train.save_every=0", "train.grad_accum=2", "train.log_every=4"]
    run = Trainer(load_config(RunConfig, None, overrides + extra), "deepspeed_configs/zero2.json")
    micro_batches = []
    to_device = run.to_device
    run.to_device = lambda batch: micro_batches.append(1) or to_device(batch)
    with HostSyncs("cpu") as syncs:
        run.fit()
    result = {"steps": run.state["step"], "micro_batches": len(micro_batches), "calls": loop_syncs(syncs)}
    (Path(out_dir) / f"syncs_{dist.get_rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
