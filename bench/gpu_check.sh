#!/usr/bin/env bash
# The GPU proof, on a machine with an NVIDIA GPU, a CUDA build of torch and a CUDA toolkit of the
# same major version (no internet needed). Stages, all by default, or the ones named:
#
#   build     build the extension fastsam._C (fails loudly if it cannot) and print `fastsam info`
#   tests     the whole test suite: the op tests then run every backend on CUDA tensors, and the
#             tests marked gpu run (no host sync under set_sync_debug_mode("error") for SAM, ASAM,
#             FisherSAM, ESAM, mSAM, GSAM, LookSAM steps; CUDA-graph capture and replay;
#             torch.compile; opcheck; fp16 autocast + GradScaler)
#   backends  cuda vs triton vs torch per op and size, GB/s against the measured copy bandwidth
#             (bench/results/backends.csv), and this GPU's measured order written into the
#             auto-dispatch table fastsam/auto_table.json
#   bench     `fastsam bench` (full plan: kernels on resnet18 / vit_b / small2000 / 1B values, SDS,
#             end to end) appended to bench/results/results.csv, then the plot and the README block
#
# Usage: bench/gpu_check.sh [-o OUT_DIR] [stage ...]
#   PY=python3 selects the interpreter; MAX_JOBS and TORCH_CUDA_ARCH_LIST are honoured by the build.
#   With -o, the result files (CSV rows, table, plot, log) are also copied to OUT_DIR (at most 8
#   files, flat), e.g. the $OUT folder of a remote GPU run. Each stage fits in a 10-minute command
#   on an H100/H200 except possibly `bench`, which can be split with FASTSAM_BENCH_ONLY=subjects.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT_DIR=""
if [[ "${1:-}" == "-o" ]]; then OUT_DIR=$2; shift 2; fi
STAGES=("$@")
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=(build tests backends bench)

mkdir -p bench/results
GPU=$("$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))")
TAG=$(echo "$GPU" | tr -c 'A-Za-z0-9\n' '_')
LOG="bench/results/gpu_check_${TAG}.log"
has() { local s; for s in "${STAGES[@]}"; do [[ "$s" == "$1" ]] && return 0; done; return 1; }

{
  echo "== $(date -u +%FT%TZ) $GPU, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), stages: ${STAGES[*]}"
  if has build; then
    echo "== build the CUDA extension"
    FASTSAM_BUILD_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
    if ! "$PY" -c "import torch, fastsam._C"; then
      echo "(editable install did not place fastsam._C in the tree; building in place)"
      FASTSAM_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace
    fi
    "$PY" -m fastsam info
    "$PY" -c "from fastsam import _extension; ok, why = _extension.status(); assert ok, why; print('cuda backend loads')"
  fi
  if has tests; then
    echo "== tests (GPU tests included)"
    "$PY" -m pytest -q -rs
  fi
  if has backends; then
    echo "== benchmark: cuda vs triton vs torch"
    "$PY" -m fastsam.bench.bench_backends --device cuda --sets small2000,resnet18,vit_b --dtype float32 \
        --write-table fastsam/auto_table.json
    "$PY" -m fastsam.bench.bench_backends --device cuda --sets resnet18,vit_b --dtype bfloat16 --no-sds
  fi
  if has bench; then
    echo "== fastsam bench (full plan)"
    "$PY" -m fastsam bench --device cuda --no-progress ${FASTSAM_BENCH_ONLY:+--only "$FASTSAM_BENCH_ONLY"}
    "$PY" -m fastsam.bench.plot
    "$PY" -m fastsam.bench.report
  fi
  echo "== done: bench/results/, fastsam/auto_table.json, README.md results block, $LOG"
} 2>&1 | tee "$LOG"

if [[ -n "$OUT_DIR" ]]; then
  mkdir -p "$OUT_DIR"
  for f in bench/results/results.csv bench/results/backends.csv fastsam/auto_table.json "$LOG" README.md; do
    [[ -f "$f" ]] && cp "$f" "$OUT_DIR/"
  done
  ls bench/results/*.png >/dev/null 2>&1 && cp "$(ls -t bench/results/*.png | head -n 1)" "$OUT_DIR/"
  echo "copied results to $OUT_DIR"
fi
