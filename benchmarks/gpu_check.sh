#!/usr/bin/env bash
# The GPU check: one call on one lent H100/H200 runs every GPU path this project has and
# brings every result back. Its output folder gets two files: gpu_check.tar.gz (every JSON,
# log, PNG, summary.md and the brief) and brief.txt (the one-screen summary, also printed).
# The archive is rewritten after every step, so a call stopped by its time limit still
# brings back what was measured; each step's rows reach its JSON as they finish.
#
# Steps, by value (GPU seconds each, a hard limit; they add up to 420 s with the install):
#   preflight   versions, imports, one-rank NCCL all-reduce, CUDA memory/capability, nvJPEG;
#               stops the run with one line if the machine cannot do the rest
#   e2e         launch/pretrain.py, tiny preset at 800x1333, nvjpeg, bf16, ZeRO-2: 30 steps,
#               save, SIGTERM + resume (losses equal the uninterrupted run's), eval, export
#   fp32        the same first 10 steps in fp32 (bf16's curve against it)
#   zero3, fp16 smoke steps: ZeRO-3; fp16 with DeepSpeed's loss scaler
#   train_step  pixelbert-r50 bf16 800x1333: samples/s, TFLOP/s, MFU, peak memory
#   attention   SDPA backends (flash, mem-efficient, cuDNN) against eager at Pixel-BERT's shapes
#   memory      activation checkpointing: peak memory none vs all
#   overhead    the Trainer against a bare engine loop, host syncs per step (sync debug mode)
#   decode      nvJPEG decode throughput
#   compile     torch.compile against eager (a cold compile may not finish: its rows say how far)
#   summary     summary.md, plots, brief.txt
#
# Before the device call, here:  bash benchmarks/gpu_wheels.sh        (fills .whl/)
# The device call:               carry [".whl"], command "bash benchmarks/gpu_check.sh",
#                                timeout_s 480 (a rerun of any one step still fits 15 min)
set -uo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: bash benchmarks/gpu_check.sh [--cpu-smoke] [--dry-run] [--only STEP,...] [--out DIR]

Runs the GPU check's steps (preflight, e2e pre-training with SIGTERM resume, fp32, ZeRO-3,
fp16, R50 step/MFU, attention, memory, overhead + host syncs, decode, compile, summary).
Writes DIR/gpu_check.tar.gz (all JSON, logs, PNG, the brief) and DIR/brief.txt.

  --cpu-smoke  the same plumbing on a CPU at tiny sizes, no time limits (gloo, pil decode)
  --dry-run    print each step's budget and command, run nothing
  --only S,..  these steps alone (after the preflight; the summary too): a rerun of what
               failed or timed out, e.g. --only e2e,compile
  --out DIR    output folder (default: $OUT on the device machine, else a new
               benchmarks/results/<machine>-<date>-gpu-check|cpu-smoke/)
  -h, --help   this text
EOF
}

