"""NLVR2 fine-tuning from a pre-training export (accuracy and consistency on dev / test-P).

    python launch/make_shards.py images --kind nlvr2 --images images/train dev test1 --out data/nlvr2_images
    deepspeed launch/finetune_nlvr2.py --pretrained runs/X/export --shards data/nlvr2_images \
        --train train.json --dev dev.json --test test1.json [--image-map images.json] [key=value ...]
"""

import sys

from pixelbert_dist.finetune.run import cli

if __name__ == "__main__":
    sys.exit(cli("nlvr2"))
