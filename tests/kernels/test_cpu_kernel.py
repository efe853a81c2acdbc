"""The fused float32 CPU backward (naclip_kernels/_cpu_kernel.py + csrc/gaussian_bwd_cpu.c): availability,
gradients against the float64 reference on every layout and bias form, block edges, determinism, NaN
propagation, the fallback when it cannot be built, and the build cache.

Tolerance: float32 grads relative to ``max|ref grad|`` 1e-4 (test_autograd's; observed ~1e-6).
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

import naclip_kernels._cpu_kernel as ck
from naclip_kernels import gaussian_attention, reference_attention

TOL = 1e-4
HAVE_CC = shutil.which("cc") is not None and torch.backends.mkl.is_available()
needs_kernel = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on PATH or no MKL in this torch build")


@pytest.fixture
def fresh_state(monkeypatch):
    """A process state in which the library has not been loaded yet (restored afterwards)."""
    monkeypatch.setattr(ck, "_state", None)


@pytest.fixture
def spy_kernel(monkeypatch):
    calls = []
    real = ck.backward

    def spy(*args, **kw):
        calls.append(args[1].shape)
        return real(*args, **kw)

    monkeypatch.setattr(ck, "backward", spy)
    return calls


def _param(kind, H, value):
    if kind is None or kind == "float":
        return value
    if kind == "scalar":
        return torch.tensor(value, requires_grad=True)
    return torch.linspace(0.7 * value, 1.3 * value, H).requires_grad_()


def _check(q, k, v, grid, sig, bs=1.0, P=1, dout=None):
    """Grads of gaussian_attention (torch backend) vs the float64 reference from the same inputs."""
    leaves = [t for t in (q, k, v, sig, bs) if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves = [t for i, t in enumerate(leaves) if not any(t is u for u in leaves[:i])]
    out = gaussian_attention(q, k, v, grid, sig, bias_scale=bs, num_prefix_tokens=P, backend="torch")
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)) if dout is None else dout
    got = torch.autograd.grad(out, leaves, go)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    sub = {id(a): b for a, b in zip(leaves, ref_leaves, strict=True)}

    def r(t):
        return sub.get(id(t), t.detach().double() if isinstance(t, torch.Tensor) else t)

    ref = reference_attention(r(q), r(k), r(v), grid, r(sig), bias_scale=r(bs), num_prefix_tokens=P)
    want = torch.autograd.grad(ref, ref_leaves, go.double())
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert a.shape == b.shape and a.dtype == torch.float32
        err = float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6))
        assert err <= TOL, f"grad {i}: relative error {err:.3g} > {TOL}"
    return got


def _qkv(B, H, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g).requires_grad_() for _ in range(3)]


@needs_kernel
def test_available_here():
    st = ck.status()
    assert st.available, st.reason
    assert st.path is not None and st.path.endswith(".so")


CASES = [  # B, H, grid, P, D, sigma kind, bias kind
    (1, 1, (1, 1), 1, 8, "float", "float"),
    (2, 3, (3, 5), 1, 16, "scalar", "float"),
    (1, 2, (7, 4), 0, 17, "heads", "scalar"),
    (3, 2, (20, 3), 5, 32, "float", "heads"),
    (1, 2, (2, 33), 1, 64, "heads", "heads"),
    (2, 1, (5, 16), 2, 24, "scalar", "scalar"),
    (1, 2, (9, 9), 1, 16, None, "float"),
]


@needs_kernel
@pytest.mark.parametrize(
    "B,H,grid,P,D,sig_kind,bs_kind",
    CASES,
    ids=[f"B{c[0]}-H{c[1]}-{c[2][0]}x{c[2][1]}-P{c[3]}-D{c[4]}-sigma_{c[5]}-bs_{c[6]}" for c in CASES],
)
@pytest.mark.parametrize(
    "blocks", [(256, 256), (64, 512), (5, 7)], ids=["default-blocks", "64x512", "tiny-blocks"]
)
def test_grads_match_reference(monkeypatch, spy_kernel, B, H, grid, P, D, sig_kind, bs_kind, blocks):
    monkeypatch.setattr(ck, "BLOCK_M", blocks[0])
    monkeypatch.setattr(ck, "BLOCK_N", blocks[1])
    q, k, v = _qkv(B, H, P + grid[0] * grid[1], D)
    sig = None if sig_kind is None else _param(sig_kind, H, 1.7)
    _check(q, k, v, grid, sig, _param(bs_kind, H, 1.3), P)
    assert spy_kernel, "the fused kernel did not run"


@needs_kernel
def test_many_query_and_key_blocks_default_sizes(spy_kernel):
    """N = 601 at the default block sizes (256 x 256): three query blocks (the last of 89 rows), key blocks of
    10 grid rows (251, 250 and 100 keys, the prefix key joined to the first)."""
    q, k, v = _qkv(1, 2, 1 + 24 * 25, 16)
    _check(q, k, v, (24, 25), torch.tensor(4.0, requires_grad=True))
    assert spy_kernel


@needs_kernel
def test_grid_row_wider_than_key_block(monkeypatch, spy_kernel):
    monkeypatch.setattr(ck, "BLOCK_N", 16)
    q, k, v = _qkv(1, 1, 1 + 3 * 40, 8)
    _check(q, k, v, (3, 40), torch.tensor([2.5], requires_grad=True))


@needs_kernel
@pytest.mark.parametrize("q_is_k", [False, True], ids=["q", "q-is-k"])
def test_token_major_views_of_packed_qkv(spy_kernel, q_is_k):
    """Heads split off a packed [B, N, 3, H, D] projection (timm / open_clip layout), odd strides."""
    B, N, H, D, grid = 2, 1 + 4 * 6, 3, 16, (4, 6)
    qkv = torch.randn(B, N, 3, H, D + 3)[..., :D].requires_grad_()  # padded: no dense stride anywhere
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    sig = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    dout = torch.randn(B, H, N, 2 * D)[..., ::2]  # a head dim of stride 2 (copied for the kernel)
    _check(k if q_is_k else q, k, v, grid, sig, 0.8, dout=dout)
    assert spy_kernel


def _term_sizes(q, k, v, go, grid, sigma, bs):
    """Error scales of d bias_scale and d sigma in float32: with ``dS = P * (dP - D)``, each ``dS_ij`` carries
    an error of about ``eps * P_ij * (|dP_ij| + |D_i|)``, so the sums carry about eps times
    ``sum P (|dP| + |D|) G`` and ``sum P (|dP| + |D|) G d^2 * |bs| / sigma^3`` (float64 reference). That
    dominates when the terms cancel (a one-hot or flat softmax: the grads are then ~1e-10)."""
    from naclip_kernels import gaussian_bias, reference_attention_probs

    q, k, v, go = (t.detach().double() for t in (q, k, v, go))
    p = reference_attention_probs(q, k, grid, sigma, bias_scale=bs)
    ds = p * ((go @ v.transpose(-1, -2)).abs() + (go * (p @ v)).sum(-1, keepdim=True).abs())
    g = gaussian_bias(grid, sigma, dtype=torch.float64)
    r = torch.arange(grid[0] * grid[1], dtype=torch.float64)
    yy, xx = torch.div(r, grid[1], rounding_mode="floor"), r % grid[1]
    d2 = torch.zeros_like(g)
    d2[1:, 1:] = (yy[:, None] - yy[None, :]) ** 2 + (xx[:, None] - xx[None, :]) ** 2
    return float((ds * g).abs().sum()), float((ds * g * d2).abs().sum() * abs(bs) / sigma**3)


@needs_kernel
@pytest.mark.parametrize("sigma", [1e-30, 0.2, 40.0, 1e6], ids=lambda s: f"sigma{s:g}")
@pytest.mark.parametrize("bs", [-2.0, 30.0], ids=lambda b: f"bs{b:g}")
def test_extreme_sigma_and_bias_scale(sigma, bs):
    """q, k, v grads to 1e-4 relative; the parameter grads to 1e-4 relative or 1e-5 of their terms' size
    (bias_scale = 30 makes each row nearly one-hot or flat: the sums cancel to ~1e-10)."""
    q, k, v = _qkv(1, 2, 1 + 5 * 6, 8)
    sig, b = torch.tensor(sigma, requires_grad=True), torch.tensor(bs, requires_grad=True)
    out = gaussian_attention(q, k, v, (5, 6), sig, bias_scale=b, backend="torch")
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q, k, v, b, sig), go)
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rb, rs = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (bs, sigma))
    want = torch.autograd.grad(reference_attention(*r, (5, 6), rs, bias_scale=rb), (*r, rb, rs), go.double())
    for a, w in zip(got[:3], want[:3], strict=True):
        assert float((a.double() - w).abs().max() / w.abs().max()) <= TOL
    for a, w, size in zip(got[3:], want[3:], _term_sizes(q, k, v, go, (5, 6), sigma, bs), strict=True):
        assert abs(float(a) - float(w)) <= max(TOL * abs(float(w)), 1e-5 * size), (float(a), float(w), size)


@needs_kernel
def test_zero_bias_scale_tensor_still_gives_both_grads():
    q, k, v = _qkv(1, 2, 1 + 3 * 3, 8)
    sig, bs = torch.tensor(1.5, requires_grad=True), torch.tensor(0.0, requires_grad=True)
    got = _check(q, k, v, (3, 3), sig, bs)
    assert float(got[3]) == 0.0 and float(got[4]) != 0.0  # d sigma = bs * (...) = 0; d bs is not


@needs_kernel
def test_deterministic_and_independent_of_thread_count():
    q, k, v = _qkv(2, 3, 1 + 9 * 8, 32)
    sig = torch.tensor([1.0, 3.0, 5.0], requires_grad=True)

    def grads():
        out = gaussian_attention(q, k, v, (9, 8), sig, backend="torch")
        return torch.autograd.grad(out, (q, k, v, sig), torch.ones_like(out))

    threads = torch.get_num_threads()
    a, b = grads(), grads()
    try:
        torch.set_num_threads(1)
        c = grads()
    finally:
        torch.set_num_threads(threads)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)


@needs_kernel
def test_nan_propagates_like_the_reference():
    q, k, v = _qkv(1, 1, 1 + 4 * 4, 8)
    with torch.no_grad():
        v[0, 0, 5, 3] = float("nan")
    sig = torch.tensor(2.0, requires_grad=True)
    out = gaussian_attention(q, k, v, (4, 4), sig, backend="torch")
    got = torch.autograd.grad(out, (q, k, v, sig), torch.ones_like(out))
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rs = sig.detach().double().requires_grad_()
    ref = reference_attention(*r, (4, 4), rs)
    want = torch.autograd.grad(ref, (*r, rs), torch.ones_like(ref))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(torch.isnan(a), torch.isnan(b))


@needs_kernel
def test_switch_off_uses_aten_and_gives_the_same_grads(monkeypatch, spy_kernel):
    q, k, v = _qkv(1, 2, 1 + 5 * 4, 16)
    sig = torch.tensor(2.0, requires_grad=True)
    fused = _check(q, k, v, (5, 4), sig)
    assert spy_kernel
    monkeypatch.setenv(ck.ENV_SWITCH, "0")
    assert not ck.status().available and ck.ENV_SWITCH in ck.status().reason
    spy_kernel.clear()
    aten = _check(q, k, v, (5, 4), sig)
    assert not spy_kernel
    for a, b in zip(fused, aten, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cc", ["no-such-compiler-xyz", "false"], ids=["missing", "failing"])
def test_fallback_when_it_cannot_be_built(monkeypatch, tmp_path, fresh_state, spy_kernel, cc):
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv(ck.ENV_CACHE, str(tmp_path))
    if cc == "false":  # a compiler that fails: a warning, since the fast path was expected
        with pytest.warns(RuntimeWarning, match="fused CPU backward is off"):
            st = ck.status()
    else:
        st = ck.status()
    assert not st.available
    assert ("not on PATH" in st.reason) if cc.startswith("no-") else ("failed" in st.reason)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    q, k, v = _qkv(1, 2, 1 + 3 * 4, 8)
    _check(q, k, v, (3, 4), torch.tensor(1.5, requires_grad=True))  # aten's path, same result
    assert not spy_kernel


@needs_kernel
def test_build_is_cached_and_atomic(monkeypatch, tmp_path, fresh_state):
    monkeypatch.setenv(ck.ENV_CACHE, str(tmp_path))
    first = ck._build(*ck._compiler())
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    real = subprocess.run

    def no_compile(cmd, *a, **kw):
        if str(ck._SOURCE) in cmd:
            raise AssertionError("recompiled although the cached library exists")
        return real(cmd, *a, **kw)

    monkeypatch.setattr(subprocess, "run", no_compile)
    assert ck._build(*ck._compiler()) == first
    assert ck.status().available and ck.status().path == str(first)


@needs_kernel
def test_self_check_catches_a_wrong_result(monkeypatch, fresh_state):
    st, lib, gemm = ck._loaded()
    assert st.available and ck._self_check(lib, gemm) is None
    real = ck._call

    def off_by_a_bit(*args, **kw):
        sums = real(*args, **kw)
        args[2][6].mul_(1.001)  # dq
        return sums

    monkeypatch.setattr(ck, "_call", off_by_a_bit)
    assert "dq" in ck._self_check(lib, gemm)


@needs_kernel
def test_learnable_sigma_module_step_uses_the_kernel(spy_kernel):
    from naclip_kernels.nn import GaussianAttention

    attn = GaussianAttention(32, 4, sigma=3.0, learnable_sigma=True, per_head_sigma=True)
    x = torch.randn(2, 1 + 6 * 5, 32)
    attn(x, (6, 5)).square().mean().backward()
    assert spy_kernel and attn.sigma.grad is not None and torch.isfinite(attn.sigma.grad).all()


@needs_kernel
def test_exp_within_two_ulp_and_its_special_values():
    """The kernel's vectorised exp: <= 2 ulp on [-87, 1] (the arguments it gets are <= ~1e-6), 0 below -87,
    +inf above 88, NaN for NaN; odd lengths take the padded tail."""
    x = torch.cat([torch.linspace(-87.0, 1.0, 200_001), -torch.rand(1001) * 1e-6])
    got, want = ck.exp(x).double(), torch.exp(x.double())
    ulp = (want.float().nextafter(torch.tensor(float("inf"))) - want.float()).double()
    assert float(((got - want).abs() / ulp).max()) <= 2.0
    special = ck.exp(torch.tensor([-1e4, -88.0, 89.0, float("inf"), float("-inf"), float("nan"), 0.0]))
    assert special[:2].tolist() == [0.0, 0.0] and special[2:4].isinf().all() and float(special[4]) == 0.0
    assert special[5].isnan() and float(special[6]) == 1.0
