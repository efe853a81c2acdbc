"""Tests of ``naclip_kernels.inspect``: cuobjdump parsers and check logic (fast), and the CI compile check.

The compile check runs ``python -m naclip_kernels.inspect --check`` in a subprocess whose environment has no
``TRITON_INTERPRET`` (``tests/conftest.py`` sets it on machines without a GPU, and a kernel defined under the
interpreter yields no cubin) and no ``PYTEST_VERSION`` (so the full autotune list is compiled). It covers
every config the autotuner can launch (the kernel's ``config_allowed``) for fp16/bf16 at D=64 on sm_80 and
sm_90 with bias off and on, plus config 0 for fp32 at D=64/128 and bf16 at D=128. A toy kernel with a
per-element ``exp`` bias shows that ``--check`` fails and names the variant.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from naclip_kernels import inspect as nki

REPO_ROOT = Path(__file__).resolve().parents[2]

# ------------------------------------------------------------------------------------------------------------
# Captured cuobjdump output (triton 3.8.0 wheel, CUDA 13.1 cuobjdump), trimmed
# ------------------------------------------------------------------------------------------------------------

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


def test_parse_resource_usage_sm90():
    res = nki.parse_resource_usage(RES_SM90)
    assert list(res) == ["_attn_fwd_kernel"]
    f = res["_attn_fwd_kernel"]
    assert (f["REG"], f["STACK"], f["SHARED"], f["LOCAL"], f["CONSTANT[0]"]) == (246, 0, 1024, 0, 664)


def test_parse_resource_usage_two_functions_with_stack():
    res = nki.parse_resource_usage(RES_SPILLING_TWO_FUNCS)
    assert set(res) == {"helper_kernel", "_attn_fwd_kernel"}
    assert res["helper_kernel"]["REG"] == 40
    assert (res["_attn_fwd_kernel"]["STACK"], res["_attn_fwd_kernel"]["LOCAL"]) == (6808, 16)


@pytest.mark.parametrize(
    "text, exc",
    [
        pytest.param("Resource usage:\n Common:\n  GLOBAL:0\n", ValueError, id="no-function-block"),
        pytest.param("", ValueError, id="empty"),
        pytest.param(b"REG:1", TypeError, id="bytes"),
    ],
)
def test_parse_resource_usage_rejects(text, exc):
    with pytest.raises(exc):
        nki.parse_resource_usage(text)


def test_parse_sass_sm90_counts():
    s = nki.parse_sass(SASS_SM90)
    assert s.arches == ("sm_90a",)
    assert s.functions == ("_attn_fwd_kernel",)
    assert s.ex2 == 3  # plain, @!P0- and @UPT-predicated; MUFU.RCP not counted
    assert s.count("MUFU") == 4
    assert s.tensor_core_ops() == {"HGMMA": 2}
    assert s.local_memory_ops == 0
    assert s.opcodes["LOP3.LUT"] == 1 and s.opcodes["NOP"] == 1
    assert sum(s.opcodes.values()) == 9  # encoding-only lines are not instructions


def test_parse_sass_sm80_spills_and_hmma():
    s = nki.parse_sass(SASS_SM80_SPILLS)
    assert s.arches == ("sm_80",)
    assert s.local_memory_ops == 3  # LDL.LU + STL + STL.64
    assert s.tensor_core_ops() == {"HMMA": 2}
    assert s.ex2 == 1


@pytest.mark.parametrize(
    "text, exc",
    [
        pytest.param("\tcode for sm_90a\n\t\tFunction : k\n", ValueError, id="no-instruction"),
        pytest.param(None, TypeError, id="none"),
    ],
)
def test_parse_sass_rejects(text, exc):
    with pytest.raises(exc):
        nki.parse_sass(text)


# ------------------------------------------------------------------------------------------------------------
# Check logic on synthetic rows
# ------------------------------------------------------------------------------------------------------------


def _row(target=90, dtype="fp16", head_dim=64, bias=False, config=0, **fields):
    v = nki.Variant(target, dtype, head_dim, bias, True, config, 128, 64, 8, 3)
    row = v.base_row()
    row.update(
        arch="sm_90a" if target == 90 else f"sm_{target}",
        regs=168,
        spill_bytes=0,
        stack_bytes=0,
        lmem_ops=0,
        smem_dynamic=49152,
        smem_static=0,
        smem_bytes=49152,
        tc_op="HGMMA" if target == 90 else "HMMA",
        tc_count=16,
        ex2=68,
    )
    row.update(fields)
    return row


def _pair(**on_fields):
    rows = [_row(bias=False), _row(bias=True, **on_fields)]
    nki.add_ex2_ratios(rows)
    return rows


def test_check_passes_clean_pair():
    rows = _pair()
    assert rows[0]["ex2_ratio"] == rows[1]["ex2_ratio"] == 1.0
    assert nki.check_rows(rows) == []


@pytest.mark.parametrize(
    "rows, reason",
    [
        pytest.param(
            [_row(error="CompilationError: boom")], "does not compile: CompilationError", id="compile"
        ),
        pytest.param(
            [_row(spill_bytes=64, stack_bytes=64, lmem_ops=12)], "spills for fp16 at D=64", id="spill"
        ),
        pytest.param([_row(dtype="bf16", lmem_ops=2)], "spills for bf16 at D=64", id="lmem-ops-only"),
        pytest.param(
            [_row(target=80, smem_bytes=166913, smem_dynamic=166913)],
            "exceeds the sm_80 per-block limit 166912",
            id="smem-sm80",
        ),
        pytest.param(
            [_row(smem_bytes=232449, smem_dynamic=231425, smem_static=1024)],
            "exceeds the sm_90 per-block limit",
            id="smem-sm90",
        ),
        pytest.param([_row(tc_op="HMMA")], "no HGMMA tensor-core instruction", id="no-wgmma-on-sm90"),
        pytest.param([_row(target=80, tc_op="none", tc_count=0)], "no HMMA tensor-core", id="no-mma-on-sm80"),
        pytest.param(_pair(ex2=136), "MUFU.EX2 with bias is 2.000x", id="ex2-doubled"),
        pytest.param(
            [_row(drv_regs=170)], "the driver reports 170 registers, cuobjdump 168", id="driver-regs"
        ),
    ],
)
def test_check_names_variant_and_reason(rows, reason):
    failures = nki.check_rows(rows)
    assert len(failures) == 1, failures
    assert reason in failures[0]
    assert "config#0(BLOCK_M=128 BLOCK_N=64 warps=8 stages=3)" in failures[0]
    assert failures[0].startswith(rows[-1]["target"])


def test_check_ex2_limit_is_ten_percent():
    assert nki.check_rows(_pair(ex2=74)) == []  # 74/68 = 1.088
    assert len(nki.check_rows(_pair(ex2=75))) == 1  # 1.103


def test_check_ex2_message_tells_duplication_from_extra_exps():
    dup = nki.check_rows(_pair(ex2=136, tc_count=32))[0]
    assert "duplicated code" in dup
    extra = nki.check_rows(_pair(ex2=136))[0]
    assert "extra exponentials per score element" in extra


@pytest.mark.parametrize(
    "row",
    [
        pytest.param(
            _row(dtype="fp32", spill_bytes=6808, stack_bytes=6808, lmem_ops=900, tc_op="none"), id="fp32"
        ),
        pytest.param(_row(head_dim=128, spill_bytes=128, stack_bytes=128, lmem_ops=70), id="fp16-D128"),
    ],
)
def test_spills_outside_fp16_bf16_d64_are_notes_not_failures(row):
    assert nki.check_rows([row]) == []
    assert any("LDL/STL" in n for n in nki._notes([row]))


def test_ex2_ratio_pairs_and_missing_sides():
    rows = [
        _row(bias=False, config=0, ex2=68, tc_count=16),
        _row(bias=True, config=0, ex2=70, tc_count=16),
        _row(bias=True, config=1, ex2=68),  # no bias-off partner
        _row(bias=False, config=2, ex2=0, tc_count=16),
        _row(bias=True, config=2, ex2=4, tc_count=16),
        _row(bias=False, config=3, error="x", ex2=None),
        _row(bias=True, config=3, ex2=68),
    ]
    nki.add_ex2_ratios(rows)
    assert rows[0]["ex2_ratio"] == rows[1]["ex2_ratio"] == pytest.approx(70 / 68, abs=1e-4)
    assert rows[1]["ex2_per_mma_ratio"] == pytest.approx(70 / 68, abs=1e-4)
    assert rows[2]["ex2_ratio"] is None
    assert rows[4]["ex2_ratio"] == float("inf")
    assert rows[5]["ex2_ratio"] is None and rows[6]["ex2_ratio"] is None


# ------------------------------------------------------------------------------------------------------------
# Variants, helpers, CLI argument errors (no compile)
# ------------------------------------------------------------------------------------------------------------

_CONFIGS = [
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
]


def test_build_variants_product_and_order():
    vs = nki.build_variants(_CONFIGS, targets=[80, 90], dtypes=["fp16", "fp32"], head_dims=[64, 128])
    assert len(vs) == 2 * 2 * 2 * 2 * 2
    assert [(v.config, v.bias) for v in vs[:4]] == [(0, False), (0, True), (1, False), (1, True)]
    assert vs[-1].target == 90 and vs[-1].dtype == "fp32" and vs[-1].head_dim == 128
    assert vs[2].BLOCK_M == 128 and vs[2].num_warps == 8


def test_build_variants_keep_filter():
    vs = nki.build_variants(
        _CONFIGS,
        targets=[90],
        dtypes=["fp16", "fp32"],
        head_dims=[64],
        keep=lambda d, h, i, bias: (d != "fp32" or i == 0) and not (bias and i == 1),
    )
    assert {(v.dtype, v.config, v.bias) for v in vs} == {
        ("fp16", 0, False),
        ("fp16", 0, True),
        ("fp16", 1, False),
        ("fp32", 0, False),
        ("fp32", 0, True),
    }


def test_autotune_keep_follows_config_allowed():
    """inspect compiles exactly what the kernel's public pruning rule admits (per dtype, D and bias)."""
    import torch

    from naclip_kernels import triton_backend as tb

    keep = nki.autotune_keep()
    assert keep is not None
    for dt, tdt in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        for hd in (64, 128):
            for bias in (False, True):
                want = [
                    tb.config_allowed(c, dtype=tdt, head_dim=hd, has_bias=bias, n=16384) for c in tb.CONFIGS
                ]
                assert [keep(dt, hd, i, bias) for i in range(len(tb.CONFIGS))] == want, (dt, hd, bias)
    # the bias drops the 64-scores-per-thread tiles, never a bias-off-only config's partner
    assert not all(keep("fp16", 64, i, True) for i in range(len(tb.CONFIGS)))
    assert all(keep("fp16", 64, i, False) for i in range(len(tb.CONFIGS)))


