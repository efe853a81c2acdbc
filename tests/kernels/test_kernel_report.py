"""Tests of ``naclip_kernels.report``: cuobjdump parsers, signatures, variant selection and checks (fast),
and the CI compile check (slow: fp16/bf16 at D=64, sm_80 + sm_90, forward and backward kernels).

The compile check runs ``python -m naclip_kernels.report --check`` in a subprocess; the report's workers drop
``TRITON_INTERPRET`` (set by tests/conftest.py without a GPU; an interpreted kernel has no cubin).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from naclip_kernels import report
from naclip_kernels.triton import bwd, configs, fwd

REPO_ROOT = Path(__file__).resolve().parents[2]

# Captured cuobjdump output (triton 3.8.0 wheel, CUDA 13.1 cuobjdump), trimmed.
RES_SM90 = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function _attn_fwd_kernel:
  REG:246 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:664 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

RES_SPILLING_TWO_FUNCS = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function helper_kernel:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:360 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _attn_fwd_kernel:
  REG:32 STACK:6808 SHARED:0 LOCAL:16 CONSTANT[0]:488 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

_ENC = "/* 0x000fe20000000800 */"
SASS_SM90 = f"""
\tcode for sm_90a
\t\tFunction : _attn_fwd_kernel
\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_ACCELERATORS EF_CUDA_SM90"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                          /* 0x00000a00ff017b82 */
                                                                                   {_ENC}
        /*0310*/               @P2 LOP3.LUT R116, R116, 0x4, RZ, 0xfc, !PT ;       /* 0x0000000474742812 */
                                                                                   {_ENC}
        /*7090*/                   HGMMA.64x64x16.F32 R24, gdesc[UR16].tnspB, RZ, !UPT ;  /* 0x40e0000010 */
                                                                                   {_ENC}
        /*70a0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR12].tnspB, R24 ;  /* 0x40e000000c1879f0 */
                                                                                   {_ENC}
        /*7cb0*/                   MUFU.EX2 R53, R53 ;                             /* 0x0000003500357308 */
                                                                                   {_ENC}
        /*7cc0*/               @!P0 MUFU.EX2 R45, R45 ;                            /* 0x0000002d002d7308 */
                                                                                   {_ENC}
        /*7cd0*/                   MUFU.RCP R0, R0 ;                               /* 0x0000000000007308 */
                                                                                   {_ENC}
        /*7ce0*/              @UPT MUFU.EX2 R180, R51 ;                            /* 0x0000003300b47308 */
                                                                                   {_ENC}
        /*a0f0*/                   NOP;                                            /* 0x0000000000007918 */
                                                                                   {_ENC}
\t\t..........
"""

SASS_SM80_SPILLS = f"""
\tcode for sm_80
\t\tFunction : _attn_fwd_kernel
        /*0080*/                   LDL.LU R8, [R1+0x79c] ;                         /* 0x00079c0001087983 */
                                                                                   {_ENC}
        /*0800*/                   STL [R1+0x110], R0 ;                            /* 0x0001100001007387 */
                                                                                   {_ENC}
        /*0810*/                   STL.64 [R1+0x118], R2 ;                         /* 0x0001180001007387 */
                                                                                   {_ENC}
        /*3540*/                   HMMA.16816.F32 R128, R112.reuse, R76, RZ ;      /* 0x0000004c7080723c */
                                                                                   {_ENC}
        /*3550*/                   HMMA.16816.F32 R132, R112, R78, RZ ;            /* 0x0000004c7080723c */
                                                                                   {_ENC}
        /*3560*/                   MUFU.EX2 R3, R3 ;                               /* 0x0000000000007308 */
                                                                                   {_ENC}
