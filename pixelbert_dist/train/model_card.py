"""The model card of a pre-training export: ``README.md`` in the export folder, as the
Hugging Face Hub shows it (YAML front matter, then Markdown): the preset, the data, the
steps, the final metrics (from the run's ``metrics.jsonl``), how to load it, the licence."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pixelbert_dist.checkpoint.files import CheckpointError, read_meta
from pixelbert_dist.model.pretrained import FILE_MODE
from pixelbert_dist.train.config import RunConfig

CARD_NAME = "README.md"
FRONT_MATTER = """---
license: apache-2.0
library_name: pixelbert_dist
pipeline_tag: feature-extraction
tags:
- pixel-bert
- vision-language
- image-text-matching
---
"""


def final_metrics(run_dir: Path, step: int) -> dict[str, tuple[int, dict]]:
    """{split: (step, values)}: each split's last row at or before ``step`` in metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    out: dict[str, tuple[int, dict]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else None
        if row and row["step"] <= step:
            values = {k: v for k, v in row.items() if k not in ("step", "split", "time")}
            out[row["split"]] = (row["step"], values)
    return out


def _metrics_table(metrics: dict[str, tuple[int, dict]], keys: tuple[str, ...]) -> list[str]:
    lines = ["| split | step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for split, (step, values) in metrics.items():
        shown = [f"{values[k]:.4g}" if k in values else "-" for k in keys]
        lines.append(f"| {split} | {step} | " + " | ".join(shown) + " |")
    return lines


def model_card(model_cfg, num_parameters: int, run_cfg: RunConfig | None, step: int | None, metrics: dict) -> str:
    preset = run_cfg.model.preset if run_cfg else "(no run config)"
    rows = [
        ("preset", f"`{preset}`: {model_cfg.backbone} CNN, {model_cfg.num_layers} layers x {model_cfg.hidden_size}"),
        ("parameters", f"{num_parameters / 1e6:.1f} M"),
        ("optimiser steps", str(step) if step is not None else "unknown"),
    ]
    if run_cfg is not None:
        m, d, t = run_cfg.model, run_cfg.data, run_cfg.train
        start = ", ".join(f"{k} `{v}`" for k, v in (("BERT", m.bert_dir), ("CNN", m.cnn_weights)) if v) or "random init"
        rows += [
            ("initialised from", start),
            ("training data", f"`{d.train_shards}` (validation: `{d.val_shards}`)"),
            ("images", f"shorter side {d.image_shorter}, longer at most {d.image_max}"),
            ("batch", f"{t.global_batch} per step" if t.global_batch else f"{t.micro_batch} x {t.grad_accum} per rank"),
        ]
    keys = ("loss", "mlm_loss", "itm_loss", "mlm_acc", "itm_acc", "i2t_r1", "t2i_r1")
    return "\n".join(
        [
            FRONT_MATTER,
            f"# Pixel-BERT `{preset}`, pre-trained with pixelbert_dist",
            "",
            "Pixel-BERT (Huang et al., 2020, arXiv:2004.00849): a CNN reads the image's pixels and a",
            "BERT-style transformer reads the caption and the pixel features together; pre-trained",
            "with masked language modelling (MLM) and image-text matching (ITM).",
            "",
            "| | |",
            "|---|---|",
            *(f"| {name} | {value} |" for name, value in rows),
            "",
            "## Final metrics",
            "",
            *(_metrics_table(metrics, keys) if metrics else ["No metrics were logged before this checkpoint."]),
            "",
            "## How to load",
            "",
            "```python",
            "from pixelbert_dist.model import PixelBert",
            "",
            'model = PixelBert.from_pretrained("THIS_FOLDER")  # or a Hub repo id, "owner/name"',
            "```",
            "",
            "Fine-tune it: `python launch/finetune_vqa.py --pretrained THIS_FOLDER ...` (also NLVR2,",
            "retrieval). config.json records the sha256 of model.safetensors (checked on load) and the",
            "image and text settings fine-tuning needs; the tokenizer files lie beside it.",
            "",
            "## Licence",
            "",
            "Apache-2.0, as the pixelbert_dist code. The weights were trained on the data named above",
            "and initialised from the weights named above: their terms apply too.",
            "",
        ]
    )


def write_model_card(out_dir: Path, model, run_cfg: RunConfig | None, checkpoint: str | None) -> Path:
    """README.md in ``out_dir``; the step and metrics from ``checkpoint`` (a tag folder of the run)."""
    step = checkpoint_step(checkpoint)
    metrics = final_metrics(Path(checkpoint).parent.parent, step) if step is not None else {}
    path = Path(out_dir) / CARD_NAME
    path.write_text(model_card(model.config, model.num_parameters(), run_cfg, step, metrics))
    os.chmod(path, FILE_MODE)
    return path


def checkpoint_step(checkpoint: str | None) -> int | None:
    """The step of a checkpoint tag folder; None for none, or for a folder of no checkpoint."""
    try:
        return read_meta(checkpoint)["step"] if checkpoint else None
    except CheckpointError:
        return None
