"""Image-text retrieval fine-tuning (COCO / Flickr30K Karpathy split) from a pre-training export.

    python launch/make_shards.py coco --karpathy dataset_flickr30k.json --images flickr30k-images --out data/flickr30k
    deepspeed launch/finetune_retrieval.py --pretrained runs/X/export \
        --shards data/flickr30k/train data/flickr30k/val data/flickr30k/test \
        --karpathy dataset_flickr30k.json [retrieval.eval_split=test train.freeze_cnn=true ...]

Images are found by the shard keys make_shards gives them (retrieval.key_format, default
{dataset}{image_id}: flickr30k42, coco391895).
"""

import sys

from pixelbert_dist.finetune.run import cli

if __name__ == "__main__":
    sys.exit(cli("retrieval"))
