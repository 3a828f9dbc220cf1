#!/usr/bin/env bash
# The GPU code, checked on a machine without a GPU (issue 13). One command, called by .ci/run:
#
#   bash tests/gpuless/run.sh
#
# 1. a cached virtual environment with the CUDA build of torch 2.13.0 (created on first use, about
#    2.7 GB of downloads; FASTSAM_GPULESS_CACHE moves it from ~/.cache/fastsam-gpuless);
# 2. fastsam._C built there for sm_90 and sm_80 from a copy of this checkout (nothing is written into
#    the checkout but the results), loaded without a GPU;
# 3. every cuda-backend function of fastsam/ops called on fake CUDA tensors through the compiled
#    schemas (tests/gpuless/extension.py), and tests/test_csrc_schemas.py (torch.library.opcheck and
#    the host emulation) run against the compiled schemas;
# 4. every Triton kernel variant compiled ahead of time for sm_90 and sm_80 with the triton that
#    CUDA torch pins (the cached environment) and the newest one (this environment), and
#    `nvcc --resource-usage` over csrc/ (tests/gpuless/triton_aot.py, csrc_resources.py);
# 5. the rows merged into bench/results/gpuless_resources.csv, the README block regenerated, and the
#    rules applied (tests/gpuless/report.py): compile errors, spills, missing 128-bit paths,
#    streaming kernels above 128 registers fail the stage.
#
# PY selects this environment's interpreter (default: python). Exit status: 0 pass, 1 a check
# failed, 3 the CUDA torch could not be installed (registry unreachable).
set -euo pipefail

main() {  # the whole script is read before it runs (editing it mid-run cannot derail a run)
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-python}
CACHE=${FASTSAM_GPULESS_CACHE:-$HOME/.cache/fastsam-gpuless}
VENV=$CACHE/venv
VPY=$VENV/bin/python
T0=$(date +%s)
step() { echo "== gpuless [$(( $(date +%s) - T0 )) s] $*"; }
fail() { echo "gpuless: FAIL $*"; exit 1; }
unset TRITON_INTERPRET  # ahead-of-time compiles need the real compiler
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
mkdir -p "$CACHE"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastsam-gpuless.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 1. The CUDA build of torch, cached. `===` (exact match) skips a local CPU wheel that `==` accepts.
if "$VPY" -c "import torch, triton, ninja, pytest, numpy; assert torch.__version__.startswith('2.13.0') and torch.version.cuda" \
    2>/dev/null; then
  step "cached environment $VENV: $("$VPY" -c 'import torch, triton; print(f"torch {torch.__version__}, triton {triton.__version__}")')"
else
  step "creating $VENV (CUDA build of torch 2.13.0: about 2.7 GB to download, 4.8 GB on disk)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  if ! "$VPY" -m pip install --quiet --disable-pip-version-check "torch===2.13.0" ninja pytest numpy \
      > "$CACHE/install.log" 2>&1; then
    reason=$(grep -m1 -iE "error|could not|no matching" "$CACHE/install.log" || tail -n 1 "$CACHE/install.log")
    echo "gpuless: FAIL cannot install the CUDA build of torch 2.13.0 (package registry unreachable?): $reason (log: $CACHE/install.log)"
    exit 3
  fi
fi

# 2. Build fastsam._C from a copy of the checkout (tracked and untracked-but-not-ignored files).
step "building fastsam._C for sm_80 and sm_90"
mkdir -p "$WORK/src" "$WORK/run"
git ls-files -z -co --exclude-standard | xargs -0 -I{} sh -c 'test -e "{}" && printf "%s\0" "{}"' \
  | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
rm -rf "$WORK/src/fastsam.egg-info" "$WORK/src/build"
if ! (cd "$WORK/src" && FASTSAM_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="8.0;9.0" MAX_JOBS=${MAX_JOBS:-2} \
      "$VPY" -m pip install --no-build-isolation --no-deps --disable-pip-version-check . > "$WORK/build.log" 2>&1); then
  grep -E "error|fastsam:" "$WORK/build.log" | head -n 20
  fail "building fastsam._C failed (tail of the build log above)"
fi
grep -E "^\s*fastsam: building" "$WORK/build.log" || true

# 3. Load it, bind every cuda-backend function, opcheck the compiled schemas (from outside the
# checkout: the installed fastsam, with _C, is the one imported).
step "loading fastsam._C without a GPU; every cuda-backend function through the compiled schemas"
(cd "$WORK/run" && "$VPY" "$ROOT/tests/gpuless/extension.py") || fail "binding check"
step "tests/test_csrc_schemas.py against the compiled schemas (opcheck, host emulation)"
out=$(cd "$WORK/run" && FASTSAM_REQUIRE_COMPILED=1 "$VPY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" \
      -c "$ROOT/pyproject.toml" "$ROOT/tests/test_csrc_schemas.py" 2>&1) || { echo "$out" | tail -n 30; fail "opcheck"; }
echo "$out" | tail -n 1
echo "$out" | tail -n 1 | grep -q "skipped" && fail "tests/test_csrc_schemas.py skipped tests against the compiled schemas"

# 4. Ahead-of-time compiles: triton as CUDA torch pins it, the newest triton 3.x here, and nvcc.
step "ahead-of-time compiles (sm_90, sm_80): $("$VPY" -c 'import triton; print("triton", triton.__version__)'), $("$PY" -c 'import triton; print("triton", triton.__version__)'), nvcc"
TRITON_CACHE_DIR=$CACHE/triton-cache-pinned "$VPY" tests/gpuless/triton_aot.py --out "$WORK/triton_pinned.csv" --jobs 1 &
pinned=$!
TRITON_CACHE_DIR=$CACHE/triton-cache-newest "$PY" tests/gpuless/triton_aot.py --out "$WORK/triton_newest.csv" --jobs 1 &
newest=$!
"$PY" tests/gpuless/csrc_resources.py --out "$WORK/nvcc.csv" --jobs 1 || fail "nvcc --resource-usage"
wait $pinned || fail "ahead-of-time compiles with the pinned triton"
wait $newest || fail "ahead-of-time compiles with the newest triton"

# 5. The table, the README block, the rules.
step "results"
header="Generated by \`bash tests/gpuless/run.sh\` ($(date -u +%F), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'); \
torch $("$VPY" -c 'import torch; print(torch.__version__)'), CUDA $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')): \
one row per kernel x variant x target x toolchain in \`bench/results/gpuless_resources.csv\`; registers and shared memory \
from \`cuobjdump --dump-resource-usage\`, spills as STL/LDL in the SASS."
"$PY" tests/gpuless/report.py "$WORK/triton_pinned.csv" "$WORK/triton_newest.csv" "$WORK/nvcc.csv" \
  --out bench/results/gpuless_resources.csv --readme README.md --header "$header" || fail "see the violations above"
step "passed"
}

main "$@"
