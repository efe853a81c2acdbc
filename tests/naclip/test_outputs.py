"""Structured outputs: class areas / JSON (CLI ``--json``), heat maps (``--heatmaps``), the transformers
pipeline and ``supervision`` formats, and the ``hubconf.py`` entry point (tiny random models, no download)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from naclip_test_support import REPO_ROOT, register_tiny_config, tiny_clip
from PIL import Image

from naclip import outputs
from naclip.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = "naclip-outputs-tiny"


def _random_result(h: int, w: int, n_cls: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    probs = rng.random((n_cls, h, w)).astype(np.float32)
    probs /= probs.sum(0, keepdims=True)
    labels = probs.argmax(0)
    labels[0, 0] = n_cls - 1  # a label that is not the argmax somewhere (as after prob_thd)
    return labels, probs, [f"c{i}" for i in range(n_cls)]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return register_tiny_config(tmp_path_factory.mktemp("tiny_cfg"), TINY)


@pytest.mark.parametrize(
    ("h", "w", "n_cls"),
    [
        pytest.param(7, 9, 3, id="7x9-C3"),
        pytest.param(16, 5, 6, id="16x5-C6"),
        pytest.param(1, 1, 2, id="1x1-C2"),
    ],
)
def test_class_areas_agree_with_the_labels(h: int, w: int, n_cls: int) -> None:
    labels, probs, names = _random_result(h, w, n_cls)
    areas = outputs.class_areas(torch.from_numpy(labels), torch.from_numpy(probs), names)
    assert [a["index"] for a in areas] == list(range(n_cls))
    assert [a["name"] for a in areas] == names
    assert sum(a["pixels"] for a in areas) == h * w
    assert sum(a["fraction"] for a in areas) == pytest.approx(1.0, abs=1e-12)
    for a in areas:
        own = labels == a["index"]
        assert a["pixels"] == int(own.sum())
        if own.any():
            assert a["mean_prob"] == pytest.approx(float(probs[a["index"]][own].mean()), rel=1e-6)
        else:
            assert a["mean_prob"] is None


def test_unknown_pixels_get_their_own_entry() -> None:
    from naclip.io import UNKNOWN_LABEL, UNKNOWN_NAME

    labels, probs, names = _random_result(5, 8, 3)
    labels[1:3, 2:7] = UNKNOWN_LABEL  # below prob_thd without a background class
    areas = outputs.class_areas(labels, probs, names)
    assert [a["index"] for a in areas] == [0, 1, 2, UNKNOWN_LABEL]
    assert areas[-1] == {"index": UNKNOWN_LABEL, "name": UNKNOWN_NAME, "pixels": 10, "fraction": 10 / 40,
                         "mean_prob": None}  # fmt: skip
    assert sum(a["pixels"] for a in areas) == 40
    assert sum(a["fraction"] for a in areas) == pytest.approx(1.0, abs=1e-12)
    assert UNKNOWN_NAME not in [e["label"] for e in outputs.to_hf(labels, probs, names)]
    labels[0, 0] = 7
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\) or 255 \(unknown\)"):
        outputs.class_areas(labels, probs, names)


def test_class_areas_reject_mismatched_inputs() -> None:
    labels, probs, names = _random_result(4, 6, 3)
    with pytest.raises(ValueError, match=r"class_names: expected 3 names, got 2"):
        outputs.class_areas(labels, probs, names[:2])
    with pytest.raises(ValueError, match=r"labels/probs: expected \[H, W\] and \[C, H, W\]"):
        outputs.class_areas(labels[:, :5], probs, names)


def test_heatmap_tiles_use_the_fixed_colour_scale() -> None:
    probs = np.stack([np.zeros((30, 40)), np.ones((30, 40)), np.full((30, 40), 0.5)]).astype(np.float32)
    img = np.asarray(outputs.render_heatmaps(probs, ["zero", "one", "half"]))
    lut = outputs.heatmap_colors()
    scale = outputs.HEATMAP_TILE / 40
    tw, th = round(40 * scale), round(30 * scale)
    centres = [(6 + k * (tw + 6) + tw // 2, 6 + 16 + th // 2) for k in range(3)]  # pad 6, title 16
    got = [tuple(img[y, x]) for x, y in centres]
    assert got == [tuple(lut[0]), tuple(lut[255]), tuple(lut[128])]
    assert img.shape[1] > 3 * tw  # tiles plus the colour bar


def test_heatmap_errors() -> None:
    labels, probs, names = _random_result(4, 6, 3)
    with pytest.raises(ValueError, match=r"probs: expected \[C, H, W\] with C = 2 names"):
        outputs.render_heatmaps(probs, names[:2])
    with pytest.raises(ValueError, match=r"columns: expected an int >= 1"):
        outputs.render_heatmaps(probs, names, columns=0)
    with pytest.raises(ValueError, match=r"heat maps are written as .png"):
        outputs.save_heatmaps("x.jpg", probs, names)


def test_cli_json_and_heatmaps(tiny_config: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out"
    argv = ["segment", str(src), "--out", str(out), "--classes", "sky, cloud; tree; person", "--json"]
    argv += ["--heatmaps", "--model-config", str(tiny_config), "--model", TINY, "--pretrained", "none"]
    assert main([*argv, "--short-side", "48", "--no-progress", "--device", "cpu", "--mode", "slide"]) == 0
    data = json.loads((out / "photo.json").read_text())
    mask = np.asarray(Image.open(out / "photo_mask.png"))
    assert (data["height"], data["width"]) == mask.shape == (40, 70)
    assert [c["name"] for c in data["classes"]] == ["sky", "tree", "person"]
    assert [c["pixels"] for c in data["classes"]] == np.bincount(mask.ravel(), minlength=3).tolist()
    assert sum(c["fraction"] for c in data["classes"]) == pytest.approx(1.0, abs=1e-12)
    s = data["settings"]
    got = (s["mode"], s["short_side"], s["pamr"], s["preset"], s["dtype"])
    assert got == ("slide", 48, True, None, "fp32")
    heat = Image.open(out / "photo_heatmaps.png")
    assert heat.format == "PNG" and heat.width > 3 * outputs.HEATMAP_TILE


@pytest.fixture(scope="module")
def result():
    import open_clip

    from naclip import Segmenter

    seg = Segmenter(tiny_clip(vision_layers=1), open_clip.get_tokenizer("ViT-B-16"), device="cpu")
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    return seg.predict(image, "sky; tree; person; car", short_side=48, pamr=False)


def test_to_json_is_the_summary(result) -> None:
    data = json.loads(result.to_json())
    assert data == result.summary()
    assert data["settings"]["pamr"] is False and data["settings"]["mode"] == "whole"


def test_to_hf_pipeline_format(result) -> None:
    labels = result.labels.numpy()
    entries = result.to_hf()
    present = sorted(set(labels.ravel().tolist()))
    assert [e["label"] for e in entries] == [result.class_names[c] for c in present]
    areas = {a["name"]: a for a in result.summary()["classes"]}
    for e, c in zip(entries, present, strict=True):
        assert e["mask"].mode == "L" and e["mask"].size == (53, 37)
        np.testing.assert_array_equal(np.asarray(e["mask"]), np.where(labels == c, 255, 0))
        assert e["score"] == areas[e["label"]]["mean_prob"]


def test_to_supervision_detections(result) -> None:
    pytest.importorskip("supervision", reason="supervision (in [dev]) is not installed")
    labels = result.labels.numpy()
    det = result.to_supervision()
    present = sorted(set(labels.ravel().tolist()))
    assert det.class_id.tolist() == present
    assert det.data["class_name"].tolist() == [result.class_names[c] for c in present]
    areas = result.summary()["classes"]
    np.testing.assert_allclose(det.confidence, [areas[c]["mean_prob"] for c in present], rtol=1e-6)
    for m, c, box in zip(det.mask, det.class_id, det.xyxy, strict=True):
        np.testing.assert_array_equal(m, labels == c)
        ys, xs = np.nonzero(m)
        assert box.tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_to_supervision_without_the_package(result, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "supervision", None)
    with pytest.raises(ImportError, match=r"optional 'supervision' package: pip install supervision"):
        result.to_supervision()


def test_torch_hub_load_local(tiny_config: Path) -> None:
    from naclip import Segmenter

    hub = {"source": "local", "pretrained": None, "device": "cpu"}
    seg = torch.hub.load(str(REPO_ROOT), "naclip", model_name=TINY, **hub)
    assert isinstance(seg, Segmenter)
    res = seg.predict(np.zeros((32, 48, 3), np.uint8), "a; b", short_side=32, pamr=False)
    assert res.labels.shape == (32, 48)