"""


def test_parse_resource_usage_reads_the_first_function():
    assert report.parse_resource_usage(RES_SM90)["REG"] == 246
    f = report.parse_resource_usage(RES_SPILLING_TWO_FUNCS)
    assert (f["REG"], f["STACK"], f["LOCAL"]) == (40, 0, 0)  # helper_kernel: the first block only
    with pytest.raises(ValueError, match="Function"):
        report.parse_resource_usage("Resource usage:\n Common:\n  GLOBAL:0\n")


def test_parse_sass_counts_opcodes_with_predicates():
    arch, ops = report.parse_sass(SASS_SM90)
    assert arch == "sm_90a"
    assert report._count(ops, "MUFU.EX2") == 3  # plain, @!P0- and @UPT-predicated; MUFU.RCP not counted
    assert report._count(ops, "HGMMA") == 2 and sum(ops.values()) == 9
    arch, ops = report.parse_sass(SASS_SM80_SPILLS)
    assert arch == "sm_80" and report._count(ops, "LDL") + report._count(ops, "STL") == 3
    with pytest.raises(ValueError, match="SASS"):
        report.parse_sass("nothing here")


@pytest.mark.parametrize("kernel", list(report.KERNELS))
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_signature_types_every_argument(kernel, dtype):
    fn = getattr(fwd if kernel == "fwd" else bwd, report.KERNELS[kernel][0])
    v = report.variants([kernel], [90], [dtype], [64])[0]
    sig, cx, attrs = report._signature(fn, v)
    assert list(sig) == list(fn.arg_names)
    assert all(sig[n] == "constexpr" for n in cx) and cx["HEAD_DIM"] == 64
    assert sig["K"] == f"*{dtype}" and sig["ROWS"] == "*i32" and sig["T"] == "*fp32"
    assert sig["N"] == "i32" and sig["qk_scale"] == "fp32" and cx["stride_kd"] == 1
    names = list(fn.arg_names)
    assert (names.index("K"),) in attrs and (names.index("stride_kn"),) in attrs  # 3 * 12 * 64: aligned
    assert (names.index("N"),) not in attrs and (names.index("GW"),) not in attrs  # 785, 28


def test_variants_follow_the_autotuners_pruning():
    vs = report.variants(["fwd", "dq"], [80], ["bf16"], [64])
    fwd_on = {v.config for v in vs if v.kernel == "fwd" and v.bias == "on"}
    want = {
        i for i, c in enumerate(configs.CONFIGS)
        if configs.config_allowed(c, dtype=torch.bfloat16, head_dim=64, has_bias=True, n=16384)
    }  # fmt: skip
    assert fwd_on == want and fwd_on != set(range(len(configs.CONFIGS)))
    grad = {v.config for v in vs if v.kernel == "dq" and v.bias == "grad"}
    on = {v.config for v in vs if v.kernel == "dq" and v.bias == "on"}
    assert grad and grad < on  # three gathers: fewer score elements per thread admitted
    for v in vs:
        if v.bias == "grad":
            assert v.BLOCK_M * v.BLOCK_N // (32 * v.num_warps) <= configs.BIAS_MAX_SCORES_PER_THREAD // 2


def _row(**kw):
    base = {
        "label": "fwd sm_90 fp16 D=64 bias=on config#0", "kernel": "fwd", "target": "sm_90", "dtype": "fp16",
        "head_dim": 64, "bias": "on", "error": "", "regs": 200, "spill_bytes": 0, "lmem_ops": 0,
        "smem_bytes": 50000, "smem_limit": 232448, "tc_op": "HGMMA", "ex2": 68, "ex2_ratio": 1.0,
    }  # fmt: skip
    return {**base, **kw}


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"error": "CompilationError: x"}, "does not compile"),
        ({"spill_bytes": 16, "lmem_ops": 12}, "spills 16 B"),
        ({"smem_bytes": 240000}, "shared memory 240000"),
        ({"tc_op": "none"}, "no HGMMA"),
        ({"ex2_ratio": 2.0}, "MUFU.EX2 with bias 2.000x"),
    ],
    ids=["error", "spill", "smem", "no-tensor-core", "ex2"],
)
def test_check_rows_names_the_variant_and_the_reason(kw, needle):
    assert report.check_rows([_row()]) == []
    (fail,) = report.check_rows([_row(**kw)])
    assert fail.startswith("fwd sm_90 fp16 D=64 bias=on") and needle in fail


def test_spills_outside_fp16_bf16_d64_pass_and_the_ex2_limit_is_ten_percent():
    assert report.check_rows([_row(dtype="fp32", spill_bytes=8, lmem_ops=2, tc_op="none")]) == []
    assert report.check_rows([_row(head_dim=128, spill_bytes=8, lmem_ops=2)]) == []
    assert report.check_rows([_row(ex2_ratio=1.1)]) == []
    assert report.check_rows([_row(ex2_ratio=1.11)])


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--kernels", "fwd,bogus"], "--kernels"),
        (["--targets", "70"], "--targets"),
        (["--dtypes", "fp8"], "--dtypes"),
        (["--head-dims", "0"], "--head-dims"),
        (["--jobs", "0"], "--jobs"),
    ],
    ids=["kernel", "target", "dtype", "head-dim", "jobs"],
)
def test_cli_rejects_bad_flags_before_compiling(argv, needle, capsys):
    with pytest.raises(SystemExit) as ei:
        report.main(argv)
    assert ei.value.code == 2 and needle in capsys.readouterr().err


@pytest.mark.slow
def test_ci_compile_check_fp16_bf16_d64(tmp_path):
    """The CI subset: every admitted config of the forward, dK/dV and dQ kernels, fp16/bf16, D=64, sm_80 and
    sm_90, bias off/on (+ the dq bias-gradient variant): compiles, 0 spills, tensor cores, EX2 with bias =
    without."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    flags = ["--check", "--dtypes", "fp16,bf16", "--head-dims", "64", "--out", str(tmp_path)]
    cmd = [sys.executable, "-m", "naclip_kernels.report", *flags]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=3000, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert {r["kernel"] for r in rows} == {"fwd", "dkdv", "dq"} and {r["target"] for r in rows} == {
        "sm_80",
        "sm_90",
    }
    assert all(r["ex2_ratio"] == 1.0 for r in rows if r["bias"] != "off")
    assert (tmp_path / "report.md").read_text().count("\n| ") == len(rows) + 1
