"""Consolidate a DeepSpeed checkpoint into the fine-tuning export folder
(config.json + model.safetensors + tokenizer + the model card README.md), on rank 0, in fp32.

config.json also records what fine-tuning needs to feed the model as pre-training did
(``input_spec``): the preset, the image normalisation and sizes, the text length and the
tokenizer's source."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from pixelbert_dist.checkpoint.choose import find_checkpoint
from pixelbert_dist.config import load_config
from pixelbert_dist.data.decode.images import MEAN_255, PAD_MULTIPLE, STD_255
from pixelbert_dist.model import PixelBert, PixelBertConfig
from pixelbert_dist.train.config import RunConfig
from pixelbert_dist.train.model_card import write_model_card

log = logging.getLogger(__name__)


def consolidated_state_dict(ckpt_dir: str | Path, tag_dir: Path, zero_stage: int, engine=None) -> dict:
    """fp32 weights: ZeRO 1-3 master weights through zero_to_fp32; ZeRO 0 keeps whole
    weights in the module (cast to fp32)."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag_dir.name)


def input_spec(run_cfg: RunConfig) -> dict:
    """The config.json entries that let fine-tuning reproduce pre-training's inputs."""
    data = run_cfg.data
    return {
        "preset": run_cfg.model.preset,
        "preset_overrides": dict(run_cfg.model.overrides),
        "inputs": {
            "image_mean_255": list(MEAN_255),
            "image_std_255": list(STD_255),
            "image_shorter": data.image_shorter,
            "image_max": data.image_max,
            "pad_multiple": PAD_MULTIPLE,
            "max_text_len": data.max_text_len,
            "tokenizer_dir": data.vocab_dir or "the shipped synthetic vocab",
        },
    }


def _saved_run_config(ckpt_dir: Path) -> RunConfig | None:
    """The run's config.yaml beside its checkpoints folder (the Trainer writes it)."""
    path = Path(ckpt_dir).parent / "config.yaml"
    return load_config(RunConfig, path) if path.is_file() else None


def write_export(
    cfg: PixelBertConfig,
    state: dict,
    out_dir: Path,
    tokenizer,
    extra: dict | None = None,
    run_cfg: RunConfig | None = None,
) -> Path:
    """``run_cfg`` (when given) adds ``input_spec`` to config.json."""
    extra = {**(input_spec(run_cfg) if run_cfg is not None else {}), **(extra or {})}
    model = PixelBert(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the tied MLM decoder may be stored under either name; anything else is a real mismatch
    missing = [k for k in missing if k != "mlm_head.decoder.weight"]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = model.save_pretrained(out_dir, tokenizer, extra)
    write_model_card(out, model, run_cfg, extra.get("checkpoint"))
    log.info("export written to %s", out)
    return out


def export_from_engine(
    engine, ckpt_dir: str | Path, out_dir: str | Path, tokenizer, run_cfg: RunConfig | None = None
) -> Path | None:
    """Rank 0 writes the export from the latest checkpoint; the others wait. Without
    ``run_cfg`` the input settings come from the run's config.yaml, where there is one."""
    tag_dir = find_checkpoint(ckpt_dir, "auto", verify=False)  # written by this run a moment ago
    if tag_dir is None:
        raise RuntimeError(f"no checkpoint in {ckpt_dir} to export")
    out = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        with torch.no_grad():
            state = consolidated_state_dict(ckpt_dir, tag_dir, engine.zero_optimization_stage(), engine)
        run_cfg = run_cfg if run_cfg is not None else _saved_run_config(Path(ckpt_dir))
        out = write_export(engine.module.config, state, Path(out_dir), tokenizer, {"checkpoint": str(tag_dir)}, run_cfg)
    if dist.is_initialized():
        dist.barrier()
    return out
