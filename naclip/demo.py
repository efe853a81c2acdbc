"""``naclip demo``: a Gradio app around one loaded :class:`naclip.Segmenter` (optional extra ``[demo]``).

The page takes an image (upload, paste or webcam), a class list (typed, ``";"`` between classes and ``", "``
between synonyms, or filled in from a preset) and the settings (mode, Gaussian σ, ``prob_thd``, PAMR, short
side), and shows the overlay with its legend, the per-class heat maps and the class areas, with the palette
mask and the JSON summary to download. The model is loaded once by the caller; text features are cached in
memory per class list by the Segmenter. One request runs at a time (the model is shared).

API: ``api_name="/segment"``, inputs ``(image, classes, mode, sigma, prob_thd, pamr, short_side)`` of which
only the first two are needed (the others default to the Segmenter's settings); outputs ``(overlay,
heatmaps, areas, mask file, json file)``. Offline: analytics, version checks and telemetry are off, the
default theme uses local fonts, server-side rendering (which needs node) is off, and the server listens on
``127.0.0.1`` unless told otherwise; ``share=True`` (a public tunnel, needs internet) is off by default.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from naclip import io, outputs
from naclip._validate import check_bool, check_int
from naclip.inference import MODES
from naclip.presets import PRESET_NAMES, get_preset

__all__ = ["DemoSession", "build_app", "launch", "require_gradio"]

# Must be in the environment before gradio is imported (it reads them at import and at Blocks creation).
_OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
_NO_PRESET = "(none)"
_AREA_HEADERS = ["class", "pixels", "area %", "mean prob"]
#: Download folders kept per session (older ones are removed; gradio serves its own copies).
_KEEP_REQUESTS = 32


def require_gradio() -> Any:
    """Import and return ``gradio`` with analytics off; ``ImportError`` naming the extra without it."""
    for key, value in _OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    try:
        import gradio
    except ImportError:
        raise ImportError(
            "naclip demo needs the optional 'gradio' package: pip install 'naclip[demo]'"
        ) from None
    return gradio


class DemoSession:
    """The demo's request handler: one Segmenter, a private directory for the downloadable files."""

    def __init__(self, segmenter: Any) -> None:
        self.segmenter = segmenter
        self.root = Path(tempfile.mkdtemp(prefix="naclip-demo-"))
        # class string shown for a preset -> its ClassSpec (which keeps display names such as "background")
        self._preset_specs: dict[str, Any] = {}

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def preset_settings(self, name: str) -> tuple[str, str, float, int]:
        """``(classes string, mode, prob_thd, short_side)`` of a preset (for the preset picker)."""
        p = get_preset(name)
        text = "; ".join(p.classes.lines())
        self._preset_specs[text] = p.classes
        return text, p.mode, p.prob_thd, p.short_side or 0

    def segment(
        self,
        image: np.ndarray | None,
        classes: str,
        *,
        mode: str | None = None,
        sigma: float | None = None,
        prob_thd: float | None = None,
        pamr: bool | None = None,
        short_side: int | None = None,
    ) -> tuple[Any, Any, list[list[Any]], str, str]:
        """Segment ``image`` (uint8 ``H x W x 3``); ``None`` settings take the Segmenter's. Returns
        ``(overlay PIL, heat maps PIL, area rows, mask path, json path)``; bad input raises ``ValueError``."""
        if image is None:
            raise ValueError("image: upload, paste or capture an image first")
        if not isinstance(classes, str) or not classes.strip():
            raise ValueError("classes: type class names, e.g. 'sky, cloud; tree; person', or pick a preset")
        seg = self.segmenter
        side = None if short_side is None else int(short_side)
        if side is not None and side <= 0:
            side = None if seg.config.short_side is None else seg.config.short_side
        spec = self._preset_specs.get(classes.strip(), classes)
        before = seg.visual.gaussian_std
        try:  # σ applies to this request only (and only to strategies that have one)
            if sigma is not None and before is not None:
                seg.visual.set_params(gaussian_std=float(sigma))
            res = seg.predict(image, spec, mode=mode or None, pamr=pamr, prob_thd=prob_thd, short_side=side)
        finally:
            if before is not None:
                seg.visual.set_params(gaussian_std=before)
        data = res.summary()
        out = self._request_dir()
        mask_path = res.save_mask(out / "mask.png")
        json_path = outputs.save_json(out / "segmentation.json", data)
        overlay = io.render_overlay(res.image, res.labels, res.class_names, palette=res.palette)
        heat = outputs.render_heatmaps(res.probs, res.class_names, labels=res.labels)
        rows = [
            [a["name"], a["pixels"], round(100 * a["fraction"], 2), _round(a["mean_prob"])]
            for a in data["classes"]
        ]
        return overlay, heat, rows, str(mask_path), str(json_path)

    def _request_dir(self) -> Path:
        old = sorted(self.root.iterdir(), key=lambda p: p.stat().st_mtime)
        for stale in old[: max(0, len(old) - _KEEP_REQUESTS + 1)]:
            shutil.rmtree(stale, ignore_errors=True)
        out = self.root / uuid.uuid4().hex
        out.mkdir()
        return out


