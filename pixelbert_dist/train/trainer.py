"""The pre-training Trainer: Pixel-BERT with MLM + ITM on image-caption shards, on the
shared loop (``train.loop.BaseTrainer``): the model from a preset (plus BERT / CNN /
visual weights), the shard loaders, ITM / MLM / R@1 evaluation and the export."""

from __future__ import annotations

import dataclasses


from pixelbert_dist.config import ConfigError
from pixelbert_dist.data.loader import build_loader
from pixelbert_dist.data.text import load_tokenizer
from pixelbert_dist.model import (
    PixelBert,
    build_model,
    load_bert_checkpoint,
    load_torchvision_backbone,
    load_visual_weights,
)
from pixelbert_dist.model.flops import training_flops_analytic
from pixelbert_dist.train.config import ModelSection
from pixelbert_dist.train.evaluate import batch_metrics, evaluate, metric_values
from pixelbert_dist.train.export import export_from_engine
from pixelbert_dist.train.loop import BaseTrainer
from pixelbert_dist.train.optim import build_optimizer

__all__ = ["Trainer", "build_run_model", "freeze_prefixes"]


def build_run_model(section: ModelSection, vocab_size: int | None = None) -> PixelBert:
    model = build_model(section.preset, **section.overrides)
    if vocab_size is not None and vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"the tokenizer has {vocab_size} tokens but model preset {section.preset!r} has "
            f"vocab_size={model.config.vocab_size}: set model.overrides.vocab_size or data.vocab_dir"
        )
    if section.bert_dir:  # each loader logs what it loaded (once)
        load_bert_checkpoint(model, section.bert_dir)
    if section.cnn_weights:
        load_torchvision_backbone(model, section.cnn_weights)
    if section.visual_weights:
        load_visual_weights(model, section.visual_weights)
    freeze_prefixes(model, section.freeze)
    return model


def freeze_prefixes(model: PixelBert, prefixes: list[str]) -> None:
    """requires_grad=False for every parameter under the prefixes (the optimiser then
    leaves them out, and ZeRO neither reduces nor stores state for them)."""
    for prefix in prefixes:
        hits = [p for name, p in model.named_parameters() if name.startswith(prefix)]
        if not hits:
            raise ConfigError(f"model.freeze: no parameter name starts with {prefix!r}")
        for param in hits:
            param.requires_grad_(False)


class Trainer(BaseTrainer):
    """Pre-training: ``Trainer(run_config, deepspeed_json).fit()`` -> the last validation metrics."""

    name = "pretrain"
    postfix_keys = ("loss", "itm_acc")

    def build_model(self) -> PixelBert:
        self.tokenizer = load_tokenizer(self.cfg.data.vocab_dir)
        return build_run_model(self.cfg.model, len(self.tokenizer))

    def build_loaders(self):
        cfg, micro = self.cfg, self.cfg.train.micro_batch
        train_loader = build_loader(
            cfg.data,
            cfg.data.train_shards,
            micro,
            self.rank,
            self.world,
            self.device,
            train=True,
            tokenizer=self.tokenizer,
        )
        self.val_loader = self.probe_loader = None
        if cfg.data.val_shards:
            # Validation keeps MLM masking and ITM negatives (seeded, so every evaluation
            # sees the same draws) but no shuffle or flip; repeats are flagged is_pad.
            val_cfg = dataclasses.replace(cfg.data, shuffle=False, hflip=False, drop_last=False)
            self.val_loader = build_loader(
                val_cfg,
                cfg.data.val_shards,
                micro,
                self.rank,
                self.world,
                self.device,
                train=True,
                tokenizer=self.tokenizer,
            )
            if cfg.train.retrieval_size:
                self.probe_loader = build_loader(
                    val_cfg,
                    cfg.data.val_shards,
                    cfg.train.retrieval_size,
                    0,
                    1,
                    self.device,
                    train=False,
                    tokenizer=self.tokenizer,
                )
        return train_loader

    def build_optimizer(self, model):
        return build_optimizer(model, self.cfg.optim)

    def train_samples(self) -> int | None:
        index = getattr(self.train_loader, "index", None)  # streamed shards have none
        return len(index) if index is not None else self.cfg.data.epoch_samples or None

    def batch_sums(self, out: dict, batch: dict) -> dict:
        return batch_metrics(out, batch)

    def window_values(self, totals: dict) -> dict:
        return metric_values(totals)

    def samples_in(self, batch: dict) -> int:
        return len(batch["keys"])

    def flops_shape(self, batch: dict) -> tuple:
        return (len(batch["keys"]), *batch["images"].shape[-2:], batch["input_ids"].shape[1])

    def shape_flops(self, size: int, height: int, width: int, text_len: int) -> float:
        """The padded image and text this batch really has, and the pixels sampled from it."""
        return size * training_flops_analytic(self.engine.module.config, (height, width), text_len)

    def evaluate(self) -> dict:
        if self.val_loader is None:
            return {}
        values = evaluate(self.engine, self.val_loader, self.probe_loader, self.to_device, self.cfg.train.eval_batches)
        self.logger.log(self.state["step"], "val", values)
        self.last_val = {**values, "step": self.state["step"]}
        return values

    def evaluate_during(self) -> None:
        self.evaluate()

    def finish(self) -> dict:
        if self.last_val.get("step") != self.state["step"]:
            self.evaluate()  # the final model, whatever the eval period
        if self.cfg.train.export:
            export_from_engine(self.engine, self.ckpt_dir, self.run_dir / "export", self.tokenizer)
        return self.last_val

    def outputs(self) -> dict:
        return {**super().outputs(), "export": self.run_dir / "export"}

    def stopped(self) -> dict:
        return self.last_val
