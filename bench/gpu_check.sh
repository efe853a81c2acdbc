#!/usr/bin/env bash
# One prepared GPU check for a lent NVIDIA GPU (target: H100, torch 2.11 + triton 3.6, no open_clip), < 5 min.
#
#   bash bench/gpu_check.sh            # from anywhere; logs + results go to $OUT if set, else bench/results/gpu_check_<time>
#
# Steps (each with its own timeout, each logged to <step>.log; a failing step does not stop the later ones):
#   1. env      : GPU, driver, python/torch/triton versions.
#   2. static   : AOT-compiles the fused kernel (fp16/bf16, D=64, bias on/off) for this GPU with the installed triton
#                 through triton_backend.aot_signature/aot_attrs and counts MUFU.EX2 / spills with cuobjdump.
#   3. tests    : pytest -m "cuda or triton" tests/kernels on CUDA (fixed heuristic config: no autotune, fast).
#   4. micro    : autotuned Triton kernel with/without bias vs SDPA flash (no bias) and SDPA + dense bias, N=4097 and
#                 162 crops x N=197, bf16/fp16 -> micro.json.
#   5. bench    : python -m bench.attention --device cuda (triton, FlexAttention, SDPA, ...), if present.
# Exit status: 0 when every step passed, 1 otherwise; summary.txt lists each step's status and duration.
# Per-step timeouts (seconds) can be overridden: T_STATIC, T_TESTS, T_MICRO, T_BENCH.
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

# The test session requires the golden-fixtures directory to exist. The kernel tests selected below do not read
# it, so when ../shared is not on this machine an empty stand-in directory is used (and said so).
if [ -z "${NACLIP_FIXTURES_DIR:-}" ] && [ ! -d "$ROOT/../shared/reference/fixtures" ]; then
    export NACLIP_FIXTURES_DIR="$RES/fixtures-standin"
    mkdir -p "$NACLIP_FIXTURES_DIR"
    echo "note: ../shared/reference/fixtures missing; NACLIP_FIXTURES_DIR=$NACLIP_FIXTURES_DIR (empty)" | tee -a "$SUMMARY"
fi

step env 60 bash -c "nvidia-smi || true; $PY - <<'EOF'
import platform, torch, triton
print('python', platform.python_version(), 'torch', torch.__version__, 'triton', triton.__version__)
print('cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', p.name, 'sm', f'{p.major}{p.minor}', 'SMs', p.multi_processor_count)
EOF"

step static "${T_STATIC:-90}" "$PY" - <<'EOF'
import os, re, shutil, subprocess, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from naclip_kernels import triton_backend as tb

major, minor = torch.cuda.get_device_capability(0)
bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
cuobjdump = os.path.join(bindir, "cuobjdump")
if not os.path.exists(cuobjdump):
    cuobjdump = shutil.which("cuobjdump") or cuobjdump
cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
ok = True
for dt in (torch.float16, torch.bfloat16):
    ex2 = {}
    for bias in (False, True):
        sig, cx = tb.aot_signature(dt, 64, bias, True, cfg)
        src = ASTSource(fn=tb._attn_fwd_kernel, signature=sig, constexprs=cx, attrs=tb.aot_attrs(sig))
        k = triton.compile(src, target=GPUTarget("cuda", major * 10 + minor, 32),
                           options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True).stdout
        res = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", res, re.S)
        reg, local = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
        ex2[bias] = sass.count("MUFU.EX2")
        mma = len(re.findall(r"HGMMA|HMMA", sass))
        print(f"{dt} bias={bias} cfg={cfg} EX2={ex2[bias]} MMA={mma} REG={reg} LOCAL={local} smem={k.metadata.shared}")
        ok &= local == 0 and mma > 0
    ratio = ex2[True] / max(ex2[False], 1)
    print(f"{dt} EX2 ratio bias/nobias = {ratio:.3f}")
    ok &= ratio <= 1.10
