"""deepspeed launch/pretrain.py --deepspeed_config deepspeed_configs/zero2.json [--config X.yaml] [key=value ...]"""

import sys

from pixelbert_dist.train.run import cli

if __name__ == "__main__":
    sys.exit(cli())
