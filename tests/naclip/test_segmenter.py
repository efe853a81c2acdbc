"""naclip.Segmenter end to end: random-init ViT-B-16 (slow), a tiny random CLIP for the rest, bad input."""

from __future__ import annotations

import time

import numpy as np
import open_clip
import pytest
import torch
from naclip_test_support import tiny_clip
from PIL import Image

import naclip
import naclip.inference as inf
from naclip import SegmentationResult, SegmentConfig, Segmenter
from naclip.io import ImageTooLargeError
from naclip.segmenter import DTYPES, dtype_name, resolve_dtype


@pytest.fixture(scope="module")
def tok():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="module")
def seg(tok) -> Segmenter:
    return Segmenter(tiny_clip(), tok, backend="torch")


def _image(h=75, w=100, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


def _check_result(res: SegmentationResult, h: int, w: int, n_cls: int) -> None:
    assert res.labels.shape == (h, w) and res.labels.dtype == torch.uint8 and res.labels.device.type == "cpu"
    assert res.probs.shape == (n_cls, h, w) and res.probs.dtype == torch.float32
    assert len(res.class_names) == n_cls
    assert int(res.labels.min()) >= 0 and int(res.labels.max()) < n_cls
    assert torch.allclose(res.probs.sum(0), torch.ones(h, w), atol=1e-4)
    assert torch.isfinite(res.probs).all()


# ------------------------------------------------------------------------------------------ ViT-B-16


@pytest.mark.slow
def test_vit_b16_random_init_whole_slide_single_500x375():
    cfg = SegmentConfig(templates=("a photo of a {c}.", "a bad photo of a {c}."))  # text tower cost only
    t0 = time.perf_counter()
    seg = Segmenter.from_pretrained("ViT-B-16", pretrained=None, device="cpu", config=cfg)
    assert seg.visual.patch_size == (16, 16) and seg.visual.pretrained_grid == (14, 14)
    img = _image(375, 500, seed=1)  # 500 wide, 375 high (a VOC-sized photo) -> 336x448 model input
    classes = "sky, cloud; tree; person, people"
    whole = seg.predict(img, classes, mode="whole", return_logits=True)  # PAMR on (default)
    _check_result(whole, 375, 500, 3)
    assert whole.logits.shape == (5, 336, 448)
    single = seg.predict(img, classes, mode="single", pamr=False, return_logits=True)
    slide = seg.predict(img, classes, mode="slide", pamr=False, return_logits=True)
    for r in (single, slide):
        _check_result(r, 375, 500, 3)
    assert single.logits.shape == (5, 368, 496)  # native 375x500 rounded to the 16 px patch grid
    assert slide.logits.shape == whole.logits.shape and not torch.allclose(slide.logits, whole.logits)
    assert whole.class_names == ["sky", "tree", "person"]
    assert time.perf_counter() - t0 < 600


# ------------------------------------------------------------------------------------------ tiny model


def test_predict_classes_string_numpy(seg):
    res = seg.predict(_image(), "sky, cloud; tree; person", pamr=False)
    _check_result(res, 75, 100, 3)
    assert res.class_names == ["sky", "tree", "person"]
    assert res.image.shape == (75, 100, 3) and res.source is None and res.logits is None


@pytest.mark.parametrize("mode", ["whole", "slide", "single"])
def test_predict_modes_and_pamr(seg, mode):
    # 60x90 -> 64x96 model input; a 32 px crop at stride 16 gives 3x5 windows, so slide != whole
    img, classes = _image(60, 90, seed=2), ["cat", "dog, puppy"]
    kw = {"mode": mode, "short_side": 64, "crop": 32, "stride": 16, "return_logits": True}
    res = seg.predict(img, classes, pamr=True, **kw)
    _check_result(res, 60, 90, 2)
    off = seg.predict(img, classes, pamr=False, **kw)
    _check_result(off, 60, 90, 2)
    assert torch.equal(res.logits, off.logits)  # PAMR acts after the logits...
    assert not torch.allclose(res.probs, off.probs, atol=1e-4)  # ...and is not ignored
    whole = seg.predict(img, classes, mode="whole", pamr=False, short_side=64, return_logits=True)
    assert whole.logits.shape == (3, 64, 96)
    if mode == "slide":
        assert not torch.allclose(off.logits, whole.logits, atol=1e-4)  # the mode is not ignored
    else:
        assert torch.equal(off.logits, whole.logits)  # single = whole (one pass)


def test_predict_matches_manual_pipeline(seg):
    img = _image(50, 70, seed=3)
    res = seg.predict(img, "a; b, c", mode="whole", pamr=False, prob_thd=0.4)
    feats, qidx, _ = seg.text_features("a; b, c")
    x = inf.preprocess(img, short_side=336)
    with torch.inference_mode():
        logits = inf.infer_logits(seg.visual, x, feats, mode="whole")
    labels, probs = inf.postprocess(logits, x, qidx, ori_shape=(50, 70), pamr_steps=0, prob_thd=0.4)
    assert torch.equal(res.labels, labels) and torch.allclose(res.probs, probs)


def test_preset_settings_are_used(tok, monkeypatch):
    seg = Segmenter(tiny_clip(), tok, config=SegmentConfig(templates=("a photo of a {c}.",)))  # fast text
    seen = {}
    real_infer, real_post = inf.run_logits, inf.run_postprocess  # predict's (unvalidated) internal steps

    def spy_infer(visual, image, text, **kw):
        seen["mode"], seen["hw"], seen["q"] = kw["mode"], tuple(image.shape[-2:]), text.shape[0]
        return real_infer(visual, image, text, **kw)

    def spy_post(logits, image, settings, **kw):
        seen["prob_thd"], seen["pamr_steps"] = settings.prob_thd, settings.pamr_steps
        return real_post(logits, image, settings, **kw)

    monkeypatch.setattr(inf, "run_logits", spy_infer)
    monkeypatch.setattr(inf, "run_postprocess", spy_post)
    res = seg.predict(_image(40, 50), preset="voc21", pamr=False)
    assert seen == {"mode": "whole", "hw": (336, 420), "q": 56, "prob_thd": 0.1, "pamr_steps": 0}
    assert res.class_names == list(naclip.get_preset("voc21").class_names)
    _check_result(res, 40, 50, 21)
    # explicit classes override the preset's list but keep its settings; explicit arguments override both
    res = seg.predict(_image(40, 50), "cat; dog", preset="cityscapes", pamr=False, mode="whole", prob_thd=0.2)
    assert seen == {"mode": "whole", "hw": (560, 700), "q": 2, "prob_thd": 0.2, "pamr_steps": 0}
    assert res.class_names == ["cat", "dog"]


def test_predict_from_path_and_writers(seg, tmp_path):
    src = tmp_path / "photo.png"
    Image.fromarray(_image()).save(src)
    before = src.read_bytes()
    res = seg.predict(src, "sky; tree", pamr=False)
    assert res.source == src
    with pytest.raises(ValueError, match="refusing to overwrite the input"):
        res.save_mask(src)
    m = res.save_mask(tmp_path / "mask.png")
    o = res.save_overlay(tmp_path / "overlay.jpg")
    p = res.save_probs(tmp_path / "probs.npy")
    assert src.read_bytes() == before
    with Image.open(m) as im:
        assert np.array_equal(np.asarray(im), res.labels.numpy())
    assert Image.open(o).size[0] == 100
    assert np.allclose(np.load(p), res.probs.numpy())


def test_text_progress_callback(tok):
    s = Segmenter(tiny_clip(1), tok, config=SegmentConfig(text_batch=2))
    calls = []
    s.predict(_image(), "a; b; c", pamr=False, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(0, 3), (2, 3), (3, 3)]
    s.predict(_image(), "a; b; c", pamr=False, progress=lambda d, t: calls.append((d, t)))
    assert len(calls) == 3  # cached: no encoding


def test_default_arch_and_method(tok):
    model = tiny_clip()
    assert Segmenter(model, tok).visual.arch == "reduced"
    s = Segmenter(model, tok, method="csa")
    assert (s.visual.arch, s.visual.strategy) == ("vanilla", "csa")
    assert Segmenter(model, tok, method="kk").visual.strategy == "kk"
    assert "method='kk'" in repr(Segmenter(model, tok, method="kk"))


def test_tower_only_segmenter_runs_from_features():
    model = tiny_clip()
    s = Segmenter(model.visual)
    x = torch.randn(1, 3, 64, 80)
    q = torch.nn.functional.normalize(torch.randn(3, 32), dim=-1)
    res = s.predict_from_features(x, q, [0, 1, 2], pamr_steps=0, class_names=["a", "b", "c"])
    _check_result(res, 64, 80, 3)
    with pytest.raises(ValueError, match="no text encoder"):
        s.predict(_image(), "a; b")


def test_resolve_dtype():
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(None) is None and resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("fp8")


@pytest.mark.parametrize(
    "text,expected",
    [
        ("torch.float16", torch.float16),
        (str(torch.bfloat16), torch.bfloat16),
        (" FP32 ", torch.float32),
        ("half", torch.float16),
        ("float", torch.float32),
    ],
    ids=["torch-prefix", "str-of-dtype", "case-space", "half", "float"],
)
def test_resolve_dtype_spellings(text, expected):
    assert resolve_dtype(text) is expected
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    assert dtype_name(text) == names[expected]


@pytest.mark.parametrize(
    "value,exc",
    [(16, TypeError), (np.float16, TypeError), (torch.int8, ValueError), ("torch.int8", ValueError)],
    ids=["int", "numpy-type", "torch-int8", "str-int8"],
)
def test_resolve_dtype_errors(value, exc):
    with pytest.raises(exc, match=r"dtype: expected .*got "):
        resolve_dtype(value)


def test_dtype_table_and_default_name():
    assert dict(DTYPES) == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    assert dtype_name(None) == "fp32" and dtype_name(torch.bfloat16) == "bf16"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_constructor_dtype_keeps_layernorm_fp32_like_open_clip(tok, dtype):
    seg = Segmenter(tiny_clip(), tok, dtype=str(dtype), backend="torch")
    expected = tiny_clip()
    open_clip.convert_weights_to_lp(expected, dtype=dtype)  # open_clip's precision="fp16"/"bf16" path
    got = {k: v.dtype for k, v in seg.clip_model.state_dict().items()}
    assert got == {k: v.dtype for k, v in expected.state_dict().items()}
    assert seg.visual.visual.ln_post.weight.dtype == torch.float32
    assert seg.clip_model.visual.transformer.resblocks[0].ln_1.weight.dtype == torch.float32
    assert seg.dtype == dtype  # conv1 (the image dtype)
    # a model that is already (purely) low precision gets its LayerNorms back in fp32
    pure = tiny_clip().to(torch.float16)
    seg = Segmenter(pure, tok, dtype=dtype, backend="torch")
    assert {k: v.dtype for k, v in seg.clip_model.state_dict().items()} == got
    # and fp32 brings everything back to fp32
    seg = Segmenter(pure, tok, dtype="fp32", backend="torch")
    floats = [v for v in seg.clip_model.state_dict().values() if v.is_floating_point()]
    assert all(v.dtype == torch.float32 for v in floats)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "classes,kwargs,exc,match",
    [
        ([], {}, ValueError, "at least one class"),
        ("", {}, ValueError, "at least one class"),
        ("sky; tree; sky", {}, ValueError, "duplicate class name 'sky'"),
        ("sky, ; tree", {}, ValueError, "empty class name or synonym"),
        (None, {}, ValueError, "classes: expected class names"),
        (None, {"preset": "pascal"}, ValueError, "unknown preset"),
        ("a; b", {"mode": "tiles"}, ValueError, "mode"),
        ("a; b", {"prob_thd": 1.5}, ValueError, "prob_thd"),
        ("a; b", {"pamr": "yes"}, TypeError, "pamr"),
        ("a; b", {"short_side": 0}, ValueError, "short_side"),
        ("a; b", {"crop": -1, "mode": "slide"}, ValueError, "crop"),
        ("a; b", {"preset": 3}, TypeError, "preset"),
    ],
    ids=[
        "empty-list",
        "empty-str",
        "duplicate",
        "empty-synonym",
        "no-classes",
        "unknown-preset",
        "mode",
        "prob_thd",
        "pamr-type",
        "short_side",
        "crop",
        "preset-type",
    ],
)
def test_predict_bad_arguments(seg, classes, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        seg.predict(_image(), classes, **kwargs)


@pytest.mark.parametrize("hw", [(10, 10), (8, 300)], ids=["10x10", "8x300"])
def test_image_smaller_than_patch(seg, hw):
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        seg.predict(_image(*hw), "a; b")


def test_extreme_aspect_ratio(seg):
    with pytest.raises(ValueError, match="resized to 4x2048 .*smaller than one 16x16 patch"):
        seg.predict(_image(20, 10000), "a; b")


def test_enormous_images(tok):
    s = Segmenter(tiny_clip(), tok, config=SegmentConfig(max_pixels=5000))
    with pytest.raises(ImageTooLargeError, match="above the limit of 5,000"):
        s.predict(_image(75, 100), "a; b")
    s = Segmenter(tiny_clip(), tok, config=SegmentConfig(max_pixels=100_000))
    with pytest.raises(ImageTooLargeError, match="resized model input"):
        s.predict(_image(75, 100), "a; b", mode="single", short_side=1000)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        ({"method": "gav"}, ValueError, "method: expected one of"),
        ({"method": "csa", "arch": "reduced"}, ValueError, "requires arch='vanilla'"),
        ({"arch": "reduced_no_ffn"}, ValueError, "arch must be one of"),
        ({"gaussian_std": 0.0}, ValueError, "gaussian_std"),
        ({"dtype": "int8"}, ValueError, "dtype"),
        ({"dtype": 16}, TypeError, "dtype"),
        ({"config": {"mode": "whole"}}, TypeError, "SegmentConfig"),
    ],
    ids=["unknown-method", "csa-reduced", "unknown-arch", "std0", "dtype", "dtype-type", "config-type"],
)
def test_segmenter_bad_construction(tok, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Segmenter(tiny_clip(), tok, **kwargs)


def test_segmenter_bad_model_and_features(seg, tok):
    with pytest.raises(TypeError, match="clip_model"):
        Segmenter("ViT-B-16", tok)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clip_model"):
        Segmenter(torch.nn.Linear(2, 2), tok)
    with pytest.raises(ValueError, match="expected D = 32"):
        seg.predict_from_features(torch.zeros(1, 3, 32, 32), torch.zeros(2, 16), [0, 1])
    with pytest.raises(ValueError, match=r"\[1, 3, H, W\]"):
        seg.predict_from_features(torch.zeros(3, 32, 32), torch.zeros(2, 32), [0, 1])
    with pytest.raises(TypeError, match="floating"):
        seg.predict_from_features(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, 32), [0, 1])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mode": "x"}, "mode"),
        ({"pamr_dilations": ()}, "pamr_dilations"),
        ({"templates": ("no placeholder",)}, "templates"),
        ({"max_pixels": 0}, "max_pixels"),
        ({"prob_thd": -0.1}, "prob_thd"),
    ],
    ids=["mode", "dilations", "templates", "max_pixels", "prob_thd"],
)
def test_segment_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"crop": 224.0}, "crop: expected an int >= 1, got float 224.0"),
        ({"short_side": "336"}, "short_side: expected an int >= 1, got str '336'"),
        ({"text_batch": True}, "text_batch: expected an int >= 1, got bool True"),
        ({"prob_thd": "0.5"}, r"prob_thd: expected a number in \[0, 1\], got str '0.5'"),
    ],
    ids=["float-crop", "str-short-side", "bool-batch", "str-prob-thd"],
)
def test_segment_config_wrong_types_raise_type_error(kwargs, match):
    with pytest.raises(TypeError, match=match):
        SegmentConfig(**kwargs)


def test_package_version():
    from importlib.metadata import version

    assert isinstance(naclip.__version__, str) and "__version__" in naclip.__all__
    assert naclip.__version__ == version("naclip")  # installed editable in the dev venv
