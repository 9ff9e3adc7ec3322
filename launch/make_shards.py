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

`make_shards.py SOURCE --help` says where each source's official files come from.
Keys: the data set's name and its own image id (coco391895, vg1, flickr30k42), the keys
the fine-tuning readers build by default; NLVR2 images keep their names (dev-850-0-img0).
Rerunning the same command skips the shards that are already finished and still intact,
and rebuilds those whose input files (size, mtime) or annotations changed.
Exit status: 0 when every split holds samples, 1 when a split wrote none, 2 on bad input.
"""

import sys

from pixelbert_dist.data.builders.cli import main

if __name__ == "__main__":
    sys.exit(main())
