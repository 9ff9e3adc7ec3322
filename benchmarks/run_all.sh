#!/usr/bin/env bash
# The benchmark suite: data loading, data start-up at scale, attention kernels, training steps,
# activation checkpointing's memory, scaling model.
#   bash benchmarks/run_all.sh [--quick] [--out DIR]
# Writes <name>.json, <name>.log, PNG plots and summary.md (hardware, torch, commit) into
# DIR (default: a new benchmarks/results/<machine>-<date>T<time>-quick|full/ per run, so no
# run overwrites another). --quick is the CPU smoke run
# (a few minutes on 2 cores); without it each benchmark runs its full grid (for a GPU).
# Ctrl-C (or a TERM) stops the suite and ends the benchmark it was running, children included.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}"
export PYTHONUNBUFFERED=1

QUICK=() COMPILE=()
MEMORY=(--steps 3 --warmup 1 --repeats 1)  # pixelbert-r50 800x1333 micro-batch 2
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=(--quick) COMPILE=(--repeats 3) MEMORY=(--preset tiny --image 128 128 --steps 1 --warmup 0 --repeats 1) ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (use --quick, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT" ]; then
  SUITE=full; [ ${#QUICK[@]} -gt 0 ] && SUITE=quick
  OUT=$("$PY" -c 'import sys; from benchmarks.common import new_run_dir; print(new_run_dir(sys.argv[1]))' "$SUITE" 2>/dev/null | tail -1)
fi
mkdir -p "$OUT"
echo "results: $OUT"

failed=0 child="" current=""
# `timeout` runs each benchmark in a process group of its own, out of the terminal's reach:
# a Ctrl-C reaches this script only, which ends that group (the benchmark, its DataLoader
# workers, its ranks) and stops instead of starting the next benchmark.
stop() {
  trap - INT TERM
  echo "run_all.sh: $1: stopping ${current:-the suite}" >&2
  if [ -n "$child" ]; then
    kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null || true
    wait "$child" 2>/dev/null || true
  fi
  exit 130
}
trap 'stop interrupted' INT
trap 'stop terminated' TERM

run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, keep going on a failure
  local name=$1 limit=$2; shift 2
  local start=$SECONDS status=0
  current=$name
  echo "== $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1 &
  child=$!
  wait "$child" || status=$?
  child=""
  if [ "$status" = 0 ]; then
    grep '^|' "$OUT/$name.log" || true
    echo "   ok in $((SECONDS - start)) s"
  else
    echo "   FAILED (exit $status) after $((SECONDS - start)) s; see $OUT/$name.log" >&2
    tail -5 "$OUT/$name.log" >&2
    failed=1
  fi
}

run bench_data 300 "$PY" -m benchmarks.bench_data "${QUICK[@]}" --out "$OUT/bench_data.json"
# per-rank start-up and RSS of the indexed loader at 10^4..10^6 samples (builds them once)
run bench_index 900 "$PY" -m benchmarks.bench_index "${QUICK[@]}" --out "$OUT"
run bench_attention 300 "$PY" -m benchmarks.bench_attention "${QUICK[@]}" --out "$OUT"
run bench_step 1800 "$PY" -m benchmarks.bench_step "${QUICK[@]}" --out "$OUT"
run bench_compile 900 "$PY" -m benchmarks.bench_compile "${COMPILE[@]}" --out "$OUT"
# peak tensor memory and step time with activation checkpointing none / transformer / all
run bench_memory 1800 "$PY" -m benchmarks.bench_memory "${MEMORY[@]}" --modes none transformer all --out "$OUT"
# Pixel-BERT-R50 on 1-64 nodes of H100s at an assumed 40% MFU (the traffic model that
# bench_comms.py checks against DeepSpeed's comms logger)
run bench_scaling 120 "$PY" -m benchmarks.bench_scaling --preset pixelbert-r50 --gpu H100 --mfu 0.4 \
  --micro-batch 8 --out "$OUT"
run summarize 120 "$PY" -m benchmarks.summarize "$OUT"
echo "summary: $OUT/summary.md"
exit "$failed"
