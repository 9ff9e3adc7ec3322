"""Distributed plumbing: where this process sits in the job, and DeepSpeed config filling."""
from pixelbert_dist.distributed.ds_config import fill_deepspeed_config, precision_of
from pixelbert_dist.distributed.env import DistEnv, detect_env, device_for, init_distributed

__all__ = ["DistEnv", "detect_env", "device_for", "fill_deepspeed_config", "init_distributed",
           "precision_of"]
