"""Image loading/conversion and result writers.

Loading (:func:`load_image`) turns any supported input into a ``uint8`` RGB ``numpy`` array ``H x W x 3``:

* **file paths** (``str`` / ``os.PathLike``), decoded with Pillow. Missing, unreadable, truncated or non-image
  files raise :class:`ImageLoadError` (a ``ValueError``) or ``FileNotFoundError`` naming the file. The EXIF
  ``Orientation`` tag is applied (a phone photo stored sideways comes out upright, as every viewer shows it;
  the mask then has the upright size); ``exif_orientation=False`` keeps the pixels as stored.
  :func:`probe_image` reads only the header: the (oriented) size, for checks before any decoding.
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
onto any path listed in ``protect`` (the input images): :func:`save_mask` (palette PNG, palette from
:func:`label_palette`), :func:`save_overlay` (colour blend + a legend scaled with the image, drawn with fonts
covering non-ASCII names, see :mod:`naclip._fonts`), :func:`save_probs` (``.npy`` float32 ``C x H x W``).

Colours: with ``background=True`` (benchmark presets, whose class 0 is a real background) the VOC palette,
0 = black; otherwise every class gets a visible colour (class ``i`` -> VOC colour ``i + 1``) and
:data:`UNKNOWN_LABEL` (pixels below ``prob_thd`` when no class is a background) is black, "unknown".
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
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from naclip._validate import check_bool, check_int
from naclip.config import DEFAULT_MAX_PIXELS

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "OVERLAY_ALPHA",
    "UNKNOWN_LABEL",
    "UNKNOWN_NAME",
    "ImageLoadError",
    "ImageTooLargeError",
    "load_image",
    "probe_image",
    "label_palette",
    "voc_palette",
    "colorize",
    "save_mask",
    "legend_text_height",
    "render_overlay",
    "save_overlay",
    "save_probs",
    "save_probs_streaming",
    "atomic_write",
]

#: Default opacity of the class colours in an overlay: ``(1 - alpha)·image + alpha·colour``.
OVERLAY_ALPHA = 0.5
#: Label of pixels below ``prob_thd`` when no user class is a background (palette PNG value, legend name).
UNKNOWN_LABEL = 255
UNKNOWN_NAME = "unknown"
#: EXIF tag number of ``Orientation`` (values 1..8; 5..8 swap width and height).
_EXIF_ORIENTATION = 0x0112

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


def _oriented_size(img: Image.Image, exif_orientation: bool) -> tuple[int, int]:
    """``(w, h)`` of ``img`` as it will be returned (EXIF orientations 5..8 swap the sides)."""
    w, h = img.size
    if exif_orientation and img.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
        return h, w
    return w, h


@contextlib.contextmanager
def _opened(path: PathLike, max_pixels: int | None, exif_orientation: bool, *, verify: bool = False):
    """``Image.open`` with the checks and error mapping of :func:`load_image`; yields ``(img, (w, h))``.
    ``verify``: first run Pillow's integrity check on a separate handle (it must directly follow open)."""
    p = Path(path)
    what = f"image file {str(p)!r}"
    if not p.exists():
        raise FileNotFoundError(f"{what} does not exist")
    if p.is_dir():
        raise ImageLoadError(f"{what} is a directory, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if verify:
                with Image.open(p) as raw:
                    raw.verify()
            with Image.open(p) as img:
                w, h = _oriented_size(img, exif_orientation)
                _check_pixels(h, w, max_pixels, what)
                yield img, (w, h)
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


def _load_path(path: PathLike, max_pixels: int | None, exif_orientation: bool) -> np.ndarray:
    with _opened(path, max_pixels, exif_orientation) as (img, _):
        img.load()
        if exif_orientation:
            img = ImageOps.exif_transpose(img)
        return _pil_to_rgb(img, f"image file {str(path)!r}")


def probe_image(
    path: PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, exif_orientation: bool = True
) -> tuple[int, int]:
    """``(height, width)`` of the image file ``path`` as :func:`load_image` would return it, from its header
    (plus Pillow's ``verify()``, which catches e.g. a PNG with a bad checksum, without decoding the pixels).
    The same errors as :func:`load_image` for a missing, unreadable, corrupt or too large file."""
    with _opened(path, max_pixels, exif_orientation, verify=True) as (_, (w, h)):
        return h, w


def _is_tensor(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.Tensor)


def load_image(
    image: Any, *, max_pixels: int | None = DEFAULT_MAX_PIXELS, exif_orientation: bool = True
) -> np.ndarray:
    """Load/convert ``image`` (path, PIL image, numpy array or torch tensor) to uint8 RGB ``H x W x 3``.

    See the module docstring for the conversion rules. ``max_pixels=None`` disables the pixel limit.
    ``exif_orientation``: turn image files upright by their EXIF ``Orientation`` tag (PIL images, arrays and
    tensors are taken as given).
    """
    if max_pixels is not None:
        max_pixels = check_int("max_pixels", max_pixels, expected="an int or None")
    check_bool("exif_orientation", exif_orientation)
    if isinstance(image, str | os.PathLike):
        return _load_path(image, max_pixels, exif_orientation)
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


def label_palette(*, background: bool) -> np.ndarray:
    """The ``uint8 [256, 3]`` colours of label values (see the module docstring): ``background=True``: the
    VOC palette (0 = black background); ``False``: label ``i`` -> VOC colour ``i + 1`` (never black) and
    :data:`UNKNOWN_LABEL` -> black."""
    check_bool("background", background)
    voc = voc_palette()
    if background:
        return voc
    pal = np.empty_like(voc)
    pal[:UNKNOWN_LABEL] = voc[1 : UNKNOWN_LABEL + 1]
    pal[UNKNOWN_LABEL] = 0
    return pal


def colorize(labels: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    """Label map ``H x W`` (ints in [0, 256)) -> uint8 RGB ``H x W x 3`` through ``palette`` (VOC by
    default)."""
    pal = voc_palette() if palette is None else np.asarray(palette, dtype=np.uint8)
    lab = np.asarray(labels)
    if not (lab.dtype == np.uint8 and len(pal) >= 256):  # uint8 labels index a 256-entry palette directly
        lab = lab.astype(np.int64, copy=False) % len(pal)  # (and `% 256` would overflow uint8)
    return pal[lab]


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


def _palette_array(palette: np.ndarray | None) -> np.ndarray:
    pal = voc_palette() if palette is None else np.asarray(palette)
    if pal.shape != (256, 3) or not np.issubdtype(pal.dtype, np.integer) or pal.min() < 0 or pal.max() > 255:
        raise ValueError(f"palette: expected uint8 [256, 3] colours (e.g. label_palette()), got {pal.shape}")
    return pal.astype(np.uint8)


def save_mask(
    path: PathLike, labels: Any, *, palette: np.ndarray | None = None, protect: Iterable[PathLike] = ()
) -> Path:
    """Write ``labels`` (``H x W`` ints in [0, 255]) as a palette PNG (pixel value = label; colours
    ``palette``, default VOC, see :func:`label_palette`); ``path`` must end in .png."""
    if Path(path).suffix.lower() != ".png":
        raise ValueError(f"path: a palette mask must be written as .png, got {str(path)!r}")
    a = _labels_array(labels)
    if a.size and (a.min() < 0 or a.max() > 255):
        raise ValueError(f"labels: values must lie in [0, 255] for a palette PNG, got [{a.min()}, {a.max()}]")
    pal = _palette_array(palette)
    img = Image.fromarray(a.astype(np.uint8), mode="P")
    img.putpalette(pal.tobytes())
    return atomic_write(path, lambda f: img.save(f, format="PNG"), protect=protect)


def legend_text_height(height: int, width: int) -> int:
    """Em size in pixels of the legend text of an ``height x width`` overlay: 1/30 of the short side,
    at least 12 px (readable on small images, proportionate on a 4000 px photo)."""
    return max(12, round(min(height, width) / 30))


def _legend_name(c: int, class_names: Sequence[str]) -> str:
    if 0 <= c < len(class_names):
        return str(class_names[c])
    return UNKNOWN_NAME if c == UNKNOWN_LABEL else str(c)


def _legend_rows(entries: list[tuple[int, int]], width: int) -> list[list[tuple[int, int]]]:
    """Greedy line breaking of ``(label, entry width)`` into rows no wider than ``width``."""
    rows: list[list[tuple[int, int]]] = [[]]
    x = 0
    for e in entries:
        if rows[-1] and x + e[1] > width:
            rows.append([])
            x = 0
        rows[-1].append(e)
        x += e[1]
    return [r for r in rows if r]


def render_overlay(
    image: np.ndarray,
    labels: Any,
    class_names: Sequence[str],
    *,
    alpha: float = OVERLAY_ALPHA,
    palette: np.ndarray | None = None,
) -> Image.Image:
    """Blend the colourised ``labels`` over ``image`` (``(1-alpha)·image + alpha·colour``, colours from
    ``palette``, default VOC) and add a legend below it listing the labels present (colour swatch + name;
    :data:`UNKNOWN_LABEL` beyond the names is "unknown"). The legend scales with the image
    (:func:`legend_text_height`) and draws any Unicode name an installed font covers
    (:mod:`naclip._fonts`)."""
    from naclip import _fonts

    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha!r}")
    img = load_image(image, max_pixels=None)
    lab = _labels_array(labels)
    if lab.shape != img.shape[:2]:
        raise ValueError(f"labels: shape {lab.shape} does not match the image size {img.shape[:2]}")
    pal = _palette_array(palette)
    col = colorize(lab, pal)
    blend = (img.astype(np.float32) * (1.0 - alpha) + col.astype(np.float32) * alpha + 0.5).astype(np.uint8)
    h, w = img.shape[:2]
    em = legend_text_height(h, w)
    sw, pad = em, max(4, em // 2)
    texts = {int(c): _fonts.render_text(_legend_name(int(c), class_names), em) for c in np.unique(lab)}
    entries = [(c, sw + pad // 2 + t.width + 2 * pad) for c, t in texts.items()]
    line_h = max([t.height for t in texts.values()] + [sw]) + pad
    rows = _legend_rows(entries, w)
    canvas = Image.new("RGB", (w, h + len(rows) * line_h + pad), (255, 255, 255))
    canvas.paste(Image.fromarray(blend), (0, 0))
    draw = ImageDraw.Draw(canvas)
    y = h + pad
    for row in rows:
        x = pad
        for c, ew in row:
            colour = tuple(int(v) for v in pal[c % len(pal)])
            top = y + (line_h - pad - sw) // 2
            draw.rectangle([x, top, x + sw, top + sw], fill=colour, outline=(0, 0, 0), width=max(1, em // 12))
            canvas.paste(texts[c], (x + sw + pad // 2, y), texts[c])
            x += ew
        y += line_h
    return canvas


def save_overlay(
    path: PathLike,
    image: Any,
    labels: Any,
    class_names: Sequence[str],
    *,
    alpha: float = OVERLAY_ALPHA,
    palette: np.ndarray | None = None,
    protect: Iterable[PathLike] = (),
) -> Path:
    """Write :func:`render_overlay` to ``path`` (format from the extension, e.g. .png or .jpg), atomically."""
    fmt = _pil_format(path)
    canvas = render_overlay(image, labels, class_names, alpha=alpha, palette=palette)
    return atomic_write(path, lambda f: canvas.save(f, format=fmt), protect=protect)


def save_probs(path: PathLike, probs: Any, *, protect: Iterable[PathLike] = ()) -> Path:
    """Write ``probs`` (``C x H x W``) as a float32 ``.npy`` file (``path`` must end in .npy), atomically."""
    if Path(path).suffix.lower() != ".npy":
        raise ValueError(f"path: probabilities are written as .npy, got {str(path)!r}")
    a = probs.detach().cpu().float().numpy() if hasattr(probs, "detach") else np.asarray(probs, np.float32)
    a = np.ascontiguousarray(a, dtype=np.float32)
    return atomic_write(path, lambda f: np.save(f, a, allow_pickle=False), protect=protect)


def save_probs_streaming(
    path: PathLike,
    shape: tuple[int, int, int],
    fill: Callable[[Callable[[Any, int, int], None]], None],
    *,
    protect: Iterable[PathLike] = (),
) -> Path:
    """Write a float32 ``.npy`` ``[C, H, W]`` block by block, atomically, never holding it in memory.

    ``fill(sink)`` must call ``sink(block, r0, c0)`` with float32 blocks ``[C, th, tw]`` (tensor or array)
    that together cover the array; each block's rows go to the file with ``os.pwrite`` (the page cache holds
    them, not the process). The file appears only once ``fill`` returned (as :func:`atomic_write`).
    """
    if Path(path).suffix.lower() != ".npy":
        raise ValueError(f"path: probabilities are written as .npy, got {str(path)!r}")
    c, h, w = (int(v) for v in shape)

    def write(f: IO[bytes]) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False}
        np.lib.format.write_array_header_1_0(f, header | {"shape": (c, h, w)})
        f.flush()
        start = f.tell()
        f.truncate(start + 4 * c * h * w)
        fd = f.fileno()

        def sink(block: Any, r0: int, c0: int) -> None:
            b = block.detach().cpu().numpy() if hasattr(block, "detach") else np.asarray(block)
            b = b.astype("<f4", copy=False)
            for ci in range(c):
                for r in range(b.shape[1]):
                    os.pwrite(fd, b[ci, r].tobytes(), start + 4 * ((ci * h + r0 + r) * w + c0))

        fill(sink)

    return atomic_write(path, write, protect=protect)