raise SystemExit(0 if ok else 1)
EOF

XDIST=()
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); fi
step tests "${T_TESTS:-150}" env NACLIP_TRITON_AUTOTUNE=0 "$PY" -m pytest -m "cuda or triton" tests/kernels -q -ra \
    ${XDIST[@]+"${XDIST[@]}"} -p no:cacheprovider --junitxml="$RES/tests.junit.xml"

step micro "${T_MICRO:-120}" "$PY" - "$RES/micro.json" <<'EOF'
import json, sys, time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench
from naclip_kernels import gaussian_bias
from naclip_kernels import triton_backend as tb
from naclip_kernels._checks import check_inputs

dev = "cuda"
rows = []
for label, B, H, grid in (("N4097", 1, 12, (64, 64)), ("crops162xN197", 162, 12, (14, 14))):
    N = 1 + grid[0] * grid[1]
    for dt in (torch.bfloat16, torch.float16):
        g = torch.Generator(device=dev).manual_seed(0)
        k = torch.randn(B, N, H, 64, device=dev, dtype=dt, generator=g).transpose(1, 2)
        v = torch.randn(B, N, H, 64, device=dev, dtype=dt, generator=g).transpose(1, 2)
        sb, s0 = check_inputs(k, k, v, grid, 5.0), check_inputs(k, k, v, grid, None)
        t0 = time.time()
        out = tb.triton_attention(k, k, v, sb)  # autotunes on first call
        tb.triton_attention(k, k, v, s0)
        torch.cuda.synchronize()
        tune_s = time.time() - t0
        mask = gaussian_bias(grid, 5.0, dtype=dt, device=dev)
        ref = F.scaled_dot_product_attention(k, k, v, attn_mask=mask)
        err = (out.float() - ref.float()).abs().max().item()
        r = {"case": label, "dtype": str(dt), "B": B, "H": H, "N": N, "D": 64, "autotune_s": round(tune_s, 1),
             "max_err_vs_sdpa_mask": err}
        r["triton_bias_ms"] = do_bench(lambda: tb.triton_attention(k, k, v, sb))
        r["triton_nobias_ms"] = do_bench(lambda: tb.triton_attention(k, k, v, s0))
        kc, vc = k.contiguous(), v.contiguous()
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                r["sdpa_flash_nobias_ms"] = do_bench(lambda: F.scaled_dot_product_attention(kc, kc, vc))
        except Exception as e:  # noqa: BLE001
            r["sdpa_flash_nobias_ms"] = f"failed: {type(e).__name__}: {e}"[:200]
        r["sdpa_dense_mask_ms"] = do_bench(lambda: F.scaled_dot_product_attention(k, k, v, attn_mask=mask))
        flops = 4.0 * B * H * N * N * 64
        r["triton_bias_tflops"] = flops / r["triton_bias_ms"] * 1e-9
        if isinstance(r["sdpa_flash_nobias_ms"], float):
            r["bias_vs_flash_speed"] = r["sdpa_flash_nobias_ms"] / r["triton_bias_ms"]
        r["bias_overhead"] = r["triton_bias_ms"] / r["triton_nobias_ms"]
        print(json.dumps(r), flush=True)
        rows.append(r)
meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": __import__("triton").__version__}
with open(sys.argv[1], "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
EOF

if [ -f "$ROOT/bench/attention.py" ]; then
    step bench "${T_BENCH:-150}" "$PY" -m bench.attention --device cuda
    # keep whatever the benchmark wrote under bench/results/ with the logs
    find "$ROOT/bench/results" -maxdepth 1 -newer "$SUMMARY" -type f -name 'attention_*' -exec cp {} "$RES/" \; 2>/dev/null
else
    echo "bench skipped: bench/attention.py not present" | tee -a "$SUMMARY"
    status=1
fi

echo "=== summary ($RES)"
cat "$SUMMARY"
exit "$status"
