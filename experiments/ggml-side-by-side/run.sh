#!/usr/bin/env bash
# mixq's W4 GEMV kernels beside ggml's CPU MUL_MAT (q4_K, q4_0, q8_0, f32) at one shape, on the
# same machine, one after the other. ggml is not vendored: it is built from a local copy of
# ggml-org/ggml (GGML_SRC, e.g. a `fetch` mirror's work tree or `git archive` of it) or taken
# ready-built from GGML_BIN. Nothing is downloaded.
#
# ggml's `test-backend-ops perf` multiplies by one weight over and over (the 33 MB q4_K weight of
# 4096 × 14336 is about the size of this VM's 32 MiB L3, so part of it stays cached between
# runs). mixq's A/B tool (kernels/examples/w4_gemv.rs) is therefore run twice: in ggml's protocol
# (MIXQ_AB_SKIP_READ=1: the same weight again and again, nothing evicted) and cold (a 64 MiB read
# before every call, so the weight comes from DRAM).
#
# ggml reports the mean over >= 1 s of back-to-back runs of one graph; mixq's tool in
# MIXQ_AB_B2B=20 mode takes each sample as the mean of 20 back-to-back calls, the same protocol.
# Because this VM's bandwidth drifts by up to 2x within a minute, the last part alternates the two
# tools PAIRS times (ggml q4_K, then mixq W4A8) and reports each pair's ratio and their median.
#
# Usage: experiments/ggml-side-by-side/run.sh [ROUNDS]   (default 41; K=14336, N=4096, M=1)
# Env: PAIRS (default 7) alternations in the last part.
# Env: GGML_BIN=path/to/test-backend-ops, or GGML_SRC=path/to/ggml source tree (built with cmake
# -DGGML_NATIVE=ON into $MIXQ_SCRATCH). Output: results/<date>-<HHMM>.txt (UTC).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
rounds="${1:-41}"
scratch="${MIXQ_SCRATCH:-${TMPDIR:-/tmp}/mixq-ggml-side-by-side}"
mkdir -p "$scratch" "$here/results"
. "$root/scripts/env.sh"
if [ -z "${GGML_BIN:-}" ]; then
  src="${GGML_SRC:-}"
  if [ -z "$src" ]; then
    mirror=/work/.mirror/ggml-org+ggml/repo
    [ -d "$mirror" ] || { echo "set GGML_BIN (a built test-backend-ops) or GGML_SRC (a ggml source tree)" >&2; exit 2; }
    src="$scratch/ggml-src"
    if [ ! -f "$src/CMakeLists.txt" ]; then
      mkdir -p "$src" && git --git-dir="$mirror" archive HEAD | tar -x -C "$src"
    fi
  fi
  cmake -S "$src" -B "$scratch/ggml-build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_BUILD_TESTS=ON >/dev/null
  cmake --build "$scratch/ggml-build" --target test-backend-ops -j "$(nproc)" >/dev/null
  GGML_BIN="$scratch/ggml-build/bin/test-backend-ops"
fi
(cd "$root" && scripts/with-env cargo build --release -q -p mixq-kernels --example w4_gemv)
ab="$root/target/release/examples/w4_gemv"
out="$here/results/$(date -u +%Y-%m-%d-%H%M).txt"
{
  echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "## ggml test-backend-ops perf, x[1×14336] · W[4096×14336] (m=4096 n=1 k=14336)"
  "$GGML_BIN" perf -o MUL_MAT -b CPU -p "type_a=(f32|q8_0|q4_0|q4_K),type_b=f32,m=4096,n=1,k=14336" 2>&1 | grep -E "MUL_MAT|Backend|CPU" || true
  echo "## mixq w4_gemv, ggml's protocol (same weight each call, nothing evicted), group 64"
  MIXQ_AB_SKIP_READ=1 "$ab" 4096 14336 1 64 "$rounds" 0
  echo "## mixq w4_gemv, cold (64 MiB read before each call), group 64"
  "$ab" 4096 14336 1 64 "$rounds" 0
  echo "## alternating, same protocol: ggml q4_K (mean over >= 1 s of back-to-back runs) then mixq W4A8"
  echo "## (MIXQ_AB_SKIP_READ=1 MIXQ_AB_B2B=20: median over 7 rounds of the mean of 20 back-to-back calls)"
  ratios=()
  for p in $(seq "${PAIRS:-7}"); do
    g=$("$GGML_BIN" perf -o MUL_MAT -b CPU -p "type_a=q4_K,type_b=f32,m=4096,n=1,k=14336" 2>&1 | grep MUL_MAT | sed -E 's/.* ([0-9.]+) us\/run.*/\1/')
    q=$(MIXQ_AB_SKIP_READ=1 MIXQ_AB_B2B=20 "$ab" 4096 14336 1 64 7 0 2>&1 | awk '/^w4a8/{print $4 * 1000}')
    r=$(python3 -c "print(f'{$q / $g:.3f}')")
    ratios+=("$r")
    echo "pair $p: ggml q4_K ${g} us, mixq W4A8 ${q} us, mixq/ggml ${r} (load $(cut -d' ' -f1 /proc/loadavg))"
  done
  echo "median mixq/ggml time ratio over ${#ratios[@]} pairs: $(printf '%s\n' "${ratios[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') (below 1: mixq faster)"
  echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee "$out"
