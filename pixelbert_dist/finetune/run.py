"""The fine-tuning entry point shared by ``launch/finetune_*.py``: parse, build, run.

Nothing heavy (torch, DeepSpeed) is imported before the arguments are parsed, so
``--help`` (every config key with its default) and ``--print-config`` answer at once."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pixelbert_dist.config import config_help, dump_config, load_config
from pixelbert_dist.console import setup_console
from pixelbert_dist.finetune.config import FinetuneConfig

REPO = Path(__file__).resolve().parents[2]


def build_parser(file_args: list[tuple[str, str, str]], description: str) -> argparse.ArgumentParser:
    """``--pretrained``, ``--shards``, the task's files (``file_args``: flag, config key,
    help), ``--config``, ``--deepspeed_config``, ``--print-config`` and key=value overrides."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys, set as dotted key=value overrides (e.g. train.epochs=3 optim.lr=3e-5);\n"
               "default and type shown:\n" + "\n".join(config_help(FinetuneConfig)))
    parser.add_argument("--pretrained", help="pre-training export folder (config.json, model.safetensors)")
    parser.add_argument("--shards", nargs="+", help="shard folder(s) holding the task's images")
    for flag, key, text in file_args:
        parser.add_argument(flag, dest=key.replace(".", "__"), help=f"{text} ({key})")
    parser.add_argument("--config", help="fine-tuning config YAML (launch/configs/finetune_*.yaml)")
    parser.add_argument("--deepspeed_config", default=str(REPO / "deepspeed_configs" / "zero2.json"),
                        help="ZeRO + precision JSON (precision: the run config's train.precision wins)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the merged config (defaults <- --config <- flags and overrides) as YAML and exit")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    return parser


def config_from_args(task: str, args: argparse.Namespace, file_args) -> FinetuneConfig:
    """Defaults <- --config <- key=value overrides <- the path flags."""
    # `--shards A B key=value`: nargs="+" swallows the overrides that follow; hand them back
    extra = [s for s in args.shards or [] if "=" in s and not Path(s).exists()]
    shards = [s for s in args.shards or [] if s not in extra]
    cfg = load_config(FinetuneConfig, args.config, [f"task={task}", *extra, *args.overrides])
    # paths are set as values, never parsed as YAML text
    if args.pretrained:
        cfg.pretrained = args.pretrained
    if shards:
        cfg.data.shards = shards
    for _, key, _ in file_args:
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    return cfg


def parse_config(task: str, argv, file_args) -> FinetuneConfig:
    """The config a fine-tuning command line describes (what ``--print-config`` prints)."""
    return config_from_args(task, build_parser(file_args, "").parse_args(argv), file_args)


def main(task: str, argv, file_args: list[tuple[str, str, str]], description: str) -> dict:
    """Parse the command line (``build_parser``), train, evaluate; the results."""
    args = build_parser(file_args, description).parse_args(argv)
    cfg = config_from_args(task, args, file_args)
    if args.print_config:
        print(dump_config(cfg), end="", flush=True)
        return {}
    setup_console()  # levels and noise filters, before DeepSpeed is imported
    from pixelbert_dist.finetune.trainer import FinetuneTrainer  # torch and DeepSpeed: after the arguments

    trainer = FinetuneTrainer(cfg, args.deepspeed_config)
    results = trainer.fit()
    if trainer.is_main:
        print(json.dumps({"task": task, "metrics": results.get("metrics"), "skipped": results.get("skipped")}),
              flush=True)
    return results
