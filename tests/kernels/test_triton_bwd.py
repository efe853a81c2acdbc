"""Backward of the fused Triton path (naclip_kernels.triton) against the float64 dense oracle.

On CPU the real kernels run in the interpreter (``TRITON_INTERPRET=1``, 32x32 tiles: several query and key
tiles, partial tails, far/near band splits); bf16 needs CUDA. The oracle is ``reference_attention`` in float64
on the same (rounded) inputs, differentiated by autograd. Tolerances, as max |grad - ref| relative to
max(1, max |ref|): fp32 1e-5 (fp32 accumulation and IEEE dots: summation-order rounding plus the band skip's
bounded 2^-24 terms), fp16 2e-2 and bf16 8e-2 (P and dS are rounded to the input dtype for the tensor-core
dots, 2^-11 / 2^-8 relative, over sums of N terms).
"""

from __future__ import annotations

import os

import pytest
import torch

from naclip_kernels import _bias, gaussian_attention, reference_attention
from naclip_kernels._checks import check_inputs
from naclip_kernels.triton import launch, triton_attention

pytestmark = pytest.mark.triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available() and not INTERPRET
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 8e-2}
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(
        torch.bfloat16,
        id="bf16",
        marks=pytest.mark.skipif(
            not HAS_CUDA, reason="bf16 needs CUDA (the interpreter's bf16 tl.dot is broken)"
        ),
    ),
]
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="launch spying uses the interpreter's fixed config"
)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


def _inputs(B, H, N, D, dtype, *, layout="bnhd", q_is_k=True, seed=0):
    """Leaf q, k, v ``[B, H, N, D]`` (``bnhd``: transposed views with odd strides; q is k when asked)."""
    g = torch.Generator().manual_seed(seed)

    def one():
        if layout == "bnhd":
            base = torch.randn(B, N, H, D, generator=g).to(device=DEVICE, dtype=dtype)
            return _leaf(base).transpose(1, 2)
        return _leaf(torch.randn(B, H, N, D, generator=g).to(device=DEVICE, dtype=dtype))

    k = one()
    return (k if q_is_k else one()), k, one()


def _grads(fn, tensors, grad_out):
    out = fn()
    return out, torch.autograd.grad(out, tensors, grad_out)


def _check(got, want, dtype, what):
    for name, a, b in zip(what, got, want, strict=True):
        assert a.shape == b.shape, name
        err = (a.double() - b).abs().max().item()
        bound = TOL[dtype] * max(1.0, b.abs().max().item())
        assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"


def _oracle(q, k, v, grid, sigma, bias_scale, P, leaves):
    """float64 reference on the same values and aliasing (q is k stays one leaf); grads w.r.t. ``leaves``."""
    cast = {}
    for t in leaves:
        cast[id(t)] = _leaf(t.detach().double())
    q64, k64, v64 = (cast.get(id(t), t.detach().double()) for t in (q, k, v))
    sig = cast.get(id(sigma), sigma)
    bs = cast.get(id(bias_scale), bias_scale)
    out = reference_attention(q64, k64, v64, grid, sig, num_prefix_tokens=P, bias_scale=bs)
    return out, [cast[id(t)] for t in leaves]


def _leaves(*ts):
    """Distinct tensors that require grad, in order (q is k counted once); views map to their base leaf."""
    out, seen = [], set()
    for t in ts:
        if isinstance(t, torch.Tensor) and t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# (id, B, H, grid, P, D, sigma, bias_scale, q_is_k): odd N, non-square grids, P in {0, 1, several}.
