"""SegmentConfig.resolve (the one merge of settings) and Segmenter.predict on a list of images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from naclip_test_support import tiny_clip
from PIL import Image

from naclip import SegmentConfig, Segmenter, get_preset
from naclip.config import PRESET_KEYS


@pytest.fixture(scope="module")
def seg() -> Segmenter:
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-16")
    return Segmenter(
        tiny_clip(), tok, config=SegmentConfig(templates=("a photo of a {c}.",)), text_cache=False
    )


@pytest.mark.parametrize("name", ["voc21", "cityscapes", "ade20k"], ids=str)
def test_resolve_takes_preset_values_then_overrides(name):
    pre = get_preset(name)
    cfg = SegmentConfig().resolve(pre, prob_thd=0.25, crop=None)
    for key in PRESET_KEYS:
        want = getattr(pre, key) if getattr(pre, key) is not None else getattr(SegmentConfig(), key)
        assert getattr(cfg, key) == (0.25 if key == "prob_thd" else want), key


def test_resolve_without_preset_or_overrides_is_the_config():
    base = SegmentConfig(crop=96, stride=48)
    assert base.resolve() == base and base.resolve(None, mode=None) == base
    assert base.resolve(mode="slide", stride=32) == dataclasses.replace(base, mode="slide", stride=32)


def test_resolve_refuses_unknown_keys_and_bad_values():
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['bogus', 'crop_size'\]"):
        SegmentConfig().resolve(crop_size=3, bogus=1)
    with pytest.raises(TypeError, match="crop: expected an int >= 1, got float 2.5"):
        SegmentConfig().resolve(crop=2.5)
    with pytest.raises(ValueError, match="mode: expected one of"):
        SegmentConfig().resolve(mode="tiles")


def _inputs():
    rng = np.random.RandomState(3)
    a = rng.randint(0, 256, (37, 53, 3), dtype=np.uint8)  # odd, non-square
    b = Image.fromarray(rng.randint(0, 256, (48, 33, 3), dtype=np.uint8))
    c = torch.from_numpy(rng.randint(0, 256, (40, 40, 3), dtype=np.uint8))
    return [a, b, c]


@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "whole", "pamr": False}, {"mode": "slide", "crop": 32, "stride": 21}],
    ids=["whole", "slide"],
)
def test_predict_list_equals_single_calls(seg, kwargs, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.RandomState(9).randint(0, 256, (35, 45, 3), dtype=np.uint8)).save(path)
    images = [*_inputs()[:2], str(path)]
    batch = seg.predict(images, "sky; tree, bush; person", **kwargs)
    assert isinstance(batch, list) and len(batch) == 3
    for img, res in zip(images, batch, strict=True):
        one = seg.predict(img, "sky; tree, bush; person", **kwargs)
        assert torch.equal(res.labels, one.labels)
        assert torch.equal(res.probs, one.probs)
        assert res.settings == one.settings and res.source == one.source
        assert res.image.shape == one.image.shape


def test_predict_list_encodes_text_once(seg, monkeypatch):
    calls = []
    real = seg.text_features
    monkeypatch.setattr(seg, "text_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = seg.predict(_inputs(), "sky; tree", pamr=False)
    assert len(out) == 3 and len(calls) == 1


def test_predict_list_arguments(seg, tmp_path):
    with pytest.raises(ValueError, match=r"non-empty list of images, got \[\]"):
        seg.predict([], "sky; tree")
    with pytest.raises(ValueError, match="probs_path: expected one path per image"):
        seg.predict(_inputs(), "sky; tree", probs_path=tmp_path / "p.npy")
    paths = [tmp_path / f"p{i}.npy" for i in range(3)]
    out = seg.predict(_inputs(), "sky; tree", pamr=False, probs_path=paths, keep_probs=True)
    for res, p in zip(out, paths, strict=True):
        assert np.array_equal(np.load(p), res.probs.numpy())
