"""Attention strategies vs the official ``custom_attn`` fixtures (19 ``kernel`` cases), and properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from naclip_test_support import fixture_case_ids, triton_skip_reason

from naclip.strategies import (
    ARCHS,
    STRATEGIES,
    get_strategy,
    nonly_bias_multiplier,
    validate_config,
)

ATOL = RTOL = 1e-4  # fp32 fixture tolerance


KERNEL_IDS = fixture_case_ids("kernel")
TRITON_KERNEL_IDS = [i for i in KERNEL_IDS if "g5x7" in i]  # T = 36: quick under the interpreter


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _get(fixture_tensors, case, ref):
    key, _, suffix = ref.partition(" ")
    t = fixture_tensors[case["file"]][key]
    return t[: case["batch"]] if suffix else t


def _heads(x, h):
    b, t, e = x.shape
    return x.view(b, t, h, e // h).transpose(1, 2)  # [B, H, T, D] strided view


def _replay(case, fixture_tensors, backend):
    inp = {name: _get(fixture_tensors, case, ref) for name, ref in case["inputs"].items()}
    x, h = inp["x"], case["num_heads"]
    q, k, v = (_heads(t, h) for t in F.linear(x, inp["in_proj_weight"], inp["in_proj_bias"]).chunk(3, dim=-1))
    strategy = get_strategy(case["attn_strategy"])
    grid = tuple(case["grid_hw"])
    out = strategy(q if strategy.needs_query else None, k, v, grid, case["gaussian_std"], backend)
    b, _, t, d = out.shape
    merged = out.transpose(1, 2).reshape(b, t, h * d)  # channel h*d + j
    outputs = case["outputs"]
    expected = fixture_tensors[case["file"]][outputs["out_pre_proj"]]
    torch.testing.assert_close(merged, expected, atol=ATOL, rtol=RTOL)
    diffs = {"out_pre_proj": (merged - expected).abs().max().item()}
    if "out" in outputs:
        projected = F.linear(merged, inp["out_proj_weight"], inp["out_proj_bias"])
        exp_out = fixture_tensors[case["file"]][outputs["out"]]
        torch.testing.assert_close(projected, exp_out, atol=ATOL, rtol=RTOL)
        diffs["out"] = (projected - exp_out).abs().max().item()
    if "attn_probs" in outputs:
        probs = strategy.probs(q, k, grid, case["gaussian_std"])
        exp_probs = fixture_tensors[case["file"]][outputs["attn_probs"]]
        torch.testing.assert_close(probs, exp_probs, atol=ATOL, rtol=RTOL)
        diffs["attn_probs"] = (probs - exp_probs).abs().max().item()
    if "nonly_bias_multiplier" in case:
        s = nonly_bias_multiplier(q, k)
        assert s.shape == (x.shape[0],)
        assert math.isclose(s.item(), case["nonly_bias_multiplier"], rel_tol=1e-5)
    return diffs


def _params(ids, backends):
    return [pytest.param(cid, b, id=f"{b}:{cid.removeprefix('kernel/')}") for b in backends for cid in ids]


def test_all_kernel_cases_collected():
    assert len(KERNEL_IDS) == 19


@pytest.mark.parametrize(("case_id", "backend"), _params(KERNEL_IDS, ("torch", "reference")))
def test_kernel_case_matches_official(case_id, backend, cases, fixture_tensors):
    _replay(cases[case_id], fixture_tensors, backend)


@pytest.mark.triton
@pytest.mark.parametrize(("case_id", "backend"), _params(TRITON_KERNEL_IDS, ("triton",)))
def test_kernel_case_matches_official_triton(case_id, backend, cases, fixture_tensors):
    reason = triton_skip_reason()
    if reason:
        pytest.skip(reason)
    _replay(cases[case_id], fixture_tensors, backend)


def _random_qkv(b=2, h=3, grid=(5, 7), d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = 1 + grid[0] * grid[1]
    return tuple(torch.randn(b, h, t, d, generator=g) for _ in range(3))


def test_registry_names():
    assert list(STRATEGIES) == ["naclip", "nonly", "kk", "vanilla", "csa", "qq"]
    assert ARCHS == ("reduced", "vanilla")
    assert not STRATEGIES["naclip"].needs_query and not STRATEGIES["kk"].needs_query
    assert STRATEGIES["nonly"].needs_query and STRATEGIES["csa"].required_arch == "vanilla"


def test_nonly_scalar_is_per_image():
    q, k, v = _random_qkv(b=3)
    q[1] *= 4.0  # a different scale for image 1
    s = nonly_bias_multiplier(q, k)
    # definition: scale * mean over (heads, i, j) of |q_i| |k_j|, computed per image
    for b in range(3):
        pair = q[b].norm(dim=-1)[:, :, None] * k[b].norm(dim=-1)[:, None, :]
        assert math.isclose(s[b].item(), (pair.mean() * 16**-0.5).item(), rel_tol=1e-5)
    out = STRATEGIES["nonly"](q, k, v, (5, 7), 2.0, "torch")
    single = torch.cat(
        [
            STRATEGIES["nonly"](q[i : i + 1], k[i : i + 1], v[i : i + 1], (5, 7), 2.0, "torch")
            for i in range(3)
        ]
    )
    torch.testing.assert_close(out, single, atol=0, rtol=0)


def test_nonly_cls_query_row_is_uniform():
    q, k, _ = _random_qkv(b=1)
    probs = STRATEGIES["nonly"].probs(q, k, (5, 7), 5.0)
    torch.testing.assert_close(probs[..., 0, :], torch.full_like(probs[..., 0, :], 1 / 36))


def test_csa_rows_sum_to_two():
    q, k, v = _random_qkv()
    probs = STRATEGIES["csa"].probs(q, k, (5, 7), None)
    torch.testing.assert_close(probs.sum(-1), torch.full(probs.shape[:-1], 2.0))
    out = STRATEGIES["csa"](q, k, v, (5, 7), None, "torch")
    torch.testing.assert_close(out, probs @ v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_equals_its_probs_times_v(name):
    q, k, v = _random_qkv(seed=1, grid=(4, 9))
    out = STRATEGIES[name](q, k, v, (4, 9), 1.5, "torch")
    assert out.shape == v.shape and out.is_contiguous()
    torch.testing.assert_close(out, STRATEGIES[name].probs(q, k, (4, 9), 1.5) @ v, atol=1e-5, rtol=1e-5)


def test_naclip_gaussian_is_added_after_scaling():
    # naclip == softmax(scale K K^T + G) V with G from naclip_kernels.gaussian_bias (CLS row/col 0).
    import naclip_kernels

    _, k, v = _random_qkv(b=1, grid=(3, 4), d=8)
    g = naclip_kernels.gaussian_bias((3, 4), 1.5)
    expected = torch.softmax(k @ k.transpose(-1, -2) * 8**-0.5 + g, dim=-1) @ v
    torch.testing.assert_close(
        STRATEGIES["naclip"](None, k, v, (3, 4), 1.5, "torch"), expected, atol=1e-5, rtol=1e-5
    )


def test_qq_is_query_query_attention_without_gaussian():
    # ClearCLIP: softmax(scale Q Q^T) V; K is never used (a random K must not change it).
    q, k, v = _random_qkv(b=1, grid=(3, 5), d=8, seed=3)
    expected = torch.softmax(q @ q.transpose(-1, -2) * 8**-0.5, dim=-1) @ v
    out = STRATEGIES["qq"](q, torch.randn_like(k), v, (3, 5), 1.5, "torch")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_missing_query_is_an_error():
    _, k, v = _random_qkv()
    with pytest.raises(ValueError, match="needs the query"):
        STRATEGIES["vanilla"](None, k, v, (5, 7), None)


@pytest.mark.parametrize(
    ("arch", "strategy", "std", "exc", "match"),
    [
        ("reduced", "gav", 5.0, ValueError, "strategy must be one of"),
        ("reduced_no_ffn", "naclip", 5.0, ValueError, "arch must be one of"),
        ("reduced", "csa", None, ValueError, "requires arch='vanilla'"),
        ("reduced", "naclip", 0.0, ValueError, "gaussian_std"),
        ("vanilla", "nonly", -2.0, ValueError, "gaussian_std"),
        ("reduced", "naclip", float("nan"), ValueError, "gaussian_std"),
        ("reduced", "naclip", None, TypeError, "gaussian_std"),
        ("reduced", "naclip", True, TypeError, "gaussian_std"),
    ],
    ids=[
        "unknown-strategy",
        "unknown-arch",
        "csa-reduced",
        "std-zero",
        "std-negative",
        "std-nan",
        "std-none",
        "std-bool",
    ],
)
def test_validate_config_errors(arch, strategy, std, exc, match):
    with pytest.raises(exc, match=match):
        validate_config(arch, strategy, std)


def test_validate_config_accepts():
    assert validate_config("reduced", "naclip", 5) == 5.0
    assert validate_config("vanilla", "csa", None) is None
    assert validate_config("reduced", "kk", -1.0) == -1.0  # std unused by kk: not checked (as official)