def test_autotune_keep_none_without_config_allowed(tmp_path, monkeypatch):
    (tmp_path / "no_rule_kernel.py").write_text("CONFIGS = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert nki.autotune_keep("no_rule_kernel") is None


@pytest.mark.parametrize(
    "kwargs, name",
    [
        pytest.param({"dtypes": ["fp8"]}, "dtypes", id="dtype"),
        pytest.param({"targets": [70]}, "targets", id="target"),
        pytest.param({"head_dims": [0]}, "head_dims", id="head-dim"),
        pytest.param({"config_indices": [2]}, "config_indices", id="config-index"),
    ],
)
def test_build_variants_rejects(kwargs, name):
    with pytest.raises(ValueError, match=name):
        nki.build_variants(_CONFIGS, **kwargs)


def test_alignment_attrs_marks_pointers_and_strides():
    class _Fn:
        arg_names = ["Q", "stride_qn", "N", "qk_scale", "BLOCK_M", "stride_qd"]

    sig = {"Q": "*fp16", "stride_qn": "i32", "N": "i32", "qk_scale": "fp32", "BLOCK_M": "constexpr"}
    sig["stride_qd"] = "constexpr"
    assert nki._alignment_attrs(_Fn, sig) == {
        (0,): [["tt.divisibility", 16]],
        (1,): [["tt.divisibility", 16]],
    }


def test_find_cuobjdump_default_and_override(tmp_path, monkeypatch):
    found = nki.find_cuobjdump()
    assert found.is_file() and os.access(found, os.X_OK)
    fake = tmp_path / "cuobjdump"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("TRITON_CUOBJDUMP_PATH", str(fake))
    assert nki.find_cuobjdump() == fake
    monkeypatch.setenv("TRITON_CUOBJDUMP_PATH", str(tmp_path / "missing"))
    assert nki.find_cuobjdump() == found  # falls back to the wheel's binary


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--q-is-k", "2"], id="q-is-k"),
        pytest.param(["--head-dims", "sixty-four"], id="head-dims"),
        pytest.param(["--jobs", "0"], id="jobs"),
    ],
)
def test_cli_rejects_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as e:
        nki.main([*argv, "--no-save"])
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        pytest.param(["--targets", "70"], "targets", id="unknown-target"),
        pytest.param(["--dtypes", "fp8"], "dtypes", id="unknown-dtype"),
        pytest.param(["--configs", "99"], "config_indices", id="config-out-of-range"),
    ],
)
def test_cli_value_errors_exit_2_before_compiling(argv, needle, capsys):
    assert nki.main([*argv, "--no-save"]) == 2
    assert needle in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# The CI compile check (real compiles in a subprocess without TRITON_INTERPRET)
