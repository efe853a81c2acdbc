"""gaussian_bias (closed form) against the official conv-built Gaussian additions in the golden fixtures."""

from __future__ import annotations

import pytest
import torch

from naclip_kernels import gaussian_bias


def _bias_cases(manifest: dict) -> list[dict]:
    cases = [c for c in manifest["cases"] if c["kind"] == "gaussian_bias"]
    assert cases, "manifest has no gaussian_bias cases"
    return cases


def test_manifest_has_the_documented_bias_cases(manifest):
    ids = {c["id"] for c in _bias_cases(manifest)}
    assert {"bias/g5x7/std5", "bias/g5x7/std1.5", "bias/g14x20/std5"} <= ids


@pytest.mark.parametrize("case_id", ["bias/g5x7/std5", "bias/g5x7/std1.5", "bias/g14x20/std5"])
def test_gaussian_bias_matches_fixture(case_id, manifest, fixture_tensors):
    case = next(c for c in _bias_cases(manifest) if c["id"] == case_id)
    expected = fixture_tensors[case["file"]][case["outputs"]["addition"]]
    gh, gw = case["grid_hw"]
    got = gaussian_bias((gh, gw), case["gaussian_std"], num_prefix_tokens=1)
    assert got.shape == expected.shape == (1 + gh * gw, 1 + gh * gw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # CLS row and column are exactly zero (not -inf), the diagonal of the patch block is exactly one
    assert torch.count_nonzero(got[0]) == 0 and torch.count_nonzero(got[:, 0]) == 0
    assert torch.equal(got[1:, 1:].diagonal(), torch.ones(gh * gw))


def test_all_fixture_bias_cases_match(manifest, fixture_tensors):
    for case in _bias_cases(manifest):
        expected = fixture_tensors[case["file"]][case["outputs"]["addition"]]
        got = gaussian_bias(tuple(case["grid_hw"]), case["gaussian_std"])
        assert (got - expected).abs().max().item() <= 1e-6, case["id"]


def test_transposed_grid_is_not_the_same_bias(manifest, fixture_tensors):
    # catches an H/W swap: the 5x7 fixture must not be reproduced by a 7x5 grid
    case = next(c for c in _bias_cases(manifest) if c["id"] == "bias/g5x7/std1.5")
    expected = fixture_tensors[case["file"]][case["outputs"]["addition"]]
    swapped = gaussian_bias((7, 5), 1.5)
    assert (swapped - expected).abs().max().item() > 1e-2
