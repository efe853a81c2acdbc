"""Autograd of gaussian_attention: float64 gradcheck, torch backend vs the differentiable reference, learnable
sigma / bias_scale (scalar and per head), band split and mask-cache safety, memory, determinism, and the
registered op (opcheck, torch.compile fullgraph forward + backward, torch.export).

Tolerances for float32 / half grads are relative to ``max|ref grad|`` (ref: float64 reference from the same
rounded inputs): fp32 1e-4 (summation order of N-term reductions; observed ~1e-6), fp16 2e-2 and bf16 8e-2
(the forward's documented tolerances, doubled: the backward reuses the rounded output and probabilities).
"""

from __future__ import annotations

import pytest
import torch

import naclip_kernels.torch_backend as tb
import naclip_kernels.torch_backward as tbw
from naclip_kernels import check_inputs, gaussian_attention, reference_attention
from naclip_kernels.torch_backward import explicit_backward, explicit_forward

GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}


def _qkv(B, H, N, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _param(kind, H, value, dtype=torch.float64):
    """A sigma / bias_scale argument: a Python float, a [] tensor or an [H] tensor requiring grad."""
    if kind == "float":
        return value
    if kind == "scalar":
        return torch.tensor(value, dtype=dtype, requires_grad=True)
    return torch.linspace(0.7 * value, 1.3 * value, H, dtype=dtype).requires_grad_()


def _grads(out, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, go)


def _leaves(*xs):
    out = []
    for x in xs:
        if isinstance(x, torch.Tensor) and x.requires_grad and not any(x is y for y in out):
            out.append(x)
    return out


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several query chunks, key blocks (and the band split) on small problems."""
    monkeypatch.setattr(tb, "MIN_EFFICIENT_ROWS", 1)
    monkeypatch.setattr(tbw, "MIN_KEY_BLOCK", 1)
    monkeypatch.setenv("NACLIP_TORCH_CHUNK_BYTES", "4000")


# ---- float64 gradcheck (torch backend: CPU flash path and explicit path; reference) ----


@pytest.mark.parametrize("impl", ["flash", "explicit"])
@pytest.mark.parametrize(
    "sigma_kind,bias_kind,P,q_is_k",
    [
        ("float", "float", 1, True),
        ("scalar", "float", 1, False),
        ("heads", "scalar", 0, True),
        ("scalar", "heads", 3, False),
        ("heads", "heads", 1, False),
    ],
    ids=lambda x: str(x),
)
def test_gradcheck_float64_torch_backend(monkeypatch, impl, sigma_kind, bias_kind, P, q_is_k):
    if impl == "explicit":
        monkeypatch.setattr(tb, "_flash_cpu", None)
    B, H, grid, D = 2, 2, (2, 3), 3
    q, k, v = (t.requires_grad_() for t in _qkv(B, H, P + 6, D))
    q = k if q_is_k else q
    sig, bs = _param(sigma_kind, H, 1.3), _param(bias_kind, H, 1.7)

    def f(q, k, v, sig, bs):
        return gaussian_attention(q, k, v, grid, sig, bias_scale=bs, num_prefix_tokens=P, backend="torch")

    inputs = (q, k, v, sig, bs)
    assert torch.autograd.gradcheck(f, inputs, atol=1e-8, rtol=1e-6, fast_mode=True)


@pytest.mark.parametrize("sigma_kind,bias_kind", [("scalar", "heads"), ("heads", "float")], ids=str)
def test_gradcheck_float64_reference(sigma_kind, bias_kind):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 1 + 6, 4))
    sig, bs = _param(sigma_kind, 2, 0.9), _param(bias_kind, 2, -1.2)
    f = lambda q, k, v, s, b: reference_attention(q, k, v, (2, 3), s, bias_scale=b)  # noqa: E731
    assert torch.autograd.gradcheck(f, (q, k, v, sig, bs), atol=1e-8, rtol=1e-6, fast_mode=True)


# ---- torch backend grads vs the float64 reference, every dtype, chunked and band split ----


def _compare_grads(q, k, v, grid, sig, bs, P, dtype, *, backend="torch"):
    out = gaussian_attention(q, k, v, grid, sig, bias_scale=bs, num_prefix_tokens=P, backend=backend)
    leaves = _leaves(q, k, v, sig, bs)
    got = _grads(out, leaves)
    # reference in float64 from the same (rounded) inputs
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if q is k:
        r[0] = r[1]
    rs = sig.detach().double().requires_grad_() if isinstance(sig, torch.Tensor) else sig
    rb = bs.detach().double().requires_grad_() if isinstance(bs, torch.Tensor) else bs
    ref_out = reference_attention(*r, grid, rs, bias_scale=rb, num_prefix_tokens=P)
    want = _grads(ref_out, _leaves(r[0], r[1], r[2], rs, rb))
    for i, (leaf, a, b) in enumerate(zip(leaves, got, want, strict=True)):
        name = f"input {i}"
        assert a.shape == b.shape == leaf.shape and a.dtype == leaf.dtype
        err = ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
        assert err <= GRAD_TOL[dtype], f"{name}: relative grad error {err:.3g} > {GRAD_TOL[dtype]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sigma_kind,bias_kind", [("float", "float"), ("heads", "scalar")], ids=str)
def test_grads_match_reference_chunked_and_band_split(
    monkeypatch, small_chunks, dtype, sigma_kind, bias_kind
):
    calls = []
    real = tb._flash_cpu

    def spy(q, k, v, **kw):
        calls.append((k.shape[2], kw.get("attn_mask") is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(tb, "_flash_cpu", spy)
    B, H, grid, P = 2, 2, (20, 3), 1
    q, k, v = (t.requires_grad_() for t in _qkv(B, H, P + 60, 16, dtype))
    sig = _param(sigma_kind, H, 0.6, torch.float32)
    bs = _param(bias_kind, H, 2.0, torch.float32)
    _compare_grads(k, k, v, grid, sig, bs, P, dtype)
    _compare_grads(q, k, v, grid, sig, bs, P, dtype)
    assert any(n < P + 60 and m for n, m in calls), "the band split was not exercised"


@pytest.mark.parametrize(
    "B,grid,P,sigma_kind,bias_kind,q_is_k",
    [
        (1, (7, 5), 1, "scalar", "float", True),
        (2, (9, 4), 0, "heads", "scalar", False),
        (3, (5, 8), 5, "float", "heads", True),
        (1, (11, 3), 1, "heads", "heads", False),
    ],
    ids=["7x5-P1-scalar", "9x4-P0-heads-B2", "5x8-P5-bias-heads-B3", "11x3-P1-both-heads"],
)
def test_backward_key_blocks_match_reference(
    monkeypatch, small_chunks, B, grid, P, sigma_kind, bias_kind, q_is_k
):
    """The CPU flash backward cut into query chunks x key blocks (later chunks: blocks of whole grid rows,
    the prefix keys joined to the first; bias-free ranges cut anywhere) gives the reference's grads (float32
    runs the fused CPU kernel by default: switched off here to reach aten's path)."""
    monkeypatch.setenv("NACLIP_CPU_KERNEL", "0")
    calls = []
    real = tbw._flash_cpu_bwd

    def spy(do, q, k, v, *args, **kw):
        calls.append((q.shape[2], k.shape[2]))
        return real(do, q, k, v, *args, **kw)

    monkeypatch.setattr(tbw, "_flash_cpu_bwd", spy)
    H = 2
    N = P + grid[0] * grid[1]
    q, k, v = (t.float().requires_grad_() for t in _qkv(B, H, N, 8))
    sig = _param(sigma_kind, H, 0.9, torch.float32)
    bs = _param(bias_kind, H, 1.6, torch.float32)
    _compare_grads(k if q_is_k else q, k, v, grid, sig, bs, P, torch.float32)
    assert any(n <= grid[1] + P for _, n in calls), "the key blocks were not exercised"


def test_key_blocks_cover_every_key_once():
    spec = check_inputs(*_qkv(1, 1, 1 + 6 * 5, 4, torch.float32), grid_hw=(6, 5), sigma=0.5)
    for kb in (1, 5, 7, 10, 31):
        for s, e in ((0, 3), (1, 12), (20, 31)):
            for R in (-1, 0, 1, 4):
                blocks = tbw._key_blocks(spec, s, e, R, kb, True)
                keys = sorted(j for a, b, _ in blocks for j in range(a, b))
                assert keys == list(range(spec.N)), (kb, s, e, R)
                for a, b, rows in blocks:
                    if rows is not None:  # whole grid rows, prefix joined to the first
                        assert a == (0 if rows[0] == 0 else 1 + rows[0] * 5) and b == 1 + (rows[1] + 1) * 5


def test_explicit_path_matches_reference_and_builds_bias_in_float32():
    """The path CUDA half precision takes: a bias_scale beyond float16's range is still exact."""
    q, k, v = _qkv(1, 2, 1 + 12, 16, torch.float16)
    spec = check_inputs(q, k, v, (3, 4), 1.5, bias_scale=1e5)
    out, lse = explicit_forward(q, k, v, spec)
    ref = reference_attention(q.float(), k.float(), v.float(), (3, 4), 1.5, bias_scale=1e5)
    assert torch.isfinite(out).all() and (out.float() - ref).abs().max() < 1e-2
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 13)
    dq, dk, dv, _ = explicit_backward(
        torch.ones_like(out), q, k, v, out, lse, spec, need_sigma=False, need_bias=False
    )
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))


