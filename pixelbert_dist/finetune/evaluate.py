"""Evaluation on its own (``launch/evaluate.py``, ``pixelbert-evaluate``): a fine-tuning
run's checkpoint, or a pre-training export for zero-shot retrieval, on any split the task
reads, over every rank the launcher started; no training, no optimiser.

    pixelbert-evaluate --run runs/ft_retrieval [--tag step_00003000] [--split test] [key=value ...]
    pixelbert-evaluate --pretrained runs/demo/export --task retrieval --shards data/f30k/test \\
        --karpathy dataset_flickr30k.json [--split test]

``--run`` reads the run's resolved ``config.yaml`` (task files, shards, export) and the
checkpoint's weights (ZeRO 1-3 through ``zero_to_fp32``); key=value overrides change any
of it (e.g. ``vqa.test_questions=...`` for another questions file). The prediction files,
retrieval's score store and ``results_SPLIT.json`` go to ``--out`` (default RUN/eval or
runs/evaluate). Retrieval resumes a killed evaluation from its score store. SIGTERM (or
SIGINT, SIGUSR1, SIGHUP) stops it within one transformer call, the finished batches of
score rows kept, and it exits with 128 + the signal's number (143 for SIGTERM), saying so.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from pixelbert_dist.config import load_config
from pixelbert_dist.finetune.config import UNVERIFIED_HELP, FinetuneConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run", help="a fine-tuning run folder (config.yaml, checkpoints/)")
    where.add_argument("--pretrained", help="a pre-training export: zero-shot retrieval with its ITM head")
    parser.add_argument("--tag", default="latest", help="checkpoint of --run: latest or a tag (step_00001000)")
    parser.add_argument("--task", choices=["vqa", "nlvr2", "retrieval"], help="with --pretrained: retrieval")
    parser.add_argument("--split", action="append", help="split(s) to evaluate (default: every split the task reads)")
    parser.add_argument("--shards", nargs="+", help="shard folder(s) with the images (default: the run's)")
    parser.add_argument("--karpathy", help="Karpathy split file (retrieval with --pretrained)")
    parser.add_argument("--allow-unverified-weights", action="store_true", help=UNVERIFIED_HELP)
    parser.add_argument("--out", help="results folder (default: RUN/eval, or runs/evaluate)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the fine-tuning config")
    return parser


def config_from_args(args) -> tuple[FinetuneConfig, Path]:
    """The task's config: the run's own, or a retrieval config around the export."""
    if args.run:
        run = Path(args.run)
        if not (run / "config.yaml").is_file():
            raise FileNotFoundError(f"{run}/config.yaml not found: --run takes a fine-tuning run folder")
        cfg = load_config(FinetuneConfig, run / "config.yaml", args.overrides)
        out = Path(args.out or run / "eval")
    else:
        if args.task not in (None, "retrieval"):
            raise ValueError(f"--pretrained evaluates retrieval zero-shot; --task {args.task} needs --run")
        cfg = load_config(FinetuneConfig, None, ["task=retrieval", *args.overrides])
        cfg.pretrained = args.pretrained
        if args.karpathy:
            cfg.retrieval.karpathy = args.karpathy
        # the task reads a training split too; zero-shot never uses it: read the evaluated one
        cfg.retrieval.train_splits = [cfg.retrieval.eval_split]
        out = Path(args.out or "runs/evaluate")
    if args.shards:
        cfg.data.shards = args.shards
    if args.allow_unverified_weights:
        cfg.allow_unverified_weights = True
    cfg.run_dir = str(out)
    return cfg.validate(), out


def _load_weights(model, run: Path, tag: str) -> str:
    """The fine-tuned weights of ``run``'s checkpoint ``tag``, consolidated in fp32."""
    from pixelbert_dist.checkpoint.choose import find_checkpoint
    from pixelbert_dist.checkpoint.files import read_meta
    from pixelbert_dist.train.export import consolidated_state_dict

    tag_dir = find_checkpoint(run / "checkpoints", tag)
    if tag_dir is None:
        raise FileNotFoundError(f"{run}/checkpoints holds no checkpoint ({tag})")
    stage = int(read_meta(tag_dir).get("zero_stage", 0))
    if stage == 0:
        raise ValueError(f"{tag_dir}: a ZeRO-0 checkpoint; evaluate runs saved under ZeRO 1-3 (the default zero2)")
    model.load_state_dict(consolidated_state_dict(run / "checkpoints", tag_dir, stage), strict=True)
    return f"{tag_dir.resolve()}"


