"""Video segmentation (PyAV, which bundles FFmpeg; in ``[dev]``, else ``pip install av``).

:func:`segment_video` decodes the frames lazily, ``batch`` at a time, and writes ``<stem>_overlay.mp4``
(H.264, the input's frame count, size and frame rate; a variable-rate input is written at its average rate),
optionally one palette mask PNG per frame, and returns the per-frame class areas (the JSON written by the
CLI). The first frame goes through :meth:`naclip.Segmenter.predict` (which validates the settings, encodes the
class texts once and returns the resolved settings); in ``whole`` / ``single`` mode the following frames go
through the model ``batch`` at a time with those settings (same resize, logits, PAMR, softmax and threshold,
per frame), in ``slide`` mode one at a time (each frame's crops are batched already).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from naclip import inference, io, outputs
from naclip._validate import check_int

__all__ = ["DEFAULT_BATCH", "VIDEO_SUFFIXES", "VideoInfo", "iter_frame_batches", "probe", "segment_video"]

#: File suffixes ``naclip segment`` treats as videos (case-insensitive).
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")
#: Frames per model batch by default.
DEFAULT_BATCH = 8


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise ImportError("video input needs the optional 'av' package (PyAV): pip install av") from None
    return av


@dataclass(frozen=True)
class VideoInfo:
    """``frames`` (decoded count when the container does not store it), ``width``, ``height``, ``fps``."""

    frames: int
    width: int
    height: int
    fps: Fraction


def probe(path: str | os.PathLike) -> VideoInfo:
    """Size, frame rate and frame count of the first video stream (``ValueError`` naming the file if none)."""
    av = _av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"video {str(path)!r}: no video stream")
            stream = container.streams.video[0]
            frames = stream.frames or sum(1 for _ in container.decode(stream))
            rate = stream.average_rate or stream.guessed_rate
            if not rate:
                raise ValueError(f"video {str(path)!r}: unknown frame rate")
            return VideoInfo(frames, stream.codec_context.width, stream.codec_context.height, Fraction(rate))
    except av.FFmpegError as exc:
        raise ValueError(f"video {str(path)!r} cannot be read: {exc}") from None


def iter_frame_batches(path: str | os.PathLike, batch: int) -> Iterator[list[np.ndarray]]:
    """Lists of up to ``batch`` uint8 RGB frames ``H x W x 3``, decoded lazily in order."""
    av = _av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        chunk: list[np.ndarray] = []
        for frame in container.decode(stream):
            chunk.append(frame.to_ndarray(format="rgb24"))
            if len(chunk) == batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def _batched_results(seg: Any, frames: list[np.ndarray], first: Any, spec: Any) -> list[Any]:
    """Segment ``frames`` with the settings of ``first`` (a result of ``seg.predict``) in one forward."""
    s, cfg = first.settings, seg.config
    x = torch.cat([
        inference.preprocess(f, short_side=s["short_side"], long_side=s["long_side"], device=seg.device)
        for f in frames
    ])  # fmt: skip
    feats, qidx, names = seg.text_features(spec)
    with torch.inference_mode():
        logits = inference.dense_logits(seg.visual, x, feats).float()
        results = []
        for i, f in enumerate(frames):
            h, w = f.shape[:2]
            post = inference.PostSettings(  # the settings predict checked on the first frame
                query_idx=qidx.to(logits.device), ori_shape=(h, w), num_classes=len(names),
                pamr_steps=cfg.pamr_steps if s["pamr"] else 0, pamr_dilations=tuple(cfg.pamr_dilations),
                prob_thd=s["prob_thd"], logit_scale=float(s["logit_scale"]),
                below_thd_label=s["below_thd_label"], area_thd=None, renormalize=True,
                memory_budget=cfg.memory_budget, keep_probs=True,
            )  # fmt: skip
            labels, probs = inference.run_postprocess(logits[i : i + 1], x[i : i + 1], post)
            results.append(
                type(first)(labels=labels, probs=probs, class_names=names, image=f, palette=first.palette)
            )
    return results


def _overlay_frame(result: Any) -> np.ndarray:
    """The overlay of :func:`naclip.io.render_overlay` without its legend strip (the frame keeps its size)."""
    h = result.labels.shape[0]
    img = io.render_overlay(result.image, result.labels, result.class_names, palette=result.palette)
    return np.asarray(img)[:h]


def _encoder(container: Any, info: VideoInfo) -> Any:
    stream = container.add_stream("libx264", rate=info.fps)
    stream.width, stream.height = info.width, info.height
    # 4:2:0 needs even sizes; odd ones keep their exact size in 4:4:4
    stream.pix_fmt = "yuv420p" if info.width % 2 == 0 and info.height % 2 == 0 else "yuv444p"
    stream.options = {"crf": "20", "preset": "veryfast"}
    return stream


def segment_video(
    segmenter: Any,
    path: str | os.PathLike,
    classes: Any,
    *,
    overlay: str | os.PathLike,
    masks_dir: str | os.PathLike | None = None,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[int], None] | None = None,
    protect: tuple = (),
    **predict_kw: Any,
) -> dict[str, Any]:
    """Segment every frame of ``path`` into ``classes``; write the overlay video (atomically) and, with
    ``masks_dir``, ``<frame index:06d>_mask.png`` per frame. ``predict_kw`` go to ``Segmenter.predict``
    (``preset``, ``mode``, ``pamr``, ``prob_thd``, ``short_side``); ``progress(n)`` after every ``n`` frames.
    Returns ``{"height", "width", "frames", "fps", "classes", "settings", "per_frame": [{"frame",
    "pixels", "fraction"}]}`` (pixels and fractions per class, in class order)."""
    batch = check_int("batch", batch, minimum=1)
    av, info = _av(), probe(path)
    spec = classes
    if classes is None and predict_kw.get("preset") is not None:  # keep the preset's synonyms and names
        from naclip.presets import get_preset

        preset = predict_kw["preset"]
        spec = (get_preset(preset) if isinstance(preset, str) else preset).classes
    if masks_dir is not None:
        Path(masks_dir).mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"height": info.height, "width": info.width, "frames": 0, "fps": float(info.fps)}
    per_frame: list[dict[str, Any]] = []

    def encode(fileobj) -> None:
        with av.open(fileobj, mode="w", format="mp4") as container:
            stream = _encoder(container, info)
            first = None
            for frames in iter_frame_batches(path, batch):
                if first is None:
                    first = segmenter.predict(frames[0], spec, **predict_kw)
                    report.update(classes=first.class_names, settings=first.settings)
                    rest, results = frames[1:], [first]
                else:
                    rest, results = frames, []
                results += _segment_rest(segmenter, rest, first, spec, predict_kw)
                for res in results:
                    _write_frame(container, stream, res, len(per_frame), masks_dir, per_frame, av)
                if progress is not None:
                    progress(len(frames))
            container.mux(stream.encode())

    io.atomic_write(overlay, encode, protect=protect)
    report["frames"] = len(per_frame)
    report["per_frame"] = per_frame
    return report


def _segment_rest(seg: Any, frames: list, first: Any, spec: Any, predict_kw: dict) -> list:
    if not frames:
        return []
    if first.settings["mode"] == "slide":
        return [seg.predict(f, spec, **predict_kw) for f in frames]
    return _batched_results(seg, frames, first, spec)


def _write_frame(container, stream, res, index: int, masks_dir, per_frame: list, av) -> None:
    frame = av.VideoFrame.from_ndarray(_overlay_frame(res), format="rgb24")
    container.mux(stream.encode(frame))
    areas = outputs.class_areas(res.labels, res.probs, res.class_names)
    per_frame.append({
        "frame": index, "pixels": [a["pixels"] for a in areas], "fraction": [a["fraction"] for a in areas],
    })  # fmt: skip
    if masks_dir is not None:
        res.save_mask(Path(masks_dir) / f"{index:06d}_mask.png")