def test_cuda_half_with_bias_routes_to_float32_explicit_path():
    import dataclasses

    q, k, v = _qkv(1, 1, 1 + 6, 8, torch.float16)
    spec = check_inputs(q, k, v, (2, 3), 1.0)
    cuda = dataclasses.replace(spec, device=torch.device("cuda"))
    assert tb.choose_impl(cuda, k) == "explicit"
    assert tb.choose_impl(dataclasses.replace(cuda, sigma=None), k) == "sdpa"
    assert tb.choose_impl(dataclasses.replace(cuda, dtype=torch.float32), k) == "sdpa"
    assert tb.choose_impl(dataclasses.replace(cuda, dtype=torch.float32), k, needs_lse=True) == "explicit"
    assert tb.mask_dtype(cuda) == torch.float32


# ---- safety: the cached mask and the band split never corrupt a pending backward ----


def test_backward_after_mask_cache_reuse_and_band_split(small_chunks):
    """Regression: the old path raised (in-place op on a saved tensor / reused cached mask) here."""
    tb.clear_workspace()
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 2, 1 + 60, 16))
    out1 = gaussian_attention(k, k, v, (20, 3), 0.6, backend="torch")
    # same grid, other sigma: refills the thread's cached bias buffer in place
    out2 = gaussian_attention(q, q, v, (20, 3), 2.0, backend="torch")
    g1 = torch.autograd.grad(out1.sum(), (k, v), retain_graph=True)
    ref = reference_attention(k, k, v, (20, 3), 0.6)
    r1 = torch.autograd.grad(ref.sum(), (k, v))
    for a, b in zip(g1, r1, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert torch.autograd.grad(out2.sum(), q)[0].shape == q.shape


def test_outputs_and_saved_tensors_hold_no_n_by_n(small_chunks):
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 1, 1 + 30 * 4, 8))
    N = q.shape[2]
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    sig = torch.tensor(0.8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gaussian_attention(q, k, v, (30, 4), sig, backend="torch")
    assert saved and max(saved) <= N * 8  # q, k, v, out, lse, sigma: never N x N
    out.sum().backward()
    assert sig.grad is not None and torch.isfinite(sig.grad)


def test_backward_is_deterministic(small_chunks):
    q, k, v = (t.float().requires_grad_() for t in _qkv(2, 2, 1 + 60, 16))
    sig, bs = _param("heads", 2, 0.7, torch.float32), _param("scalar", 2, 1.5, torch.float32)
    runs = []
    for _ in range(2):
        out = gaussian_attention(q, k, v, (20, 3), sig, bias_scale=bs, backend="torch")
        runs.append(_grads(out, [q, k, v, sig, bs]))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_bias_scale_tensor_without_sigma_has_zero_grad():
    q, k, v = _qkv(1, 2, 7, 4)
    bs = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    q.requires_grad_()
    out = gaussian_attention(q, k, v, None, None, bias_scale=bs, backend="torch")
    gq, gb = torch.autograd.grad(out.sum(), (q, bs))
    assert gb.item() == 0.0 and gq.shape == q.shape


def test_float_params_without_grad_keep_the_direct_path(monkeypatch):
    import naclip_kernels._library as lib

    called = []
    monkeypatch.setattr(lib, "torch_attention_op", lambda *a: called.append(a))
    q, k, v = _qkv(1, 2, 13, 8, torch.float32)
    out = gaussian_attention(q, k, v, (3, 4), 2.0, backend="torch")
    assert out.grad_fn is None and not called


# ---- registered op: opcheck, torch.compile (fullgraph, forward + backward), torch.export ----


def _op_samples():
    q, k, v = (t.float().requires_grad_() for t in _qkv(1, 2, 1 + 12, 8))
    sig = torch.tensor([1.0, 2.0], requires_grad=True)
    bs = torch.tensor(1.5, requires_grad=True)
    return [
        (q, q, v, sig, bs, [3, 4], None, 0.0, 0.35, 1),
        (q, k, v, None, None, [3, 4], 2.0, 1.0, 0.35, 1),
        (q, k, v, None, None, None, None, 1.0, 0.35, 0),
    ]


@pytest.mark.parametrize("case", [0, 1, 2], ids=["tensor_params_q_is_k", "float_params", "no_bias"])
def test_opcheck(case):
    torch.library.opcheck(torch.ops.naclip_kernels.torch_fwd.default, _op_samples()[case])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(compiler):
    torch._dynamo.reset()
    q, _, v = (t.float().requires_grad_() for t in _qkv(1, 2, 1 + 12, 8))
    sig = torch.tensor([1.0, 2.0], requires_grad=True)

    def fn(q, v, sig):
        return gaussian_attention(q, q, v, (3, 4), sig, bias_scale=1.5, backend="torch").square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    got = torch.autograd.grad(compiled(q, v, sig), (q, v, sig))
    want = torch.autograd.grad(fn(q, v, sig), (q, v, sig))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_torch_export_with_learnable_sigma():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sigma = torch.nn.Parameter(torch.tensor([1.5, 3.0]))

        def forward(self, k, v):
            return gaussian_attention(k, k, v, (3, 4), self.sigma, backend="torch")

    k, _, v = (t.float() for t in _qkv(1, 2, 1 + 12, 8))
    m = M()
    ep = torch.export.export(m, (k, v))
    assert "naclip_kernels.torch_fwd" in ep.graph_module.code
    torch.testing.assert_close(ep.module()(k, v), m(k, v))
