"""python launch/submit.py [options] -- --deepspeed_config PATH [--config YAML] [key=value ...]:
pre-training on Slurm through submitit (or here with --local). `--help` shows the options;
the logic is pixelbert_dist.jobs (cli: this command line)."""

import sys

from pixelbert_dist.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
