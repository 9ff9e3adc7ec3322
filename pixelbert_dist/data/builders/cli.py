"""Write image–caption shards (WebDataset tar + manifest.json) from a source.

    python launch/make_shards.py synthetic --out data/synthetic --num 5000 --seed 0
    python launch/make_shards.py coco --captions captions_train2017.json --images train2017 --out data/coco
    python launch/make_shards.py coco --karpathy dataset_coco.json --images COCO_ROOT --out data/coco_karpathy
    python launch/make_shards.py vg --regions region_descriptions.json --image-data image_data.json \\
        --images VG_100K VG_100K_2 --out data/vg
    python launch/make_shards.py jsonl --file pairs.jsonl --out data/mine
    python launch/make_shards.py images --kind nlvr2 --images nlvr2/images/train nlvr2/dev nlvr2/test1 \\
        --out data/nlvr2_images
    python launch/make_shards.py images --kind coco --images test2015 --out data/coco_test2015
    python launch/make_shards.py index data/old_split     # index shards made before indexes
    python launch/make_shards.py index /data/cc3m         # index img2dataset / OpenCLIP tars beside them

`make_shards.py SOURCE --help` says where each source's official files come from.
Keys: the data set's name and its own image id (coco391895, vg1, flickr30k42), the keys
the fine-tuning readers build by default; NLVR2 images keep their names (dev-850-0-img0).
Rerunning the same command skips the shards that are already finished and still intact,
and rebuilds those whose input files (size, mtime) or annotations changed.
Exit status: 0 when every split holds samples, 1 when a split wrote none, 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


COCO_HELP = """official files:
  COCO Captions 2014 (the paper's; 2017 holds the same images and captions, re-split):
    https://cocodataset.org/#download -> annotations_trainval2014.zip
    (captions_train2014.json, captions_val2014.json), train2014.zip, val2014.zip
  Karpathy splits (113K train+restval / 5K val / 5K test, the paper's retrieval split):
    caption_datasets.zip from https://cs.stanford.edu/people/karpathy/deepimagesent/
    (dataset_coco.json; --images is the COCO root holding train2014/ and val2014/)
  Flickr30K: dataset_flickr30k.json from the same zip; the images (flickr30k-images/)
    by the request form at https://shannon.cs.illinois.edu/DenotationGraph/
keys: coco{cocoid} / flickr30k{imgid}, as retrieval.key_format and vqa.key_format build them"""
VG_HELP = """official files:
  Visual Genome v1.2 (the paper's 108K images / 5.41M region phrases), from
  https://homes.cs.washington.edu/~ranjay/visualgenome/api.html:
    region_descriptions.json.zip (v1.2), image_data.json.zip (v1.2),
    images.zip (VG_100K) and images2.zip (VG_100K_2)
keys: vg{image_id}; each sample keeps VG's coco_id"""
IMAGES_HELP = """official files:
  --kind nlvr2: NLVR2 (Suhr et al. 2019) images, by the request form linked from
    https://github.com/lil-lab/nlvr/tree/master/nlvr2 (train/ holds 100 numbered
    sub-folders, dev/, test1/); the json lines are in that repository's nlvr2/data/
    keys: the file name, dev-850-0-img0 (nlvr2.key_format = {name})
  --kind coco: VQA 2.0 test-dev/test-std ask about COCO test2015 images:
    http://images.cocodataset.org/zips/test2015.zip (see https://visualqa.org/download.html;
    train2014/val2014 images come with their captions from the coco source)
    keys: coco{id} from COCO_test2015_000000000001.jpg (vqa.key_format = coco{image_id})"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="output directory")
    common.add_argument("--samples-per-shard", type=int, default=2000)
    common.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="image decode/encode processes (0: in this process)"
    )
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    sub = parser.add_subparsers(dest="source", required=True)

    fmt = argparse.RawDescriptionHelpFormatter
    coco = sub.add_parser(
        "coco", parents=[common], help="COCO captions or a Karpathy split", epilog=COCO_HELP, formatter_class=fmt
    )
    which = coco.add_mutually_exclusive_group(required=True)
    which.add_argument("--captions", type=Path, help="official captions_*.json")
    which.add_argument("--karpathy", type=Path, help="Karpathy split file (dataset_coco.json / dataset_flickr30k.json)")
    coco.add_argument("--images", required=True, type=Path, help="image folder (COCO root for --karpathy)")

    vg = sub.add_parser(
        "vg", parents=[common], help="Visual Genome region descriptions", epilog=VG_HELP, formatter_class=fmt
    )
    vg.add_argument("--regions", required=True, type=Path, help="region_descriptions.json")
    vg.add_argument("--image-data", required=True, type=Path, help="image_data.json")
    vg.add_argument("--images", required=True, type=Path, nargs="+", help="VG_100K VG_100K_2")

    jsonl = sub.add_parser(
        "jsonl",
        parents=[common],
        help='lines of {"image": ..., "caption": ...}',
        epilog="your own pairs; relative image paths are taken from the file's "
        "folder; keys: jsonl + a hash of the image's path",
    )
    jsonl.add_argument("--file", required=True, type=Path)
    jsonl.add_argument("--name", default="jsonl", help="shard name prefix")

    images = sub.add_parser(
        "images",
        parents=[common],
        help="images without captions (NLVR2, VQA test2015) for fine-tuning",
        epilog=IMAGES_HELP,
        formatter_class=fmt,
    )
    images.add_argument("--kind", required=True, choices=["nlvr2", "coco"], help="how files name images")
    images.add_argument(
        "--images",
        required=True,
        type=Path,
        nargs="+",
        help="image folders (searched recursively: NLVR2's train/0..99)",
    )
    images.add_argument("--name", default=None, help="shard name prefix (default: KIND_images)")

    syn = sub.add_parser(
        "synthetic",
        parents=[common],
        help="coloured shapes with captions",
        epilog="generated here (the embedded default); keys: syn00000000, ...",
    )
    syn.add_argument("--num", type=int, required=True, help="images in all (train + val)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--val-fraction", type=float, default=0.1)
    syn.add_argument("--min-size", type=int, default=96)
    syn.add_argument("--max-size", type=int, default=224)

    index = sub.add_parser(
        "index",
        help="write index sidecars (and a manifest) beside existing shards: a split made before indexes "
        "existed, or a folder of foreign webdataset tars (img2dataset, OpenCLIP, DataComp), never rewritten",
    )
    index.add_argument("directory", type=Path, help="split directory with manifest.json, or a folder of .tar files")
    index.add_argument("--force", action="store_true", help="rewrite existing indexes too")
    index.add_argument("--workers", type=int, default=None, help="foreign tars indexed at once (default: CPUs)")
    index.add_argument(
        "--caption-key",
        default=None,
        metavar="FIELD",
        help="foreign tars: take each caption from this JSON field (train with data.caption_key=FIELD); "
        "samples without it are skipped and counted. Default: the .txt, else the JSON's caption(s)",
    )
    return parser


def _indexed_already(args, made_for: str, caption_key: str) -> int:
    """A foreign folder indexed before, run again without --force: nothing to do, unless
    another --caption-key was asked for (refused: a rerun must not look like it took)."""
    from pixelbert_dist.data.format.foreign_index import reindex_command
    from pixelbert_dist.data.format.index import ShardFormatError

    if args.caption_key is not None and caption_key != made_for:
        raise ShardFormatError(
            f"{args.directory} was indexed for caption key {made_for!r} (its manifest.json); "
            f"index it again for {caption_key!r}: `{reindex_command(args.directory, caption_key)}`"
        )
    print(f"{args.directory}: indexed already (caption key {made_for!r}); --force indexes it again")
    return 0


def _index(args) -> int:
    from pixelbert_dist.data.format.foreign_index import SOURCE, index_foreign
    from pixelbert_dist.data.format.index import ShardFormatError
    from pixelbert_dist.data.format.members import DEFAULT_CAPTION_KEY
    from pixelbert_dist.data.format.shards import MANIFEST, index_split, read_manifest

    manifest = args.directory / MANIFEST
    caption_key = args.caption_key if args.caption_key is not None else DEFAULT_CAPTION_KEY
    try:
        made = read_manifest(args.directory) if manifest.is_file() else None
        if made is not None and made.source == SOURCE:
            if not args.force:
                return _indexed_already(args, made.caption_key or DEFAULT_CAPTION_KEY, caption_key)
            manifest.unlink()  # made by index_foreign: made again, from the tars
        elif made is not None and args.caption_key is not None:
            raise ShardFormatError(
                f"--caption-key is for foreign webdataset tars: {args.directory} holds this project's shards, "
                "whose index points at each sample's .json (any data.caption_key reads it)"
            )
        if not manifest.is_file():
            made = index_foreign(
                args.directory, args.workers, lambda r: print(f"indexed {r['file']}", flush=True), caption_key
            )
            print(
                f"{args.directory}: {len(made.shards)} shards, {made.num_samples} samples "
                f"(caption key {caption_key!r}), {made.skipped} skipped"
            )
            return 0
        written = index_split(
            args.directory, force=args.force, progress=lambda path: print(f"indexed {path}", flush=True)
        )
    except ShardFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.directory}: {written} shard index(es) written")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.source == "index":
        return _index(args)
    common = {"samples_per_shard": args.samples_per_shard, "workers": args.workers, "progress": not args.no_progress}
    if args.samples_per_shard < 1:
        raise SystemExit("--samples-per-shard must be >= 1")
    # imported after parsing: pixelbert_dist.data pulls in torch (seconds), --help must not wait
    from pixelbert_dist.data.builders import build_coco, build_images, build_jsonl, build_synthetic, build_vg

    try:
        if args.source == "coco":
            results = build_coco(args.out, args.images, args.captions, args.karpathy, **common)
        elif args.source == "vg":
            results = build_vg(args.out, args.regions, args.image_data, args.images, **common)
        elif args.source == "jsonl":
            results = build_jsonl(args.out, args.file, args.name, **common)
        elif args.source == "images":
            results = build_images(args.out, args.images, args.kind, args.name, **common)
        else:
            results = build_synthetic(
                args.out, args.num, args.seed, args.val_fraction, args.min_size, args.max_size, **common
            )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return _report(results)


def _report(results: dict) -> int:
    """One line per split: images written, images skipped and captions dropped apart."""
    empty = []
    for split, r in results.items():
        reused = f", {r.shards_reused} finished shard(s) reused" if r.shards_reused else ""
        print(
            f"{split}: written {r.written}, skipped {r.images_skipped} image(s), dropped "
            f"{r.captions_dropped} caption(s){reused} -> {r.directory}"
        )
        if r.written == 0:
            empty.append(split)
    for split in empty:
        print(
            f"error: {split}: no sample written; the reasons are in {results[split].directory / 'skipped.jsonl'}",
            file=sys.stderr,
        )
    return 1 if empty else 0
