"""python launch/plot.py RUN_DIR [--out FILE.png]: a run's metrics.jsonl as PNG curves."""
import argparse

from pixelbert_dist.plotting import plot_run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--out")
    args = parser.parse_args()
    print(plot_run(args.run_dir, args.out))
