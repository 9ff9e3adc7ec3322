"""The fine-tuning entry point shared by ``launch/finetune_*.py``: parse, build, run.

Nothing heavy (torch, DeepSpeed) is imported before the arguments are parsed, so
``--help`` (every config key with its default) and ``--print-config`` answer at once."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pixelbert_dist.config import config_help, dump_config, load_config
from pixelbert_dist.console import setup_console
from pixelbert_dist.distributed.ds_config import SHIPPED_DIR
from pixelbert_dist.finetune.config import UNVERIFIED_HELP, FinetuneConfig


# Each task's own files: (flag, config key, help), and its --help description.
TASK_FILES = {
    "vqa": [
        ("--train-questions", "vqa.train_questions", "official questions JSON of the training split"),
        ("--train-annotations", "vqa.train_annotations", "official annotations JSON of the training split"),
        ("--val-questions", "vqa.val_questions", "questions evaluated with the official accuracy"),
        ("--val-annotations", "vqa.val_annotations", "their annotations"),
        ("--test-questions", "vqa.test_questions", "questions to predict into the submission file"),
        ("--image-map", "vqa.image_map", "JSON {image_id: shard key}; default key: vqa.key_format"),
        ("--answer-vocab", "vqa.answer_vocab", "a saved answer vocabulary (else the top answers of train)"),
    ],
    "nlvr2": [
        ("--train", "nlvr2.train", "official train.json (jsonl)"),
        ("--dev", "nlvr2.dev", "official dev.json"),
        ("--test", "nlvr2.test", "official test1.json (test-P)"),
        ("--image-map", "nlvr2.image_map", "JSON {image name: shard key}; default key: nlvr2.key_format"),
    ],
    "retrieval": [("--karpathy", "retrieval.karpathy", "Karpathy split file dataset_{coco,flickr30k}.json")],
}
DESCRIPTIONS = {
    "vqa": "Fine-tune and evaluate Pixel-BERT on VQA 2.0.",
    "nlvr2": "Fine-tune and evaluate Pixel-BERT on NLVR2.",
    "retrieval": "Fine-tune Pixel-BERT for image-text retrieval (ITM head, hard negatives).",
}


def task_config_help(task: str) -> list[str]:
    """The config keys ``--help`` lists for ``task``: the shared sections and its own, not
    the other tasks' (``vqa.*`` under NLVR2's help would only mislead), nor ``task``."""
    others = (*(f"  {name}." for name in TASK_FILES if name != task), "  task=")  # the command sets task
    return [line for line in config_help(FinetuneConfig) if not line.startswith(others)]


def build_parser(task: str) -> argparse.ArgumentParser:
    """``--pretrained``, ``--shards``, the task's files (``TASK_FILES``: flag, config key,
    help), ``--config``, ``--deepspeed_config``, ``--print-config`` and key=value overrides.
    Flags are dashed, except DeepSpeed's own (``--deepspeed_config``, ``--local_rank``)."""
    parser = argparse.ArgumentParser(
        description=DESCRIPTIONS[task],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys, set as dotted key=value overrides (e.g. train.epochs=3 optim.lr=3e-5);\n"
        "default, (type, bounds) and help shown:\n" + "\n".join(task_config_help(task)),
    )
    parser.add_argument("--pretrained", metavar="DIR", help="pre-training export folder (config.json, weights)")
    parser.add_argument("--shards", nargs="+", metavar="DIR", help="shard folder(s) holding the task's images")
    parser.add_argument("--allow-unverified-weights", action="store_true", help=UNVERIFIED_HELP)
    for flag, key, text in TASK_FILES[task]:
        parser.add_argument(flag, dest=key.replace(".", "__"), metavar="PATH", help=f"{text} ({key})")
    parser.add_argument("--config", metavar="YAML", help="fine-tuning config YAML (launch/configs/finetune_*.yaml)")
    parser.add_argument(
        "--deepspeed_config",
        metavar="JSON",
        default=str(SHIPPED_DIR / "zero2.json"),
        help="ZeRO + precision JSON (precision: the run config's train.precision wins)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the merged config (defaults <- --config <- flags and overrides) as YAML and exit",
    )
    parser.add_argument("--local_rank", type=int, default=None, metavar="N", help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    return parser


def config_from_args(task: str, args: argparse.Namespace) -> FinetuneConfig:
    """Defaults <- --config <- key=value overrides <- the path flags."""
    # `--shards A B key=value`: nargs="+" swallows the overrides that follow; hand them back
    extra = [s for s in args.shards or [] if "=" in s and not Path(s).exists()]
    shards = [s for s in args.shards or [] if s not in extra]
    cfg = load_config(FinetuneConfig, args.config, [f"task={task}", *extra, *args.overrides])
    # paths are set as values, never parsed as YAML text
    if args.pretrained:
        cfg.pretrained = args.pretrained
    if args.allow_unverified_weights:
        cfg.allow_unverified_weights = True
    if shards:
        cfg.data.shards = shards
    for _, key, _ in TASK_FILES[task]:
        value = getattr(args, key.replace(".", "__"))
        if value is not None:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    return cfg


def parse_config(task: str, argv) -> FinetuneConfig:
    """The config a fine-tuning command line describes (what ``--print-config`` prints)."""
    return config_from_args(task, build_parser(task).parse_args(argv))


def main(task: str, argv=None) -> dict:
    """Parse the command line (``build_parser``), train, evaluate; the results."""
    args = build_parser(task).parse_args(argv)
    cfg = config_from_args(task, args)
    if args.print_config:
        print(dump_config(cfg), end="", flush=True)
        return {}
    cfg.validate()  # what spans two keys, refused before torch and DeepSpeed load
    setup_console()  # levels and noise filters, before DeepSpeed is imported
    from pixelbert_dist.finetune.trainer import FinetuneTrainer  # torch and DeepSpeed: after the arguments

    trainer = FinetuneTrainer(cfg, args.deepspeed_config)
    results = trainer.fit()
    if trainer.is_main:
        print(
            json.dumps({"task": task, "metrics": results.get("metrics"), "skipped": results.get("skipped")}), flush=True
        )
    return results


def cli(task: str, argv=None) -> int:
    """``launch/finetune_TASK.py`` and the ``pixelbert-finetune-TASK`` console scripts."""
    from pixelbert_dist.train.run import end_command, refusals_as_one_line

    return end_command(refusals_as_one_line(f"finetune {task}", lambda: main(task, argv)))


def vqa() -> int:
    return cli("vqa")


def nlvr2() -> int:
    return cli("nlvr2")


def retrieval() -> int:
    return cli("retrieval")
