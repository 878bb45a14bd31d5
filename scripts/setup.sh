#!/usr/bin/env bash
# Create .venv with tilebackend installed (editable) plus its test tools.
# - A machine that already has torch and triton (a GPU box): the venv sees them
#   (--system-site-packages) and nothing is reinstalled or downloaded.
# - Otherwise: torch 2.13.0 (the CPU build) and triton come from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch, triton" >/dev/null 2>&1; then
    echo "[setup] using the torch/triton already installed for $PY"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q --upgrade pip
  "$VPY" -m pip install -q "torch==2.13.0"
fi
if ! "$VPY" -c "import triton" >/dev/null 2>&1; then
  "$VPY" -m pip install -q "triton>=3.6"
fi
if ! "$VPY" -c "import tilebackend" >/dev/null 2>&1; then
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e . \
    || "$VPY" -m pip install -q --no-deps -e .
fi
for tool in pytest ruff; do
  if ! "$VPY" -c "import $tool" >/dev/null 2>&1; then
    "$VPY" -m pip install -q "$tool" || echo "[setup] could not install $tool (offline?)"
  fi
done
"$VPY" -c "import torch, triton, tilebackend; print('[setup] torch', torch.__version__, 'triton', triton.__version__)"