# ------------------------------------------------------------------------------------------------------------


def _compile_env(extra_pythonpath: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_VERSION")}
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    if extra_pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_pythonpath), env.get("PYTHONPATH", "")]))
    return env


def _run_inspect(args: list[str], out: Path, *, env: dict[str, str] | None = None, timeout: int = 1500):
    cmd = [sys.executable, "-m", "naclip_kernels.inspect", "--check", "--json", "--out", str(out), *args]
    proc = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=env or _compile_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    report = json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else None
    return proc, report


_CI_RUNS = {
    # every config, fp16/bf16 at D=64, sm_80 + sm_90, bias off/on
    "fp16-bf16-D64": ["--targets", "80,90", "--dtypes", "fp16,bf16", "--head-dims", "64"],
    # a subset: config 0 for fp32 (D=64, 128) and bf16 at D=128
    "fp32-and-D128": [
        "--targets",
        "80,90",
        "--dtypes",
        "fp32,bf16",
        "--head-dims",
        "64,128",
        "--configs",
        "0",
    ],
}


@pytest.fixture(scope="module", params=list(_CI_RUNS), ids=list(_CI_RUNS))
def ci_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"inspect-{request.param}")
    proc, report = _run_inspect(_CI_RUNS[request.param], out)
    return request.param, proc, report, out


