"""Image loading/conversion and result writers.

Loading (:func:`load_image`) turns any supported input into a ``uint8`` RGB ``numpy`` array ``H x W x 3``:

* **file paths** (``str`` / ``os.PathLike``), decoded with Pillow. Missing, unreadable, truncated or non-image
  files raise :class:`ImageLoadError` (a ``ValueError``) or ``FileNotFoundError`` naming the file. EXIF
  orientation is **not** applied (like OpenCV's ``imread`` flags used by the official pipeline: pixels as
  stored).
* **PIL images**: ``RGB`` as is; grayscale (``L``, ``1``) replicated to 3 channels; palette (``P``) expanded
  through its palette; alpha (``RGBA``, ``LA``, ``PA``, palette transparency) **dropped** (colour values kept
  as stored, as OpenCV's ``imread(IMREAD_COLOR)`` in the official pipeline does; no compositing); 16-bit
  (``I;16*``, and ``I`` holding 0..65535 as Pillow reads 16-bit PNGs) mapped to 8 bits with ``round(v / 257)``
  (65535 -> 255); float (``F``) like float arrays; ``CMYK``/``YCbCr``/``LAB``/``HSV`` converted by Pillow
  (Pillow itself decodes 48-bit RGB PNGs to 8 bits per channel).
* **numpy arrays**: ``H x W`` or ``H x W x C`` with ``C`` in 1, 3, 4 (4: alpha dropped); ``uint8`` as is;
  ``uint16`` via ``round(v / 257)``; float (``float16/32/64``) must lie in **[0, 1]** and is mapped with
  ``round(v · 255)`` (values outside [0, 1] raise ``ValueError``: pass ``uint8`` for 0-255 data).
* **torch tensors**: like arrays, in ``C x H x W`` (channels first, the torch convention) or ``H x W x C``
  layout, optionally with a leading batch dimension of 1. A 3-D tensor whose first dimension is 1, 3 or 4 is
  read as ``C x H x W`` (even if its last dimension also is); otherwise as ``H x W x C``.
* A pixel limit (``max_pixels``, default :data:`DEFAULT_MAX_PIXELS`) is checked before decoding, with a clear
  :class:`ImageTooLargeError`, instead of an out-of-memory error or Pillow's ``DecompressionBombError``
  (Pillow's own bomb check at ``2 · PIL.Image.MAX_IMAGE_PIXELS`` pixels is also reported this way).

Writers are atomic (a temporary file in the destination directory, then ``os.replace``) and refuse to write
onto any path listed in ``protect`` (the input images): :func:`save_mask` (palette PNG with the VOC palette
extended to 256 colours), :func:`save_overlay` (colour blend + legend drawn with Pillow's default font),
:func:`save_probs` (``.npy`` float32 ``C x H x W``).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageLoadError",
    "ImageTooLargeError",
    "load_image",
    "voc_palette",
    "colorize",
    "save_mask",
    "render_overlay",
    "save_overlay",
    "save_probs",
    "atomic_write",
]

#: Default pixel limit (H·W) of an input image: 64 megapixels (e.g. 8000 x 8000).
DEFAULT_MAX_PIXELS = 64_000_000

PathLike = str | os.PathLike


class ImageLoadError(ValueError):
    """An input could not be read or converted to an RGB image (the message names the file or the object)."""


class ImageTooLargeError(ImageLoadError):
    """An input image has more pixels than the configured limit."""


def _check_pixels(h: int, w: int, max_pixels: int | None, what: str) -> None:
    if max_pixels is not None and h * w > max_pixels:
        raise ImageTooLargeError(
            f"{what}: {w}x{h} image has {h * w:,} pixels, above the limit of {max_pixels:,} "
            f"(raise max_pixels to allow it)"
        )


def _u16_to_u8(a: np.ndarray) -> np.ndarray:
    return np.floor(a.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)


def _float_to_u8(a: np.ndarray, what: str) -> np.ndarray:
    a = a.astype(np.float64, copy=False)
    if not np.isfinite(a).all():
        raise ValueError(f"{what}: float image contains NaN or inf")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{what}: float images must lie in [0, 1], got values in [{lo:g}, {hi:g}] "
            "(divide by 255 or pass uint8 for 0-255 data)"
        )
    return np.floor(a * 255.0 + 0.5).astype(np.uint8)


def _array_to_rgb(a: np.ndarray, what: str) -> np.ndarray:
    """``H x W`` or ``H x W x C`` (C in 1, 3, 4) array -> uint8 ``H x W x 3``."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise ValueError(f"{what}: expected an H x W or H x W x C (C = 1, 3 or 4) image, got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{what}: empty image of shape {a.shape}")
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = _u16_to_u8(a)
    elif np.issubdtype(a.dtype, np.floating):
        a = _float_to_u8(a, what)
    else:
        raise TypeError(f"{what}: unsupported dtype {a.dtype}; expected uint8, uint16 or float in [0, 1]")
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    elif a.shape[2] == 4:
        a = a[:, :, :3]
    return np.ascontiguousarray(a)