CASES = [
    ("g7x5-P1-s2-qk", 1, 2, (7, 5), 1, 32, 2.0, 1.0, True),
    ("g3x13-P0-s0.7-qnek", 1, 1, (3, 13), 0, 16, 0.7, -1.5, False),
    ("g9x4-P3-s30-qk-D48", 2, 1, (9, 4), 3, 48, 30.0, 2.0, True),
    ("g5x6-P1-nobias-qnek", 1, 1, (5, 6), 1, 16, None, 1.0, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_qkv_grads_match_fp64_oracle(case, dtype):
    _, B, H, grid, P, D, sigma, bs, q_is_k = case
    N = P + grid[0] * grid[1]
    q, k, v = _inputs(B, H, N, D, dtype, q_is_k=q_is_k, seed=1)
    leaves = _leaves(q, k, v)
    g_out = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    spec = check_inputs(q, k, v, grid, sigma, num_prefix_tokens=P, bias_scale=bs)
    out, got = _grads(lambda: triton_attention(q, k, v, spec), leaves, g_out)
    ref, ref_leaves = _oracle(q, k, v, grid, sigma, bs, P, leaves)
    want = torch.autograd.grad(ref, ref_leaves, g_out.double())
    _check([out], [ref.detach()], dtype, ["out"])
    _check(got, want, dtype, ["dk", "dv"] if q_is_k else ["dq", "dk", "dv"])


# Tensor sigma / bias_scale: [] or [H] each (per-head G: one table and one band radius per head).
PARAM_CASES = [
    ("sigma[H]-bs[]", [0.6, 2.0, 5.0], 1.5),
    ("sigma[]-bs[H]", 1.3, [0.5, -2.0, 3.0]),
    ("sigma[]-bs[]", 2.5, 0.8),
]


# Every parameter shape in fp32; the per-head sigma case also in fp16 (and bf16 on CUDA).
PARAM_RUNS = [pytest.param(*c[1:], torch.float32, id=f"{c[0]}-fp32") for c in PARAM_CASES] + [
    pytest.param(*PARAM_CASES[0][1:], p.values[0], id=f"{PARAM_CASES[0][0]}-{p.id}", marks=p.marks)
    for p in DTYPES[1:]
]


@pytest.mark.parametrize(("sigma", "bias_scale", "dtype"), PARAM_RUNS)
def test_sigma_and_bias_scale_grads(sigma, bias_scale, dtype):
    grid, P, H = (6, 7), 1, 3
    N = P + grid[0] * grid[1]
    q, k, v = _inputs(2, H, N, 16, dtype, seed=3)
    sig = _leaf(torch.tensor(sigma, dtype=torch.float32, device=DEVICE))
    bs = _leaf(torch.tensor(bias_scale, dtype=torch.float64, device=DEVICE))
    leaves = _leaves(k, v, sig, bs)
    g_out = torch.randn(2, H, N, 16, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    spec = check_inputs(q, k, v, grid, sig, num_prefix_tokens=P, bias_scale=bs)
    _, got = _grads(lambda: triton_attention(q, k, v, spec), leaves, g_out)
    ref, ref_leaves = _oracle(q, k, v, grid, sig, bs, P, leaves)
    want = torch.autograd.grad(ref, ref_leaves, g_out.double())
    assert got[2].shape == sig.shape and got[2].dtype == sig.dtype
    assert got[3].shape == bs.shape and got[3].dtype == bs.dtype
    _check(got, want, dtype, ["dk", "dv", "dsigma", "dbias_scale"])


def test_band_skip_in_backward_is_exact_and_a_wrong_radius_is_caught(monkeypatch):
    """A tall grid with sigma 0.5 has far tiles in every kernel; with the proven radius the grads match the
    oracle to fp32 resolution, with the radius forced to 0 the dropped bias shows (so the check can fail)."""
    grid, P, sigma = (40, 3), 1, 0.5
    N = P + grid[0] * grid[1]
    assert _bias.band_rows(sigma, 1.0, grid[0]) == 3 < grid[0] - 1  # 32-token tiles span ~11 rows: far tiles
    q, k, v = _inputs(1, 1, N, 16, torch.float32, seed=5)
    g_out = torch.randn(1, 1, N, 16, generator=torch.Generator().manual_seed(6))
    ref, ref_leaves = _oracle(q, k, v, grid, sigma, 1.0, P, [k, v])
    want = torch.autograd.grad(ref, ref_leaves, g_out.double())
    spec = check_inputs(q, k, v, grid, sigma, num_prefix_tokens=P)
    _, got = _grads(lambda: triton_attention(q, k, v, spec), [k, v], g_out)
    _check(got, want, torch.float32, ["dk", "dv"])
    launch._cached_tables.cache_clear()
    monkeypatch.setattr(_bias, "band_rows", lambda *a, **kw: 0)
    try:
        _, bad = _grads(lambda: triton_attention(q, k, v, spec), [k, v], g_out)
    finally:
        launch._cached_tables.cache_clear()
    with pytest.raises(AssertionError, match="dk"):
        _check(bad, want, torch.float32, ["dk", "dv"])


def test_backward_is_deterministic():
    """Two runs give bit-identical gradients (no atomics; d(sigma), d(bias_scale) are fixed-order sums)."""
    grid, P, H = (5, 7), 1, 2
    q, k, v = _inputs(2, H, P + 35, 32, torch.float32, seed=7)
    sig = _leaf(torch.tensor([1.5, 3.0], device=DEVICE))
    bs = _leaf(torch.tensor(1.2, device=DEVICE))
    g_out = torch.randn(2, H, P + 35, 32, generator=torch.Generator().manual_seed(8)).to(DEVICE)
    spec = check_inputs(q, k, v, grid, sig, num_prefix_tokens=P, bias_scale=bs)
    runs = [_grads(lambda: triton_attention(q, k, v, spec), [k, v, sig, bs], g_out)[1] for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@needs_interpreter
@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
def test_lse_is_stored_only_when_a_gradient_is_needed(monkeypatch, requires_grad):
    """Nothing requires grad: today's forward (no LSE store, one launch). Else LSE is stored."""
    from test_triton import _spy_launches

    launches = _spy_launches(monkeypatch)
    q, k, v = _inputs(1, 1, 1 + 20, 16, torch.float32, seed=9)
    with torch.set_grad_enabled(requires_grad):
        out = triton_attention(k, k, v, check_inputs(k, k, v, (4, 5), 2.0))
    assert [kw["STORE_LSE"] for _, _, kw in launches] == [requires_grad]
    assert out.requires_grad is requires_grad


def test_public_api_backward_with_learnable_sigma():
    """gaussian_attention(..., backend="triton") end to end: q is k, per-head sigma, float bias_scale."""
    grid, P, H = (4, 6), 1, 2
    N = P + grid[0] * grid[1]
    _, k, v = _inputs(1, H, N, 16, torch.float32, seed=10)
    sig = _leaf(torch.tensor([0.8, 4.0], device=DEVICE))
    out = gaussian_attention(k, k, v, grid, sig, num_prefix_tokens=P, bias_scale=2.0, backend="triton")
    got = torch.autograd.grad(out.square().sum(), (k, v, sig))
    ref, leaves = _oracle(k, k, v, grid, sig, 2.0, P, [k, v, sig])
    want = torch.autograd.grad(ref.square().sum(), leaves)
    _check(got, want, torch.float32, ["dk", "dv", "dsigma"])


def test_compiled_fullgraph_forward_and_backward():
    """torch.compile(fullgraph=True) through the registered op, tensor sigma learnable (aot_eager here: the
    interpreter's kernels are opaque custom ops; on CUDA the triton_op is traced into)."""
    grid, P = (3, 4), 1
    _, k, v = _inputs(1, 2, 13, 16, torch.float32, seed=11)
    sig = _leaf(torch.tensor([1.0, 2.0], device=DEVICE))

    def loss(k, v, sig):
        return gaussian_attention(k, k, v, grid, sig, num_prefix_tokens=P, backend="triton").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if INTERPRET else "inductor")
    got = torch.autograd.grad(compiled(k, v, sig), (k, v, sig))
    want = torch.autograd.grad(loss(k, v, sig), (k, v, sig))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_opcheck_forward_op():
    grid = (3, 4)
    _, k, v = _inputs(1, 2, 13, 16, torch.float32, layout="bhnd", seed=12)
    t = launch.bias_tables(grid, 2.0, 1.0, k.device)
    args = (k, k, v, t.scaled, t.rows, None, None, *grid, 1, 0.25, 2.0, 1.0, True, True, True)
    torch.library.opcheck(torch.ops.naclip_kernels.triton_fwd.default, args)


def test_float64_is_refused_with_a_reason():
    x = torch.zeros(1, 1, 5, 16, dtype=torch.float64, device=DEVICE)
    reasons = launch.unsupported_reasons(x, x, x, check_inputs(x, x, x, (2, 2), 1.0))
    assert any("float64" in r for r in reasons)
    with pytest.raises(ValueError, match="float64"):
        gaussian_attention(x, x, x, (2, 2), 1.0, backend="triton")


@pytest.mark.parametrize("kernel", ["dkdv", "dq"])
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"]
)
@pytest.mark.parametrize("bias_grad", [False, True], ids=["fixed", "learnt"])
def test_fixed_backward_configs_are_admitted(monkeypatch, kernel, dtype, bias_grad):
    """Without autotuning (NACLIP_TRITON_AUTOTUNE=0 on a GPU) each backward kernel gets an admitted config."""
    from naclip_kernels.triton import configs

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setenv("NACLIP_TRITON_AUTOTUNE", "0")
    for D, n in ((64, 197), (128, 16385)):
        cfg = configs.launch_config(kernel, dtype, D, n, True)
        kw = {"dtype": dtype, "head_dim": D, "has_bias": True, "n": n}
        assert configs.bwd_config_allowed(cfg, kernel=kernel, **kw, bias_grad=bias_grad), (cfg, D)
