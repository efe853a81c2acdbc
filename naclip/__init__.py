"""naclip: training-free open-vocabulary semantic segmentation (NACLIP) on open_clip ViTs.

Quick start::

    import naclip
    seg = naclip.Segmenter.from_pretrained("ViT-B-16", "openai")
    res = seg.predict("photo.jpg", "sky, cloud; tree; person")   # or preset="voc21"
    res.labels, res.probs, res.class_names                          # [H, W], [C, H, W], C names
    res.save_mask("mask.png"); res.save_overlay("overlay.png")
"""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from naclip.io import load_image
from naclip.presets import PRESET_NAMES, PRESETS, Preset, get_preset
from naclip.segmenter import SegmentationResult, SegmentConfig, Segmenter

try:
    __version__: str = _version("naclip")
except _PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "Segmenter",
    "SegmentationResult",
    "SegmentConfig",
    "Preset",
    "PRESETS",
    "PRESET_NAMES",
    "get_preset",
    "load_image",
]