def _pil_to_rgb(img: Image.Image, what: str) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("1", "L", "LA", "La"):
        return _array_to_rgb(np.asarray(img.convert("L"), dtype=np.uint8), what)
    if mode in ("P", "PA"):
        return np.asarray(img.convert("RGBA"), dtype=np.uint8)[:, :, :3].copy()
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.asarray(img.convert("RGBA") if mode == "RGBa" else img, dtype=np.uint8)[:, :, :3].copy()
    if mode.startswith("I;16"):
        return _array_to_rgb(_u16_to_u8(np.asarray(img).astype(np.uint32)), what)
    if mode == "I":
        a = np.asarray(img)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageLoadError(
                f"{what}: 32-bit integer image with values in [{a.min()}, {a.max()}] is not supported "
                "(expected 16-bit data 0..65535)"
            )
        return _array_to_rgb(_u16_to_u8(a), what)
    if mode == "F":
        return _array_to_rgb(np.asarray(img, dtype=np.float32), what)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (ValueError, OSError) as exc:
        raise ImageLoadError(f"{what}: cannot convert a {mode!r} image to RGB: {exc}") from None


def _tensor_to_array(t: Any, what: str) -> np.ndarray:
    import torch

    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ValueError(f"{what}: expected a single image, got a batch of shape {tuple(t.shape)}")
        t = t[0]
    if t.ndim == 3 and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)
    elif t.ndim not in (2, 3):
        raise ValueError(f"{what}: expected a C x H x W or H x W x C tensor, got shape {tuple(t.shape)}")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    if t.dtype == torch.uint16:
        return t.contiguous().numpy().astype(np.uint16)
    return t.contiguous().numpy()


def _load_path(path: PathLike, max_pixels: int | None) -> np.ndarray:
    p = Path(path)
    what = f"image file {str(p)!r}"
    if not p.exists():
        raise FileNotFoundError(f"{what} does not exist")
    if p.is_dir():
        raise ImageLoadError(f"{what} is a directory, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                w, h = img.size
                _check_pixels(h, w, max_pixels, what)
                img.load()
                return _pil_to_rgb(img, what)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{what}: {exc}") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{what} is not an image Pillow can read (unknown or corrupt format)") from None
    except PermissionError:
        raise ImageLoadError(f"{what} cannot be read (permission denied)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise ImageLoadError(f"{what} is truncated or corrupt: {exc}") from None


def _is_tensor(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.Tensor)


def load_image(image: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Load/convert ``image`` (path, PIL image, numpy array or torch tensor) to uint8 RGB ``H x W x 3``.

    See the module docstring for the conversion rules. ``max_pixels=None`` disables the pixel limit.
    """
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)):
        raise TypeError(f"max_pixels: expected an int or None, got {max_pixels!r}")
    if isinstance(image, str | os.PathLike):
        return _load_path(image, max_pixels)
    if isinstance(image, Image.Image):
        w, h = image.size
        _check_pixels(h, w, max_pixels, "image")
        return _pil_to_rgb(image, "image")
    if isinstance(image, np.ndarray):
        a = image
    elif _is_tensor(image):
        a = _tensor_to_array(image, "image")
    else:
        raise TypeError(
            f"image: expected a file path, PIL.Image, numpy array or torch tensor, got {type(image).__name__}"
        )
    if a.ndim >= 2:
        _check_pixels(int(a.shape[0]), int(a.shape[1]), max_pixels, "image")
    return _array_to_rgb(a, "image")


# ------------------------------------------------------------------------------------------------- writers


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map extended to ``n`` entries, ``uint8 [n, 3]`` (0 = black, 1 = (128, 0, 0),
    ...).

    Entry ``i``: for ``k = 0..7``, bit ``7 - k`` of R, G and B is bit ``3k``, ``3k + 1`` and ``3k + 2`` of
    ``i``.
    """
    pal = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for k in range(8):
            r |= ((c >> 0) & 1) << (7 - k)
            g |= ((c >> 1) & 1) << (7 - k)
            b |= ((c >> 2) & 1) << (7 - k)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Label map ``H x W`` (ints in [0, 256)) -> uint8 RGB ``H x W x 3`` through ``palette`` (VOC by
    default)."""
    pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    return pal[np.asarray(labels) % len(pal)]


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _umask() -> int:
    """The process umask, read without changing it where possible (``/proc/self/status`` on Linux); else
    via the ``os.umask`` set-and-restore idiom."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _final_mode(dest: Path) -> int:
    """Permission bits for the finished file: those of an existing ``dest`` (replaced in place), else what
    ``open(dest, "w")`` would give: ``0o666 & ~umask``."""
    try:
        return stat.S_IMODE(os.stat(dest).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(
    path: PathLike, write: Callable[[IO[bytes]], None], *, protect: Iterable[PathLike] = ()
) -> Path:
    """Write a file atomically: ``write(fileobj)`` into a temporary file beside ``path``, then ``os.replace``.

    Raises ``ValueError`` if ``path`` is (or resolves to the same file as) one of ``protect`` (input files are
    never overwritten). The parent directory must exist. The file gets the permission bits of the file it
    replaces, or ``0o666 & ~umask`` for a new file (as a plain ``open(path, "w")``; the temporary file itself
    is created ``0o600``). Returns the final path.
    """
    dest = Path(path)
    for src in protect:
        s = Path(src)
        if dest.resolve() == s.resolve() or _same_file(dest, s):
            raise ValueError(f"path: refusing to overwrite the input file {str(s)!r}")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"path: directory {str(parent)!r} of {str(dest)!r} does not exist")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), _final_mode(dest))
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return dest


