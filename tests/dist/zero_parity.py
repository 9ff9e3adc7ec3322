"""Run by test_pretrain_dist under `deepspeed --num_gpus 2`: the same tiny run under
ZeRO 0, 1, 2 and 3 in one process group; rank 0 writes each stage's losses, and
whether its export reloads to the trained engine's outputs."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from pixelbert_dist.config import load_config
from pixelbert_dist.model import PixelBert
from pixelbert_dist.train.config import RunConfig
from pixelbert_dist.train.evaluate import gathered_params
from pixelbert_dist.train.trainer import Trainer
from tests.pretrain_helpers import fast_overrides, train_losses


def main(out_dir: str, train: str, val: str) -> None:
    results = {}
    for stage in (0, 1, 2, 3):
        run = Path(out_dir) / f"zero{stage}"
        cfg = load_config(RunConfig, None, fast_overrides(run, {"train": train, "val": val}, steps=4)
                          + ["train.save_every=0", "train.retrieval_size=0"])
        trainer = Trainer(cfg, f"deepspeed_configs/zero{stage}.json")
        trainer.fit()
        batch = trainer.to_device(next(iter(trainer.val_loader)))
        trainer.engine.eval()
        with torch.no_grad(), gathered_params(trainer.engine):
            engine_logits = trainer.engine.module(batch)["itm_logits"]
        if dist.get_rank() == 0:
            export = PixelBert.from_pretrained(run / "export").eval()
            with torch.no_grad():
                export_logits = export(batch)["itm_logits"]
            results[stage] = {"losses": train_losses(run),
                              "export_max_diff": (engine_logits - export_logits).abs().max().item()}
    if dist.get_rank() == 0:
        (Path(out_dir) / "parity.json").write_text(json.dumps(results))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(*args)
