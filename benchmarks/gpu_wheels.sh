#!/usr/bin/env bash
# Fill .whl/ with the wheels `bash benchmarks/gpu_check.sh` needs on the GPU machine (no
# registry there): the workplace's fetch-wheels.sh set (deepspeed, pydantic, hjson, submitit,
# omegaconf, ...) plus typing_extensions >= 4.14 (pydantic 2.14's floor; the image's own
# version is unknown) and setuptools (its distutils shim: DeepSpeed's op probe imports
# distutils, gone from Python 3.12's standard library). gpu_check.sh installs them there.
#   bash benchmarks/gpu_wheels.sh        (FETCH_WHEELS=PATH names another fetch-wheels.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
fetch=${FETCH_WHEELS:-}
for candidate in ../shared/device/fetch-wheels.sh ../../shared/device/fetch-wheels.sh; do
  [ -n "$fetch" ] || { [ -f "$candidate" ] && fetch=$candidate; }
done
[ -n "$fetch" ] && [ -f "$fetch" ] ||
  { echo "gpu_wheels: no fetch-wheels.sh beside the checkout: set FETCH_WHEELS=PATH" >&2; exit 1; }
# the versions this project's virtualenv runs with
bash "$fetch" typing_extensions==4.16.0 setuptools==84.2.1
