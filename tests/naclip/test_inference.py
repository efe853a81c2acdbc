"""Pipeline fixtures (official NACLIP.predict) through Segmenter.predict_from_features, window placement,
crop batching, preprocessing and post-processing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import naclip.inference as inf
import naclip.tiles
from naclip import Segmenter
from naclip.testing import build_visual_from_manifest

PIPELINE_CASES = ["pipeline/p_slide_pamr_syn", "pipeline/p_whole_pamr_syn", "pipeline/p_slide_nopamr"]


def _case(manifest: dict, case_id: str) -> dict:
    return next(c for c in manifest["cases"] if c["id"] == case_id)


@pytest.fixture(scope="module")
def tiny_segmenter(manifest, fixture_tensors) -> Segmenter:
    visual = build_visual_from_manifest(manifest["model"], fixture_tensors["weights.safetensors"])
    return Segmenter(visual, None, backend="torch")


@pytest.mark.parametrize("case_id", PIPELINE_CASES, ids=lambda s: s.split("/")[1])
def test_pipeline_fixture(manifest, fixture_tensors, tiny_segmenter, case_id):
    case = _case(manifest, case_id)
    assert (case["arch"], case["attn_strategy"], case["gaussian_std"]) == ("reduced", "naclip", 5.0)
    t = fixture_tensors[case["file"]]
    image = inf.normalize(t[case["inputs"]["image"]].float())
    assert tuple(image.shape[-2:]) == tuple(case["image_hw"])
    res = tiny_segmenter.predict_from_features(
        image,
        t[case["inputs"]["query_features"]],
        t[case["inputs"]["query_idx"]],
        ori_shape=tuple(case["ori_shape"]),
        mode="slide" if case["slide_crop"] > 0 else "whole",
        crop=case["slide_crop"] or 224,
        stride=case["slide_stride"],
        pamr_steps=case["pamr_steps"],
        pamr_dilations=tuple(case["pamr_dilations"]),
        prob_thd=case["prob_thd"],
        num_classes=case["num_classes"],
        logit_scale=case["logit_scale"],
        return_logits=True,
    )
    out = case["outputs"]
    probs, pred = t[out["seg_probs"]], t[out["pred"]][0].long()
    assert res.probs.shape == probs.shape and res.labels.shape == pred.shape
    assert res.labels.dtype == torch.uint8 and res.probs.dtype == torch.float32
    d = (res.probs - probs).abs().max().item()
    assert torch.allclose(res.probs, probs, atol=1e-4, rtol=1e-4), f"seg_probs max abs diff {d:.3g}"
    assert torch.equal(res.labels, pred), f"{(res.labels != pred).sum().item()} label mismatches"
    if "slide_logits" in out:
        ref = t[out["slide_logits"]][0]
        d = (res.logits - ref).abs().max().item()
        assert torch.allclose(res.logits, ref, atol=1e-4, rtol=1e-4), f"slide_logits max abs diff {d:.3g}"


# ------------------------------------------------------------------------------------------ window placement


def _spans(wins, axis):
    return sorted({(w.y1, w.y2) if axis == 0 else (w.x1, w.x2) for w in wins})


@pytest.mark.parametrize(
    "h,w,rows,cols",
    [
        (240, 256, [(0, 224), (16, 240)], [(0, 224), (32, 256)]),
        (336, 448, [(0, 224), (112, 336)], [(0, 224), (112, 336), (224, 448)]),
        (225, 224, [(0, 224), (1, 225)], [(0, 224)]),
        (224, 224, [(0, 224)], [(0, 224)]),
        (100, 150, [(0, 100)], [(0, 150)]),
        (100, 500, [(0, 100)], [(0, 224), (112, 336), (224, 448), (276, 500)]),
    ],
    ids=["240x256", "336x448", "225x224", "exact-crop", "smaller-than-crop", "short-and-wide"],
)
def test_slide_windows_placement(h, w, rows, cols):
    wins = inf.slide_windows(h, w, 224, 112)
    assert _spans(wins, 0) == rows and _spans(wins, 1) == cols
    assert len(wins) == len(rows) * len(cols)
    # row-major order, all windows the same size min(crop, side)
    assert wins == sorted(wins, key=lambda v: (v.y1, v.x1))
    assert {v.shape for v in wins} == {(min(224, h), min(224, w))}


@pytest.mark.parametrize("h,w", [(17, 300), (500, 375), (1120, 560), (223, 337)], ids=lambda v: str(v))
def test_slide_windows_cover_the_image(h, w):
    count = np.zeros((h, w), dtype=int)
    for v in inf.slide_windows(h, w, 224, 112):
        assert 0 <= v.y1 < v.y2 <= h and 0 <= v.x1 < v.x2 <= w
        count[v.y1 : v.y2, v.x1 : v.x2] += 1
    assert count.min() >= 1


class _CountingVisual(torch.nn.Module):
    """Cheap fake dense model (patch 16): average-pooled image channels, projected; records batch shapes."""

    patch_size = (16, 16)
    width, num_heads = 64, 2

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3, 8, generator=g)
        self.batches: list[tuple[int, ...]] = []

    def forward(self, x):
        self.batches.append(tuple(x.shape))
        p = torch.nn.functional.avg_pool2d(x, 16).flatten(2).transpose(1, 2) @ self.proj  # [B, N, 8]
        cls = p.mean(dim=1, keepdim=True)
        return torch.cat([cls, p], dim=1)


@pytest.mark.parametrize("max_batch", [1, 2, 5, None], ids=lambda v: f"chunk{v}")
def test_chunked_slide_equals_unchunked(max_batch):
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 336, 500, generator=g)
    text = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    ref_model = _CountingVisual()
    ref = inf.slide_logits(ref_model, image, text, max_batch=100)
    assert len(ref_model.batches) == 1 and ref_model.batches[0][0] == 2 * 4  # all 8 crops in one batch
    model = _CountingVisual()
    out = inf.slide_logits(model, image, text, max_batch=max_batch)
    assert torch.allclose(out, ref, atol=1e-6)
    if max_batch is not None:
        assert [b[0] for b in model.batches] == [min(max_batch, 8 - i) for i in range(0, 8, max_batch)]
    # explicit per-window loop (the official forward_slide)
    acc = torch.zeros(1, 4, 336, 500)
    cnt = torch.zeros(1, 1, 336, 500)
    for v in inf.slide_windows(336, 500):
        acc[:, :, v.y1 : v.y2, v.x1 : v.x2] += inf.dense_logits(
            model, image[:, :, v.y1 : v.y2, v.x1 : v.x2], text
        )
        cnt[:, :, v.y1 : v.y2, v.x1 : v.x2] += 1
    assert torch.allclose(out, acc / cnt, atol=1e-6)


def test_memory_budget_sets_chunk_size():
    model = _CountingVisual()
    per_crop = 4 * 197 * 16 * 64  # SDPA blocks: O(T) per crop, element_size * T * 16 * width
    assert inf.crops_per_chunk(model, (224, 224), 3 * per_crop) == 3
    assert inf.crops_per_chunk(model, (224, 224), 1) == 1
    image = torch.randn(1, 3, 336, 500)
    text = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    inf.slide_logits(model, image, text, memory_budget=3 * per_crop)
    assert [b[0] for b in model.batches] == [3, 3, 2]


def test_crop_memory_estimate_is_linear_in_tokens_and_ignores_heads():
    """The blocks run SDPA (no T x T attention matrix): the per-crop estimate is element_size * T * 16 * E."""
    model = _CountingVisual()
    t_small, t_big = 1 + 14 * 14, 1 + 56 * 56  # 224 and 896 px crops, patch 16
    budget = 4 * t_big * 16 * 64 * 10  # exactly 10 big crops
    assert inf.crops_per_chunk(model, (896, 896), budget) == 10
    assert inf.crops_per_chunk(model, (224, 224), budget) == budget // (4 * t_small * 16 * 64)
    assert inf.crops_per_chunk(model, (896, 896), budget, element_size=2) == 20  # fp16 activations
    many_heads = _CountingVisual()
    many_heads.num_heads = 64
    assert inf.crops_per_chunk(many_heads, (896, 896), budget) == 10
    with pytest.raises(ValueError, match="memory_budget"):
        inf.crops_per_chunk(model, (224, 224), 0)


def test_slide_on_image_smaller_than_crop_equals_whole(tiny_segmenter):
    g = torch.Generator().manual_seed(4)
    image = torch.randn(1, 3, 160, 200, generator=g)
    text = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    with torch.inference_mode():
        slide = inf.infer_logits(tiny_segmenter.visual, image, text, mode="slide")
        whole = inf.infer_logits(tiny_segmenter.visual, image, text, mode="whole")
    assert torch.allclose(slide, whole, atol=1e-6)


def test_single_equals_whole_and_non_multiple_of_patch(tiny_segmenter):
    g = torch.Generator().manual_seed(5)
    image = torch.randn(1, 3, 70, 90, generator=g)  # 4x5 grid; remainders are dropped then stretched
    text = torch.nn.functional.normalize(torch.randn(3, 32, generator=g), dim=-1)
    with torch.inference_mode():
        single = inf.infer_logits(tiny_segmenter.visual, image, text, mode="single")
        whole = inf.infer_logits(tiny_segmenter.visual, image, text, mode="whole")
    assert single.shape == (1, 3, 70, 90)
    assert torch.equal(single, whole)


# ------------------------------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize(
    "hw,short,long,expected",
    [
        ((375, 500), 336, 2048, (336, 448)),
        ((500, 375), 336, 2048, (448, 336)),
        ((1024, 2048), 560, 2048, (560, 1120)),
        ((100, 5000), 336, 2048, (41, 2048)),
        ((336, 448), 336, 2048, (336, 448)),
        ((333, 333), 336, 2048, (336, 336)),
    ],
    ids=["voc-landscape", "voc-portrait", "cityscapes", "long-side-limit", "unchanged", "upscale"],
)
def test_rescale_size_mmcv_semantics(hw, short, long, expected):
    assert inf.rescale_size(*hw, short, long) == expected


def test_preprocess_normalises_without_resize_and_rounds_after_resize():
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, (336, 448, 3), dtype=np.uint8)
    x = inf.preprocess(img, short_side=336)
    mean = torch.tensor(inf.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(inf.CLIP_STD).view(1, 3, 1, 1)
    expected = (torch.from_numpy(img).permute(2, 0, 1)[None].float() - mean) / std
    assert torch.equal(x, expected)
    small = rng.randint(0, 256, (30, 40, 3), dtype=np.uint8)
    y = inf.preprocess(small, short_side=60)
    assert y.shape == (1, 3, 60, 80)
    raw = y * std + mean
    assert torch.allclose(raw, raw.round(), atol=1e-3)  # integer grey levels like cv2's uint8 output
    assert inf.preprocess(small, short_side=None).shape == (1, 3, 30, 40)


def test_preprocess_rejects_extreme_aspect():
    with pytest.raises(ValueError, match="aspect"):
        inf.preprocess(np.zeros((1, 9000, 3), np.uint8), short_side=336)


# ------------------------------------------------------------------------------------------ post-processing


def test_postprocess_synonym_max_threshold_and_renormalisation():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(1, 5, 6, 7, generator=g) * 0.1
    qidx = torch.tensor([0, 0, 1, 2, 2])
    image = torch.zeros(1, 3, 6, 7)
    labels, probs = inf.postprocess(logits, image, qidx, ori_shape=(6, 7), pamr_steps=0, prob_thd=0.6)
    q = (logits[0] * 40).softmax(0)
    cls = torch.stack([q[0:2].max(0).values, q[2], q[3:5].max(0).values])
    exp_labels = cls.argmax(0)
    exp_labels[cls.max(0).values < 0.6] = 0
    assert torch.equal(labels, exp_labels)
    assert torch.allclose(probs, cls / cls.sum(0, keepdim=True), atol=1e-6)
    assert torch.allclose(probs.sum(0), torch.ones(6, 7), atol=1e-5)
    assert (labels == 0).any()  # the threshold did act on this input


def test_postprocess_resizes_to_ori_shape():
    logits = torch.randn(1, 3, 20, 30)
    labels, probs = inf.postprocess(
        logits, torch.zeros(1, 3, 20, 30), [0, 1, 2], ori_shape=(41, 59), pamr_steps=0
    )
    assert labels.shape == (41, 59) and probs.shape == (3, 41, 59)


def test_postprocess_pamr_runtime_error_falls_back_with_warning(monkeypatch):
    logits = torch.randn(1, 3, 12, 12)
    image = torch.randn(1, 3, 12, 12)
    ref = inf.postprocess(logits, image, [0, 1, 2], ori_shape=(12, 12), pamr_steps=0)

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(naclip.tiles, "_pamr", boom)
    with pytest.warns(RuntimeWarning, match="PAMR skipped"):
        out = inf.postprocess(logits, image, [0, 1, 2], ori_shape=(12, 12), pamr_steps=10)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


def test_postprocess_bad_query_idx():
    with pytest.raises(ValueError, match="query_idx"):
        inf.postprocess(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), [0, 1], ori_shape=(4, 4))
    with pytest.raises(ValueError, match="query_idx"):
        inf.postprocess(
            torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4), [0, 5], ori_shape=(4, 4), num_classes=2
        )


def _post_args(**kw):
    args = {
        "logits": torch.zeros(1, 2, 4, 4),
        "image": torch.zeros(1, 3, 4, 4),
        "query_idx": [0, 1],
        "ori_shape": (4, 4),
        "pamr_steps": 0,
    }
    args.update(kw)
    return args


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"logits": torch.zeros(2, 4, 4)}, ValueError, r"logits: expected a floating tensor \[1, Q, H, W\]"),
        ({"logits": torch.zeros(2, 2, 4, 4)}, ValueError, r"logits: .*got \(2, 2, 4, 4\)"),
        ({"logits": torch.zeros(1, 2, 4, 4, dtype=torch.long)}, TypeError, "logits: .*torch.int64"),
        ({"logits": [[0.0]]}, ValueError, "logits: .*got list"),
        ({"image": torch.zeros(1, 1, 4, 4)}, ValueError, r"image: expected .*\[1, 3, H, W\], got \(1, 1"),
        ({"image": torch.zeros(1, 3, 4, 4, dtype=torch.uint8)}, TypeError, "image: .*torch.uint8"),
        ({"prob_thd": 1.5}, ValueError, r"prob_thd: expected a number in \[0, 1\], got 1.5"),
        ({"prob_thd": "0.1"}, TypeError, "prob_thd: .*got str '0.1'"),
        ({"prob_thd": True}, TypeError, "prob_thd: .*got bool"),
        ({"logit_scale": "40"}, TypeError, "logit_scale: .*got str"),
        ({"logit_scale": float("inf")}, ValueError, "logit_scale: expected a finite number, got inf"),
        ({"pamr_steps": 1.0}, TypeError, "pamr_steps: .*got float"),
        ({"pamr_steps": -1}, ValueError, "pamr_steps: expected an int >= 0, got -1"),
        ({"ori_shape": (4,)}, ValueError, r"ori_shape: expected \(height, width\)"),
        ({"ori_shape": (4, 0)}, ValueError, r"ori_shape\[1\]: expected a positive int, got 0"),
        ({"ori_shape": (4.0, 4)}, TypeError, r"ori_shape\[0\]: .*got float"),
        ({"query_idx": [0.0, 1.0]}, TypeError, "query_idx: expected integer"),
        ({"num_classes": 0}, ValueError, "num_classes: expected a positive int, got 0"),
    ],
    ids=[
        "logits-3d",
        "logits-batch2",
        "logits-int",
        "logits-list",
        "image-1ch",
        "image-uint8",
        "thd-range",
        "thd-str",
        "thd-bool",
        "scale-str",
        "scale-inf",
        "steps-float",
        "steps-negative",
        "shape-len",
        "shape-zero",
        "shape-float",
        "qidx-float",
        "num-classes-0",
    ],
)
def test_postprocess_validates_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        inf.postprocess(**_post_args(**kwargs))


def test_postprocess_accepts_numpy_and_tensor_sizes():
    ref = inf.postprocess(**_post_args())
    for shape in ((np.int64(4), np.int32(4)), torch.Size([4, 4]), [4, 4]):
        out = inf.postprocess(**_post_args(ori_shape=shape))
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.parametrize(
    "fn,args,exc",
    [
        (inf.rescale_size, (10.0, 10, 336), TypeError),
        (inf.rescale_size, (0, 10, 336), ValueError),
        (inf.slide_windows, (10, 10, "224"), TypeError),
        (inf.slide_windows, (10, 10, 224, -1), ValueError),
    ],
    ids=["float-height", "zero-height", "str-crop", "negative-stride"],
)
def test_int_arguments_type_vs_value_errors(fn, args, exc):
    with pytest.raises(exc, match="expected a positive int"):
        fn(*args)


def test_infer_logits_errors(tiny_segmenter):
    text = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="mode"):
        inf.infer_logits(tiny_segmenter.visual, torch.zeros(1, 3, 32, 32), text, mode="tiles")
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        inf.infer_logits(tiny_segmenter.visual, torch.zeros(1, 3, 8, 64), text)
    with pytest.raises(ValueError, match=r"\[1, 3, H, W\]"):
        inf.infer_logits(tiny_segmenter.visual, torch.zeros(2, 3, 32, 32), text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="crop"):
            inf.infer_logits(tiny_segmenter.visual, torch.zeros(1, 3, 32, 32), text, mode="slide", crop=8)
