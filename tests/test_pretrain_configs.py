"""The shipped real-size pre-training configs load, validate, build their model on the meta
device, fill the DeepSpeed JSON, and hold the paper's numbers (Pixel-BERT, arXiv 2004.00849,
section 4.1: "Implementation Details")."""

from __future__ import annotations

from pathlib import Path

import pytest

from pixelbert_dist.config import ConfigError, load_config
from pixelbert_dist.distributed.ds_config import fill_deepspeed_config
from pixelbert_dist.model import build_model
from pixelbert_dist.model.presets import preset_config
from pixelbert_dist.train.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
PAPER_GPUS, PAPER_BATCH = 64, 4096
# model -> (preset, CNN, shorter side, longer side)
PAPER = {"r50": ("pixelbert-r50", "resnet50", 800, 1333), "x152": ("pixelbert-x152", "resnext152_32x8d", 600, 1000)}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_pretrain_config_is_the_papers_recipe(name):
    path = REPO / "launch" / "configs" / f"pretrain_{name}.yaml"
    cfg = load_config(RunConfig, path).validate()
    preset, backbone, shorter, longer = PAPER[name]
    model_cfg = preset_config(cfg.model.preset, **cfg.model.overrides)
    assert (cfg.model.preset, model_cfg.backbone) == (preset, backbone)
    assert (model_cfg.num_layers, model_cfg.hidden_size, model_cfg.num_heads) == (12, 768, 12)
    assert model_cfg.pixel_sample_size == 100
    assert (cfg.data.image_shorter, cfg.data.image_max) == (shorter, longer)
    o = cfg.optim
    assert (o.cnn_rule, o.cnn_lr, o.cnn_weight_decay) == ("sgd", 1e-2, 5e-4)
    assert (o.lr, o.weight_decay) == (1e-4, 1e-2)
    s = cfg.schedule
    assert (s.kind, list(s.milestones_epochs), s.gamma, cfg.train.epochs) == ("step", [25, 35], 0.1, 40)
    ds = fill_deepspeed_config(
        REPO / "deepspeed_configs" / "zero2.json",
        micro_batch=cfg.train.micro_batch,
        grad_accum=cfg.train.accumulation(PAPER_GPUS),
        world_size=PAPER_GPUS,
        grad_clip=cfg.train.grad_clip,
    )
    assert ds["train_batch_size"] == PAPER_BATCH
    assert cfg.model.bert_dir == cfg.data.vocab_dir, "BERT's own vocab goes with its weights"
    model = build_model(cfg.model.preset, device="meta", **cfg.model.overrides)
    assert sum(p.numel() for p in model.parameters()) > 100e6


# (GPUs, config) -> (micro_batch, grad_accum): the paper's 4096 pairs per step on any cluster
ARITHMETIC = {
    (8, "r50"): (16, 32),
    (64, "r50"): (16, 4),
    (512, "r50"): (8, 1),
    (8, "x152"): (8, 64),
    (64, "x152"): (8, 8),
    (512, "x152"): (8, 1),
}


@pytest.mark.parametrize(("gpus", "name"), sorted(ARITHMETIC))
def test_global_batch_holds_at_8_64_and_512_gpus(gpus, name):
    cfg = load_config(RunConfig, REPO / "launch" / "configs" / f"pretrain_{name}.yaml").validate()
    micro, accum = ARITHMETIC[gpus, name]
    if cfg.train.micro_batch != micro:
        with pytest.raises(ConfigError, match=f"train.micro_batch={micro} fits"):
            cfg.train.accumulation(gpus)
        cfg.train.micro_batch = micro
    assert cfg.train.accumulation(gpus) == accum
    assert micro * accum * gpus == PAPER_BATCH


def test_global_batch_and_grad_accum_are_one_source_of_truth():
    cfg = load_config(RunConfig, REPO / "launch" / "configs" / "pretrain_r50.yaml").validate()
    cfg.train.grad_accum = 2
    with pytest.raises(ConfigError, match="gives grad_accum 4 on 64 ranks, but train.grad_accum=2"):
        cfg.train.accumulation(64)
    with pytest.raises(ConfigError, match="not a multiple"):
        cfg.train.accumulation(3)
