"""Tiled post-processing (naclip.tiles via naclip.inference.postprocess): identical to the untiled run for any
tiling, close to the plain F.interpolate + PAMR formula, bounded probabilities, and the single mode's size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from naclip_test_support import tiny_clip

import naclip.inference as inf
import naclip.tiles as tiles_mod
from naclip import SegmentConfig, Segmenter
from naclip.cli import byte_size
from naclip.io import ImageTooLargeError
from naclip.pamr import pamr
from naclip.tiles import bilinear_axis, bytes_per_pixel, label_dtype, plan_tiles, resize_region


def _legacy(logits, image, qidx, oh, ow, steps, dils, thd):
    """The untiled formula on the whole image with torch's own resize (the pre-tiling implementation)."""
    lg = F.interpolate(logits, size=(oh, ow), mode="bilinear", align_corners=False)
    if steps:
        guide = F.interpolate(image, size=(oh, ow), mode="bilinear", align_corners=False)
        lg = pamr(guide, lg, steps, dils)
    p = (lg[0] * inf.LOGIT_SCALE).softmax(0)
    q = torch.tensor(qidx)
    cp = p.new_zeros((int(q.max()) + 1, oh, ow))
    cp.scatter_reduce_(0, q.view(-1, 1, 1).expand_as(p), p, "amax", include_self=True)
    labels = cp.argmax(0)
    labels[cp.amax(0) < thd] = 0
    return labels, cp / cp.sum(0, keepdim=True)


