"""Image-text retrieval fine-tuning (COCO / Flickr30K Karpathy split) from a pre-training export.

    python launch/make_shards.py coco --karpathy dataset_flickr30k.json --images flickr30k-images --out data/flickr30k
    deepspeed launch/finetune_retrieval.py --pretrained runs/X/export \
        --shards data/flickr30k/train data/flickr30k/val data/flickr30k/test \
        --karpathy dataset_flickr30k.json [retrieval.eval_split=test train.freeze_cnn=true ...]

Images are found by the shard keys make_shards gives them (retrieval.key_format, default
{dataset}{image_id}: flickr30k42, coco391895).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from pixelbert_dist.config import ConfigError  # noqa: E402
from pixelbert_dist.finetune.run import main as run  # noqa: E402

FILES = [("--karpathy", "retrieval.karpathy", "Karpathy split file dataset_{coco,flickr30k}.json")]


def main(argv=None) -> dict:
    return run("retrieval", argv, FILES, "Fine-tune Pixel-BERT for image-text retrieval (ITM head, hard negatives).")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:  # a bad key or value: the message says which, no traceback needed
        sys.exit(f"finetune_retrieval.py: {err}")
