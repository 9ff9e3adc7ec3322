"""python launch/make_shards.py {coco,vg,jsonl,images,synthetic,index} ... --out DIR: write
image-caption shards. `--help` shows every source; the logic is pixelbert_dist.data.builders.cli."""

import sys

from pixelbert_dist.data.builders.cli import main

if __name__ == "__main__":
    sys.exit(main())
