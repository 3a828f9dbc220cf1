#!/usr/bin/env bash
# GPU check for the CUDA backend, on a machine with an NVIDIA GPU, a CUDA build of torch and a CUDA
# toolkit of the same major version:
#   1. build the extension fastsam._C (fails loudly if it cannot),
#   2. fastsam info (which backends load, and why not),
#   3. the whole test suite (the op tests then run every backend on CUDA tensors, and the tests
#      marked gpu run: no host sync, CUDA-graph capture, torch.compile, opcheck),
#   4. the backend benchmark (cuda vs triton vs torch per op and size, GB/s against the copy
#      bandwidth) appended to bench/results/backends.csv, and this GPU's measured order written into
#      the auto-dispatch table fastsam/auto_table.json (review and commit both).
# Everything printed is also kept in bench/results/gpu_check_<gpu>.log.
#
# Usage: bench/gpu_check.sh [python]     (MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured by the build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python}
mkdir -p bench/results
GPU=$("$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))")
TAG=$(echo "$GPU" | tr -c 'A-Za-z0-9\n' '_')
LOG="bench/results/gpu_check_${TAG}.log"

{
  echo "== $(date -u +%FT%TZ) $GPU, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "== 1. build the CUDA extension"
  FASTSAM_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
  if ! "$PY" -c "import torch, fastsam._C"; then
    echo "(editable install did not place fastsam._C in the tree; building in place)"
    FASTSAM_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
  fi
  echo "== 2. fastsam info"
  "$PY" -m fastsam info
  "$PY" -c "from fastsam import _extension; ok, why = _extension.status(); assert ok, why; print('cuda backend loads')"
  echo "== 3. tests"
  "$PY" -m pytest -q -rs
  echo "== 4. benchmark: cuda vs triton vs torch"
  "$PY" -m fastsam.bench.bench_backends --device cuda --sets small2000,resnet18,vit_b --dtype float32 \
      --write-table fastsam/auto_table.json
  "$PY" -m fastsam.bench.bench_backends --device cuda --sets resnet18,vit_b --dtype bfloat16 --no-sds
  echo "== done: bench/results/backends.csv, fastsam/auto_table.json, $LOG"
} 2>&1 | tee "$LOG"
