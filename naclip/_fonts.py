"""Legend text for the overlays: scalable fonts found robustly, with a per-character fallback.

:func:`draw_text` / :func:`text_size` render a string at a pixel height with the first font that has each
character: a sans-serif font from fontconfig (``fc-match``; DejaVu Sans on Debian), fonts shipped with pip
packages (matplotlib's DejaVu Sans), a few well-known system paths, then, per character, any installed font
that fontconfig says covers it (``fc-list :charset=XXXX``; CJK from ``fonts-noto-cjk`` /
``fonts-droid-fallback``, emoji from ``fonts-noto-color-emoji``, drawn in colour and scaled from their fixed
bitmap size). Without any scalable font, Pillow's built-in one is used. A character no font covers is drawn
as ``?`` and reported once with a ``UserWarning`` naming it and the Debian packages that add coverage: never
an unexplained box.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import warnings
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

__all__ = ["draw_text", "render_text", "text_size"]

_PIP_FONTS = (("matplotlib", "mpl-data/fonts/ttf/DejaVuSans.ttf"),)
_SYSTEM_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/Library/Fonts/Arial Unicode.ttf",
    "C:/Windows/Fonts/arial.ttf",
)
_FONT_PACKAGES = "fonts-noto-cjk or fonts-droid-fallback (CJK), fonts-noto-color-emoji (emoji)"
_FC_TIMEOUT_S = 5.0
_BITMAP_SIZES = (109, 136, 128, 72, 64, 32)  # fixed strike sizes of colour emoji fonts (CBDT / sbix)
_warned: set[str] = set()


def _fc(*args: str) -> list[str]:
    """Lines printed by a fontconfig tool (``[]`` when fontconfig is absent or fails)."""
    exe = shutil.which(args[0])
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, *args[1:]], capture_output=True, text=True, timeout=_FC_TIMEOUT_S, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


@functools.cache
def _primary_paths() -> tuple[str, ...]:
    """Candidate main fonts, best first (existing files only)."""
    found = _fc("fc-match", "-f", "%{file}\n", "sans-serif:style=Book")
    for module, rel in _PIP_FONTS:
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.origin:
            found.append(str(Path(spec.origin).parent / rel))
    found.extend(_SYSTEM_FONTS)
    seen: dict[str, None] = {}
    for path in found:
        if os.path.isfile(path) and path.lower().endswith((".ttf", ".otf", ".ttc")):
            seen.setdefault(path, None)
    return tuple(seen)


@functools.cache
def _load(path: str, size: int) -> tuple[ImageFont.FreeTypeFont, int] | None:
    """``(font, loaded size)``: scalable fonts at ``size``, bitmap-only (colour emoji) fonts at a strike
    size; ``None`` if the file cannot be loaded."""
    for s in (size, *_BITMAP_SIZES):
        try:
            return ImageFont.truetype(path, s), s
        except OSError:
            continue
    return None


@functools.cache
def _notdef(path: str) -> bytes:
    """The bitmap this font draws for a character it lacks (U+10FFFD, a private-use code point)."""
    return _mask_bytes(path, "\U0010fffd")


def _mask_bytes(path: str, ch: str) -> bytes:
    loaded = _load(path, 32)
    if loaded is None:
        return b""
    font = loaded[0]
    try:
        mask = font.getmask(ch, mode="L")
    except (OSError, ValueError):
        return b""
    return bytes(mask.size) + bytes(mask)


def _covers(path: str, ch: str) -> bool:
    if ch.isspace():
        return True
    glyph = _mask_bytes(path, ch)
    return bool(glyph) and glyph != _notdef(path)


@functools.cache
def _fallback_for(ch: str) -> str | None:
    """A font file covering ``ch``: the main candidates, then fontconfig's list for that code point."""
    for path in _primary_paths():
        if _covers(path, ch):
            return path
    for path in _fc("fc-list", f":charset={ord(ch):x}", "file"):
        path = path.rstrip(":").strip()
        if os.path.isfile(path) and _covers(path, ch):
            return path
    return None


def _runs(text: str) -> list[tuple[str | None, str]]:
    """Split ``text`` into ``(font path or None, substring)`` runs; uncovered characters become ``?``."""
    runs: list[tuple[str | None, str]] = []
    missing = []
    for ch in text:
        path = _fallback_for(ch)
        if path is None:
            if not _primary_paths() and ord(ch) < 128:
                pass  # Pillow's built-in font covers ASCII
            else:
                missing.append(ch)
                ch = "?"
                path = _fallback_for("?")
        if runs and runs[-1][0] == path:
            runs[-1] = (path, runs[-1][1] + ch)
        else:
            runs.append((path, ch))
    new = [c for c in missing if c not in _warned]
    if new:
        _warned.update(new)
        warnings.warn(
            f"no installed font can draw {''.join(new)!r} "
            f"({', '.join(f'U+{ord(c):04X}' for c in new)}); drawn as '?' in the overlay legend. "
            f"Install fonts that cover them, e.g. the Debian packages {_FONT_PACKAGES}.",
            UserWarning,
            stacklevel=3,
        )
    return runs


def _render_run(path: str | None, text: str, height: int) -> Image.Image:
    """``text`` drawn in black (colour glyphs in colour) on transparent RGBA, ``height`` px tall."""
    if path is None:
        font: ImageFont.ImageFont | ImageFont.FreeTypeFont = ImageFont.load_default(size=height)
        loaded = height
    else:
        font, loaded = _load(path, height) or (ImageFont.load_default(size=height), height)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (loaded, 0)
    width = max(1, int(font.getlength(text)) + 1)
    img = Image.new("RGBA", (width, max(1, ascent + descent)), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((0, 0), text, fill=(0, 0, 0, 255), font=font, embedded_color=True)
    target_h = max(1, round(height * (ascent + descent) / loaded))
    if img.height != target_h:
        img = img.resize((max(1, round(img.width * target_h / img.height)), target_h), Image.LANCZOS)
    return img


def render_text(text: str, height: int) -> Image.Image:
    """``text`` as a transparent RGBA strip whose em size is ``height`` pixels (see the module docstring)."""
    parts = [_render_run(path, run, height) for path, run in _runs(text)] or [_render_run(None, " ", height)]
    strip = Image.new("RGBA", (sum(p.width for p in parts), max(p.height for p in parts)), (0, 0, 0, 0))
    x = 0
    for part in parts:
        strip.alpha_composite(part, (x, 0))
        x += part.width
    return strip


def text_size(text: str, height: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`render_text` ``(text, height)``."""
    return render_text(text, height).size


def draw_text(canvas: Image.Image, xy: tuple[int, int], text: str, height: int) -> None:
    """Draw ``text`` onto the RGB ``canvas`` with its top-left corner at ``xy`` (em size ``height`` px)."""
    strip = render_text(text, height)
    canvas.paste(strip, xy, strip)
