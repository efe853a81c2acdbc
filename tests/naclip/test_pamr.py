"""PAMR: golden fixtures of the official implementation, an independent per-pixel reference, properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from naclip.pamr import neighbour_offsets, pamr

PAMR_CASES = ["pamr/pamr_10_8_16", "pamr/pamr_50_vis"]


def _case(manifest: dict, case_id: str) -> dict:
    return next(c for c in manifest["cases"] if c["id"] == case_id)


@pytest.mark.parametrize("case_id", PAMR_CASES, ids=lambda s: s.split("/")[1])
def test_pamr_matches_official_fixture(manifest, fixture_tensors, case_id):
    case = _case(manifest, case_id)
    t = fixture_tensors[case["file"]]
    image, mask = t[case["inputs"]["image"]], t[case["inputs"]["mask"]]
    expected = t[case["outputs"]["out"]]
    out = pamr(image, mask, case["num_iter"], tuple(case["dilations"]))
    assert out.shape == expected.shape and out.dtype == torch.float32
    diff = (out - expected).abs().max().item()
    assert torch.allclose(out, expected, atol=1e-4, rtol=1e-4), f"max abs diff {diff:.3g}"


def _naive_pamr(image: torch.Tensor, mask: torch.Tensor, num_iter: int, dilations) -> torch.Tensor:
    """Per-pixel reference written from spec §2.6 with explicit clamped indexing (float64)."""
    image, mask = image.double(), mask.double()
    b, k, h, w = image.shape
    offs = neighbour_offsets(dilations)

    def at(t, bi, c, y, x):
        return t[bi, c, min(max(y, 0), h - 1), min(max(x, 0), w - 1)]

    aff = torch.zeros(b, len(offs), h, w, dtype=torch.float64)
    for bi in range(b):
        for y in range(h):
            for x in range(w):
                logits = torch.zeros(len(offs), dtype=torch.float64)
                for c in range(k):
                    samples = [at(image, bi, c, y, x)] * len(dilations)
                    samples += [at(image, bi, c, y + dy, x + dx) for dy, dx in offs]
                    std = torch.stack(samples).std()  # unbiased, 9 * n_dil samples
                    for j, (dy, dx) in enumerate(offs):
                        diff = (at(image, bi, c, y, x) - at(image, bi, c, y + dy, x + dx)).abs()
                        logits[j] += -diff / (1e-8 + 0.1 * std) / k
                aff[bi, :, y, x] = logits.softmax(0)
    for _ in range(num_iter):
        new = torch.zeros_like(mask)
        for bi in range(b):
            for y in range(h):
                for x in range(w):
                    for j, (dy, dx) in enumerate(offs):
                        new[bi, :, y, x] += aff[bi, j, y, x] * torch.stack(
                            [at(mask, bi, c, y + dy, x + dx) for c in range(mask.shape[1])]
                        )
        mask = new
    return mask


@pytest.mark.parametrize(
    "h,w,dilations,num_iter",
    [(5, 7, (1,), 2), (6, 5, (1, 3), 1), (4, 9, (2, 8), 2)],
    ids=["5x7-d1-it2", "6x5-d1,3-it1", "4x9-d2,8(beyond border)-it2"],
)
def test_pamr_matches_naive_reference(h, w, dilations, num_iter):
    g = torch.Generator().manual_seed(h * 100 + w)
    image = torch.randn(1, 3, h, w, generator=g)
    mask = torch.randn(1, 2, h, w, generator=g)
    out = pamr(image, mask, num_iter, dilations)
    ref = _naive_pamr(image, mask, num_iter, dilations)
    assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()


def test_pamr_output_is_convex_combination_and_constant_preserved():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 17, 23, generator=g)
    mask = torch.randn(2, 5, 17, 23, generator=g)
    out = pamr(image, mask, 3, (1, 2))
    lo = mask.amin(dim=(2, 3), keepdim=True)
    hi = mask.amax(dim=(2, 3), keepdim=True)
    assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()
    const = torch.full((2, 5, 17, 23), 0.37)
    assert torch.allclose(pamr(image, const, 4, (1, 2)), const, atol=1e-6)


def test_pamr_centre_excluded():
    # A single spike moves entirely to its neighbours in one step: the centre gets no weight from itself.
    image = torch.zeros(1, 3, 9, 9)
    image[0, :, ::2] = 1.0  # some texture so that the std is non-zero
    mask = torch.zeros(1, 1, 9, 9)
    mask[0, 0, 4, 4] = 1.0
    out = pamr(image, mask, 1, (1,))
    assert out[0, 0, 4, 4] == 0.0
    assert out.sum() > 0


def test_pamr_batch_items_independent():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 3, 12, 10, generator=g)
    mask = torch.randn(3, 4, 12, 10, generator=g)
    batched = pamr(image, mask, 2, (1, 4))
    single = torch.cat([pamr(image[i : i + 1], mask[i : i + 1], 2, (1, 4)) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-6)


def test_pamr_zero_iterations_and_mask_resize():
    g = torch.Generator().manual_seed(2)
    image = torch.randn(1, 3, 16, 20, generator=g)
    small = torch.randn(1, 2, 8, 10, generator=g)
    out = pamr(image, small, 0, (8, 16))
    expected = F.interpolate(small, size=(16, 20), mode="bilinear", align_corners=True)
    assert torch.equal(out, expected)


def test_pamr_half_inputs_computed_in_float32():
    g = torch.Generator().manual_seed(3)
    image = torch.randn(1, 3, 10, 11, generator=g)
    mask = torch.randn(1, 2, 10, 11, generator=g)
    out = pamr(image.half(), mask.half(), 2, (1, 2))
    assert out.dtype == torch.float32
    ref = pamr(image.half().float(), mask.half().float(), 2, (1, 2))
    assert torch.equal(out, ref)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"dilations": ()}, ValueError, "dilations"),
        ({"dilations": (0, 2)}, ValueError, "dilations"),
        ({"dilations": 8}, TypeError, "dilations"),
        ({"num_iter": -1}, ValueError, "num_iter"),
        ({"num_iter": 2.0}, TypeError, "num_iter: expected an int >= 0, got float 2.0"),
        ({"num_iter": True}, TypeError, "num_iter: expected an int >= 0, got bool"),
        ({"mask": torch.zeros(2, 2, 8, 8)}, ValueError, "batch"),
        ({"mask": torch.zeros(1, 2, 8)}, ValueError, "4-D"),
        ({"image": torch.zeros(1, 3, 8, 8, dtype=torch.long)}, TypeError, "floating"),
    ],
    ids=[
        "empty-dilations",
        "zero-dilation",
        "int-dilations",
        "negative-iter",
        "float-iter",
        "bool-iter",
        "batch-mismatch",
        "3d-mask",
        "int",
    ],
)
def test_pamr_bad_arguments(kwargs, exc, match):
    args = {
        "image": torch.zeros(1, 3, 8, 8),
        "mask": torch.zeros(1, 2, 8, 8),
        "num_iter": 1,
        "dilations": (1,),
    }
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pamr(**args)
