"""deepspeed launch/pretrain.py --deepspeed_config deepspeed_configs/zero2.json [--config X.yaml] [key=value ...]"""
import sys

from pixelbert_dist.config import ConfigError
from pixelbert_dist.train.run import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except ConfigError as err:  # a bad key or value: the message says which, no traceback needed
        sys.exit(f"pretrain.py: {err}")
