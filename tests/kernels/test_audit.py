"""Regressions of the adversarial audit (issue 9): self-overlapping layouts, extreme sigma / bias_scale /
scale, and non-finite keys in half precision. Each case is compared with the float64 reference (oracle)."""

from __future__ import annotations

import pytest
import torch

from naclip_kernels import gaussian_attention, reference_attention
from naclip_kernels._checks import has_internal_overlap


def _kv(N=1 + 12, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, H, N, D, generator=g, dtype=torch.float64), torch.randn(
        1, H, N, D, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize(
    "shape,stride,overlaps",
    [
        ((2, 1, 3, 4), (1, 4, 24, 1), True),  # batch stride 1 with a unit-stride head dim (the audit's case)
        ((1, 2, 3, 4), (24, 1, 8, 1), True),  # head stride 1
        ((2, 3, 5, 4), (60, 4, 12, 1), False),  # [B, N, H, D] view transposed: fine
        ((2, 3, 5, 4), (0, 20, 4, 1), True),  # expanded batch
        ((1, 1, 5, 4), (7, 7, 4, 1), False),  # size-1 dims never overlap
    ],
    ids=["batch_stride_1", "head_stride_1", "bnhd_view", "expanded", "size_one_dims"],
)
def test_has_internal_overlap(shape, stride, overlaps):
    t = torch.as_strided(torch.randn(200), shape, stride)
    assert has_internal_overlap(t) == overlaps


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("q_is_k", [True, False], ids=["q_is_k", "q_not_k"])
def test_overlapping_views_are_copied_and_exact(backend, q_is_k):
    base = torch.randn(96, generator=torch.Generator().manual_seed(0))
    k = torch.as_strided(base, (2, 1, 3, 4), (1, 4, 24, 1))  # elements shared between batch items
    v = torch.as_strided(base.flip(0), (2, 1, 3, 4), (1, 4, 24, 1))
    q = k if q_is_k else torch.as_strided(base.roll(5), (2, 1, 3, 4), (1, 4, 24, 1))
    before = base.clone()
    out = gaussian_attention(q, k, v, (1, 2), 1.0, backend=backend)
    ref = reference_attention(
        q.contiguous().double(), k.contiguous().double(), v.contiguous().double(), (1, 2), 1.0
    )
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(base, before)  # inputs never written


def _identity_limit(k, v, P=1, grid=(3, 4)):
    """Tiny sigma: G = 1 on the patch diagonal, 0 elsewhere (the float64 oracle with an explicit G)."""
    N = k.shape[2]
    G = torch.zeros(N, N, dtype=torch.float64)
    G[P:, P:] = torch.eye(N - P, dtype=torch.float64)
    s = k @ k.transpose(-1, -2) * k.shape[-1] ** -0.5 + G
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("sigma", [1e-160, 1e-170, 5e-324, 0.01], ids=str)
def test_tiny_sigma_is_the_identity_neighbourhood(sigma, backend, dtype):
    k, v = _kv()
    out = gaussian_attention(k.to(dtype), k.to(dtype), v.to(dtype), (3, 4), sigma, backend=backend)
    torch.testing.assert_close(out.double(), _identity_limit(k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_tiny_sigma_tensor_and_its_grad(backend):
    k, v = _kv()
    sig = torch.tensor(1e-200, dtype=torch.float64, requires_grad=True)
    out = gaussian_attention(k, k, v, (3, 4), sig, backend=backend)
    torch.testing.assert_close(out, _identity_limit(k, v), atol=1e-10, rtol=1e-10)
    if backend == "torch":  # the closed-form grad is exactly 0 (G d^2 = 0 everywhere); autograd of exp is NaN
        (g,) = torch.autograd.grad(out.sum(), sig)
        assert g.item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_huge_sigma_is_a_constant_bias(backend):
    k, v = _kv()
    out = gaussian_attention(k.float(), k.float(), v.float(), (3, 4), 1e300, backend=backend)
    N = k.shape[2]
    G = torch.ones(N, N, dtype=torch.float64)
    G[0], G[:, 0] = 0, 0
    ref = torch.softmax(k @ k.transpose(-1, -2) * 8**-0.5 + G, -1) @ v
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("scale,bias_scale", [(1e18, 1.0), (None, 2.0**64), (1e-30, -(2.0**64))], ids=str)
def test_largest_multipliers_match_the_float64_oracle(backend, scale, bias_scale):
    k, v = _kv()
    out = gaussian_attention(k.float(), k.float(), v.float(), (3, 4), 2.0, scale=scale, bias_scale=bias_scale,
                             backend=backend)  # fmt: skip
    ref = reference_attention(k, k, v, (3, 4), 2.0, scale=scale, bias_scale=bias_scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [{"scale": 1e38}, {"bias_scale": 1e300}, {"bias_scale": -1e20}], ids=str)
def test_multipliers_beyond_the_range_are_refused(bad):
    k, v = _kv()
    name = next(iter(bad))
    with pytest.raises(ValueError, match=rf"{name} must be .*\|{name}\| <= 2\^64"):
        gaussian_attention(k, k, v, (3, 4), 2.0, **bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inf", [float("inf"), -float("inf")], ids=["pos_inf", "neg_inf"])
def test_half_precision_inf_key_gives_nan_like_float32(dtype, inf):
    k, v = _kv()
    k[0, 0, 5, 0] = inf
    want = gaussian_attention(k.float(), k.float(), v.float(), (3, 4), 2.0, backend="torch")
    got = gaussian_attention(k.to(dtype), k.to(dtype), v.to(dtype), (3, 4), 2.0, backend="torch")
    assert want.isnan().any()  # rows meeting +inf - inf
    assert torch.equal(got.isnan(), want.isnan())
    fin = ~want.isnan()
    torch.testing.assert_close(got.float()[fin], want[fin], atol=6e-2, rtol=6e-2)
