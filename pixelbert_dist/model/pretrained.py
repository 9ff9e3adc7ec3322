"""The fine-tuning hand-off: a folder with config.json, model.safetensors and the
tokenizer files, loadable with no DeepSpeed and no pickle."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from .config import PixelBertConfig
from .pixelbert import PixelBert

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_pretrained(model: PixelBert, out_dir: str | Path, tokenizer=None, extra: dict | None = None) -> Path:
    """Write fp32 weights (safetensors handles the tied MLM decoder), the config and the tokenizer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"architecture": "PixelBert", "config": dataclasses.asdict(model.config), **(extra or {})}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_model(model.float(), str(out / WEIGHTS_NAME))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        # vocab.txt too (transformers 5 writes only tokenizer.json): BERT readers expect it
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        (out / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab))
    return out


def read_pretrained_config(folder: str | Path) -> PixelBertConfig:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {folder} is not a pixelbert_dist export folder")
    data = json.loads(path.read_text())
    if data.get("architecture") != "PixelBert" or "config" not in data:
        raise ValueError(f"{path} does not describe a PixelBert export (architecture="
                         f"{data.get('architecture')!r})")
    return PixelBertConfig(**data["config"])


def from_pretrained(folder: str | Path, map_location: str | torch.device = "cpu", **overrides) -> PixelBert:
    """Rebuild the exported model; ``overrides`` change execution settings such as
    pixel_sample_size or attn_implementation (shapes must match the weights)."""
    cfg = read_pretrained_config(folder).replace(**overrides)
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    model = PixelBert(cfg)
    try:
        load_model(model, str(weights), strict=True, device=str(map_location))
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the model its config.json describes: {err}") from None
    return model.to(map_location)
