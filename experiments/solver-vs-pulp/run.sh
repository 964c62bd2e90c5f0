#!/usr/bin/env bash
# mixq's allocator vs PuLP + CBC on the same seeded synthetic instance (2,000 layers × 8 formats),
# one budget and three budgets. mixq writes the instance (`mixq synthetic`) and solves it
# (`mixq allocate --cost-table … --json`, which reports the solver's own time); compare.py builds
# the same 0/1 program in PuLP from that CSV with the limits mixq resolved, solves it with CBC, and
# prints the side-by-side table. Usage: experiments/solver-vs-pulp/run.sh [REPEATS]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
repeats="${1:-5}"
B="${MIXQ_BIN:-$root/target/release/mixq}"
[ -x "$B" ] || (cd "$root" && scripts/with-env cargo build --release --bin mixq)
. "$root/scripts/env.sh"
PY="$MIXQ_VENV/bin/python"
"$PY" -c "import pulp" 2>/dev/null || "$PY" -m pip install --quiet pulp
# The instance (1.3 MB) and the per-run JSON go to a scratch folder; results/ keeps the table.
out="${MIXQ_SCRATCH:-${TMPDIR:-/tmp}/mixq-solver-vs-pulp}"
rm -rf "$out" && mkdir -p "$out" "$here/results"
"$B" synthetic --seed 1 --layers 2000 --formats 8 -o "$out/synthetic-s1-2000x8.csv"
run_case() { # name, budgets...
  local name="$1"; shift
  local args=()
  for b in "$@"; do args+=(--budget "$b"); done
  for i in $(seq 1 "$repeats"); do
    local t0 t1
    t0=$(date +%s.%N)
    "$B" allocate --cost-table "$out/synthetic-s1-2000x8.csv" "${args[@]}" --json > "$out/$name.mixq.$i.json"
    t1=$(date +%s.%N)
    echo "$t0 $t1" > "$out/$name.mixq.$i.wall"
  done
}
run_case one-budget size=30%
run_case three-budgets size=30% bops=35% latency=40%
run_case three-budgets-binding size=30% bops=30% latency=35%
"$PY" "$here/compare.py" "$out" "$repeats" one-budget three-budgets three-budgets-binding | tee "$here/results/table.txt"
cp "$out/solver-vs-pulp.csv" "$here/results/"