@pytest.mark.slow
def test_ci_compile_check_passes(ci_run):
    name, proc, report, _ = ci_run
    assert report is not None, f"no JSON report (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0 and report["passed"], "inspect --check failed:\n" + "\n".join(
        report["failures"]
    )


@pytest.mark.slow
def test_ci_compile_check_rows(ci_run):
    name, proc, report, _ = ci_run
    assert report is not None, proc.stderr[-3000:]
    rows, meta = report["rows"], report["meta"]
    assert rows and meta["triton"] and meta["n_variants"] == len(rows)
    # every requested (target, dtype, D) is there with every config the autotuner can launch, per bias flag
    skipped = set(meta["skipped"])
    n_configs = len(meta["configs"]) if name == "fp16-bf16-D64" else 1
    for tgt in ("sm_80", "sm_90"):
        for dt in meta["dtypes"]:
            for hd in meta["head_dims"]:
                want = {
                    (i, b)
                    for i in range(n_configs)
                    for b in (0, 1)
                    if f"{dt} D={hd} bias={('off', 'on')[b]} config#{i}" not in skipped
                }
                got = [
                    (r["config"], r["bias"])
                    for r in rows
                    if (r["target"], r["dtype"], r["head_dim"]) == (tgt, dt, hd)
                ]
                assert sorted(got) == sorted(want), (tgt, dt, hd)
                # a config launched with the bias is also launched without it: every bias row has a partner
                assert all((i, 0) in want for i, b in want if b), (tgt, dt, hd)
    if name == "fp16-bf16-D64":  # the bias excludes the spilling 64-scores-per-thread tiles
        assert any("bias=on" in s for s in skipped) and not any("bias=off" in s for s in skipped)
    for r in rows:
        label = nki._row_label(r)
        assert not r["error"], label
        assert r["smem_bytes"] <= r["smem_limit"], label
        assert r["ex2"] > 0, label
        if r["bias"]:
            assert r["ex2_ratio"] is not None and r["ex2_ratio"] <= nki.EX2_RATIO_LIMIT, (
                label,
                r["ex2_ratio"],
            )
        if r["target"] == "sm_90":
            assert r["arch"] == "sm_90a", label
        if r["dtype"] in ("fp16", "bf16"):
            want_op = "HGMMA" if r["target"] == "sm_90" else "HMMA"
            assert want_op in r["tc_op"].split("+"), (label, r["tc_op"])
            if r["head_dim"] == 64:
                assert r["spill_bytes"] == 0 and r["lmem_ops"] == 0, (label, r["spill_bytes"], r["lmem_ops"])


