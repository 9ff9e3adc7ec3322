"""Write image–caption shards (WebDataset tar + manifest.json) from a source.

    python launch/make_shards.py synthetic --out data/synthetic --num 5000 --seed 0
    python launch/make_shards.py coco --captions captions_train2017.json --images train2017 --out data/coco
    python launch/make_shards.py coco --karpathy dataset_coco.json --images COCO_ROOT --out data/coco_karpathy
    python launch/make_shards.py vg --regions region_descriptions.json --image-data image_data.json \\
        --images VG_100K VG_100K_2 --out data/vg
    python launch/make_shards.py jsonl --file pairs.jsonl --out data/mine
    python launch/make_shards.py index data/old_split     # index shards made before indexes

Rerunning the same command skips the shards that are already finished.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pixelbert_dist.data.builders import build_coco, build_jsonl, build_synthetic, build_vg  # noqa: E402
from pixelbert_dist.data.shards import ShardFormatError, index_split  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="output directory")
    common.add_argument("--samples-per-shard", type=int, default=2000)
    common.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="image decode/encode processes (0: in this process)")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="source", required=True)

    coco = sub.add_parser("coco", parents=[common], help="COCO captions or a Karpathy split")
    which = coco.add_mutually_exclusive_group(required=True)
    which.add_argument("--captions", type=Path, help="official captions_*.json")
    which.add_argument("--karpathy", type=Path,
                       help="Karpathy split file (dataset_coco.json / dataset_flickr30k.json)")
    coco.add_argument("--images", required=True, type=Path, help="image folder (COCO root for --karpathy)")

    vg = sub.add_parser("vg", parents=[common], help="Visual Genome region descriptions")
    vg.add_argument("--regions", required=True, type=Path, help="region_descriptions.json")
    vg.add_argument("--image-data", required=True, type=Path, help="image_data.json")
    vg.add_argument("--images", required=True, type=Path, nargs="+", help="VG_100K VG_100K_2")

    jsonl = sub.add_parser("jsonl", parents=[common], help='lines of {"image": ..., "caption": ...}')
    jsonl.add_argument("--file", required=True, type=Path)
    jsonl.add_argument("--name", default="jsonl", help="shard name prefix")

    syn = sub.add_parser("synthetic", parents=[common], help="coloured shapes with captions")
    syn.add_argument("--num", type=int, required=True, help="images in all (train + val)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--val-fraction", type=float, default=0.1)
    syn.add_argument("--min-size", type=int, default=96)
    syn.add_argument("--max-size", type=int, default=224)

    index = sub.add_parser("index", help="write the per-shard index sidecars of an existing "
                           "split (shards made before indexes existed)")
    index.add_argument("directory", type=Path, help="split directory with manifest.json")
    index.add_argument("--force", action="store_true", help="rewrite existing indexes too")
    return parser


def _index(args) -> int:
    try:
        written = index_split(args.directory, force=args.force,
                              progress=lambda path: print(f"indexed {path}", flush=True))
    except ShardFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.directory}: {written} shard index(es) written")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.source == "index":
        return _index(args)
    common = {"samples_per_shard": args.samples_per_shard, "workers": args.workers,
              "progress": not args.no_progress}
    if args.samples_per_shard < 1:
        raise SystemExit("--samples-per-shard must be >= 1")
    try:
        if args.source == "coco":
            results = build_coco(args.out, args.images, args.captions, args.karpathy, **common)
        elif args.source == "vg":
            results = build_vg(args.out, args.regions, args.image_data, args.images, **common)
        elif args.source == "jsonl":
            results = build_jsonl(args.out, args.file, args.name, **common)
        else:
            results = build_synthetic(args.out, args.num, args.seed, args.val_fraction,
                                      args.min_size, args.max_size, **common)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, result in results.items():
        reused = f", {result.shards_reused} finished shard(s) reused" if result.shards_reused else ""
        print(f"{split}: written {result.written}, skipped {result.skipped}{reused} -> {result.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
