"""The fused Triton forward kernel (naclip_kernels.triton) against the dense fp32 reference.

On a CPU machine these run the real Triton kernel in the interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py) with the fixed ``INTERPRETER_CONFIG`` (32x32 tiles, so the shapes below span several query
and key tiles, partial tail tiles and far/near band splits). bf16 and large-N cases need CUDA and skip
otherwise.

Tolerances, as max |out - ref| relative to max(1, max |ref|) (ref = fp32 reference on the same rounded
inputs):
* fp32 2e-5: both sides accumulate in fp32 (the kernel uses IEEE fp32 dots, no TF32); differences are
  summation-order rounding (~N * 2^-24) plus the band skip's bounded 1.2e-7.
* fp16 1e-2: the kernel rounds P to fp16 for the PV product (2^-11 relative) and the output to fp16 (2^-11).
* bf16 6e-2: same with bf16's 2^-8 rounding of P and of the output.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from layout_expect import in_q_order

from naclip_kernels import _bias, reference_attention
from naclip_kernels._checks import check_inputs
from naclip_kernels.triton import configs, launch
from naclip_kernels.triton import triton_attention as _triton_attention

pytestmark = pytest.mark.triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}
# On CPU the interpreter cannot run bf16 (broken bf16 tl.dot); on CUDA bf16 joins the matrix.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
needs_cuda = pytest.mark.skipif(
    not HAS_CUDA, reason="needs a CUDA GPU (the CPU interpreter is too slow / no bf16)"
)
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the kernel under TRITON_INTERPRET=1 only")


def _dt(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _make(B, H, N, D, dtype, *, layout="bhnd", q_is_k=True, seed=0, kscale=1.0):
    """q, k, v of shape [B, H, N, D] in the requested memory layout (never copied to contiguous)."""
    g = torch.Generator().manual_seed(seed)

    def one(scale=1.0):
        if layout == "bhnd":
            t = torch.randn(B, H, N, D, generator=g) * scale
        elif layout == "bnhd":  # a view of a [B, N, H, D] tensor (the qkv projection layout)
            t = (torch.randn(B, N, H, D, generator=g) * scale).transpose(1, 2)
        elif layout == "expand":  # one batch item broadcast with stride 0
            t = (torch.randn(1, H, N, D, generator=g) * scale).expand(B, H, N, D)
        elif layout == "transposed":  # [B, H, D, N] storage: token stride 1, feature stride N
            t = (torch.randn(B, H, D, N, generator=g) * scale).transpose(-1, -2)
        else:
            raise AssertionError(layout)
        return t.to(device=DEVICE, dtype=dtype)

    k = one(kscale)
    q = k if q_is_k else one()
    v = one()
    return q, k, v


def _run(q, k, v, grid_hw, sigma, **kw):
    spec = check_inputs(q, k, v, grid_hw, sigma, **kw)
    assert launch.unsupported_reasons(q, k, v, spec) == []
    out = _triton_attention(q, k, v, spec)
    assert in_q_order(out, q), (out.stride(), q.stride())
    return out


def _ref(q, k, v, grid_hw, sigma, **kw):
    return reference_attention(q.float(), k.float(), v.float(), grid_hw, sigma, **kw)


def _assert_close(out, ref, dtype, what=""):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all(), f"non-finite output {what}"
    err = (out.float() - ref).abs().max().item()
    bound = TOL[dtype] * max(1.0, ref.abs().max().item())
    assert err <= bound, f"max abs err {err:.3e} > {bound:.3e} {what}"


# (id, B, H, grid, P, D, sigma, extra kwargs) -- grids square / 1xk / kx1 / non-square, odd N, D non-pow2.
CASES = [
    ("sq9x9-P1-s5-D64", 1, 2, (9, 9), 1, 64, 5.0, {}),
    ("1x40-P0-s0.5-D32", 1, 1, (1, 40), 0, 32, 0.5, {}),
    ("40x1-P3-s50-D48", 1, 1, (40, 1), 3, 48, 50.0, {}),
    ("7x13-P8-none-D16", 2, 1, (7, 13), 8, 16, None, {}),
    ("11x6-P1-s2-D80-bs2.5", 1, 1, (11, 6), 1, 80, 2.0, {"bias_scale": 2.5}),
    ("5x7-P0-s1-D96-negbs", 1, 1, (5, 7), 0, 96, 1.0, {"bias_scale": -1.5}),
    ("12x10-P1-s5-D48-scale0", 1, 1, (12, 10), 1, 48, 5.0, {"scale": 0.0, "bias_scale": 3.0}),
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case, dtype):
    _, B, H, grid, P, D, sigma, kw = case
    N = P + grid[0] * grid[1]
    q, k, v = _make(B, H, N, D, dtype, q_is_k=True)
    out = _run(q, k, v, grid, sigma, num_prefix_tokens=P, **kw)
    _assert_close(out, _ref(q, k, v, grid, sigma, num_prefix_tokens=P, **kw), dtype)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd", "expand", "transposed"])
@pytest.mark.parametrize("q_is_k", [True, False], ids=["q_is_k", "q_ne_k"])
def test_strides_and_q_is_k(layout, q_is_k):
    # Odd N = 1 + 7*9 = 64; D = 48 padded to 64; expanded batch has stride 0 on the batch axis.
    grid, P, D = (7, 9), 1, 48
    q, k, v = _make(2, 2, P + 63, D, torch.float32, layout=layout, q_is_k=q_is_k, seed=1)
    before = (q.clone(), k.clone(), v.clone())
    out = _run(q, k, v, grid, 3.0, num_prefix_tokens=P)
    _assert_close(out, _ref(q, k, v, grid, 3.0, num_prefix_tokens=P), torch.float32, layout)
    for a, b in zip((q, k, v), before, strict=True):  # inputs never overwritten
        assert torch.equal(a, b)


def test_q_is_k_detected_for_equal_views():
    """Two distinct view objects of the same memory are treated as q is k (the same numbers either way)."""
    q, k, v = _make(1, 2, 1 + 25, 32, torch.float32, layout="bnhd", seed=2)
    k2 = k.transpose(1, 2).transpose(1, 2)
    assert k2 is not k and k2.data_ptr() == k.data_ptr()
    a = _run(k2, k, v, (5, 5), 1.5)
    b = _run(k, k, v, (5, 5), 1.5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [0.5, 5.0, 50.0, None], ids=["s0.5", "s5", "s50", "none"])
@pytest.mark.parametrize("P", [0, 1, 3])
def test_prefix_and_sigma(P, sigma):
    grid = (6, 5)
    q, k, v = _make(1, 1, P + 30, 32, torch.float32, q_is_k=False, seed=3)
    out = _run(q, k, v, grid, sigma, num_prefix_tokens=P)
    _assert_close(out, _ref(q, k, v, grid, sigma, num_prefix_tokens=P), torch.float32)


def _far_tiles(N, P, grid, sigma, dtype, bias_scale=1.0):
    """Number of (query tile, key tile) pairs that the band split treats as far (no bias); None if unknown."""
    if INTERPRET:
        cfg = configs.INTERPRETER_CONFIG
    elif os.environ.get("NACLIP_TRITON_AUTOTUNE", "1") == "0":
        cfg = configs.heuristic_config(dtype, 32, N)
    else:
        return None  # autotuned: the block sizes are not known in advance
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    gh, gw = grid
    R = _bias.band_rows(sigma, bias_scale, gh)
    n_full = N // bn * bn
    far = 0
    for m0 in range(0, N, bm):
        first, last = max(m0, P), min(m0 + bm, N) - 1
        if first > last:
            lo = hi = 0
        else:
            row_lo = max((first - P) // gw - R, 0)
            row_hi = min((last - P) // gw + R, gh - 1)
            lo = min((P + row_lo * gw) // bn * bn, n_full)
            hi = min(max(-(-(P + (row_hi + 1) * gw) // bn) * bn, lo), n_full)
        far += (lo + n_full - hi) // bn
    return far


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_band_skip_is_exact(dtype):
    """A tall grid with sigma 0.5: most key tiles are far (no bias) and the result is still exact."""
    grid, P, sigma = ((40, 3), 1, 0.5) if INTERPRET else ((80, 3), 1, 0.5)
    N = P + grid[0] * grid[1]
    assert _bias.band_rows(sigma, 1.0, grid[0]) == 3  # 0.5 * sqrt(2 ln 2^24) = 2.88 -> 2, + 1
    far = _far_tiles(N, P, grid, sigma, dtype)
    assert far is None or far > 0  # the skip is really exercised
    q, k, v = _make(1, 1, N, 32, dtype, seed=4)
    out = _run(q, k, v, grid, sigma, num_prefix_tokens=P)
    _assert_close(out, _ref(q, k, v, grid, sigma, num_prefix_tokens=P), dtype)
    if dtype == torch.float32:  # exactness: within fp32 rounding of the dense reference
        ref = _ref(q, k, v, grid, sigma, num_prefix_tokens=P)
        assert (out - ref).abs().max().item() < 5e-6 * max(1.0, ref.abs().max().item())


def test_bias_table_layout():
    """T[a_i - b_j] equals bias_scale * log2(e) * G for patches, 0 for prefix rows/cols, -inf past N."""
    gh, gw, sigma, bs = 4, 3, 1.3, 2.0
    T = launch.bias_tables((gh, gw), sigma, bs, torch.device("cpu")).scaled[0]
    assert T.numel() == launch.table_numel(gh, gw)
    W2 = 2 * gw - 1

    def a(r, c):
        return (r + gh - 1) * W2 + c + gw - 1

    for r1 in range(gh):
        for c1 in range(gw):
            for r2 in range(gh):
                for c2 in range(gw):
                    g = math.exp(-((r1 - r2) ** 2 + (c1 - c2) ** 2) / (2 * sigma**2))
                    assert T[a(r1, c1) - (r2 * W2 + c2)].item() == pytest.approx(bs * math.log2(math.e) * g)
            assert T[a(r1, c1) - ((1 - 2 * gh) * W2)].item() == 0.0  # prefix key
            assert T[a(r1, c1) - ((1 - 4 * gh) * W2)].item() == float("-inf")  # key >= N
    for r2 in range(gh):
        for c2 in range(gw):
            assert T[a(2 * gh - 1, 0) - (r2 * W2 + c2)].item() == 0.0  # prefix query
    assert T[a(2 * gh - 1, 0) - (1 - 2 * gh) * W2].item() == 0.0
    assert T[a(2 * gh - 1, 0) - (1 - 4 * gh) * W2].item() == float("-inf")


@pytest.mark.parametrize(
    ("N", "grid", "P", "sigma"),
    [(1, (1, 1), 0, 2.0), (1, None, 1, None), (2, (1, 1), 1, 1.0), (33, (4, 8), 1, 5.0)],
    ids=["N1-grid1x1", "N1-cls-only", "N2-cls+1", "N33-one-past-tile"],
)
def test_tiny_and_edge_n(N, grid, P, sigma):
    q, k, v = _make(1, 2, N, 16, torch.float32, q_is_k=False, seed=5)
    out = _run(q, k, v, grid, sigma, num_prefix_tokens=P)
    _assert_close(out, _ref(q, k, v, grid, sigma, num_prefix_tokens=P), torch.float32)


def test_nonly_mode_equals_softmax_of_bias():
    """q = k = 0, scale = 0, bias_scale = s (NACLIP's ``nonly``): softmax(s * G) V."""
    grid, P, s = (6, 7), 1, 4.0
    N = P + 42
    _, _, v = _make(1, 1, N, 32, torch.float32, seed=6)
    z = torch.zeros_like(v)
    out = _run(z, z, v, grid, 2.0, num_prefix_tokens=P, scale=0.0, bias_scale=s)
    _assert_close(out, _ref(z, z, v, grid, 2.0, num_prefix_tokens=P, scale=0.0, bias_scale=s), torch.float32)
    assert torch.allclose(out[0, 0, 0], v[0, 0].mean(0), atol=1e-5)  # CLS row: uniform over all keys


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's NaN warnings inside the interpreter
def test_nan_propagates():
    grid, P = (5, 6), 1
    q, k, v = _make(1, 1, P + 30, 32, torch.float32, q_is_k=False, seed=7)
    q_nan = q.clone()
    q_nan[0, 0, 4, 3] = float("nan")
    out = _run(q_nan, k, v, grid, 2.0, num_prefix_tokens=P)
    assert torch.isnan(out[0, 0, 4]).all()
    rows = [i for i in range(out.shape[2]) if i != 4]
    assert torch.isfinite(out[0, 0, rows]).all()
    v_nan = v.clone()
    v_nan[0, 0, 10, 0] = float("nan")
    out = _run(q, k, v_nan, grid, 2.0, num_prefix_tokens=P)
    assert torch.isnan(out[0, 0, :, 0]).all()  # every query attends to key 10 with p > 0


def test_fp16_large_norm_keys_stay_finite():
    """fp16 keys with norms ~1e3 give logits ~1e5 before the max subtraction; the output stays finite."""
    grid, P = (6, 6), 1
    q, k, v = _make(1, 1, P + 36, 64, torch.float16, kscale=1e3 / 8.0, seed=8)
    out = _run(q, k, v, grid, 5.0, num_prefix_tokens=P)
    _assert_close(out, _ref(q, k, v, grid, 5.0, num_prefix_tokens=P), torch.float16)


def _spy_launches(monkeypatch):
    """Record ``(kernel name, grid, kwargs)`` of every kernel launch made through ``launch.wrap_triton``."""
    launches = []
    real = launch.wrap_triton

    def spy(kernel):
        wrapped = real(kernel)
        name = getattr(kernel, "__name__", None) or kernel.fn.__name__

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    launches.append((name, grid, kw))
                    return wrapped[grid](*args, **kw)

                return run

        return Grid()

    monkeypatch.setattr(launch, "wrap_triton", spy)
    return launches


def test_many_rows_in_one_launch(monkeypatch):
    """All batch*head rows (e.g. every sliding-window crop) go into ONE kernel launch on a 1-D grid."""
    if not INTERPRET:
        pytest.skip("launch counting wraps the fixed-config kernel used by the interpreter")
    launches = _spy_launches(monkeypatch)
    grid, P, B, H = (2, 3), 1, 20, 3
    q, k, v = _make(B, H, P + 6, 16, torch.float32, layout="bnhd", seed=9)
    out = _run(q, k, v, grid, 1.0, num_prefix_tokens=P)
    assert [(n, g) for n, g, _ in launches] == [("attn_fwd_kernel", (B * H,))]  # one query block per row
    _assert_close(out, _ref(q, k, v, grid, 1.0, num_prefix_tokens=P), torch.float32)


# ----------------------------------------------------------------------------------- reasons, configs
def _spec_for(q, k, v, **kw):
    return check_inputs(q, k, v, kw.pop("grid", None), kw.pop("sigma", None), **kw)


def test_unsupported_reasons_head_dim_and_device():
    q = torch.zeros(1, 1, 4, 512, device=DEVICE)
    reasons = launch.unsupported_reasons(q, q, q, _spec_for(q, q, q))
    assert any("head dim" in r and "512" in r for r in reasons)
    m = torch.zeros(1, 1, 4, 16, device="meta")
    reasons = launch.unsupported_reasons(m, m, m, _spec_for(m, m, m))
    assert any("device" in r and "meta" in r for r in reasons)
    with pytest.raises(ValueError, match="head dim"):
        _triton_attention(q, q, q, _spec_for(q, q, q))


@needs_interpreter
def test_unsupported_reasons_bf16_in_interpreter():
    q = torch.zeros(1, 1, 4, 16, dtype=torch.bfloat16)
    reasons = launch.unsupported_reasons(q, q, q, _spec_for(q, q, q))
    assert any("bfloat16" in r for r in reasons)


def test_supported_head_dims_have_no_reasons():
    for D in (16, 32, 48, 64, 80, 96, 128):
        q = torch.zeros(1, 1, 5, D, device=DEVICE)
        assert launch.unsupported_reasons(q, q, q, _spec_for(q, q, q, grid=(2, 2), sigma=1.0)) == []


def test_configs_are_well_formed():
    assert configs.CONFIGS and len(configs.CONFIGS) <= 12
    for c in configs.CONFIGS:
        assert set(c) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
        assert c["BLOCK_M"] in (64, 128) and c["BLOCK_N"] in (32, 64, 128)
        assert c["num_warps"] in (4, 8) and c["num_stages"] in (2, 3)


@pytest.mark.parametrize(
    ("dtype", "D", "n_bucket", "check"),
    [
        (torch.float16, 64, 8192, lambda kept: len(kept) == len(configs.CONFIGS)),
        (torch.float32, 64, 8192, lambda kept: all(c.kwargs["BLOCK_M"] == 64 for c in kept)),
        (torch.float16, 64, 128, lambda kept: all(c.kwargs["BLOCK_M"] == 64 for c in kept)),
        (
            torch.bfloat16,
            128,
            4096,
            # 64x128 x 3 stages would need ~213 KB of shared memory; tiles above 128x64 need 8 warps at D=128.
            lambda kept: (
                (64, 128) not in {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept}
                and all(
                    c.num_warps == 8 for c in kept if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 128 * 64
                )
            ),
        ),
    ],
    ids=["fp16-d64-big", "fp32-small-tiles", "fp16-tiny-n", "bf16-d128"],
)
def test_autotune_pruning(dtype, D, n_bucket, check):
    """The autotune list is pruned per key (shared memory, fp32 tile size, tiny N); never to nothing. Bias off
    here (the bias only removes configs: test_bias_prunes_configs_that_spill)."""
    import triton

    tconfigs = [
        triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                      num_stages=c["num_stages"])
        for c in configs.CONFIGS
    ]  # fmt: skip
    k = torch.empty(1, dtype=dtype)
    kept = configs._pruner("fwd")(tconfigs, {"K": k, "N_BUCKET": n_bucket}, HEAD_DIM=D, HAS_BIAS=False)
    assert kept and check(kept)


