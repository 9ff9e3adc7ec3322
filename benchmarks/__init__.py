"""The benchmark suite: helper modules and thin scripts, run from the repo root as modules.

    python -m benchmarks.bench_step --quick
    deepspeed --num_gpus 2 --module benchmarks.bench_comms --presets tiny
    bash benchmarks/run_all.sh --quick

Helpers: ``common`` (results folders, machine info, timing, tables), ``comm_model``
(DeepSpeed's bytes per optimizer step), ``host_syncs`` (calls that make a GPU's host wait),
``tensor_memory`` (live tensor memory on a CPU), ``slurm_bench`` (measurements as Slurm
jobs). The scripts import them as ``benchmarks.X``, which is why they run with ``-m``
(``python benchmarks/bench_step.py`` would not find the package). Benchmarks import the
library; the library never imports them. Results and their index: ``results/README.md``.
"""
