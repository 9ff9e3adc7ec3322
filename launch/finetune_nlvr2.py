"""NLVR2 fine-tuning from a pre-training export (accuracy and consistency on dev / test-P).

    python launch/make_shards.py images --kind nlvr2 --images images/train dev test1 --out data/nlvr2_images
    deepspeed launch/finetune_nlvr2.py --pretrained runs/X/export --shards data/nlvr2_images \
        --train train.json --dev dev.json --test test1.json [--image-map images.json] [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from pixelbert_dist.config import ConfigError  # noqa: E402
from pixelbert_dist.finetune.run import main as run  # noqa: E402

FILES = [("--train", "nlvr2.train", "official train.json (jsonl)"),
         ("--dev", "nlvr2.dev", "official dev.json"),
         ("--test", "nlvr2.test", "official test1.json (test-P)"),
         ("--image-map", "nlvr2.image_map", "JSON {image name: shard key}; default key: nlvr2.key_format")]


def main(argv=None) -> dict:
    return run("nlvr2", argv, FILES, "Fine-tune and evaluate Pixel-BERT on NLVR2.")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a bad key or value: the message says which, no traceback needed
        sys.exit(f"finetune_nlvr2.py: {err}")