@pytest.mark.slow
def test_ci_compile_check_writes_report_files(ci_run):
    _, proc, report, out = ci_run
    assert report is not None, proc.stderr[-3000:]
    with open(out / nki.CSV_NAME, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == nki.COLUMNS
        assert len(list(reader)) == len(report["rows"])
    md = (out / nki.MD_NAME).read_text()
    assert "How to check your own GPU build" in md
    assert ("**Check: PASS**" in md) == report["passed"]  # the verdict itself: test_ci_compile_check_passes
    assert json.loads((out / nki.JSON_NAME).read_text())["rows"] == report["rows"]
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


# A kernel whose bias costs one exp2 per score element: the EX2 check must fail and name the variant.
_TOY_KERNEL = """
import triton
import triton.language as tl

CONFIGS = [{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}]


@triton.jit
def _attn_fwd_kernel(K, V, O, stride_n, N, c, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_BIAS: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    q = tl.load(K + offs_m[:, None] * stride_n + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    k = tl.load(K + offs_n[:, None] * stride_n + offs_d[None, :], mask=offs_n[:, None] < N, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_n + offs_d[None, :], mask=offs_n[:, None] < N, other=0.0)
    s = tl.dot(q, tl.trans(k))
    if HAS_BIAS:
        d = (offs_m[:, None] - offs_n[None, :]).to(tl.float32)
        s += tl.exp2(-d * d * c)
    s = tl.where(offs_n[None, :] < N, s, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    o = tl.dot(p.to(v.dtype), v) / tl.sum(p, 1)[:, None]
    o_ptrs = O + offs_m[:, None] * stride_n + offs_d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=offs_m[:, None] < N)


def aot_signature(dtype, head_dim, has_bias, q_is_k, config):
    ptr = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}[str(dtype).split(".")[-1]]
    sig = {"K": ptr, "V": ptr, "O": ptr, "stride_n": "i32", "N": "i32", "c": "fp32"}
    const = {"D": head_dim, "BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"], "HAS_BIAS": has_bias}
    sig.update(dict.fromkeys(const, "constexpr"))
    return sig, const
"""


@pytest.mark.slow
def test_check_fails_on_per_element_exp_bias(tmp_path):
    (tmp_path / "naive_exp_bias_kernel.py").write_text(textwrap.dedent(_TOY_KERNEL))
    args = [
        "--kernel-module",
        "naive_exp_bias_kernel",
        "--targets",
        "90",
        "--dtypes",
        "fp16",
        "--head-dims",
        "32",
    ]
    proc, report = _run_inspect(args, tmp_path / "out", env=_compile_env(tmp_path), timeout=600)
    assert report is not None, proc.stderr[-3000:]
    assert [r["error"] for r in report["rows"]] == ["", ""]
    assert proc.returncode == 1
    ex2_failures = [f for f in report["failures"] if "MUFU.EX2 with bias" in f]
    assert len(ex2_failures) == 1, report["failures"]
    assert ex2_failures[0].startswith("sm_90 fp16 D=32 bias=on q_is_k=1 config#0(BLOCK_M=64 BLOCK_N=64")
    assert "extra exponentials per score element" in ex2_failures[0]
    assert "MUFU.EX2 with bias" in proc.stderr
    assert report["rows"][1]["ex2_ratio"] >= 1.5