def _scores_per_thread(c):
    return c["BLOCK_M"] * c["BLOCK_N"] // (32 * c["num_warps"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 128])
def test_bias_prunes_configs_that_spill(dtype, D):
    """With the bias, only configs with <= 32 score elements per thread launch (the others spill, see the
    module docstring); the prune hook and config_allowed agree; the bias configs are a subset of the bias-free
    ones (so every bias variant has a bias-free partner for the EX2 comparison)."""
    import triton

    on = [configs.config_allowed(c, dtype=dtype, head_dim=D, has_bias=True, n=4096) for c in configs.CONFIGS]
    off = [
        configs.config_allowed(c, dtype=dtype, head_dim=D, has_bias=False, n=4096) for c in configs.CONFIGS
    ]
    assert any(on) and all(o for o, b in zip(off, on, strict=True) if b)
    for c, ok in zip(configs.CONFIGS, on, strict=True):
        if _scores_per_thread(c) > configs.BIAS_MAX_SCORES_PER_THREAD:
            assert not ok, c
    if D == 64:  # every bias-free config launches at D=64; the 64-scores-per-thread ones not with the bias
        assert all(off) and on == [_scores_per_thread(c) <= 32 for c in configs.CONFIGS]
    tconfigs = [
        triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                      num_stages=c["num_stages"])
        for c in configs.CONFIGS
    ]  # fmt: skip
    k = torch.empty(1, dtype=dtype)
    for has_bias, want in ((True, on), (False, off)):
        kept = configs._pruner("fwd")(tconfigs, {"K": k, "N_BUCKET": 4096}, HEAD_DIM=D, HAS_BIAS=has_bias)
        assert [any(c is x for x in kept) for c in tconfigs] == want


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize("D", [32, 64, 128])
@pytest.mark.parametrize("N", [50, 197, 785, 16385])
@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("gather_branch", [None, True, False], ids=["installed", "branch", "no-branch"])
def test_heuristic_config_is_admitted(dtype, D, N, has_bias, gather_branch):
    cfg = configs.heuristic_config(dtype, D, N, has_bias=has_bias, gather_branch=gather_branch)
    assert configs.config_allowed(
        cfg, dtype=dtype, head_dim=D, has_bias=has_bias, n=N, gather_branch=gather_branch
    ), cfg


