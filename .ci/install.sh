#!/usr/bin/env bash
# Installs loradrop and what one use of it needs into the active Python environment (the README creates .venv first).
#
#   bash .ci/install.sh quickstart   # the library and the quickstart's needs (datasets, evaluate, gguf)
#   bash .ci/install.sh              # everything the tests use too: DeepSpeed, TRL, bitsandbytes, pytest, ruff
#
# pip picks today's releases within the ranges setup.py declares (the README's "Tested versions" says which were
# tested); nothing is pinned, so this is what a user installing today gets. torch is installed only when missing, so
# an existing (CUDA) build is never replaced; without a GPU it takes the release the CPU tests run on, which on our CI
# machines is a local CPU wheel (no multi-GB CUDA download).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python3}
case "${1:-tests}" in
  quickstart) extras="demo" ;;
  tests) extras="dev,demo" ;;
  *) echo "usage: bash .ci/install.sh [quickstart|tests]" >&2; exit 2 ;;
esac
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q "torch==2.13.0"
  fi
fi
"$PY" -m pip install -q -e ".[$extras]"
