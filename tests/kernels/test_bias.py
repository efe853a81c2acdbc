"""naclip_kernels._bias: the one home of eps, the Gaussian factor and the band radii (fwd and bwd)."""

from __future__ import annotations

import math

import pytest
import torch

from naclip_kernels import _bias

EPS = _bias.BIAS_EPS
CASES = [
    (0.5, 1.0), (5.0, 1.0), (50.0, 1.0), (5.0, 1e3), (0.7, -40.0), (3.0, 1e-9), (2.0, 2.0**-24), (1e-3, 7.0)
]  # fmt: skip
IDS = [f"s{s:g}-bs{b:g}" for s, b in CASES]


def _g(d: float, sigma: float) -> float:
    return math.exp(-(d * d) / (2 * sigma * sigma))


@pytest.mark.parametrize(("sigma", "bias_scale"), CASES, ids=IDS)
def test_tight_radius_is_the_smallest_with_the_bound(sigma, bias_scale):
    R = _bias.band_radius(sigma, bias_scale)
    if abs(bias_scale) <= EPS:
        assert R == -1
        return
    assert abs(bias_scale) * _g(R + 1, sigma) < EPS <= abs(bias_scale) * _g(R, sigma)


@pytest.mark.parametrize(("sigma", "bias_scale"), CASES, ids=IDS)
@pytest.mark.parametrize("gh", [3, 10_000])
def test_padded_rows_are_the_tight_radius_plus_one_clamped(sigma, bias_scale, gh):
    """The two roundings, kept explicit: Triton's rows = min(torch's radius + 1, gh - 1) above eps."""
    rows = _bias.band_rows(sigma, bias_scale, gh)
    if abs(bias_scale) < EPS:
        assert rows == -1
    elif abs(bias_scale) == EPS:  # the one edge where the two differ by more than the +1
        assert _bias.band_radius(sigma, bias_scale) == -1 and rows == min(1, gh - 1)
    else:
        assert rows == min(_bias.band_radius(sigma, bias_scale) + 1, gh - 1)


@pytest.mark.parametrize(("sigma", "bias_scale"), CASES, ids=IDS)
def test_grad_rows_bound_g_and_the_dsigma_integrand(sigma, bias_scale):
    R = _bias.band_rows(sigma, bias_scale, 10**6, for_grad=True)
    fwd = _bias.band_rows(sigma, bias_scale, 10**6)
    assert fwd <= R
    d = R + 1  # every dropped pair is at least R + 1 rows apart; both terms decrease beyond sqrt(2) sigma
    assert _g(d, sigma) < EPS and (d * d / sigma**2) * _g(d, sigma) < EPS
    assert abs(bias_scale) * _g(d, sigma) < EPS
    assert 2 * _bias.GRAD_U * math.exp(-_bias.GRAD_U) == pytest.approx(EPS, rel=1e-12)


@pytest.mark.parametrize("for_grad", [False, True], ids=["fwd", "grad"])
def test_device_rows_equal_the_host_rows(for_grad):
    sig = [s for s, _ in CASES] + [float("nan"), 1e30]
    bss = [b for _, b in CASES] + [1.0, 1.0]
    got = _bias.band_rows_tensor(torch.tensor(sig), torch.tensor(bss), 50, for_grad=for_grad).tolist()
    want = [_bias.band_rows(s, b, 50, for_grad=for_grad) for s, b in zip(sig[:-2], bss[:-2], strict=True)]
    assert got == want + [49, 49]


def test_gaussian_handles_tiny_and_huge_sigma():
    d2 = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    assert _bias.gaussian(d2, _bias.gaussian_coef(1e-170)).tolist() == [1.0, 0.0, 0.0]
    assert _bias.gaussian(d2, _bias.gaussian_coef(1e300)).tolist() == [1.0, 1.0, 1.0]
    g = _bias.gaussian(d2, _bias.gaussian_coef(2.0))
    torch.testing.assert_close(g, torch.exp(-d2 / 8), rtol=0, atol=0)
    log2e, ln2 = _bias.LOG2E, _bias.LN2
    assert log2e == pytest.approx(1 / math.log(2))
    assert ln2 == pytest.approx(math.log(2))
