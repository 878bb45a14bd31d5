#!/usr/bin/env bash
# One-shot GPU run for an H100/H200 box (works offline; installs nothing):
#   1. the GPU tests (pytest -m gpu, and the kernel test files on cuda), time-capped
#   2. kernel benchmarks at the anchors' shapes (eager / inductor / tile), then the host
#      time per tile-op call (benchmarks/host_overhead.py)
#   3. model benchmarks (GPT-2, Llama-style, BERT, ViT; GPT-2 training step)
#   4. (full run, time permitting) kernel size sweeps and inductor max-autotune
#   5. the README's Results section (readme_results.md), and the comparison table, printed
#      LAST (tile vs eager vs inductor, and vs the anchors
#      in shared/anchors when present)
# Everything lands in RESULTS_DIR (results.json/.csv/.md, PNG plots, logs).  The whole run
# is budgeted to finish within 6 minutes (ONESHOT_BUDGET_S, default 330 s of work; each
# stage is capped with `timeout`, and results are written row by row, so a cut keeps what
# was measured; ONESHOT_TESTS=0 skips the tests and leaves their time to the benchmarks);
# --quick does less (no sweeps, no warm compiles, no training step, two models).
# Missing transformers/safetensors skip the model benchmarks, missing matplotlib the
# plots, missing pytest the tests -- each with a message; kernel benchmarks need only
# torch + triton.
#
#   usage: bash benchmarks/gpu_oneshot.sh RESULTS_DIR [--quick]
#
# A dry run of the same steps on a CPU (tiny sizes, no tests), to check the script:
#   ONESHOT_DEVICE=cpu ONESHOT_EXTRA="--providers eager,tile_eager" bash benchmarks/gpu_oneshot.sh /tmp/x --quick
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash benchmarks/gpu_oneshot.sh RESULTS_DIR [--quick]}
QUICK=0
[ "${2:-}" = "--quick" ] && QUICK=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
T0=$(date +%s)
TOTAL=${ONESHOT_BUDGET_S:-330}
DEV=${ONESHOT_DEVICE:-cuda}
EXTRA=${ONESHOT_EXTRA:-}

left() { echo $((TOTAL - ($(date +%s) - T0))); }
# cap WANT RESERVE: WANT seconds, or fewer so that RESERVE seconds remain afterwards
cap() {
  local want=$1 l
  l=$(($(left) - $2))
  [ "$l" -lt "$want" ] && want=$l
  [ "$want" -lt 0 ] && want=0
  echo "$want"
}
say() { echo "[oneshot +$(($(date +%s) - T0))s] $*"; }

# the repo's .venv when it has torch + triton, else the machine's python3 (repo on the path)
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, triton" >/dev/null 2>&1; then
  PY=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=1
[ "$DEV" = cuda ] && unset TRITON_INTERPRET