def _pil_format(path: PathLike) -> str:
    ext = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ValueError(f"path: unknown image extension {ext!r} in {str(path)!r} (use .png or .jpg)")
    return fmt


def _labels_array(labels: Any) -> np.ndarray:
    a = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if a.ndim != 2:
        raise ValueError(f"labels: expected an H x W label map, got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"labels: expected integers, got {a.dtype}")
    return a


def save_mask(path: PathLike, labels: Any, *, protect: Iterable[PathLike] = ()) -> Path:
    """Write ``labels`` (``H x W`` ints in [0, 255]) as a palette PNG (VOC palette); ``path`` must end in
    .png."""
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"path: a palette mask must be written as .png, got {str(path)!r}")
    a = _labels_array(labels)
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"labels: values must lie in [0, 255] for a palette PNG, got [{a.min()}, {a.max()}]")
    img = Image.fromarray(a.astype(np.uint8), mode="P")
    img.putpalette(voc_palette().tobytes())
    return atomic_write(path, lambda f: img.save(f, format="PNG"), protect=protect)


def _legend_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def render_overlay(
    image: np.ndarray, labels: Any, class_names: Sequence[str], *, alpha: float = 0.5
) -> Image.Image:
    """Blend the colourised ``labels`` over ``image`` (``(1-alpha)·image + alpha·colour``) and add a legend
    strip below it listing the classes present (colour swatch + name, Pillow's default font)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha!r}")
    img = load_image(image, max_pixels=None)
    lab = _labels_array(labels)
    if lab.shape != img.shape[:2]:
        raise ValueError(f"labels: shape {lab.shape} does not match the image size {img.shape[:2]}")
    col = colorize(lab)
    blend = (img.astype(np.float32) * (1.0 - alpha) + col.astype(np.float32) * alpha + 0.5).astype(np.uint8)
    present = [int(c) for c in np.unique(lab)]
    font = _legend_font()
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pal = voc_palette()
    sw, pad = 12, 6
    entries = []
    for c in present:
        name = class_names[c] if 0 <= c < len(class_names) else str(c)
        box = draw_probe.textbbox((0, 0), name, font=font)
        entries.append((c, name, sw + 4 + (box[2] - box[0]) + 2 * pad, max(sw, box[3] - box[1])))
    w = img.shape[1]
    line_h = max([e[3] for e in entries] + [sw]) + pad
    rows, x, row = [], 0, []
    for e in entries:
        if row and x + e[2] > w:
            rows.append(row)
            row, x = [], 0
        row.append(e)
        x += e[2]
    if row:
        rows.append(row)
    legend_h = len(rows) * line_h + pad
    canvas = Image.new("RGB", (w, img.shape[0] + legend_h), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = img.shape[0] + pad
    for r in rows:
        x = pad
        for c, name, ew, _ in r:
            colour = tuple(int(v) for v in pal[c % len(pal)])
            draw.rectangle([x, y, x + sw, y + sw], fill=colour, outline=(0, 0, 0))
            draw.text((x + sw + 4, y), name, fill=(0, 0, 0), font=font)
            x += ew
        y += line_h
    return canvas


def save_overlay(
    path: PathLike,
    image: Any,
    labels: Any,
    class_names: Sequence[str],
    *,
    alpha: float = 0.5,
    protect: Iterable[PathLike] = (),
) -> Path:
    """Write :func:`render_overlay` to ``path`` (format from the extension, e.g. .png or .jpg), atomically."""
    fmt = _pil_format(path)
    canvas = render_overlay(image, labels, class_names, alpha=alpha)
    return atomic_write(path, lambda f: canvas.save(f, format=fmt), protect=protect)


def save_probs(path: PathLike, probs: Any, *, protect: Iterable[PathLike] = ()) -> Path:
    """Write ``probs`` (``C x H x W``) as a float32 ``.npy`` file (``path`` must end in .npy), atomically."""
    if Path(path).suffix.lower() != ".npy":
        raise ValueError(f"path: probabilities are written as .npy, got {str(path)!r}")
    a = probs.detach().cpu().float().numpy() if hasattr(probs, "detach") else np.asarray(probs, np.float32)
    a = np.ascontiguousarray(a, dtype=np.float32)
    return atomic_write(path, lambda f: np.save(f, a, allow_pickle=False), protect=protect)
