"""reference_attention / reference_attention_probs / gaussian_bias: the oracle itself.

Checked against (a) an independent per-element construction of the formula, (b) the official code's outputs in
the golden kernel fixtures (``custom_attn`` of the NACLIP last block).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from naclip_kernels import gaussian_bias, reference_attention, reference_attention_probs


def _loop_bias(gh: int, gw: int, sigma: float, P: int) -> torch.Tensor:
    """Per-element construction straight from the definition (float64)."""
    n = P + gh * gw
    g = torch.zeros(n, n, dtype=torch.float64)
    for i in range(P, n):
        ri, ci = divmod(i - P, gw)
        for j in range(P, n):
            rj, cj = divmod(j - P, gw)
            g[i, j] = math.exp(-((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * sigma * sigma))
    return g


@pytest.mark.parametrize(
    "grid,sigma,P",
    [
        ((3, 4), 1.0, 1),
        ((4, 3), 0.5, 0),
        ((1, 6), 5.0, 2),
        ((6, 1), 2.0, 8),
        ((2, 2), 50.0, 3),
        ((1, 1), 1.0, 0),
    ],
    ids=lambda x: str(x).replace(" ", ""),
)
def test_gaussian_bias_equals_definition(grid, sigma, P):
    got = gaussian_bias(grid, sigma, num_prefix_tokens=P, dtype=torch.float64)
    torch.testing.assert_close(got, _loop_bias(*grid, sigma, P), atol=1e-12, rtol=0)
    got32 = gaussian_bias(grid, sigma, num_prefix_tokens=P)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), _loop_bias(*grid, sigma, P), atol=2e-7, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_gaussian_bias_dtype_device(dtype):
    g = gaussian_bias((2, 3), 1.5, dtype=dtype, device="cpu")
    assert g.dtype == dtype and g.device.type == "cpu" and g.shape == (7, 7)


def test_gaussian_bias_is_symmetric_and_separable():
    g = gaussian_bias((5, 7), 2.0, num_prefix_tokens=0, dtype=torch.float64)
    assert torch.equal(g, g.T)
    gy = gaussian_bias((5, 1), 2.0, num_prefix_tokens=0, dtype=torch.float64)
    gx = gaussian_bias((1, 7), 2.0, num_prefix_tokens=0, dtype=torch.float64)
    torch.testing.assert_close(g, torch.kron(gy, gx), atol=1e-15, rtol=0)


@pytest.mark.parametrize(
    "bad,exc",
    [
        (dict(grid_hw=(0, 3)), ValueError),
        (dict(grid_hw=(2,)), ValueError),
        (dict(grid_hw=(2.0, 3)), TypeError),
        (dict(grid_hw=(True, 3)), TypeError),
        (dict(grid_hw="23"), TypeError),
        (dict(sigma=0.0), ValueError),
        (dict(sigma=-1.0), ValueError),
        (dict(sigma=float("nan")), ValueError),
        (dict(sigma=float("inf")), ValueError),
        (dict(sigma="5"), TypeError),
        (dict(sigma=True), TypeError),
        (dict(num_prefix_tokens=-1), ValueError),
        (dict(num_prefix_tokens=1.0), TypeError),
        (dict(dtype=torch.int32), TypeError),
    ],
    ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__,
)
def test_gaussian_bias_rejects_bad_input(bad, exc):
    kw = dict(grid_hw=(2, 3), sigma=1.0, num_prefix_tokens=1, dtype=torch.float32)
    kw.update(bad)
    with pytest.raises(exc):
        gaussian_bias(kw.pop("grid_hw"), kw.pop("sigma"), **kw)


def _naive(q, k, v, grid, sigma, scale, P, bias_scale):
    """Independent float64 computation of softmax(scale * q k^T + bias_scale * G) v."""
    s = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    if sigma is not None:
        s = s + bias_scale * _loop_bias(*grid, sigma, P)
    return torch.einsum("bhij,bhjd->bhid", torch.softmax(s, -1), v.double())


@pytest.mark.parametrize("P,grid", [(0, (3, 5)), (1, (4, 4)), (3, (2, 5)), (8, (1, 4))], ids=str)
@pytest.mark.parametrize("sigma", [0.5, 5.0, None], ids=lambda s: f"sigma{s}")
def test_reference_attention_equals_naive(P, grid, sigma):
    torch.manual_seed(0)
    N = P + grid[0] * grid[1]
    q, k, v = (torch.randn(2, 3, N, 16) for _ in range(3))
    got = reference_attention(q, k, v, grid, sigma, num_prefix_tokens=P, bias_scale=1.7)
    exp = _naive(q, k, v, grid, sigma, 16**-0.5, P, 1.7)
    assert got.dtype == torch.float32 and got.shape == (2, 3, N, 16) and got.is_contiguous()
    torch.testing.assert_close(got.double(), exp, atol=1e-5, rtol=1e-5)


def test_reference_probs_rows_sum_to_one_and_prefix_rows_unbiased():
    torch.manual_seed(1)
    k = torch.randn(1, 2, 1 + 12, 8)
    p = reference_attention_probs(k, k, (3, 4), 1.0)
    assert p.shape == (1, 2, 13, 13) and p.dtype == torch.float32
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 13))
    # the CLS query row gets no bias: it equals plain attention
    plain = reference_attention_probs(k, k, None, None)
    torch.testing.assert_close(p[..., 0, :], plain[..., 0, :])
    assert (p[..., 1:, :] - plain[..., 1:, :]).abs().max() > 1e-3


def test_reference_scale_zero_is_honoured_and_output_dtype():
    torch.manual_seed(2)
    q = torch.randn(1, 1, 5, 4, dtype=torch.float16)
    v = torch.randn(1, 1, 5, 4, dtype=torch.float16)
    out = reference_attention(q, q, v, None, None, scale=0.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(
        out.float(), v.float().mean(-2, keepdim=True).expand_as(out), atol=1e-3, rtol=0
    )


# ---- the official code's custom_attn outputs (golden fixtures) ----


def _kernel_cases(manifest, strategies=("naclip", "nonly", "kk", "vanilla")):
    return [c for c in manifest["cases"] if c["kind"] == "kernel" and c["attn_strategy"] in strategies]


def qkv_from_case(case: dict, tensors: dict):
    """q, k, v as [B, H, T, d] views of the packed projection (the official layout), float32."""
    t = tensors[case["file"]]
    x = t[case["inputs"]["x"].split(" ")[0]][: case["batch"]]
    w = t[case["inputs"]["in_proj_weight"].split(" ")[0]]
    b = t[case["inputs"]["in_proj_bias"].split(" ")[0]]
    B, T, _ = x.shape
    H, d = case["num_heads"], case["head_dim"]
    q, k, v = F.linear(x, w, b).chunk(3, -1)
    return tuple(z.view(B, T, H, d).transpose(1, 2) for z in (q, k, v))


def case_call(case: dict, q, k, v):
    """(q, k, v, grid, sigma, kwargs) of the gaussian_attention call that implements the case's strategy."""
    strat, grid = case["attn_strategy"], tuple(case["grid_hw"])
    if strat == "naclip":
        return k, k, v, grid, case["gaussian_std"], {}
    if strat == "nonly":
        return k, k, v, grid, case["gaussian_std"], dict(scale=0.0, bias_scale=case["nonly_bias_multiplier"])
    if strat == "kk":
        return k, k, v, None, None, {}
    return q, k, v, None, None, {}  # vanilla


def merge_heads(o: torch.Tensor) -> torch.Tensor:
    B, H, T, d = o.shape
    return o.transpose(1, 2).reshape(B, T, H * d)


def test_kernel_fixtures_present(manifest):
    assert len(_kernel_cases(manifest)) >= 12


def test_reference_matches_official_custom_attn(manifest, fixture_tensors):
    for case in _kernel_cases(manifest):
        q, k, v = qkv_from_case(case, fixture_tensors)
        qq, kk, vv, grid, sigma, kw = case_call(case, q, k, v)
        out = merge_heads(reference_attention(qq, kk, vv, grid, sigma, **kw))
        exp = fixture_tensors[case["file"]][case["outputs"]["out_pre_proj"]]
        torch.testing.assert_close(out, exp, atol=1e-4, rtol=1e-4, msg=case["id"])
        if "attn_probs" in case["outputs"]:
            p = reference_attention_probs(qq, kk, grid, sigma, **kw)
            exp_p = fixture_tensors[case["file"]][case["outputs"]["attn_probs"]]
            torch.testing.assert_close(p, exp_p, atol=1e-5, rtol=1e-4, msg=case["id"])
