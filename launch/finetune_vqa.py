"""VQA 2.0 fine-tuning from a pre-training export.

    deepspeed launch/finetune_vqa.py --pretrained runs/X/export --shards data/coco/train data/coco/val \
        --train-questions v2_OpenEnded_mscoco_train2014_questions.json \
        --train-annotations v2_mscoco_train2014_annotations.json \
        --val-questions v2_OpenEnded_mscoco_val2014_questions.json \
        --val-annotations v2_mscoco_val2014_annotations.json \
        [--test-questions ...] [--config launch/configs/finetune_vqa_demo.yaml] [key=value ...]
"""

import sys

from pixelbert_dist.finetune.run import cli

if __name__ == "__main__":
    sys.exit(cli("vqa"))
