"""``launch/export.py`` and ``pixelbert-export``: a pre-training checkpoint -> an export folder.

The arguments are parsed before torch and DeepSpeed load (pixelbert_dist.train.export
does the work), so ``--help`` answers at once."""

from __future__ import annotations

import argparse
from pathlib import Path

EXPORT_USAGE = """python launch/export.py RUN_DIR [--tag step_00001000] [--out DIR]

Consolidate a pre-training checkpoint (any ZeRO stage 1-3) into a fine-tuning export
folder (config.json, model.safetensors, tokenizer) on this machine, without DeepSpeed
engines or GPUs."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=EXPORT_USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--tag", default="auto", help="checkpoint tag (default: latest)")
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/export")
    return parser.parse_args(argv)


def chosen_checkpoint(ckpt_dir: Path, tag: str) -> tuple[Path, int]:
    """The checkpoint folder ``--tag`` names (the latest for auto) and its ZeRO stage, or
    SystemExit with what is there and what to pass instead."""
    from pixelbert_dist.checkpoint.choose import find_checkpoint
    from pixelbert_dist.checkpoint.files import CheckpointError, read_meta
    from pixelbert_dist.checkpoint.layout import list_tags

    if tag not in ("auto", "latest") and not (ckpt_dir / tag).is_dir() and not Path(tag).is_dir():
        tags = ", ".join(list_tags(ckpt_dir)) or "none"
        raise SystemExit(
            f"no checkpoint {tag} in {ckpt_dir}; the checkpoints there: {tags} (train.keep_last "
            "keeps only the newest). Pass --tag with one of them, or no --tag for the latest."
        )
    try:
        tag_dir = find_checkpoint(ckpt_dir, tag)  # sizes and sha256 checked against meta.json
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
    return tag_dir, stage


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pixelbert_dist.config import load_config
    from pixelbert_dist.data.text import load_tokenizer
    from pixelbert_dist.model.presets import preset_config
    from pixelbert_dist.train.config import RunConfig
    from pixelbert_dist.train.export import consolidated_state_dict, write_export

    cfg = load_config(RunConfig, args.run_dir / "config.yaml")
    ckpt_dir = args.run_dir / "checkpoints"
    tag_dir, stage = chosen_checkpoint(ckpt_dir, args.tag)
    state = consolidated_state_dict(ckpt_dir, tag_dir, stage)
    out = write_export(
        preset_config(cfg.model.preset, **cfg.model.overrides),
        state,
        args.out or args.run_dir / "export",
        load_tokenizer(cfg.data.vocab_dir),
        {"checkpoint": str(tag_dir)},
        cfg,
    )
    print(out)
    return 0
