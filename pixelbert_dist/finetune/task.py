"""The base of every fine-tuning task (``tasks.py``, ``retrieval.py``): the contract the
FinetuneTrainer relies on, and the evaluation every task shares (predict this rank's
share, gather the records, score, write the prediction file on rank 0)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from pixelbert_dist.collectives import all_reduce_max, gather_objects
from pixelbert_dist.finetune.config import FinetuneConfig
from pixelbert_dist.finetune.data import KeyedImages

# The demo's task files (and their image maps) do not ship: this command makes them.
MAKE_DEMO_TASKS = "python -m pixelbert_dist.finetune.synthetic_tasks --shards data/synthetic --out data/tasks"


def load_image_map(path: str | None) -> dict[str, str] | None:
    """A JSON object {task image name/id: shard key} (the synthetic tasks write one)."""
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"image map {p} does not exist (the demo's task files and image maps "
            f"are made from its shards by: {MAKE_DEMO_TASKS})"
        )
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ValueError(f"image map {p} must be a JSON object of image name -> shard key")
    return {str(k): v for k, v in data.items()}


class EvaluationStopped(Exception):
    """An evaluation stopped on request (SIGTERM): the message says what was kept."""


def stop_agreed(stop, stopped_here: bool) -> bool:
    """Whether any rank stopped its evaluation early (one collective, on every rank at the
    end of a pass over its batches; none when the caller passed no ``stop``)."""
    return stop is not None and all_reduce_max(1.0 if stopped_here else 0.0) > 0


class Task:
    name = "task"
    images_per_example = 1
    main_metric = "accuracy"

    def __init__(self, cfg: FinetuneConfig, tokenizer, images: KeyedImages, run_dir: Path):
        self.cfg, self.tokenizer, self.images, self.run_dir = cfg, tokenizer, images, Path(run_dir)
        self.max_len = cfg.data.max_text_len
        self.skipped: dict = {}
        self.train_examples: list = []
        self.eval_splits: dict[str, list] = {}

    def records(self, out: dict, batch: dict) -> list:
        raise NotImplementedError

    def validation_splits(self) -> list[str]:
        """The splits training evaluates on the way (never a test split: that is scored
        once, at the end, like a paper's number)."""
        return [s for s in self.eval_splits if s != "test"]

    def image_or_stand_in(self, key: str) -> str:
        """``key`` when the shards hold it, else any image of the shards: its pixels are
        masked out (``text_only`` in the batch), so the example is answered from its text."""
        return key if key in self.images else self.images.samples[0].key

    def missing_images_rule(self, mode: str, option: str, split: str, path, missing: list, examples: int) -> dict:
        """An evaluation split whose images are not all in the shards: stop naming them
        (``mode`` "stop"), or count the examples answered from the text alone ("text_only").
        Submission files must answer every example of the file, so none is dropped."""
        if not missing:
            return {"images_missing": 0, "text_only": 0}
        if mode == "stop":
            folders = [str(index.directory) for index in self.images.indexes]
            raise ValueError(
                f"{path}: {len(missing)} image(s) of the {split} split are not in the shards {folders}, "
                f"e.g. {missing[:10]}; the prediction file must answer every example: add the images "
                f"to the shards, or set {option}=text_only to answer their {examples} example(s) from the text alone"
            )
        return {"images_missing": len(missing), "text_only": examples, "example_missing_images": missing[:5]}

    def finish(self, split: str, records: list) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, engine, split: str, loader, to_device, model_tag: str = "", stop=None) -> dict:
        """Predict this rank's share (repeats dropped), gather, score on every rank,
        write the prediction file on rank 0. (``model_tag``: which model, for tasks that
        keep partial results on disk; ``stop``: a callable, true once a stop is requested,
        asked after every batch: raises ``EvaluationStopped``, here with nothing kept.)"""
        engine.eval()
        records, stopped = [], False
        for batch in loader:
            out = engine(to_device(batch))
            keep = (~batch["is_pad"]).tolist()
            records.extend(r for r, k in zip(self.records(out, batch), keep) if k)
            if stop is not None and stop():
                stopped = True
                break
        engine.train()
        if stop_agreed(stop, stopped):
            raise EvaluationStopped(f"{self.name} {split}: nothing kept (predictions are not resumable)")
        return self.finish(split, [r for part in gather_objects(records) for r in part])

    def is_main(self) -> bool:
        return not dist.is_initialized() or dist.get_rank() == 0