DRY=0 SMOKE=0 DEST="" ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --cpu-smoke) SMOKE=1 ;;
    --only) [ $# -ge 2 ] || { echo "gpu_check.sh: --only needs step names" >&2; exit 2; }; ONLY=",$2,"; shift ;;
    --out) [ $# -ge 2 ] || { echo "gpu_check.sh: --out needs a folder" >&2; exit 2; }; DEST="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (--help lists them)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}
[ "$SMOKE" = 1 ] && [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
DEST=${DEST:-${OUT:-}}
export PYTHONUNBUFFERED=1 TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"

# name and GPU seconds per step, in running order; the install's limit counts too
INSTALL_S=15
BUDGETS=(preflight 20 e2e 90 fp32 25 zero3 25 fp16 25 train_step 40 attention 20 memory 35
         overhead 35 decode 10 compile 70 summary 10)
budget() { local i; for ((i = 0; i < ${#BUDGETS[@]}; i += 2)); do
  [ "${BUDGETS[i]}" = "$1" ] && { echo "${BUDGETS[i + 1]}"; return; }; done; echo 0; }
for name in ${ONLY//,/ }; do
  [ "$(budget "$name")" != 0 ] || { echo "gpu_check.sh: --only $name: no such step (--dry-run lists them)" >&2; exit 2; }
done
total=$INSTALL_S; for ((i = 1; i < ${#BUDGETS[@]}; i += 2)); do total=$((total + BUDGETS[i])); done

install_wheels() {  # the device image lacks deepspeed, pydantic, hjson, ...: the carried wheels
  [ -d .whl ] && [ "$DRY" = 0 ] && [ "$SMOKE" = 0 ] || { export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}; return 0; }
  timeout "$INSTALL_S" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; return 1; }
  # a --target folder is no site folder: its .pth files (setuptools' distutils shim, which
  # DeepSpeed's op probe needs on Python 3.12) are read only through site.addsitedir
  if ! "$PY" -c 'import sitecustomize' 2>/dev/null; then
    printf 'import os, site\nsite.addsitedir(os.path.dirname(__file__))\n' >/tmp/site/sitecustomize.py
  fi
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
}

if [ "$SMOKE" = 1 ]; then  # the same steps at sizes a CPU finishes in seconds
  ATTN=(--quick --shapes pretrain-100px --batch 2 --iters 2 --warmup 1)
  STEP=(--presets tiny --zero 2 --precision fp32 --micro-batch 2 --sampling on --steps 2 --warmup 1)
  OVERHEAD=(--presets tiny --zero 2 --precision fp32 --micro-batch 2 --steps 4 --repeats 2)
  DECODE="pil 2 4"
  MEMORY=(--preset tiny --image 128 128 --modes none transformer --steps 1 --warmup 0 --repeats 1)
  COMPILE=()  # a CPU compile of even the tiny model takes minutes: GPU only
  PRETRAIN=(--cpu)
  PHASES=(e2e fp32 zero3)  # DeepSpeed's fp16 optimizer needs CUDA: GPU only
  PRECHECK=(--cpu)
else
  STEP=(--presets pixelbert-r50 --zero 2 --precision bf16 --micro-batch 8 --sampling on off
        --image 800 1333 --steps 8 --warmup 2)
  ATTN=(--iters 30 --warmup 10)
  MEMORY=(--preset pixelbert-r50 --image 800 1333 --micro-batch 2 --modes none all
          --steps 3 --warmup 1 --repeats 1)
  OVERHEAD=(--presets pixelbert-r50 --zero 2 --precision bf16 --micro-batch 8 --image 800 1333
            --steps 6 --repeats 2)
  DECODE="nvjpeg 10 16"
  COMPILE=(--presets pixelbert-r50 --precision bf16 --micro-batch 8 --image 800 1333 --repeats 5 --warmup 1)
  PRETRAIN=()
  PHASES=(e2e fp32 zero3 fp16)
  PRECHECK=()
fi

if [ "$DRY" = 1 ]; then
  DEST="<results-dir>" WORK="<work>" RUNS="<runs>"
else
  install_wheels || exit 1
  if [ -z "$DEST" ]; then
    SUITE=gpu-check; [ "$SMOKE" = 1 ] && SUITE=cpu-smoke
    DEST=$("$PY" -c 'import sys; from benchmarks.common import new_run_dir; print(new_run_dir(sys.argv[1]))' "$SUITE" 2>/dev/null | tail -1)
  fi
  mkdir -p "$DEST" || exit 1
  # everything is made here and archived into DEST: at most 8 files come back from a device call
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") RUNS=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_runs.XXXXXX")
  mkdir -p "$WORK/logs"
  LOG="$WORK/gpu_check.log"
  echo "gpu_check: budgets add up to $total s (install included); results -> $DEST" | tee "$LOG"
fi

archive() {  # DEST/gpu_check.tar.gz from WORK, replaced whole (never half-written)
  tar -czf "$DEST/gpu_check.tar.gz.tmp" -C "$WORK" . && mv -f "$DEST/gpu_check.tar.gz.tmp" "$DEST/gpu_check.tar.gz"
}

# stopped from outside (Ctrl-C, a kill): keep what was measured, leave no temporary folders
[ "$DRY" = 1 ] || trap 'archive; rm -rf "$WORK" "$RUNS"; exit 143' INT TERM
status=0 stopped=""
step() {  # step NAME CMD...: within its budget on a GPU, output in logs/NAME.log
  local name=$1 limit; shift
  limit=$(budget "$name")
  case "$name" in preflight|summary) ;; *) [ -z "$ONLY" ] || [[ "$ONLY" == *",$name,"* ]] || return 0 ;; esac
  if [ "$DRY" = 1 ]; then echo "[$name ${limit}s] $*"; return 0; fi
  [ -z "$stopped" ] || return 0
  local start=$SECONDS rc
  echo "== $name ($([ "$SMOKE" = 1 ] && echo "no limit on a CPU" || echo "limit ${limit} s"))" | tee -a "$LOG"
  if [ "$SMOKE" = 1 ]; then  # a shared, loaded CPU: no limits to fail
    "$@" >"$WORK/logs/$name.log" 2>&1
  else
    timeout -k 5 "$limit" "$@" >"$WORK/logs/$name.log" 2>&1
  fi
  rc=$?
  echo "   $name: exit $rc after $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (its time limit)')" | tee -a "$LOG"
  if [ "$rc" != 0 ]; then
    status=1
    echo "---- last lines of logs/$name.log ----"
    tail -n 25 "$WORK/logs/$name.log"
    echo "----"
  fi
  archive
  return "$rc"
}

[ "$DRY" = 1 ] && echo "budgets: $total s with the install ($INSTALL_S s)"
[ "$DRY" = 1 ] || { nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"; } >>"$LOG"
if ! step preflight "$PY" -m benchmarks.gpu_preflight "${PRECHECK[@]}" --out "$WORK"; then
  stopped=preflight  # one line: the preflight's own verdict, else its exit
  why=$(grep -h '^gpu_check: ' "$WORK/logs/preflight.log" | tail -1)
  if [ -z "$why" ] && grep -q ': exit 124 ' "$LOG"; then  # its time limit: which checks had finished
    done_checks=$(grep -o '^preflight [a-z_]*: ok' "$WORK/logs/preflight.log" | cut -d' ' -f2 | tr -d : | paste -sd, -)
    why="gpu_check: the preflight ran out of its $(budget preflight) s (checks done: ${done_checks:-none})"
  fi
  echo "${why:-gpu_check: the preflight failed (see logs/preflight.log)}; the other steps are skipped" | tee -a "$LOG"
fi
for phase in "${PHASES[@]}"; do
  step "$phase" "$PY" -m benchmarks.gpu_pretrain "$phase" "${PRETRAIN[@]}" --work "$RUNS" --out "$WORK"
done
step train_step "$PY" -m benchmarks.bench_step "${STEP[@]}" --out "$WORK"
step attention "$PY" -m benchmarks.bench_attention "${ATTN[@]}" --out "$WORK"
step memory "$PY" -m benchmarks.bench_memory "${MEMORY[@]}" --out "$WORK"
step overhead "$PY" -m benchmarks.bench_step --overhead "${OVERHEAD[@]}" --out "$WORK"
# nvjpeg throughput with bench_data's photo-like JPEGs (DALI's wheel is too large to carry)
step decode "$PY" -m benchmarks.gpu_decode "$WORK" $DECODE
[ ${#COMPILE[@]} -eq 0 ] || step compile "$PY" -m benchmarks.bench_compile "${COMPILE[@]}" --out "$WORK"
stopped=""  # the summary runs whatever stopped the steps: it says what is missing
step summary "$PY" -m benchmarks.summarize "$WORK" --brief
[ "$DRY" = 1 ] && exit 0
cp "$WORK/brief.txt" "$DEST/brief.txt" 2>/dev/null || echo "(no brief: see logs/summary.log)" >"$DEST/brief.txt"
archive
cat "$DEST/brief.txt"
echo "gpu_check: $DEST/gpu_check.tar.gz ($(du -h "$DEST/gpu_check.tar.gz" | cut -f1)) and brief.txt; exit $status"
rm -rf "$WORK" "$RUNS"
exit $status
