#!/usr/bin/env bash
# Installs loradrop and what its tests, recipes and quickstart need, on a fresh machine.
# torch is installed only when missing: an existing (CUDA) build is never replaced. Without a GPU it takes the
# release this project is tested with, which on our CI machines is a local CPU wheel (no multi-GB CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q "torch==2.13.0"
  fi
fi
"$PY" -m pip install -q -e ".[dev,demo]"