def _round(value: float | None) -> float | str:
    return "" if value is None else round(value, 3)


def build_app(segmenter: Any, *, title: str = "naclip: open-vocabulary segmentation") -> Any:
    """The Gradio ``Blocks`` app (not launched). Its ``.naclip_session`` is the :class:`DemoSession`."""
    gr = require_gradio()
    session = DemoSession(segmenter)
    cfg = segmenter.config
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"## {title}\nModel `{segmenter.model_id}`, method `{segmenter.visual.strategy}`.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    label="Image", sources=["upload", "clipboard", "webcam"], type="numpy",
                    image_mode="RGB", elem_id="image",
                )  # fmt: skip
                classes = gr.Textbox(
                    label='Classes (";" between classes, ", " between synonyms)', elem_id="classes",
                    placeholder="sky, cloud; tree; person", lines=2,
                )  # fmt: skip
                preset = gr.Dropdown([_NO_PRESET, *PRESET_NAMES], value=_NO_PRESET, label="Preset")
                with gr.Row():
                    mode = gr.Radio(list(MODES), value=cfg.mode, label="Mode")
                    pamr = gr.Checkbox(value=cfg.pamr, label="PAMR refinement")
                std = segmenter.visual.gaussian_std or cfg.gaussian_std
                sigma = gr.Slider(0.5, 20.0, value=std, step=0.5, label="Gaussian σ (patches)")
                thd_label = "prob_thd (below: background / unknown)"
                thd = gr.Slider(0.0, 1.0, value=cfg.prob_thd, step=0.01, label=thd_label)
                side = gr.Number(value=cfg.short_side or 0, precision=0, minimum=0,
                                 label="Short side in px (0 = original size)")  # fmt: skip
                run = gr.Button("Segment", variant="primary", elem_id="segment-btn")
            with gr.Column():
                overlay = gr.Image(label="Overlay", type="pil", format="png", elem_id="overlay")
                heat = gr.Image(label="Heat maps", type="pil", format="png", elem_id="heatmaps")
                areas = gr.Dataframe(headers=_AREA_HEADERS, label="Class areas", elem_id="areas",
                                     interactive=False)  # fmt: skip
                with gr.Row():
                    mask_file = gr.File(label="Mask (palette PNG)", elem_id="mask-file")
                    json_file = gr.File(label="Summary (JSON)", elem_id="json-file")
        run.click(
            _handler(session, gr), inputs=[image, classes, mode, sigma, thd, pamr, side],
            outputs=[overlay, heat, areas, mask_file, json_file], api_name="segment", concurrency_limit=1,
        )  # fmt: skip
        preset.change(
            _preset_handler(session, gr), inputs=[preset], outputs=[classes, mode, thd, side], api_name=False
        )
    app.naclip_session = session
    return app


def _handler(session: DemoSession, gr: Any):
    def segment(image, classes, mode=None, sigma=None, prob_thd=None, pamr=None, short_side=None):
        try:
            return session.segment(
                image, classes, mode=mode, sigma=sigma, prob_thd=prob_thd, pamr=pamr, short_side=short_side
            )
        except (ValueError, TypeError) as exc:  # user input: shown in the page, not as a traceback
            raise gr.Error(str(exc)) from None

    return segment


def _preset_handler(session: DemoSession, gr: Any):
    def pick(name):
        if not name or name == _NO_PRESET:
            return gr.update(), gr.update(), gr.update(), gr.update()
        return session.preset_settings(name)

    return pick


def launch(
    segmenter: Any, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True
) -> Any:
    """Build and serve the app on ``host:port`` (``block=False`` returns at once, the server running in a
    background thread; ``app.close()`` stops it). Returns the app."""
    port = check_int("port", port, minimum=1, maximum=65535)
    check_bool("share", share)
    app = build_app(segmenter)
    app.queue(default_concurrency_limit=1)
    try:
        app.launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
            inbrowser=False, show_error=True, ssr_mode=False, quiet=True,
        )  # fmt: skip
    finally:
        if block:
            app.naclip_session.close()
    return app
