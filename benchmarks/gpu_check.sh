#!/usr/bin/env bash
# The GPU check for one lent H100/H200, under 10 minutes (each step has its own timeout;
# they add up to 525 s, plus installing the wheels): attention kernels at Pixel-BERT's
# shapes, pixelbert-r50 pre-training steps in bf16 at 800x1333 with 100 sampled pixels,
# the Trainer's overhead over a bare engine loop with its host syncs per step (torch's
# sync debug mode), peak memory with and without activation checkpointing, torch.compile
# against eager, nvjpeg decode throughput, and a one-screen summary against the targets
# (R50 step >= 40% MFU in bf16; fused attention >= 2x eager at pre-training shapes;
# overhead <= 3%; checkpointing >= 40% lower peak).
#
# Before the device call, here:  bash ../shared/device/fetch-wheels.sh   (fills .whl/)
# The device call:               carry [".whl"], command "bash benchmarks/gpu_check.sh"
# Options: --dry-run (print the commands), --cpu-smoke (the same steps at tiny sizes on a
# CPU, to check the plumbing without a GPU), --out DIR (default: $OUT on the device
# machine, else a new benchmarks/results/<machine>-<date>T<time>-gpu-check|cpu-smoke/).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0 SMOKE=0 DEST=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --cpu-smoke) SMOKE=1 ;;
    --out) DEST="$2"; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (--help lists the options)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
[ "$SMOKE" = 1 ] && [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-${OUT:-}}
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"

# The device image lacks deepspeed, submitit, omegaconf: install the carried wheels.
if [ -d .whl ] && [ "$DRY" = 0 ] && [ "$SMOKE" = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "$SMOKE" = 0 ] && [ "$DRY" = 0 ] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check: no CUDA device here; use --cpu-smoke to check the plumbing on a CPU" >&2
  exit 1
fi
if [ "$DRY" = 0 ] && ! "$PY" -c 'import deepspeed' >/dev/null 2>&1; then
  echo "gpu_check: deepspeed is not importable: run 'bash ../shared/device/fetch-wheels.sh'" \
       "in the checkout and carry .whl; the training-step benchmark will fail" >&2
fi
if [ -z "$DEST" ] && [ "$DRY" = 1 ]; then
  DEST="<results-dir>"
elif [ -z "$DEST" ]; then
  SUITE=gpu-check; [ "$SMOKE" = 1 ] && SUITE=cpu-smoke
  DEST=$("$PY" -c 'import sys; from benchmarks.common import new_run_dir; print(new_run_dir(sys.argv[1]))' "$SUITE" 2>/dev/null | tail -1)
fi
LOG="$DEST/gpu_check.log"
[ "$DRY" = 1 ] || { mkdir -p "$DEST" && : >"$LOG"; }

if [ "$SMOKE" = 1 ]; then  # the same steps at sizes a CPU finishes in seconds
  ATTN=(--quick --shapes pretrain-100px --batch 2 --iters 2 --warmup 1)
  STEP=(--presets tiny --zero 2 --precision fp32 --micro-batch 2 --sampling on --steps 2 --warmup 1)
  OVERHEAD=(--presets tiny --zero 2 --precision fp32 --micro-batch 2 --steps 4 --repeats 2)
  DECODE="pil 2 4"
  MEMORY=(--preset tiny --image 128 128 --steps 1 --warmup 0 --repeats 1)
  COMPILE=()  # a CPU compile of even the tiny model takes minutes: GPU only
  SCALE=3  # a shared 2-core CPU: the GPU's time limits x3
else  # ~1 min, ~3 min, ~1 min on an H100
  ATTN=(--iters 30 --warmup 10)
  STEP=(--presets pixelbert-r50 --zero 2 --precision bf16 --micro-batch 8 16 --sampling on off
        --image 800 1333 --steps 10 --warmup 3)
  OVERHEAD=(--presets pixelbert-r50 --zero 2 --precision bf16 --micro-batch 8 --image 800 1333
            --steps 8 --repeats 4)
  DECODE="nvjpeg 10 16"
  MEMORY=(--preset pixelbert-r50 --image 800 1333 --micro-batch 2 --modes none transformer all
          --steps 3 --warmup 1 --repeats 1)
  COMPILE=(--presets pixelbert-r50 --precision bf16 --micro-batch 8 --image 800 1333 --repeats 10)
  SCALE=1
fi

status=0
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  if [ "$DRY" = 1 ]; then echo "$*"; return; fi
  local start=$SECONDS
  echo "== $name" | tee -a "$LOG"
  timeout "$((limit * SCALE))" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "   $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$rc" = 0 ] || status=1
}

[ "$DRY" = 1 ] || { nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"; } | tee -a "$LOG"
step attention 70 "$PY" -m benchmarks.bench_attention "${ATTN[@]}" --out "$DEST"
step train_step 120 "$PY" -m benchmarks.bench_step "${STEP[@]}" --out "$DEST"
step overhead 90 "$PY" -m benchmarks.bench_step --overhead "${OVERHEAD[@]}" --out "$DEST"
step memory 110 "$PY" -m benchmarks.bench_memory "${MEMORY[@]}" --out "$DEST"
[ ${#COMPILE[@]} -eq 0 ] || step compile 90 "$PY" -m benchmarks.bench_compile "${COMPILE[@]}" --out "$DEST"
# nvjpeg throughput with bench_data's photo-like JPEGs and loader timing (DALI's wheel is
# too large to carry, so bench_data.py itself, which reports DALI's version, is not run).
step decode 30 "$PY" - "$DEST" $DECODE <<'PY'
import sys, tempfile
from pathlib import Path
from benchmarks.bench_data import make_shards, measure
from benchmarks.common import write_results
dest, backend, batches, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
device = "cuda" if backend == "nvjpeg" else "cpu"
with tempfile.TemporaryDirectory() as tmp:
    shards = make_shards(Path(tmp) / "decode", (batches + 1) * batch_size)
    rows = [dict(measure(shards, backend, device, size, False, batches, batch_size, 4), label=backend)
            for size in ("paper", "small")]
write_results("bench_decode", rows, {"batches": batches, "batch_size": batch_size}, dest,
              ["label", "device", "size", "shorter", "max", "images", "images_per_s", "padding_fraction"])
PY
step summary 15 "$PY" -m benchmarks.summarize "$DEST" --brief
[ "$DRY" = 1 ] || cat "$DEST/brief.txt" 2>/dev/null
exit $status
