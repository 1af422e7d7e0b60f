#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): GPU tests, a 200-step bf16 training, `balcony bench` on the device and a
# quality run with the time left, in about 8 minutes on an H200; prints one table, writes everything to $OUT.
#   scripts/setup.sh && scripts/gpu_check.sh                 # a CUDA machine (setup picks a CUDA torch there)
#   scripts/gpu_check.sh --device cpu --size small           # the same stages at their smallest, on any CPU
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "[gpu-check] no .venv: run scripts/setup.sh first (it installs a CUDA build of torch where nvidia-smi works)" >&2
  exit 2
fi
exec .venv/bin/python scripts/gpu_check.py "$@"
