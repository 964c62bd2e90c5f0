#!/usr/bin/env bash
# Interleaved timing rounds of the HVP bench (benches/hvp.rs, `tiny_cnn` group) against
# PyTorch (crosscheck.py --timing-only), single-threaded, with the load average of each run
# (see README.md, "grad_outputs" timing). Odd rounds: after, PyTorch, before; even rounds:
# before, PyTorch, after.
#
#   AFTER=<bench binary> [BEFORE=<bench binary>] [ROUNDS=2] experiments/pyhessian/timing_rounds.sh
#
# A bench binary is what `cargo bench --bench hvp --no-run` prints (target/release/deps/hvp-*),
# copied away before rebuilding the other version (BEFORE: one built from the older commit).
# Criterion's output goes to $CRITERION_HOME (default: a temporary directory); after each run
# the min / median / mean time per product over criterion's samples is printed.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
: "${AFTER:?set AFTER to a bench binary (target/release/deps/hvp-*)}"
ROUNDS="${ROUNDS:-2}"
export OMP_NUM_THREADS=1
export CRITERION_HOME="${CRITERION_HOME:-$(mktemp -d)}"
PY="$MIXQ_VENV/bin/python"
load() { echo "$(date -u +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"; }
bench() { # $1: after | before, $2: the binary
  [ -n "$2" ] || return 0
  echo "-- mixq $1 $(load)"
  "$2" --bench tiny_cnn --warm-up-time 1 --measurement-time 5 2>&1 | grep -A2 '^hvp_tiny'
  "$PY" - "$CRITERION_HOME" <<'PYEOF'
import json, os, statistics, sys
g = os.path.join(sys.argv[1], "hvp_tiny_cnn_fixture_179_samples")
print("criterion samples, per product: min / median / mean ms")
for k in (1, 4, 16):
    s = json.load(open(os.path.join(g, f"hessian_{k} probes per pass", "new", "sample.json")))
    per = [t / n / k / 1e6 for t, n in zip(s["times"], s["iters"])]
    print(f"  {k:>2} probe(s) per pass: {min(per):.2f} / {statistics.median(per):.2f} / {statistics.mean(per):.2f} ms ({len(per)} samples)")
PYEOF
}
py() {
  echo "-- PyTorch $(load)"
  "$PY" experiments/pyhessian/crosscheck.py --model tests/fixtures/tiny_cnn.pt --digits data/digits/digits.safetensors --timing-only
}
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r $(load)"
  if [ $((r % 2)) = 1 ]; then bench after "$AFTER"; py; bench before "${BEFORE:-}"; else bench before "${BEFORE:-}"; py; bench after "$AFTER"; fi
  echo
done
echo "== end $(load)"
