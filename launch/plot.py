"""python launch/plot.py RUN_DIR [--out FILE.png]: a run's metrics.jsonl as PNG curves."""

import sys

from pixelbert_dist.plotting import main

if __name__ == "__main__":
    sys.exit(main())
