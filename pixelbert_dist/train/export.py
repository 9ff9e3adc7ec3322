"""Consolidate a DeepSpeed checkpoint into the fine-tuning export folder
(config.json + model.safetensors + tokenizer), on rank 0, in fp32.

config.json also records what fine-tuning needs to feed the model as pre-training did
(``input_spec``): the preset, the image normalisation and sizes, the text length and the
tokenizer's source."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from pixelbert_dist.checkpoint import CheckpointError, find_checkpoint, list_tags, read_meta
from pixelbert_dist.config import load_config
from pixelbert_dist.data.decode.images import MEAN_255, PAD_MULTIPLE, STD_255
from pixelbert_dist.data.text import load_tokenizer
from pixelbert_dist.model import PixelBert, PixelBertConfig, preset_config
from pixelbert_dist.train.config import RunConfig

log = logging.getLogger(__name__)
EXPORT_USAGE = """python launch/export.py RUN_DIR [--tag step_00001000] [--out DIR]

Consolidate a pre-training checkpoint (any ZeRO stage 1-3) into a fine-tuning export
folder (config.json, model.safetensors, tokenizer) on this machine, without DeepSpeed
engines or GPUs."""


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


def main(argv: list[str] | None = None) -> int:
    """``launch/export.py`` / ``pixelbert-export``: a checkpoint -> an export folder."""
    parser = argparse.ArgumentParser(description=EXPORT_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tag", default="auto", help="checkpoint tag (default: latest)")
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/export")
    args = parser.parse_args(argv)
    cfg = load_config(RunConfig, args.run_dir / "config.yaml")
    ckpt_dir = args.run_dir / "checkpoints"
    if args.tag not in ("auto", "latest") and not (ckpt_dir / args.tag).is_dir() and not Path(args.tag).is_dir():
        tags = ", ".join(list_tags(ckpt_dir)) or "none"
        raise SystemExit(
            f"no checkpoint {args.tag} in {ckpt_dir}; the checkpoints there: {tags} (train.keep_last "
            "keeps only the newest). Pass --tag with one of them, or no --tag for the latest."
        )
    try:
        tag_dir = find_checkpoint(ckpt_dir, args.tag)  # sizes and sha256 checked against meta.json
    except CheckpointError as err:
        raise SystemExit(str(err)) from None
    if tag_dir is None:
        raise SystemExit(f"no checkpoint in {ckpt_dir}")
    stage = read_meta(tag_dir)["zero_stage"]
    if stage == 0:
        raise SystemExit(
            f"{tag_dir} is a ZeRO-0 checkpoint, which zero_to_fp32 cannot read: a ZeRO-0 run "
            "writes its export at the end of training (train.export=true)"
        )
    model_cfg = preset_config(cfg.model.preset, **cfg.model.overrides)
    state = consolidated_state_dict(ckpt_dir, tag_dir, stage)
    out = write_export(
        model_cfg,
        state,
        args.out or args.run_dir / "export",
        load_tokenizer(cfg.data.vocab_dir),
        {"checkpoint": str(tag_dir)},
        cfg,
    )
    print(out)
    return 0
