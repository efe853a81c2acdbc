#!/usr/bin/env bash
# One prepared GPU check for a lent NVIDIA GPU (H100/H200 class): at most 9.5 minutes (sum of the step timeouts).
#
#   bash bench/gpu_check.sh      # logs + results go to $OUT if set, else bench/results/gpu_check_<time>
#
# Steps (each with its own timeout and <step>.log; a failing step does not stop the later ones):
#   1. env    : GPU, driver, python/torch/triton versions, git sha.
#   2. static : python -m naclip_kernels.report --check --targets native (fwd, dK/dV, dQ kernels; fp16/bf16
#               D=64): compiles, spills, shared memory, tensor cores, MUFU.EX2 with bias = without.
#   3. tests  : pytest -m "cuda or triton" on the kernel tests (fixed configs: NACLIP_TRITON_AUTOTUNE=0).
#   4. bench  : python -m bench.gpu_attention: fwd and fwd+bwd, Triton (fixed / learnable sigma) vs
#               SDPA-flash (no bias), SDPA + dense mask, FlexAttention(score_mod); N = 162x197, 1025, 4097,
#               16385; bf16/fp16 -> gpu_attention.json (with GPU, driver, versions, git sha).
# Exit status: 0 when every step passed; summary.txt lists each step's status and duration.
# Per-step timeouts (seconds): T_STATIC, T_TESTS, T_BENCH.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
RES="${OUT:-$ROOT/bench/results/gpu_check_$(date +%Y%m%d_%H%M%S)}"
mkdir -p "$RES" || exit 2
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-4}"
unset TRITON_INTERPRET
SUMMARY="$RES/summary.txt"
: >"$SUMMARY"
status=0

step() {  # step NAME TIMEOUT CMD...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS rc
    echo "=== [$name] $* (timeout ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$RES/$name.log"
    rc=${PIPESTATUS[0]}
    echo "=== [$name] rc=$rc in $((SECONDS - t0))s"
    echo "$name rc=$rc $((SECONDS - t0))s" >>"$SUMMARY"
    [ "$rc" -eq 0 ] || status=1
}

# The test session requires the golden-fixtures directory; the kernel tests below do not read it.
if [ -z "${NACLIP_FIXTURES_DIR:-}" ] && [ ! -d "$ROOT/../shared/reference/fixtures" ]; then
    export NACLIP_FIXTURES_DIR="$RES/fixtures-standin"
    mkdir -p "$NACLIP_FIXTURES_DIR"
    echo "note: ../shared/reference/fixtures missing; NACLIP_FIXTURES_DIR=$NACLIP_FIXTURES_DIR (empty)" | tee -a "$SUMMARY"
fi

step env 30 bash -c "nvidia-smi; git -C '$ROOT' rev-parse --short HEAD; \
    '$PY' -c 'import platform, torch, triton; print(platform.python_version(), torch.__version__, triton.__version__, torch.version.cuda, torch.cuda.get_device_name(0))'"

step static "${T_STATIC:-120}" "$PY" -m naclip_kernels.report --check --targets native --dtypes fp16,bf16 \
    --head-dims 64 --out "$RES"

step tests "${T_TESTS:-120}" env NACLIP_TRITON_AUTOTUNE=0 "$PY" -m pytest -m "cuda or triton" -q -ra -p no:cacheprovider \
    tests/kernels/test_triton.py tests/kernels/test_triton_bwd.py --junitxml="$RES/tests.junit.xml"

step bench "${T_BENCH:-300}" "$PY" -m bench.gpu_attention "$RES" --budget-s "$(( ${T_BENCH:-300} - 60 ))"

echo "=== summary ($RES)"
cat "$SUMMARY"
exit "$status"
