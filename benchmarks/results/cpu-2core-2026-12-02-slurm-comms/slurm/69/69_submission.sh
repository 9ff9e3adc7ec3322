#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=1
#SBATCH --dependency=singleton
#SBATCH --error=/work/wt/slurm-comms/benchmarks/results/cpu-2core-2026-12-02-slurm-comms/slurm/%j/%j_0_log.err
#SBATCH --job-name=bench_comms
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=/work/wt/slurm-comms/benchmarks/results/cpu-2core-2026-12-02-slurm-comms/slurm/%j/%j_0_log.out
#SBATCH --partition=debug
#SBATCH --requeue
#SBATCH --signal=USR2@180
#SBATCH --time=30
#SBATCH --wckey=submitit

# setup
cd /work/wt/slurm-comms
export PYTHONPATH=/work/wt/slurm-comms${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=/work/wt/slurm-comms/benchmarks:$PYTHONPATH
export OMP_NUM_THREADS=1

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output /work/wt/slurm-comms/benchmarks/results/cpu-2core-2026-12-02-slurm-comms/slurm/%j/%j_%t_log.out --error /work/wt/slurm-comms/benchmarks/results/cpu-2core-2026-12-02-slurm-comms/slurm/%j/%j_%t_log.err /work/main/.venv/bin/python -u -m submitit.core._submit /work/wt/slurm-comms/benchmarks/results/cpu-2core-2026-12-02-slurm-comms/slurm/%j
