"""FinetuneConfig: one fine-tuning run (VQA, NLVR2 or retrieval) from a pre-training export.

Composed like the pre-training RunConfig: the optimiser and schedule sections are the
pre-training ones (SGD for the CNN, AdamW for the transformer), the image settings are
the data loader's, and each task owns a section with its official data files. A launch
script fills the task section from its command line; YAML and key=value overrides work
as everywhere else (``pixelbert_dist.config.load_config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pixelbert_dist.train.config import LoopConfig, OptimConfig, ScheduleConfig


@dataclass
class FinetuneData:
    shards: list[str] = field(default_factory=list)  # shard split folders holding the images
    backend: Literal["dali", "nvjpeg", "pil"] = "dali"  # nvjpeg: GPU decode
    image_shorter: int = 800  # fine-tuning sees all valid pixels at this size
    image_max: int = 1333
    max_text_len: int = 40
    num_workers: int = 2
    prefetch: int = 2
    vocab_dir: str | None = None  # None: the export's own tokenizer files

    def validate(self) -> "FinetuneData":
        if not self.shards:
            raise ValueError(
                "data.shards is empty: name the shard folder(s) that hold the task's images (--shards DIR [DIR ...])"
            )
        if self.image_shorter < 1 or self.image_max < self.image_shorter:
            raise ValueError(
                f"data.image_shorter={self.image_shorter} / data.image_max={self.image_max}: "
                "need 1 <= image_shorter <= image_max"
            )
        return self


@dataclass
class FinetuneTrain(LoopConfig):
    """The loop's settings (``LoopConfig``) with fine-tuning's defaults, and its own few."""

    micro_batch: int = 32  # examples per GPU (NLVR2: 2 images each)
    epochs: float = 10.0
    keep_last: int = 2
    eval_batch: int = 0  # 0: micro_batch
    shuffle: bool = True
    freeze_cnn: bool = False  # keep the CNN (and its BatchNorm statistics) fixed
    head_lr_mult: float = 10.0  # the new head starts from scratch: a larger lr

    def validate(self) -> "FinetuneTrain":
        super().validate()
        if self.eval_batch < 0:
            raise ValueError(f"train.eval_batch={self.eval_batch} must be >= 0")
        return self


@dataclass
class VqaSection:
    train_questions: str | None = None  # v2_OpenEnded_mscoco_train2014_questions.json
    train_annotations: str | None = None
    val_questions: str | None = None
    val_annotations: str | None = None  # without it the val split is only predicted
    test_questions: str | None = None  # predicted into the submission file
    image_map: str | None = None  # JSON {image_id: shard key}; else key_format
    key_format: str = "coco{image_id}"  # the COCO builder's keys
    num_answers: int = 3129
    answer_vocab: str | None = None  # a saved AnswerVocab; else built from train


@dataclass
class Nlvr2Section:
    train: str | None = None  # train.json (official jsonl)
    dev: str | None = None
    test: str | None = None  # test1.json (test-P)
    image_map: str | None = None  # JSON {"dev-850-0-img0": shard key}; else key_format
    key_format: str = "{name}"


@dataclass
class RetrievalSection:
    karpathy: str | None = None  # dataset_coco.json / dataset_flickr30k.json
    train_splits: list[str] = field(default_factory=lambda: ["train", "restval"])
    eval_split: str = "test"
    key_format: str = "{dataset}{image_id}"  # make_shards' keys (coco391895); also {stem}, {filename}
    num_negatives: int = 20  # random negative captions per pair (the paper)
    hard_negatives: int = 5  # of those, the hardest go through backprop
    rank_weight: float = 1.0  # softmax over (positive, hardest) match scores
    itm_weight: float = 1.0  # binary ITM cross-entropy on the same rows
    text_batch: int = 256  # captions per transformer call in evaluation
    max_eval_images: int = 0  # 0: the whole split (1K Flickr test / 5K COCO)


@dataclass
class FinetuneConfig:
    task: Literal["vqa", "nlvr2", "retrieval"] = "vqa"
    run_dir: str = "runs/finetune"
    pretrained: str = ""  # the pre-training export folder
    preset: str | None = None  # if set, the export must have this preset's architecture
    head_dropout: float = 0.1
    data: FinetuneData = field(default_factory=FinetuneData)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(cnn_lr=1e-3, lr=5e-5))
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(kind="cosine", milestones_epochs=[]))
    train: FinetuneTrain = field(default_factory=FinetuneTrain)
    vqa: VqaSection = field(default_factory=VqaSection)
    nlvr2: Nlvr2Section = field(default_factory=Nlvr2Section)
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)

    def validate(self) -> "FinetuneConfig":
        if not self.pretrained:
            raise ValueError("pretrained is empty: pass --pretrained EXPORT_DIR (a pre-training run's export/ folder)")
        self.train.validate()
        r = self.retrieval
        if self.task == "retrieval" and not 1 <= r.hard_negatives <= r.num_negatives:
            raise ValueError(
                f"retrieval.hard_negatives={r.hard_negatives} must lie in "
                f"[1, retrieval.num_negatives={r.num_negatives}]"
            )
        self.data.validate()
        return self
