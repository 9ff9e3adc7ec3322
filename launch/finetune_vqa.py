"""VQA 2.0 fine-tuning from a pre-training export.

    deepspeed launch/finetune_vqa.py --pretrained runs/X/export --shards data/coco/train data/coco/val \
        --train-questions v2_OpenEnded_mscoco_train2014_questions.json \
        --train-annotations v2_mscoco_train2014_annotations.json \
        --val-questions v2_OpenEnded_mscoco_val2014_questions.json --val-annotations v2_mscoco_val2014_annotations.json \
        [--test-questions ...] [--config launch/configs/finetune_vqa_demo.yaml] [key=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from pixelbert_dist.config import ConfigError  # noqa: E402
from pixelbert_dist.finetune.run import main as run  # noqa: E402

FILES = [("--train-questions", "vqa.train_questions", "official questions JSON of the training split"),
         ("--train-annotations", "vqa.train_annotations", "official annotations JSON of the training split"),
         ("--val-questions", "vqa.val_questions", "questions evaluated with the official accuracy"),
         ("--val-annotations", "vqa.val_annotations", "their annotations"),
         ("--test-questions", "vqa.test_questions", "questions to predict into the submission file"),
         ("--image-map", "vqa.image_map", "JSON {image_id: shard key}; default key: vqa.key_format"),
         ("--answer-vocab", "vqa.answer_vocab", "a saved answer vocabulary (else the top answers of train)")]


def main(argv=None) -> dict:
    return run("vqa", argv, FILES, "Fine-tune and evaluate Pixel-BERT on VQA 2.0.")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a bad key or value: the message says which, no traceback needed
        sys.exit(f"finetune_vqa.py: {err}")