# (model-input h, w), (output h, w), PAMR steps, dilations, forced tile core, prob_thd, query -> class
CASES = {
    "upsample-odd-pamr10-syn-thd": ((21, 28), (187, 251), 10, (4, 8), (61, 83), 0.2, [0, 1, 1, 2, 0]),
    "tiles-smaller-than-halo": ((14, 15), (61, 67), 3, (8, 16), (9, 11), 0.0, [0, 1, 2]),
    "strips-nonsquare": ((20, 30), (151, 229), 4, (8, 16), (50, 229), 0.3, [0, 0, 1, 2, 2, 3]),
    "no-pamr-syn": ((20, 30), (151, 229), 0, (8, 16), (33, 17), 0.3, [0, 0, 1, 2, 2, 3]),
    "downsample-vis-dilations": ((240, 256), (119, 129), 2, (1, 2, 4, 8, 12, 24), (40, 41), 0.0, [0, 1]),
    "identity-size": ((64, 48), (64, 48), 2, (8, 16), (9, 64), 0.1, [0, 1, 2, 3]),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_tiled_equals_untiled_and_the_plain_formula(case):
    (h, w), (oh, ow), steps, dils, tile, thd, qidx = case
    g = torch.Generator().manual_seed(h * 1000 + ow)
    logits = 0.2 * torch.randn(1, len(qidx), h, w, generator=g)
    image = torch.randn(1, 3, h, w, generator=g)
    kw = {"ori_shape": (oh, ow), "pamr_steps": steps, "pamr_dilations": dils, "prob_thd": thd}
    labels, probs = inf.postprocess(logits, image, qidx, **kw)
    tiled_labels, tiled_probs = inf.postprocess(logits, image, qidx, tile_hw=tile, **kw)
    assert labels.dtype == torch.uint8 and labels.shape == (oh, ow)
    assert torch.equal(tiled_labels, labels)
    assert torch.equal(tiled_probs, probs)  # bit for bit, not only close
    ref_labels, ref_probs = _legacy(logits, image, qidx, oh, ow, steps, dils, thd)
    assert torch.equal(labels.long(), ref_labels)
    d = (probs - ref_probs).abs().max().item()
    assert torch.allclose(probs, ref_probs, atol=1e-5, rtol=0), f"max abs diff {d:.3g}"


def test_memory_budget_sets_the_tiles_not_the_result():
    logits, image = 0.2 * torch.randn(1, 4, 17, 23), torch.randn(1, 3, 17, 23)
    kw = {"ori_shape": (111, 157), "pamr_steps": 2, "prob_thd": 0.1}
    big = inf.postprocess(logits, image, [0, 1, 2, 2], **kw)
    small = inf.postprocess(logits, image, [0, 1, 2, 2], memory_budget=100_000, **kw)
    assert torch.equal(big[0], small[0]) and torch.equal(big[1], small[1])
    none = inf.postprocess(logits, image, [0, 1, 2, 2], memory_budget=10_000, keep_probs=None, **kw)
    assert none[1] is None and torch.equal(none[0], big[0])  # 4·C·H·W > budget: probs not kept


TILE_PLANS = [
    ((300, 500), 160, 10**9, None),
    ((1000, 800), 160, 400_000, None),
    ((999, 20001), 160, 4_000_000, None),
    ((37, 41), 0, 1, (5, 7)),
]


@pytest.mark.parametrize("hw,halo,budget,tile", TILE_PLANS, ids=["one-tile", "strips", "squares", "forced"])
def test_plan_tiles_cover_every_pixel_once(hw, halo, budget, tile):
    cover = np.zeros(hw, dtype=np.int32)
    tiles = plan_tiles(*hw, halo=halo, max_pixels=budget, tile_hw=tile)
    for r0, r1, c0, c1 in tiles:
        cover[r0:r1, c0:c1] += 1
    assert (cover == 1).all()
    if tile is None and hw[0] * hw[1] > budget:
        assert len(tiles) > 1


# tile cores of 1-pixel rows / columns, prime sizes and sizes around the vector widths (8, 16): the float32
# softmaxes must give the same bits whatever size the tensors they run on have
ODD_TILES = [(1, 97), (97, 1), (7, 13), (16, 17), (33, 64)]


@pytest.mark.parametrize("steps", [0, 2], ids=["no-pamr", "pamr2"])
@pytest.mark.parametrize("tile", ODD_TILES, ids=[f"{h}x{w}" for h, w in ODD_TILES])
def test_float32_softmaxes_do_not_depend_on_the_tile_size(tile, steps, monkeypatch):
    g = torch.Generator().manual_seed(7)
    logits, image = 0.3 * torch.randn(1, 19, 9, 11, generator=g), torch.randn(1, 3, 9, 11, generator=g)
    qidx = [i % 13 for i in range(19)]
    kw = {"ori_shape": (71, 97), "pamr_steps": steps, "pamr_dilations": (2, 3), "prob_thd": 0.2}
    labels, probs = inf.postprocess(logits, image, qidx, **kw)
    monkeypatch.setattr(tiles_mod, "CLASSIFY_CHUNK_PIXELS", 37)  # class-softmax chunks of a few rows too
    tiled_labels, tiled_probs = inf.postprocess(logits, image, qidx, tile_hw=tile, **kw)
    assert torch.equal(tiled_labels, labels) and torch.equal(tiled_probs, probs)


def test_memory_model_puts_a_2048_naclip_output_in_one_tile():
    bpp = bytes_per_pixel(21, 21, 2, True)  # VOC-21, one query per class, PAMR dilations (8, 16)
    assert bpp < inf.DEFAULT_MEMORY_BUDGET // (2048 * 2048)
    assert len(plan_tiles(2048, 2048, halo=160, max_pixels=inf.DEFAULT_MEMORY_BUDGET // bpp)) == 1
    assert bytes_per_pixel(21, 500, 2, True) > bpp  # many classes: the class probabilities dominate


def test_bilinear_axis_matches_torch_and_regions_match_the_full_resize():
    x = torch.randn(3, 21, 28)
    full = resize_region(x, bilinear_axis(21, 375), bilinear_axis(28, 500), (0, 375), (0, 500))
    ref = F.interpolate(x[None], size=(375, 500), mode="bilinear", align_corners=False)[0]
    assert (full - ref).abs().max().item() <= 1e-6
    part = resize_region(x, bilinear_axis(21, 375), bilinear_axis(28, 500), (37, 101), (13, 66))
    assert torch.equal(part, full[:, 37:101, 13:66])
    # the weights themselves are torch's: a one-hot source row reproduces F.interpolate's column exactly
    e = torch.zeros(1, 1, 21, 1)
    e[..., 16, 0] = 1
    col = F.interpolate(e, size=(375, 1), mode="bilinear", align_corners=False)[0, 0, :, 0]
    i0, i1, w0, w1 = bilinear_axis(21, 375)
    mine = torch.where(i0 == 16, w0, 0.0) + torch.where(i1 == 16, w1, 0.0)
    assert torch.equal(mine, col)


@pytest.mark.parametrize("n,dtype", [(1, torch.uint8), (256, torch.uint8), (257, torch.int16),
                                     (32768, torch.int16), (32769, torch.int32)])  # fmt: skip
def test_label_dtype(n, dtype):
    assert label_dtype(n) == dtype


@pytest.fixture(scope="module")
def seg():
    import open_clip

    return Segmenter(tiny_clip(), open_clip.get_tokenizer("ViT-B-16"), backend="torch")


def test_probs_streamed_to_npy_equal_the_kept_ones(seg, tmp_path):
    x = inf.normalize(torch.rand(1, 3, 64, 80) * 255)
    feats = F.normalize(torch.randn(3, seg.visual.output_dim), dim=-1)
    kw = {"ori_shape": (91, 107), "pamr_steps": 2, "mode": "slide", "crop": 48, "stride": 16}
    kept = seg.predict_from_features(x, feats, [0, 1, 1], keep_probs=True, **kw)
    path = tmp_path / "p.npy"
    streamed = seg.predict_from_features(x, feats, [0, 1, 1], probs_path=path, keep_probs=False, **kw)
    assert streamed.probs is None and torch.equal(streamed.labels, kept.labels)
    arr = np.load(path)
    assert arr.dtype == np.float32 and arr.shape == (2, 91, 107)
    assert np.array_equal(arr, kept.probs.numpy())
    assert [p.name for p in tmp_path.iterdir()] == ["p.npy"]  # no temporary file left
    with pytest.raises(ValueError, match="did not keep its probabilities"):
        streamed.save_probs(tmp_path / "q.npy")


@pytest.mark.parametrize(
    "hw,short,long,expected",
    [
        ((1024, 2048), None, None, (1024, 2048)),  # on the grid: no resize at all
        ((375, 500), None, None, (368, 496)),  # nearest multiples of 16 (23.4 -> 23, 31.25 -> 31 patches)
        ((8, 9), None, None, (16, 16)),  # at least one patch
        ((24, 40), None, None, (32, 48)),  # halves round up (1.5 -> 2, 2.5 -> 3 patches)
        ((1500, 3000), None, 2048, (1024, 2048)),  # long side only
        ((375, 500), 336, None, (336, 448)),  # short side only
        ((1000, 9000), 336, 2048, (224, 2048)),  # both: mmcv rule, then the grid (227.6 -> 228 -> 224)
    ],
)
def test_single_mode_input_size(hw, short, long, expected):
    got = inf.model_input_size(*hw, mode="single", patch_size=(16, 16), short_side=short, long_side=long)
    assert got == expected


def test_single_mode_is_native_and_limited(seg):
    img = np.random.RandomState(0).randint(0, 256, (70, 90, 3), dtype=np.uint8)
    res = seg.predict(img, "a; b", mode="single", pamr=False, return_logits=True)
    assert res.logits.shape == (2, 64, 96) and res.labels.shape == (70, 90)
    res = seg.predict(img, "a; b", mode="single", pamr=False, long_side=45, return_logits=True)
    assert res.logits.shape == (2, 32, 48)
    whole = seg.predict(img, "a; b", mode="whole", pamr=False, return_logits=True)
    assert whole.logits.shape == (2, 336, 432)  # whole keeps the short-side-336 default
    small = Segmenter(seg.clip_model, seg.tokenizer, config=SegmentConfig(single_max_pixels=4000))
    with pytest.raises(ImageTooLargeError, match="single mode's model input 96x64 .* --long-side"):
        small.predict(img, "a; b", mode="single")


@pytest.mark.parametrize("text,value", [("2G", 2 << 30), ("512m", 512 << 20), ("1000", 1000), ("1.5K", 1536)])
def test_cli_byte_size(text, value):
    assert byte_size(text) == value


@pytest.mark.parametrize("text", ["0", "-1G", "abc", "G", ""])
def test_cli_byte_size_rejects(text):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match="positive size"):
        byte_size(text)
