"""Evaluate a fine-tuning run's checkpoint, or a pre-training export (zero-shot retrieval),
on any split, over every rank the launcher started (see pixelbert_dist/finetune/evaluate.py).

    python launch/evaluate.py --run runs/ft_retrieval --split test
    deepspeed --num_gpus 8 launch/evaluate.py --pretrained runs/X/export --task retrieval \
        --shards data/coco/test --karpathy dataset_coco.json retrieval.key_format='{dataset}{image_id}'
"""

import sys

from pixelbert_dist.finetune.evaluate import cli

if __name__ == "__main__":
    sys.exit(cli())
