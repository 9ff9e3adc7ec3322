"""The fine-tuning tasks (VQA, NLVR2 here; retrieval in ``retrieval.py``; their base in
``task.py``) and ``make_task``: what each reads, how its batch looks, its metrics and files.

A task reads its official files, drops (and counts) examples whose images are not in
the shards, and gives the trainer: ``train_examples``, ``eval_splits`` (split name ->
examples), ``image_keys`` / ``collate`` for the ``TaskLoader``, ``build_model``, and
``evaluate`` (official metrics + the prediction file). ``skipped`` holds every count
of what was left out and why, for the results file.
"""

from __future__ import annotations

import numpy as np
import torch

from pixelbert_dist.finetune import nlvr2_data, vqa_data
from pixelbert_dist.finetune.config import FinetuneConfig
from pixelbert_dist.finetune.data import KeyedImages, tokenize
from pixelbert_dist.finetune.heads import Nlvr2Model, VqaModel
from pixelbert_dist.finetune.retrieval import RetrievalTask
from pixelbert_dist.finetune.task import Task, load_image_map


# ---------------------------------------------------------------- VQA 2.0
class VqaTask(Task):
    name, main_metric = "vqa", "overall"

    def __init__(self, cfg, tokenizer, images, run_dir):
        super().__init__(cfg, tokenizer, images, run_dir)
        v = cfg.vqa
        if not v.train_questions or not v.train_annotations:
            raise ValueError(
                "VQA needs vqa.train_questions and vqa.train_annotations (--train-questions / --train-annotations)"
            )
        mapping = load_image_map(v.image_map)
        self.key_of = (
            (lambda i: mapping.get(str(i), "")) if mapping is not None else (lambda i: v.key_format.format(image_id=i))
        )
        train = self._read("train", v.train_questions, v.train_annotations, evaluation=False)
        self.vocab = (
            vqa_data.AnswerVocab.load(v.answer_vocab)
            if v.answer_vocab
            else vqa_data.build_answer_vocab(train, v.num_answers)
        )
        self.train_examples, stats = vqa_data.build_targets(train, self.vocab, training=True)
        self.skipped["train_answers"] = stats
        if v.val_questions:
            val = self._read("val", v.val_questions, v.val_annotations, evaluation=True)
            if v.val_annotations:
                self.eval_splits["val"], self.skipped["val_answers"] = vqa_data.build_targets(
                    val, self.vocab, training=False
                )
            else:
                self.eval_splits["val"] = [(ex, None) for ex in val]
        if v.test_questions:
            self.eval_splits["test"] = [
                (ex, None) for ex in self._read("test", v.test_questions, None, evaluation=True)
            ]

    def _read(self, split: str, questions: str, annotations: str | None, evaluation: bool) -> list:
        """The split's questions; training skips (and counts) those without their image,
        evaluation keeps every one (``vqa.missing_images``: stop, or answer from the text)."""
        examples = vqa_data.read_vqa(questions, annotations)
        available = {ex.image_id for ex in examples if self.key_of(ex.image_id) in self.images}
        kept, stats = vqa_data.drop_missing_images(examples, available)
        if examples and not kept:
            v, image_id = self.cfg.vqa, examples[0].image_id
            rule = f"vqa.image_map {v.image_map}" if v.image_map else f"vqa.key_format={v.key_format!r}"
            raise self.images.no_match(questions, self.key_of(image_id), f"{rule} for image_id {image_id}")
        if evaluation:
            missing = sorted({ex.image_id for ex in examples} - available)
            count = len(examples) - len(kept)
            stats = self.missing_images_rule(
                self.cfg.vqa.missing_images, "vqa.missing_images", split, questions, missing, count
            )
            kept = examples
        self.skipped[f"{split}_images"] = stats
        return kept

    def build_model(self, backbone):
        return VqaModel(backbone, len(self.vocab), self.cfg.head_dropout, self.cfg.train.freeze_cnn)

    def image_keys(self, example) -> list[str]:
        return [self.image_or_stand_in(self.key_of(example[0].image_id))]

    def collate(self, examples, generator) -> dict:
        out = tokenize(self.tokenizer, [ex.question for ex, _ in examples], self.max_len)
        text_only = [self.key_of(ex.image_id) not in self.images for ex, _ in examples]
        if any(text_only):
            out["text_only"] = torch.tensor(text_only)
        if all(t is not None for _, t in examples):
            out["targets"] = torch.from_numpy(np.stack([t.dense(len(self.vocab)) for _, t in examples]))
        return out

    def records(self, out, batch) -> list:
        best = out["logits"].argmax(-1).tolist()
        return [(ex.question_id, self.vocab.answers[i]) for (ex, _), i in zip(batch["examples"], best)]

    def finish(self, split, records) -> dict:
        preds = dict(records)
        examples = [ex for ex, _ in self.eval_splits[split]]
        path = self.run_dir / f"vqa_{split}_results.json"
        if self.is_main():
            vqa_data.write_vqa_results(path, preds, [ex.question_id for ex in examples])
        if not all(ex.answers for ex in examples):
            return {"num_questions": len(preds)}
        metrics = vqa_data.evaluate_vqa(preds, examples, self.cfg.vqa.accuracy_rule)
        flat = {
            "overall": metrics["overall"],  # rounded to 2 decimals, as the official script reports it
            "overall_unrounded": metrics["unrounded"]["overall"],
            "num_questions": metrics["num_questions"],
            "accuracy_rule": metrics["rule"],
        }
        flat.update({f"type_{k.replace('/', '_')}": v for k, v in metrics["per_answer_type"].items()})
        return flat


