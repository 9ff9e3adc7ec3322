"""FinetuneConfig: one fine-tuning run (VQA, NLVR2 or retrieval) from a pre-training export.

Composed like the pre-training RunConfig: the optimiser and schedule sections are the
pre-training ones (SGD for the CNN, AdamW for the transformer), the image settings are
the data loader's, and each task owns a section with its official data files. A launch
script fills the task section from its command line; YAML and key=value overrides work
as everywhere else (``pixelbert_dist.config.load_config``). Each field carries its help
and bounds (``Help``, ``Ge``...), as in the pre-training config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Interval

from pixelbert_dist.config import ConfigError, Help, check_fields
from pixelbert_dist.data.config import Backend
from pixelbert_dist.train.config import LoopConfig, OptimConfig, ScheduleConfig

UNVERIFIED_HELP = (
    "load an export whose config.json records no checksums (exported before they were written) "
    "without verifying its weights; otherwise it is refused (allow_unverified_weights=true)"
)

# retrieval.rerank_k: R@10 is decided among the re-ranked candidates only with >= 10 of them
MIN_RERANK_K = 10


@dataclass
class FinetuneData:
    shards: Annotated[list[str], Help("shard split folders holding the task's images")] = field(default_factory=list)
    backend: Annotated[Backend, Help("image decoding: DALI, nvjpeg on the GPU, or PIL in DataLoader workers")] = "dali"
    image_shorter: Annotated[int, Help("shorter image side (all valid pixels are seen at this size)"), Ge(1)] = 800
    image_max: Annotated[int, Help("cap on the longer side; >= data.image_shorter"), Ge(1)] = 1333
    max_text_len: Annotated[int, Help("questions / captions are cut to this many tokens"), Ge(3)] = 40
    num_workers: Annotated[int, Help("PIL worker processes / DALI threads"), Ge(0)] = 2
    prefetch: Annotated[int, Help("batches prefetched per worker (PIL) / queue depth (DALI)"), Ge(1)] = 2
    vocab_dir: Annotated[str | None, Help("tokenizer folder; null: the export's own tokenizer files")] = None

    def validate(self) -> "FinetuneData":
        check_fields(self, "data.")
        if not self.shards:
            raise ConfigError(
                "data.shards is empty: name the shard folder(s) that hold the task's images (--shards DIR [DIR ...])"
            )
        if self.image_max < self.image_shorter:
            raise ConfigError(
                f"data.image_shorter={self.image_shorter} / data.image_max={self.image_max}: "
                "need image_shorter <= image_max"
            )
        return self


@dataclass
class FinetuneTrain(LoopConfig):
    """The loop's settings (``LoopConfig``) with fine-tuning's defaults, and its own few.
    A default changed here repeats the whole ``Annotated`` (help and bounds included)."""

    micro_batch: Annotated[int, Help("examples per GPU and micro-batch (NLVR2: 2 images each)"), Ge(1)] = 32
    epochs: Annotated[float, Help("passes over the training split (fractions allowed)"), Ge(0)] = 10.0
    # the validation split (VQA val, NLVR2 dev, retrieval val) on the way; test: once, at the end
    eval_every: Annotated[int, Help("validation every N optimiser steps; 0: off (see eval_minutes)"), Ge(0)] = 0
    eval_minutes: Annotated[float, Help("validation every N minutes, checked at log steps; 0: off"), Ge(0)] = 30.0
    keep_last: Annotated[int, Help("checkpoints kept on disk; 0: all"), Ge(0)] = 2
    eval_batch: Annotated[int, Help("examples per GPU in evaluation; 0: train.micro_batch"), Ge(0)] = 0
    shuffle: Annotated[bool, Help("shuffle the training examples every epoch")] = True
    freeze_cnn: Annotated[bool, Help("keep the CNN (and its BatchNorm statistics) fixed")] = False
    head_lr_mult: Annotated[float, Help("the new head's lr over optim.lr (it starts from scratch)"), Gt(0)] = 10.0


@dataclass
class VqaSection:
    train_questions: Annotated[
        str | None, Help("the train split's questions: v2_OpenEnded_mscoco_train2014_questions.json")
    ] = None
    train_annotations: Annotated[
        str | None, Help("the train split's answers: v2_mscoco_train2014_annotations.json")
    ] = None
    val_questions: Annotated[str | None, Help("the val split's questions JSON")] = None
    val_annotations: Annotated[str | None, Help("the val split's annotations; without them val is only predicted")] = (
        None
    )
    test_questions: Annotated[str | None, Help("test questions, predicted into the submission file")] = None
    image_map: Annotated[str | None, Help("JSON {image_id: shard key}; null: vqa.key_format")] = None
    key_format: Annotated[str, Help("shard key of an image_id (the COCO builder's keys)")] = "coco{image_id}"
    num_answers: Annotated[int, Help("answer vocabulary size (the most frequent train answers)"), Ge(1)] = 3129
    answer_vocab: Annotated[str | None, Help("a saved AnswerVocab; null: built from train")] = None
    accuracy_rule: Annotated[
        Literal["official", "legacy-2016"],
        Help("official: vqaEval.py master since 2021; legacy-2016: the file before that fix (older papers)"),
    ] = "official"
    missing_images: Annotated[
        Literal["stop", "text_only"],
        Help("a val/test question without its image: stop naming them, or answer from the text (counted)"),
    ] = "stop"


@dataclass
class Nlvr2Section:
    train: Annotated[str | None, Help("NLVR2 train.json (official jsonl)")] = None
    dev: Annotated[str | None, Help("NLVR2 dev.json")] = None
    test: Annotated[str | None, Help("NLVR2 test1.json (test-P)")] = None
    image_map: Annotated[str | None, Help('JSON {"dev-850-0-img0": shard key}; null: nlvr2.key_format')] = None
    key_format: Annotated[str, Help("shard key of an NLVR2 image name ({name})")] = "{name}"
    missing_images: Annotated[
        Literal["stop", "text_only"], Help("a dev/test example without its images: as vqa.missing_images")
    ] = "stop"


@dataclass
class RetrievalSection:
    karpathy: Annotated[str | None, Help("Karpathy split file: dataset_coco.json / dataset_flickr30k.json")] = None
    train_splits: Annotated[list[str], Help("Karpathy splits trained on")] = field(
        default_factory=lambda: ["train", "restval"]
    )
    eval_split: Annotated[str, Help("the Karpathy split evaluated once, at the end")] = "test"
    val_split: Annotated[str, Help("the Karpathy split evaluated during training; '': none")] = "val"
    key_format: Annotated[
        str, Help("shard key of an image: {dataset}{image_id} (make_shards' keys), {stem} or {filename}")
    ] = "{dataset}{image_id}"
    num_negatives: Annotated[int, Help("random negative captions per pair (the paper: 20)"), Ge(1)] = 20
    hard_negatives: Annotated[
        int, Help("of those, the hardest that go through backprop; <= retrieval.num_negatives"), Ge(1)
    ] = 5
    rank_weight: Annotated[float, Help("weight of the softmax over (positive, hardest) match scores"), Ge(0)] = 1.0
    itm_weight: Annotated[float, Help("weight of the binary ITM cross-entropy on the same rows"), Ge(0)] = 1.0
    text_batch: Annotated[int, Help("captions per transformer call in evaluation"), Ge(1)] = 256
    max_eval_images: Annotated[int, Help("0: the whole split (1K Flickr test / 5K COCO)"), Ge(0)] = 0
    rerank_k: Annotated[
        int,
        Help(
            "two-stage evaluation: a first stage picks each query's k best candidates, the full "
            "model re-ranks them; 0: score every pair in full; else >= 10 (R@10)"
        ),
        Ge(0),
    ] = 0
    rerank_pixels: Annotated[
        int, Help("feature pixels per image in the first stage of retrieval.rerank_k (evenly spaced)"), Ge(1)
    ] = 16


@dataclass
class FinetuneConfig:
    task: Annotated[Literal["vqa", "nlvr2", "retrieval"], Help("the task (set by the launch script)")] = "vqa"
    run_dir: Annotated[str, Help("the run's folder: config, checkpoints, logs, predictions")] = "runs/finetune"
    pretrained: Annotated[str, Help("the pre-training export folder (config.json, model.safetensors)")] = ""
    preset: Annotated[str | None, Help("if set, the export must have this preset's architecture")] = None
    allow_unverified_weights: Annotated[
        bool, Help("load an export without checksums, unverified (--allow-unverified-weights)")
    ] = False
    head_dropout: Annotated[float, Help("dropout before the task head"), Interval(ge=0, lt=1)] = 0.1
    data: FinetuneData = field(default_factory=FinetuneData)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(cnn_lr=1e-3, lr=5e-5))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="cosine", milestones_epochs=[]))
    train: FinetuneTrain = field(default_factory=FinetuneTrain)
    vqa: VqaSection = field(default_factory=VqaSection)
    nlvr2: Nlvr2Section = field(default_factory=Nlvr2Section)
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)

    def validate(self) -> "FinetuneConfig":
        if not self.pretrained:
            raise ConfigError("pretrained is empty: pass --pretrained EXPORT_DIR (a pre-training run's export/ folder)")
        check_fields(self)
        self.train.validate()
        r = self.retrieval
        if self.task == "retrieval" and not r.hard_negatives <= r.num_negatives:
            raise ConfigError(
                f"retrieval.hard_negatives={r.hard_negatives} must lie in "
                f"[1, retrieval.num_negatives={r.num_negatives}]"
            )
        if 0 < r.rerank_k < MIN_RERANK_K:
            raise ConfigError(
                f"retrieval.rerank_k={r.rerank_k}: 0 (off) or at least {MIN_RERANK_K}, so that R@10 is "
                "decided among re-ranked candidates"
            )
        self.data.validate()
        return self
