"""Shard builders: COCO / Karpathy splits, Visual Genome, jsonl, caption-less images
(NLVR2, VQA test2015) and the synthetic set."""

from pixelbert_dist.data.builders.coco import build_coco
from pixelbert_dist.data.builders.common import BuildResult, Item, build_split, image_key
from pixelbert_dist.data.builders.images import build_images
from pixelbert_dist.data.builders.jsonl import build_jsonl
from pixelbert_dist.data.builders.synthetic import build_synthetic
from pixelbert_dist.data.builders.vg import build_vg

__all__ = [
    "BuildResult",
    "Item",
    "build_split",
    "build_coco",
    "build_images",
    "build_jsonl",
    "build_synthetic",
    "build_vg",
    "image_key",
]
