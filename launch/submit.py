"""Submit Pixel-BERT pre-training to Slurm with submitit (or run it here with --local).

    python launch/submit.py --nodes 8 --gpus-per-node 8 --partition gpu --time 2-00:00:00 \\
        --output-dir runs/r50_zero2 -- --deepspeed_config deepspeed_configs/zero2.json \\
        --config launch/configs/pretrain_r50.yaml
    python launch/submit.py --dry-run ...                 # print the sbatch script only
    python launch/submit.py --sweep optim.lr=1e-4,2e-4 ... # a job array, one job per value
    python launch/submit.py --nodes 2 --gpus-per-node 0 --cpus-per-task 1 --time 10 \\
        -- --deepspeed_config deepspeed_configs/zero2.json --config launch/configs/demo_cpu.yaml
                                                          # CPU nodes: one gloo task per node
    python launch/submit.py --local --gpus-per-node 0 --tasks-per-node 2 --time 20 -- \\
        --deepspeed_config deepspeed_configs/zero2.json --config launch/configs/demo_cpu.yaml

Everything after ``--`` is what launch/pretrain.py takes. The logic lives in
pixelbert_dist.jobs.
"""

import sys

from pixelbert_dist.jobs.cli import main

if __name__ == "__main__":
    sys.exit(main())
