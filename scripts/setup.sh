#!/usr/bin/env bash
# One-time (idempotent) set-up: a virtualenv in .venv with torch and balcony installed.
# torch is installed first and pinned, so pip never resolves a newer (multi-GB CUDA) build.
# Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Where an NVIDIA GPU answers, ask for the CUDA build explicitly (a wheel mirror may serve the CPU-only one).
if [ -z "${TORCH_SPEC:-}" ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
fi
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${BALCONY_EXTRAS:-dev}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check $TORCH_SPEC 2>&1 | grep -v "^WARNING: Location" || true
fi
TORCH_VERSION=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null)
# Install balcony with torch held at what is installed.
.venv/bin/pip install -q --disable-pip-version-check -e ".[${EXTRAS}]" "torch==${TORCH_VERSION}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import balcony, torch; print(f'balcony {balcony.__version__} ready (torch {torch.__version__})')"
