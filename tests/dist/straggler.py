"""Run by test_resilience_dist under `deepspeed --num_gpus 2`: rank 1's loader sleeps
0.3 s before each batch (a slow disk on one node), the test-only hook; the run logs
every step to metrics.jsonl."""

import sys
import time
from pathlib import Path

import torch.distributed as dist

from pixelbert_dist.config import load_config
from pixelbert_dist.train.config import RunConfig
from pixelbert_dist.train.trainer import Trainer
from tests.pretrain_helpers import fast_overrides

SLOW_RANK, DELAY_S = 1, 0.3


class SlowBatches:
    """The loader as it is, each batch ``DELAY_S`` late."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            time.sleep(DELAY_S)
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)


def main(out_dir: str, train: str) -> None:
    overrides = fast_overrides(Path(out_dir) / "run", {"train": train}, steps=6, val=False)
    extra = ["train.export=false", "train.save_every=0", "train.log_every=2"]
    run = Trainer(load_config(RunConfig, None, overrides + extra), "deepspeed_configs/zero2.json")
    if dist.get_rank() == SLOW_RANK:
        run.train_loader = SlowBatches(run.train_loader)
    run.fit()


if __name__ == "__main__":
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
