"""The pre-training entry point behind ``launch/pretrain.py`` (and submitit's tasks)."""
from __future__ import annotations

import argparse
import logging
import os

from pixelbert_dist.config import load_config
from pixelbert_dist.distributed.ds_config import resolve_deepspeed_path
from pixelbert_dist.train.config import RunConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pixel-BERT pre-training. Run under `deepspeed`, `torchrun`, Slurm or alone.",
        epilog="Overrides are dotted key=value pairs, e.g. train.micro_batch=32 optim.lr=2e-4")
    parser.add_argument("--deepspeed_config", required=True, help="ZeRO + precision JSON (deepspeed_configs/)")
    parser.add_argument("--config", help="run config YAML (launch/configs/)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.deepspeed_config = str(resolve_deepspeed_path(args.deepspeed_config))
    if not os.path.isfile(args.deepspeed_config):
        raise SystemExit(f"--deepspeed_config {args.deepspeed_config}: no such file (a path, or the name of "
                         "a file in deepspeed_configs/)")
    cfg = load_config(RunConfig, args.config, args.overrides)
    from pixelbert_dist.train.trainer import Trainer  # heavy imports after the argument check

    trainer = Trainer(cfg, args.deepspeed_config)
    final = trainer.fit()
    if trainer.is_main and final:
        values = ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items()) if k != "step")
        print(f"final validation (step {final['step']}): {values}", flush=True)
    return 0
