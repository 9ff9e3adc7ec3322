"""Check the initial weights a run config points at before the run starts:

    python -m pixelbert_dist.train.check_weights CONFIG.yaml [key=value ...]

One line per check (``ok`` / ``FAIL``), exit status 1 when any failed. The table of what each
preset needs is docs/weights.md ("Weights you need"); the checks are
``pixelbert_dist.model.initial_weights``."""

from __future__ import annotations

import argparse
import sys

from pixelbert_dist.config import ConfigError, load_config
from pixelbert_dist.model import build_model, preset_config
from pixelbert_dist.model.initial_weights import Finding, check_bert_dir, check_cnn_weights
from pixelbert_dist.train.config import RunConfig

# What the paper initialises each preset from; a preset not named here starts from scratch.
PRESET_NEEDS = {
    "pixelbert-r50": ("BERT-base uncased", "torchvision ResNet-50 (ImageNet)"),
    "pixelbert-x152": ("BERT-base uncased", "ResNeXt-152 32x8d (ImageNet), torchvision key names"),
    "tiny-minilm": ("all-MiniLM-L6-v2 (the demo extra)", None),
}


def check_run_weights(cfg: RunConfig) -> list[Finding]:
    """Every check of the config's model.bert_dir and model.cnn_weights."""
    section = cfg.model
    model_cfg = preset_config(section.preset, **section.overrides)
    bert_need, cnn_need = PRESET_NEEDS.get(section.preset, (None, None))
    out = []
    if section.bert_dir:
        out += check_bert_dir(section.bert_dir, model_cfg)
    elif bert_need:
        out.append(Finding(False, f"model.bert_dir is unset: preset {section.preset} starts from {bert_need}"))
    if section.cnn_weights:
        trunk = build_model(section.preset, device="meta", **section.overrides).visual.backbone.state_dict()
        out += check_cnn_weights(section.cnn_weights, model_cfg, {k: v.shape for k, v in trunk.items()})
    elif cnn_need and not section.visual_weights:
        out.append(Finding(False, f"model.cnn_weights is unset: preset {section.preset} starts from {cnn_need}"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("config", help="the run's YAML config (launch/configs/X.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value, as for pretrain.py")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(RunConfig, args.config, args.overrides)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    findings = check_run_weights(cfg)
    for finding in findings:
        print(finding)
    if not findings:
        print(f"preset {cfg.model.preset} needs no initial weights")
    return 0 if all(f.ok for f in findings) else 1


if __name__ == "__main__":
    sys.exit(main())