# ---------------------------------------------------------------- NLVR2
class Nlvr2Task(Task):
    name, main_metric, images_per_example = "nlvr2", "accuracy", 2

    def __init__(self, cfg, tokenizer, images, run_dir):
        super().__init__(cfg, tokenizer, images, run_dir)
        n = cfg.nlvr2
        if not n.train:
            raise ValueError("NLVR2 needs nlvr2.train (--train train.json)")
        mapping = load_image_map(n.image_map)
        self.key_of = (
            (lambda name: mapping.get(name, ""))
            if mapping is not None
            else (lambda name: n.key_format.format(name=name))
        )
        self.train_examples = self._read("train", n.train, evaluation=False)
        unlabelled = [ex.identifier for ex in self.train_examples if ex.label is None]
        if unlabelled:
            raise ValueError(f"{n.train}: {len(unlabelled)} line(s) without a label, e.g. {unlabelled[0]}")
        for split, path in (("dev", n.dev), ("test", n.test)):
            if path:
                self.eval_splits[split] = self._read(split, path, evaluation=True)

    def _read(self, split: str, path: str, evaluation: bool) -> list:
        """As VqaTask._read: training skips examples missing an image, evaluation keeps all
        (``nlvr2.missing_images``)."""
        examples = nlvr2_data.read_nlvr2(path)
        names = {k for ex in examples for k in (ex.left_image, ex.right_image)}
        available = {k for k in names if self.key_of(k) in self.images}
        kept, stats = nlvr2_data.drop_missing_images(examples, available)
        if examples and not kept:
            n, name = self.cfg.nlvr2, examples[0].left_image
            rule = f"nlvr2.image_map {n.image_map}" if n.image_map else f"nlvr2.key_format={n.key_format!r}"
            raise self.images.no_match(path, self.key_of(name), f"{rule} for image {name}")
        if evaluation:
            count = len(examples) - len(kept)
            mode = self.cfg.nlvr2.missing_images
            stats = self.missing_images_rule(
                mode, "nlvr2.missing_images", split, path, sorted(names - available), count
            )
            kept = examples
        self.skipped[f"{split}_images"] = stats
        return kept

    def build_model(self, backbone):
        return Nlvr2Model(backbone, self.cfg.head_dropout, self.cfg.train.freeze_cnn)

    def image_keys(self, example) -> list[str]:
        return [self.image_or_stand_in(self.key_of(name)) for name in (example.left_image, example.right_image)]

    def collate(self, examples, generator) -> dict:
        out = tokenize(self.tokenizer, [ex.sentence for ex in examples], self.max_len)
        text_only = [self.key_of(n) not in self.images for ex in examples for n in (ex.left_image, ex.right_image)]
        if any(text_only):
            out["text_only"] = torch.tensor(text_only)  # one flag per image, in the images' order
        if all(ex.label is not None for ex in examples):
            out["labels"] = torch.tensor([int(ex.label) for ex in examples], dtype=torch.long)
        return out

    def records(self, out, batch) -> list:
        return [(ex.identifier, bool(p)) for ex, p in zip(batch["examples"], out["logits"].argmax(-1).tolist())]

    def finish(self, split, records) -> dict:
        preds = dict(records)
        examples = self.eval_splits[split]
        if self.is_main():
            nlvr2_data.write_nlvr2_predictions(self.run_dir / f"nlvr2_{split}_predictions.csv", preds, examples)
        if any(ex.label is None for ex in examples):
            return {"num_examples": len(preds)}
        return nlvr2_data.evaluate_nlvr2(preds, examples)


def make_task(cfg: FinetuneConfig, tokenizer, images: KeyedImages, run_dir) -> Task:
    if cfg.task == "vqa":
        return VqaTask(cfg, tokenizer, images, run_dir)
    if cfg.task == "nlvr2":
        return Nlvr2Task(cfg, tokenizer, images, run_dir)
    return RetrievalTask(cfg, tokenizer, images, run_dir)