def evaluate(args) -> dict | int:
    """The metrics of each split, or 128 + the signal's number when one stopped it."""
    import torch

    from pixelbert_dist.distributed.env import device_for, init_distributed
    from pixelbert_dist.finetune.data import KeyedImages
    from pixelbert_dist.finetune.task import EvaluationStopped
    from pixelbert_dist.finetune.tasks import make_task
    from pixelbert_dist.finetune.trainer import load_export
    from pixelbert_dist.train.signals import GracefulExit

    cfg, out = config_from_args(args)
    device = device_for(init_distributed())
    rank = torch.distributed.get_rank()
    backbone, tokenizer = load_export(cfg)
    images = KeyedImages(cfg.data.shards)
    task = make_task(cfg, tokenizer, images, out)
    model = task.build_model(backbone)
    tag = _load_weights(model, Path(args.run), args.tag) if args.run else f"{Path(cfg.pretrained).resolve()}"
    engine = scoring_engine(model)

    def to_device(batch: dict) -> dict:
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}

    out.mkdir(parents=True, exist_ok=True)
    with GracefulExit() as stopper:  # SIGTERM, SIGINT, SIGUSR1, SIGHUP: keep what is scored, then stop
        try:
            return {
                split: _evaluate_split(cfg, task, engine, images, split, tag, out, stopper, to_device, device)
                for split in args.split or list(task.eval_splits)
            }
        except EvaluationStopped as err:
            source = signal.Signals(stopper.received).name if stopper.requested else "a signal on another rank"
            if rank == 0:
                print(f"evaluate: stopped by {source}: {err}", file=sys.stderr, flush=True)
            return 128 + (stopper.received or signal.SIGTERM)  # the shell's code for "killed by it"


def scoring_engine(model):
    """A DeepSpeed engine that only scores: ZeRO stage 0, micro-batch 1 (the loader batches)."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 0}}
    return deepspeed.initialize(model=model, config=config)[0]


def split_loader(task, images, split: str, data, batch: int, rank: int = 0, world: int = 1, device="cpu"):
    """This rank's loader over one evaluation split of ``task``, in order."""
    from pixelbert_dist.finetune.data import TaskLoader

    return TaskLoader(
        task.eval_splits[split], images, task.image_keys, task.collate, data, batch, rank, world, train=False,
        device=device, images_per_example=task.images_per_example,
    )  # fmt: skip


def _evaluate_split(cfg, task, engine, images, split, tag, out, stopper, to_device, device) -> dict:
    """One split over every rank; ``results_SPLIT.json`` and the metrics line on rank 0."""
    import torch

    from pixelbert_dist.finetune.data import loader_data_config

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if split not in task.eval_splits:
        raise ValueError(f"split {split!r}: the task reads {sorted(task.eval_splits)} with this config")
    batch = cfg.train.eval_batch or cfg.train.micro_batch
    data = loader_data_config(cfg.data, cfg.train.seed)
    loader = split_loader(task, images, split, data, batch, rank, world, device)
    metrics = task.evaluate(engine, split, loader, to_device, model_tag=tag, stop=lambda: stopper.requested)
    if rank == 0:
        record = {"task": task.name, "split": split, "model": tag, "metrics": metrics, "skipped": task.skipped}
        (out / f"results_{split}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(json.dumps(record["metrics"]), flush=True)
    return metrics


def cli(argv=None) -> int:
    from pixelbert_dist.console import setup_console
    from pixelbert_dist.train.run import end_command, refusals_as_one_line

    args = build_parser().parse_args(argv)
    setup_console()
    return end_command(refusals_as_one_line("evaluate", lambda: evaluate(args)))
