"""Consolidate a DeepSpeed checkpoint into the fine-tuning export folder
(config.json + model.safetensors + tokenizer), on rank 0, in fp32."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from pixelbert_dist.checkpoint import find_checkpoint
from pixelbert_dist.model import PixelBert, PixelBertConfig

log = logging.getLogger(__name__)


def consolidated_state_dict(ckpt_dir: str | Path, tag_dir: Path, zero_stage: int, engine=None) -> dict:
    """fp32 weights: ZeRO 1-3 master weights through zero_to_fp32; ZeRO 0 keeps whole
    weights in the module (cast to fp32)."""
    if zero_stage == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag_dir.name)


def write_export(cfg: PixelBertConfig, state: dict, out_dir: Path, tokenizer, extra: dict | None = None) -> Path:
    model = PixelBert(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # the tied MLM decoder may be stored under either name; anything else is a real mismatch
    missing = [k for k in missing if k != "mlm_head.decoder.weight"]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    out = model.save_pretrained(out_dir, tokenizer, extra)
    log.info("export written to %s", out)
    return out


def export_from_engine(engine, ckpt_dir: str | Path, out_dir: str | Path, tokenizer) -> Path | None:
    """Rank 0 writes the export from the latest checkpoint; the others wait."""
    tag_dir = find_checkpoint(ckpt_dir, "auto", verify=False)  # written by this run a moment ago
    if tag_dir is None:
        raise RuntimeError(f"no checkpoint in {ckpt_dir} to export")
    out = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        with torch.no_grad():
            state = consolidated_state_dict(ckpt_dir, tag_dir, engine.zero_optimization_stage(), engine)
        out = write_export(engine.module.config, state, Path(out_dir), tokenizer, {"checkpoint": str(tag_dir)})
    if dist.is_initialized():
        dist.barrier()
    return out
