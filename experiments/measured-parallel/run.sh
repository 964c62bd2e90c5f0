#!/usr/bin/env bash
# Measured ΔL serially (one model, libtorch's own intra-op threads) against parallel model
# replicas (`--jobs 2`, one libtorch thread each), in interleaved rounds (see README.md).
#
#   experiments/measured-parallel/run.sh             # measure (about 7 minutes at load 4 on 2 cores)
#   experiments/measured-parallel/run.sh --summary   # only the medians of results/rounds.txt
#   experiments/measured-parallel/run.sh --wait-policy   # side check: libgomp busy-waiting (serial only)
#
# Environment: ROUNDS (default 5), MIXQ (a mixq binary; default: build target/debug/mixq, the
# binary `make demo` uses), OUT (results folder, default experiments/measured-parallel/results).
# Every run passes --no-cache, so every run computes.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/env.sh
ROUNDS="${ROUNDS:-5}"
OUT="${OUT:-experiments/measured-parallel/results}"

FEW=int2,int4,int8
MANY=int2,int3,int4,int6,int8,fp8-e4m3
# name | model | data | formats
WORKLOADS=(
  "resnet-calib|digits-resnet|digits:calib|$FEW"
  "resnet-train|digits-resnet|digits:train|$MANY"
  "tinycnn-calib|tests/fixtures/tiny_cnn.pt|digits:calib|$FEW"
  "tinycnn-train|tests/fixtures/tiny_cnn.pt|digits:train|$MANY"
)
# variant | environment | --jobs
VARIANTS=("serial||1" "jobs2||2" "serial-1thread|OMP_NUM_THREADS=1|1")

ROUNDS_FILE="$OUT/rounds.txt"
# Medians per workload and variant, from rounds.txt.
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
summary() {
  local rounds="$1"
  echo "medians over $(awk '!/^#/ {print $1}' "$rounds" | sort -u | wc -l) interleaved rounds (seconds)"
  {
    echo "workload variant measured_s wall_s runs"
    for wl in "${WORKLOADS[@]}"; do
      name=${wl%%|*}
      for v in "${VARIANTS[@]}"; do
        variant=${v%%|*}
        sel() { awk -v w="$name" -v v="$variant" -v c="$1" '!/^#/ && $2==w && $3==v {print $c}' "$rounds"; }
        echo "$name $variant $(sel 4 | median) $(sel 5 | median | xargs printf '%.3f') $(sel 4 | wc -l)"
      done
    done
  } | column -t
  echo "load average (1 min) during the runs: $(awk '!/^#/ {print $6}' "$rounds" | sort -g | sed -n '1p;$p' | paste -sd' ' - | sed 's/ / to /')"
  echo "reports identical to the workload's first serial report: $(awk '!/^#/ && $8=="yes"' "$rounds" | wc -l) of $(grep -vc '^#' "$rounds")"
}

if [ "${1:-}" = "--summary" ]; then
  summary "$ROUNDS_FILE"
  exit 0
fi
if [ -z "${MIXQ:-}" ]; then
  cargo build --bin mixq
  MIXQ=target/debug/mixq
fi

if [ "${1:-}" = "--wait-policy" ]; then
  # Side check: is the serial run slow because libgomp's threads busy-wait? resnet-calib,
  # --jobs 1, libgomp's default wait policy against OMP_WAIT_POLICY=PASSIVE, interleaved.
  for round in $(seq 1 "$ROUNDS"); do
    for policy in default PASSIVE; do
      envs=""
      [ "$policy" = default ] || envs="OMP_WAIT_POLICY=$policy"
      read -r load1 _ < /proc/loadavg
      log=$(env $envs "$MIXQ" -v sensitivity --estimator measured --no-cache --jobs 1 --json 2>&1 >/dev/null)
      echo "$round wait-policy=$policy $(grep -o '[0-9.]* s$' <<<"$log" | tail -1) load $load1"
    done
  done | tee "$OUT/omp_wait_policy.txt"
  exit 0
fi
rm -rf "$OUT/reports"
mkdir -p "$OUT/reports"
echo "# round workload variant measured_s wall_s load1 load5 report_identical_to_serial" > "$ROUNDS_FILE"
uname -a > "$OUT/machine.txt"
nproc >> "$OUT/machine.txt"
grep -m1 'model name' /proc/cpuinfo >> "$OUT/machine.txt" || true
"$MIXQ" --version >> "$OUT/machine.txt" 2>&1 || true

for round in $(seq 1 "$ROUNDS"); do
  # Alternate the order of the variants from round to round.
  if [ $((round % 2)) -eq 1 ]; then order=(0 1 2); else order=(2 1 0); fi
  for wl in "${WORKLOADS[@]}"; do
    IFS='|' read -r name model data formats <<<"$wl"
    for v in "${order[@]}"; do
      IFS='|' read -r variant envs jobs <<<"${VARIANTS[$v]}"
      read -r load1 load5 _ < /proc/loadavg
      report="$OUT/reports/$name-$variant.json"
      t0=$(date +%s.%N)
      log=$(env $envs "$MIXQ" -v sensitivity --model "$model" --data "$data" --estimator measured --formats "$formats" \
        --no-cache --jobs "$jobs" -o "$report" 2>&1 >/dev/null)
      t1=$(date +%s.%N)
      measured=$(grep -o 'measured ΔL: .* in [0-9.]* s' <<<"$log" | grep -o '[0-9.]* s$' | cut -d' ' -f1)
      wall=$(echo "$t1 - $t0" | bc)
      # The first serial report of a workload is the reference for all its later runs.
      ref="$OUT/reports/$name-reference.json"
      [ -f "$ref" ] || [ "$variant" != serial ] || cp "$report" "$ref"
      same=$(cmp -s "$report" "$ref" && echo yes || echo no)
      echo "$round $name $variant $measured $wall $load1 $load5 $same" | tee -a "$ROUNDS_FILE"
    done
  done
done

summary "$ROUNDS_FILE" | tee "$OUT/summary.txt"
