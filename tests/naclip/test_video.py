"""Video segmentation: ``naclip segment clip.mp4`` keeps frame count, size and rate; batched frames equal
per-frame ``predict``; per-frame areas agree with the per-frame masks (tiny random model, synthetic clips)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from naclip_test_support import register_tiny_config, tiny_clip
from PIL import Image

from naclip.cli import main

av = pytest.importorskip("av", reason="PyAV (in [dev]) is not installed")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = "naclip-video-tiny"


def _clip(path: Path, *, n: int, w: int, h: int, fps: Fraction) -> Path:
    """A synthetic clip: moving colour bars plus noise (lossless enough for the test's purposes)."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv444p" if (w % 2 or h % 2) else "yuv420p"
        for i in range(n):
            x = (np.arange(w)[None, :, None] + 5 * i) % 48 * 5
            frame = np.broadcast_to(x, (h, w, 3)).astype(np.uint8) + rng.integers(0, 20, (h, w, 3), np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return register_tiny_config(tmp_path_factory.mktemp("tiny_cfg"), TINY)


@pytest.mark.parametrize(
    ("n", "w", "h", "fps", "mode", "batch"),
    [
        pytest.param(7, 70, 46, Fraction(25, 2), "whole", 3, id="7f-70x46-12.5fps-whole-b3"),
        pytest.param(4, 49, 33, Fraction(30000, 1001), "slide", 2, id="4f-49x33-29.97fps-slide-b2"),
    ],
)
def test_cli_video_keeps_frames_size_and_rate(
    tiny_config: Path, tmp_path: Path, n: int, w: int, h: int, fps: Fraction, mode: str, batch: int
) -> None:
    from naclip import video

    src = _clip(tmp_path / "clip.mp4", n=n, w=w, h=h, fps=fps)
    out = tmp_path / "out"
    argv = ["segment", str(src), "--out", str(out), "--classes", "sky; tree; road", "--mode", mode]
    argv += ["--model-config", str(tiny_config), "--model", TINY, "--pretrained", "none", "--device", "cpu"]
    assert main([*argv, "--short-side", "48", "--batch", str(batch), "--frame-masks", "--no-progress"]) == 0
    assert video.probe(out / "clip_overlay.mp4") == video.VideoInfo(n, w, h, fps)
    report = json.loads((out / "clip_frames.json").read_text())
    assert (report["frames"], report["width"], report["height"]) == (n, w, h)
    assert report["fps"] == pytest.approx(float(fps)) and report["settings"]["mode"] == mode
    assert [f["frame"] for f in report["per_frame"]] == list(range(n))
    for f in report["per_frame"]:
        mask = np.asarray(Image.open(out / "clip_masks" / f"{f['frame']:06d}_mask.png"))
        assert f["pixels"] == np.bincount(mask.ravel(), minlength=3).tolist()
        assert sum(f["fraction"]) == pytest.approx(1.0, abs=1e-12)


def test_batched_frames_equal_per_frame_predict(tmp_path: Path) -> None:
    import open_clip

    from naclip import Segmenter, video

    seg = Segmenter(tiny_clip(vision_layers=1), open_clip.get_tokenizer("ViT-B-16"), device="cpu")
    src = _clip(tmp_path / "c.mp4", n=5, w=64, h=40, fps=Fraction(10))
    masks = tmp_path / "m"
    kw = {"short_side": 48, "prob_thd": 0.2}
    video.segment_video(seg, src, "sky; tree", overlay=tmp_path / "o.mp4", masks_dir=masks, batch=4, **kw)
    frames = [f for chunk in video.iter_frame_batches(src, 2) for f in chunk]
    assert len(frames) == 5
    for i, frame in enumerate(frames):
        ref = seg.predict(frame, "sky; tree", **kw)
        got = np.asarray(Image.open(masks / f"{i:06d}_mask.png"))
        top2 = torch.topk(ref.probs, 2, dim=0).values
        decided = ((top2[0] - top2[1]) > 1e-4).numpy()  # ignore exact near-ties of batched vs single matmuls
        np.testing.assert_array_equal(got[decided], ref.labels.numpy()[decided])


def test_cli_unreadable_video_fails_alone(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(img)
    out = tmp_path / "out"
    argv = ["segment", str(bad), str(img), "--out", str(out), "--classes", "a; b", "--no-progress"]
    argv += ["--model-config", str(tiny_config), "--model", TINY, "--pretrained", "none", "--device", "cpu"]
    assert main([*argv, "--short-side", "32"]) == 1
    assert "broken.mp4' cannot be read" in capsys.readouterr().err
    assert (out / "ok_mask.png").is_file() and not (out / "broken_overlay.mp4").exists()


def test_video_errors(tmp_path: Path) -> None:
    from naclip import video

    bad = tmp_path / "not.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ValueError, match=r"video '.*not.mp4' cannot be read"):
        video.probe(bad)
    with pytest.raises(ValueError, match=r"batch: expected an int >= 1, got 0"):
        video.segment_video(None, bad, "a", overlay=tmp_path / "o.mp4", batch=0)
