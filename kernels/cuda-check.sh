#!/usr/bin/env bash
# Runs the CUDA checks of mixq-kernels in one go on a GPU machine: the correctness tests (whose
# CUDA parts skip on a CPU-only machine), then a CUDA timing of QLinear against libtorch FP32 at
# the bench shapes. Run from the repository root: kernels/cuda-check.sh
# Output: the test log and a table on stdout; exit status non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=scripts/with-env
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || { echo "cuda-check: no nvidia-smi / GPU"; exit 1; }
$RUN python -c 'import torch; assert torch.cuda.is_available(), "libtorch sees no CUDA device"; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
# Release build so the timings mean something; the tests themselves are fast.
$RUN cargo test --release -p mixq-kernels -- --nocapture 2>&1 | tee /tmp/mixq-kernels-cuda-tests.log
grep -q "CUDA part skipped" /tmp/mixq-kernels-cuda-tests.log && { echo "cuda-check: the CUDA tests were skipped"; exit 1; }
$RUN cargo run --release -p mixq-kernels --example cuda_bench
