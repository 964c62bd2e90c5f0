#!/usr/bin/env bash
# PyHessian cross-check of mixq's Hessian traces and side-by-side HVP timing (see README.md).
#
#   experiments/pyhessian/run.sh            # traces + PyTorch timing
#   experiments/pyhessian/run.sh --bench    # ... and mixq's criterion bench on the same model and batch
#
# Environment: PROBES (default 2000, for mixq and for PyHessian alike), SEED (0), MIXQ (a mixq
# binary; default: build target/release/mixq), OMP_NUM_THREADS (passed to both sides).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
PROBES="${PROBES:-2000}"
SEED="${SEED:-0}"
OUT=experiments/pyhessian/results
mkdir -p "$OUT"
PY="$MIXQ_VENV/bin/python"

# PyHessian 0.1 (PyPI) declares only numpy and torch, both already in the pinned venv; --no-deps keeps
# pip from touching the pinned torch 2.13.0.
if ! "$PY" -c 'import pyhessian' 2>/dev/null; then
  "$MIXQ_VENV/bin/pip" install --no-deps 'pyhessian==0.1'
fi

if [ -z "${MIXQ:-}" ]; then
  cargo build --release --bin mixq
  MIXQ=target/release/mixq
fi

echo "== mixq sensitivity: $PROBES Hutchinson probes, seed $SEED"
"$MIXQ" sensitivity --model tests/fixtures/tiny_cnn.pt --data digits:calib --estimator hutchinson --curvature hessian \
  --min-probes "$PROBES" --max-probes "$PROBES" --seed "$SEED" -o "$OUT/mixq_report.json" 2>&1 | tee "$OUT/mixq_stderr.txt"

echo "== PyHessian and the exact Hessian"
"$PY" experiments/pyhessian/crosscheck.py --model tests/fixtures/tiny_cnn.pt --digits data/digits/digits.safetensors \
  --mixq-report "$OUT/mixq_report.json" --probes "$PROBES" --seed "$SEED" --out "$OUT/results.json" | tee "$OUT/crosscheck.txt"

if [ "${1:-}" = "--bench" ]; then
  echo "== mixq HVP bench (criterion), same model and batch"
  cargo bench --bench hvp -- tiny_cnn --warm-up-time 1 --measurement-time 5 2>&1 | grep -A2 '^hvp_tiny' | tee "$OUT/bench.txt"
fi