# --- 0. environment ---------------------------------------------------------------------
{
  say "python: $PY ($($PY -c 'import sys; print(sys.version.split()[0])'))"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY - <<'EOF'
import importlib
for m in ("torch", "triton", "transformers", "safetensors", "matplotlib", "pytest"):
    try:
        print(f"  {m:13} {importlib.import_module(m).__version__}")
    except Exception as e:
        print(f"  {m:13} MISSING ({type(e).__name__})")
import torch
print("  cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$OUT/env.log"
if [ "$DEV" = cuda ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "no CUDA device: this script is for a GPU box (on CPU use scripts/test.sh)"
  exit 1
fi

# --- 1. GPU tests -----------------------------------------------------------------------
TESTS_SUMMARY="tests: not run"
if [ "$DEV" != cuda ] || [ "${ONESHOT_TESTS:-1}" = 0 ]; then
  TESTS_SUMMARY="tests: not run (ONESHOT_DEVICE=$DEV, ONESHOT_TESTS=${ONESHOT_TESTS:-1})"
elif $PY -c "import pytest" >/dev/null 2>&1; then
  KFILES="tests/test_kernel_matmul.py tests/test_kernel_norms.py tests/test_kernel_softmax.py"
  IGN=""
  for f in $KFILES; do IGN="$IGN --ignore=$f"; done
  T_GPU=$(cap $([ $QUICK = 1 ] && echo 20 || echo 30) 240)
  T_KER=$(cap $([ $QUICK = 1 ] && echo 35 || echo 50) 220)
  say "tests: pytest -m gpu (cap ${T_GPU}s), then the kernel test files on cuda (cap ${T_KER}s)"
  TILEBACKEND_TEST_DEVICE=cuda timeout -k 5 "$T_GPU" $PY -m pytest -q -p no:cacheprovider -m gpu tests $IGN \
    >"$OUT/tests_gpu_marked.log" 2>&1
  RC1=$?
  TILEBACKEND_TEST_DEVICE=cuda timeout -k 5 "$T_KER" $PY -m pytest -q -p no:cacheprovider $KFILES \
    >"$OUT/tests_kernels_cuda.log" 2>&1
  RC2=$?
  s1=$(grep -E "passed|failed|error|no tests ran|deselected" "$OUT/tests_gpu_marked.log" | tail -1)
  s2=$(grep -E "passed|failed|error|no tests ran|deselected" "$OUT/tests_kernels_cuda.log" | tail -1)
  [ $RC1 = 124 ] || [ $RC1 = 137 ] && s1="TIMED OUT after ${T_GPU}s (partial: $(grep -cE '^(FAILED|ERROR)' "$OUT/tests_gpu_marked.log") failures listed)"
  [ $RC2 = 124 ] || [ $RC2 = 137 ] && s2="TIMED OUT after ${T_KER}s (see tests_kernels_cuda.log)"
  TESTS_SUMMARY="tests -m gpu: rc=$RC1 ${s1:-?}
tests kernel files on cuda: rc=$RC2 ${s2:-?}"
  grep -E "^(FAILED|ERROR)" "$OUT/tests_gpu_marked.log" "$OUT/tests_kernels_cuda.log" | head -20
else
  TESTS_SUMMARY="tests: SKIPPED (pytest is not installed here)"
fi
say "$TESTS_SUMMARY"

BENCH="$PY -m tilebackend bench --out $OUT --device $DEV"
Q=""
[ $QUICK = 1 ] && Q="--quick"

# --- 2. kernels at the anchors' shapes --------------------------------------------------
T=$(cap $([ $QUICK = 1 ] && echo 60 || echo 80) 100)
say "kernel benchmarks (cap ${T}s)"
timeout -k 5 "$T" $BENCH --what kernels --no-sweeps $Q --time-budget $((T > 15 ? T - 10 : 5)) $EXTRA \
  2>&1 | tee "$OUT/bench_kernels.log" | grep -E "^\[bench\]|Error|error" | grep -v "^\[bench\] wrote"

# --- 2b. host time per tile-op call (a few seconds) -------------------------------------
T=$(cap 20 90)
if [ "$T" -gt 5 ]; then
  say "host time per call (cap ${T}s)"
  timeout -k 5 "$T" $PY benchmarks/host_overhead.py --device "$DEV" --json "$OUT/host_overhead.json" \
    2>&1 | tee "$OUT/host_overhead.log"
fi

# --- 3. models --------------------------------------------------------------------------
if [ $QUICK = 1 ]; then
  MODELS="--models gpt2,llama --train="
  T=$(cap 200 12)
else
  MODELS="--models gpt2,llama,bert,vit --train gpt2"
  T=$(cap 240 12)
fi
if [ "$T" -gt 30 ]; then
  say "model benchmarks (cap ${T}s): $MODELS"
  timeout -k 5 "$T" $BENCH --what models $MODELS $Q --time-budget $((T - 10)) $EXTRA \
    --ckpt-root "${TMPDIR:-/tmp}" 2>&1 | tee "$OUT/bench_models.log" \
    | grep -E "^\[bench\]|Error" | grep -v "^\[bench\] wrote"
else
  say "model benchmarks SKIPPED: no time left"
fi

# --- 4. CUDA graphs, sweeps and max-autotune (full run, if time is left) -----------------
if [ $QUICK = 0 ]; then
  T=$(cap 60 60)
  if [ "$T" -gt 40 ]; then
    say "GPT-2 inference with CUDA graphs, tile vs inductor (cap ${T}s)"
    timeout -k 5 "$T" $BENCH --what models --models gpt2 --train= \
      --providers inductor_cudagraphs,tile_cudagraphs --no-warm-compile --time-budget $((T - 8)) $EXTRA \
      --ckpt-root "${TMPDIR:-/tmp}" 2>&1 | tee "$OUT/bench_cudagraphs.log" \
      | grep -E "^\[bench\]|Error" | grep -v "^\[bench\] wrote"
  fi
  T=$(cap 40 12)
  if [ "$T" -gt 20 ]; then
    say "kernel sweeps (cap ${T}s)"
    timeout -k 5 "$T" $BENCH --what kernels --sweeps --cases sweep. --providers eager,tile \
      --quick --time-budget $((T - 8)) $EXTRA 2>&1 | tee "$OUT/bench_sweeps.log" \
      | grep -E "^\[bench\] kernel" | tail -30
  fi
  T=$(cap 60 10)
  if [ "$T" -gt 50 ]; then
    say "inductor max-autotune on linear_bias_gelu (cap ${T}s)"
    timeout -k 5 "$T" $BENCH --what kernels --no-sweeps --cases linear_bias_gelu \
      --providers inductor_max_autotune --quick $EXTRA 2>&1 | tee "$OUT/bench_max_autotune.log" \
      | grep -E "^\[bench\] kernel"
  fi
fi

# --- 5. the comparison table, last ------------------------------------------------------
# the README's Results section for this run (apply it where the repo lives:
#   python -m tilebackend.bench.readme RESULTS_DIR --readme README.md)
[ "$DEV" = cuda ] && $PY -m tilebackend.bench.readme "$OUT" >"$OUT/readme_results.md" 2>"$OUT/readme_results.log"
echo
echo "$TESTS_SUMMARY"
say "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
$PY -m tilebackend bench --out "$OUT" --table-only