# ----------------------------------------------------------------------------------- version gate
@pytest.mark.parametrize(
    ("version", "parsed"),
    [
        ("3.6.0", (3, 6)),
        ("3.7.0", (3, 7)),
        ("3.8.0", (3, 8)),
        ("3.10.1", (3, 10)),
        ("3.7.0+git1a2b3c4", (3, 7)),
        ("3.8.0.dev20260101", (3, 8)),
        ("3.7.0rc1", (3, 7)),
        ("v4", (4, 0)),
        (" 2.3.1", (2, 3)),
        ("", None),
        ("unknown", None),
        (None, None),
        (3.8, None),
    ],
    ids=str,
)
def test_parse_version(version, parsed):
    assert configs.parse_version(version) == parsed


@pytest.mark.parametrize(
    ("dtype", "version", "expected"),
    [
        (torch.float16, "3.6.0", False),  # 3.6.0: the branch duplicates the softmax (1.5x EX2)
        (torch.bfloat16, "3.6.0", False),
        (torch.float16, "3.6.9+gabc", False),
        (torch.float16, "3.7.0", True),
        (torch.bfloat16, "3.7.0rc1", True),
        (torch.float16, "3.8.0", True),
        (torch.bfloat16, "3.8.0", True),
        (torch.float16, "3.10.0", True),  # numeric, not lexicographic ("3.10" < "3.7" as strings)
        (torch.float16, "4.0.0", True),
        (torch.float16, "2.3.1", False),
        (torch.float32, "3.8.0", False),  # fp32 never takes the branch
        (torch.float32, "3.6.0", False),
        (torch.float16, "", False),  # unparsable -> the branch-free kernel (safe on every version)
        (torch.bfloat16, "garbage", False),
        (torch.float16, None, False),
    ],
    ids=lambda x: str(x).removeprefix("torch.") if not isinstance(x, bool) else str(x),
)
def test_use_gather_branch_version_gate(dtype, version, expected):
    assert configs.use_gather_branch(dtype, version) is expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_config_allowed_counts_staging_without_branch(dtype):
    """Without the gather branch the pipelined gather's cp.async staging (4 * BM * BN * (stages - 1) bytes)
    joins the shared-memory estimate: 128x64 x 3 stages at D=128 then exceeds the budget (the triton 3.6
    kernel), while it fits with the branch (3.8). Bias-free configs do not depend on the branch; the prune
    hook honours the GATHER_BRANCH launch argument."""
    import triton

    cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    kw = {"dtype": dtype, "head_dim": 128, "n": 4096}
    assert configs.config_allowed(cfg, has_bias=True, gather_branch=True, **kw)
    assert not configs.config_allowed(cfg, has_bias=True, gather_branch=False, **kw)
    for branch in (True, False):
        assert configs.config_allowed(cfg, has_bias=False, gather_branch=branch, **kw)
    # At D=64 every bias config fits either way (the staging only trades shared memory for the branch), except
    # the ones measured to spill without the branch.
    for c in configs.CONFIGS:
        on = configs.config_allowed(c, dtype=dtype, head_dim=64, has_bias=True, n=4096, gather_branch=True)
        off = configs.config_allowed(c, dtype=dtype, head_dim=64, has_bias=True, n=4096, gather_branch=False)
        spills = ("fwd", *(c[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")))
        assert off == (on and spills not in configs.SPILLS_WITHOUT_BRANCH), c
    tconfigs = [
        triton.Config({"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]}, num_warps=c["num_warps"],
                      num_stages=c["num_stages"])
        for c in configs.CONFIGS
    ]  # fmt: skip
    k = torch.empty(1, dtype=dtype)
    for branch in (True, False):
        kept = configs._pruner("fwd")(
            tconfigs, {"K": k, "N_BUCKET": 4096}, HEAD_DIM=128, HAS_BIAS=True, GATHER_BRANCH=branch
        )
        want = [configs.config_allowed(c, has_bias=True, gather_branch=branch, **kw) for c in configs.CONFIGS]
        assert [any(c is x for x in kept) for c in tconfigs] == want
        big = [c for c in kept if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) == (128, 64, 3)]
        assert bool(big) is branch


@needs_interpreter
@pytest.mark.parametrize("version", ["3.6.0", "3.8.0"], ids=["t3.6", "t3.8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gather_branch_reaches_the_kernel(monkeypatch, dtype, version):
    """triton_attention launches with GATHER_BRANCH = use_gather_branch(dtype, triton version), and both
    kernel variants (branch / no branch) match the reference."""
    monkeypatch.setattr(configs, "TRITON_VERSION", version)
    launches = _spy_launches(monkeypatch)
    grid, P = (7, 5), 1  # N = 36: a near tile plus a partial tail tile at 32x32
    q, k, v = _make(1, 2, P + 35, 32, dtype, seed=11)
    out = _run(q, k, v, grid, 2.0, num_prefix_tokens=P)
    seen = [kw["GATHER_BRANCH"] for _, _, kw in launches]
    assert seen == [configs.use_gather_branch(dtype, version)]
    assert seen[0] is (dtype == torch.float16 and version == "3.8.0")
    _assert_close(out, _ref(q, k, v, grid, 2.0, num_prefix_tokens=P), dtype)


@pytest.mark.parametrize(
    ("kwargs", "exc", "needle"),
    [
        ({"dtype": torch.int8}, TypeError, "dtype"),
        ({"head_dim": 256}, ValueError, "head_dim"),
        ({"n": 0}, ValueError, "n must"),
        ({"config": {"BLOCK_M": 64}}, ValueError, "config"),
    ],
    ids=["dtype", "head-dim", "n", "config"],
)
def test_config_allowed_rejects_bad_arguments(kwargs, exc, needle):
    args = {"config": configs.CONFIGS[0], "dtype": torch.float16, "head_dim": 64, "has_bias": True, "n": 197}
    args.update(kwargs)
    config = args.pop("config")
    with pytest.raises(exc, match=needle):
        configs.config_allowed(config, **args)


# ----------------------------------------------------------------------------------- through the API
def test_public_api_backend_triton():
    from naclip_kernels import gaussian_attention

    grid, P = (5, 9), 1
    q, k, v = _make(1, 2, P + 45, 64, torch.float16, layout="bnhd", seed=10)
    out = gaussian_attention(k, k, v, grid, 5.0, num_prefix_tokens=P, backend="triton")
    _assert_close(out, _ref(k, k, v, grid, 5.0, num_prefix_tokens=P), torch.float16)
    big = torch.zeros(1, 1, 5, 512, device=DEVICE)
    with pytest.raises(ValueError, match="512"):
        gaussian_attention(big, big, big, (2, 2), 1.0, backend="triton")


# ----------------------------------------------------------------------------------- fuzz (interpreter)
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    given = None

if given is not None:

    @settings(max_examples=12, deadline=None, derandomize=True)
    @given(
        gh=st.integers(1, 9),
        gw=st.integers(1, 9),
        P=st.integers(0, 4),
        D=st.sampled_from([16, 24, 48, 64]),
        sigma=st.one_of(st.none(), st.floats(0.3, 60.0)),
        bias_scale=st.floats(-3.0, 3.0),
        dtype=st.sampled_from(["fp32", "fp16"]),
        q_is_k=st.booleans(),
        layout=st.sampled_from(["bhnd", "bnhd", "expand"]),
        seed=st.integers(0, 2**16),
    )
    def test_fuzz_against_reference(gh, gw, P, D, sigma, bias_scale, dtype, q_is_k, layout, seed):
        dt = _dt(dtype)
        N = P + gh * gw
        q, k, v = _make(1, 2, N, D, dt, layout=layout, q_is_k=q_is_k, seed=seed)
        kw = {"num_prefix_tokens": P, "bias_scale": bias_scale}
        out = _run(q, k, v, (gh, gw), sigma, **kw)
        _assert_close(out, _ref(q, k, v, (gh, gw), sigma, **kw), dt, f"N={N} D={D} sigma={sigma}")


# ----------------------------------------------------------------------------------- CUDA only
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cuda_matrix(case, dtype):
    _, B, H, grid, P, D, sigma, kw = case
    N = P + grid[0] * grid[1]
    for q_is_k in (True, False):
        q, k, v = _make(B, H, N, D, dtype, layout="bnhd", q_is_k=q_is_k)
        out = _run(q, k, v, grid, sigma, num_prefix_tokens=P, **kw)
        _assert_close(out, _ref(q, k, v, grid, sigma, num_prefix_tokens=P, **kw), dtype)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize(("grid", "sigma"), [((64, 64), 5.0), ((128, 128), 5.0), ((128, 128), 50.0)])
def test_cuda_large_n(grid, sigma, dtype):
    N = 1 + grid[0] * grid[1]  # 4097 / 16385
    q, k, v = _make(1, 1, N, 64, dtype, layout="bnhd")
    out = _run(q, k, v, grid, sigma)
    _assert_close(out, _ref(q, k, v, grid, sigma), dtype, f"N={N}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_162_crops_one_launch(dtype):
    """All 162 sliding-window crops of a 2048x1024 image (N = 197 each, 12 heads) in one call."""
    q, k, v = _make(162, 12, 197, 64, dtype, layout="bnhd")
    out = _run(q, k, v, (14, 14), 5.0)
    _assert_close(out, _ref(q, k, v, (14, 14), 5.0), dtype)
