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
# installed (not just importable from this folder): the entry point registers backend="tile"
if ! "$VPY" -c "import importlib.metadata as m; m.distribution('tilebackend')" >/dev/null 2>&1; then
  "$VPY" -m pip install -q --no-deps --no-build-isolation -e . \
    || "$VPY" -m pip install -q --no-deps -e .
fi
# The test extra's packages (pyproject.toml: [project.optional-dependencies] test), each
# only when missing.  A constraint pins the torch in use, so pip can never swap it.
TORCH_NOW=$("$VPY" -c "import torch; print(torch.__version__)")
PIN=$(mktemp)
echo "torch==$TORCH_NOW" >"$PIN"
for pair in "pytest:pytest>=8" "ruff:ruff>=0.6" "numpy:numpy" "transformers:transformers>=4.46" \
  "safetensors:safetensors>=0.4.3" "matplotlib:matplotlib>=3.7" "expecttest:expecttest"; do
  mod=${pair%%:*}
  spec=${pair#*:}
  if ! "$VPY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$mod') is None)" 2>/dev/null; then
    "$VPY" -m pip install -q --retries 1 -c "$PIN" "$spec" \
      || echo "[setup] could not install $spec (offline?); the tests that need it are skipped"
  fi
done
rm -f "$PIN"
if [ "$("$VPY" -c 'import torch; print(torch.__version__)')" != "$TORCH_NOW" ]; then
  echo "[setup] ERROR: installing the test packages changed torch ($TORCH_NOW)" >&2
  exit 1
fi
"$VPY" -c "import torch, triton, tilebackend; print('[setup] torch', torch.__version__, 'triton', triton.__version__)"
