"""python launch/export.py RUN_DIR [--tag step_00001000] [--out DIR]

Consolidate a pre-training checkpoint (any ZeRO stage 1-3) into a fine-tuning export
folder (config.json, model.safetensors, tokenizer) on this machine, without DeepSpeed
engines or GPUs."""

import sys

from pixelbert_dist.train.export_cli import main

if __name__ == "__main__":
    sys.exit(main())
