"""The op's output follows q's memory order (``naclip_kernels._layout``): token-major q (heads split off a
packed ``[B, N, 3, H, D]`` projection) gives a ``[B, N, H, D]``-ordered output whose head merge is a view,
on every backend, forward and through autograd; head-major q gives a contiguous output;
fake and real strides agree."""

from __future__ import annotations

import pytest
import torch

from naclip_kernels import gaussian_attention, reference_attention
from naclip_kernels._layout import empty_output, in_output_layout, token_major

BACKENDS = ["torch", "reference", "triton"]


def _packed(B, N, H, D, *, seed=0, dtype=torch.float32):
    """q, k, v views of one ``[B, N, 3, H, D]`` projection, as timm / open_clip / HF split heads."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, D, generator=g, dtype=torch.float64).to(dtype).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _head_major(B, N, H, D, *, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))


def _skip_triton(backend):
    if backend == "triton":
        pytest.importorskip("triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "B,N,H,D,grid", [(2, 13, 3, 8, (3, 4)), (1, 31, 2, 16, (5, 6))], ids=["B2N13", "B1N31"]
)
def test_token_major_q_gives_token_major_output_and_a_free_head_merge(backend, B, N, H, D, grid):
    _skip_triton(backend)
    q, k, v = _packed(B, N, H, D)
    assert token_major(q)
    out = gaussian_attention(q, k, v, grid, 2.0, backend=backend)
    assert out.stride() == (N * H * D, D, H * D, 1)
    merged = out.transpose(1, 2).reshape(B, N, H * D)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None  # a view, no copy
    ref = reference_attention(q.double(), k.double(), v.double(), grid, 2.0)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_major_q_gives_a_contiguous_output(backend):
    _skip_triton(backend)
    q, k, v = _head_major(2, 13, 3, 8)
    out = gaussian_attention(q, k, v, (3, 4), 2.0, backend=backend)
    assert out.is_contiguous()


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_layout_is_kept_through_autograd_and_gradients_match(backend):
    q, k, v = (t.double().requires_grad_() for t in _packed(2, 13, 3, 8))
    sigma = torch.tensor([1.5, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    out = gaussian_attention(k, k, v, (3, 4), sigma, backend=backend)
    assert out.stride() == (13 * 3 * 8, 8, 3 * 8, 1)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (k, v, sigma), dout)
    ref = reference_attention(k, k, v, (3, 4), sigma)
    want = torch.autograd.grad(ref, (k, v, sigma), dout)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_opcheck_token_major_inputs():
    q, k, v = (t.requires_grad_() for t in _packed(1, 13, 2, 8))
    sig = torch.tensor([1.0, 2.0], requires_grad=True)
    torch.library.opcheck(
        torch.ops.naclip_kernels.torch_fwd.default, (k, k, v, sig, None, [3, 4], None, 1.0, 0.35, 1)
    )


@pytest.mark.parametrize(
    "shape,strides,expect_tm",
    [
        ((2, 3, 5, 4), (60, 4, 12, 1), True),  # [B, N, H, D] storage
        ((2, 3, 5, 4), (60, 20, 4, 1), False),  # contiguous
        ((2, 1, 5, 4), (20, 4, 4, 1), False),  # one head: both orders coincide
        ((2, 3, 1, 4), (12, 4, 4, 1), False),  # one token
        ((2, 3, 5, 4), (60, 1, 12, 3), True),  # odd strides, head stride still < token stride
    ],
    ids=["bnhd", "bhnd", "H1", "N1", "odd"],
)
def test_empty_output_and_in_output_layout(shape, strides, expect_tm):
    q = torch.empty_strided(shape, strides)
    assert token_major(q) is expect_tm
    e = empty_output(q, torch.float16)
    assert e.shape == q.shape and e.dtype == torch.float16
    B, H, N, D = shape
    assert e.stride() == ((N * H * D, D, H * D, 1) if expect_tm else (H * N * D, N * D, D, 1))
    x = torch.randn(shape)
    y = in_output_layout(x, q)
    assert y.stride() == e.stride() and torch.equal(y, x)
    assert in_output_layout(y, q) is y  # already in layout: no copy
