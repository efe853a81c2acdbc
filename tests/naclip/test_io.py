"""Image loading/conversion and the atomic writers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from naclip import io


def _rgb(h=5, w=7, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ PIL conversions


def test_pil_rgb_and_grayscale():
    a = _rgb()
    assert np.array_equal(io.load_image(Image.fromarray(a)), a)
    g = a[:, :, 0]
    out = io.load_image(Image.fromarray(g, mode="L"))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    assert all(np.array_equal(out[:, :, c], g) for c in range(3))
    b = io.load_image(Image.fromarray(g > 128))  # mode "1"
    assert set(np.unique(b)) <= {0, 255} and np.array_equal(b[:, :, 0] == 255, g > 128)


def test_pil_palette_and_transparency():
    idx = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(idx, mode="P")
    img.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    expected = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [40, 50, 60]]], dtype=np.uint8)
    assert np.array_equal(io.load_image(img), expected)
    img.info["transparency"] = 1
    assert np.array_equal(io.load_image(img), expected)  # transparency dropped, colours kept


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_dropped_not_composited(mode):
    a = _rgb()
    rgba = np.concatenate([a, np.zeros((5, 7, 1), np.uint8)], axis=2)  # fully transparent
    img = Image.fromarray(rgba, mode="RGBA")
    if mode == "LA":
        img = img.convert("LA")
        expected = np.repeat(np.asarray(img)[:, :, :1], 3, axis=2)
    else:
        expected = a
    assert np.array_equal(io.load_image(img), expected)


def test_16bit_png_file_scaled_to_8bit(tmp_path):
    a16 = np.array([[0, 257, 65535], [32768, 1000, 65280]], dtype=np.uint16)
    p = tmp_path / "g16.png"
    Image.fromarray(a16).save(p)
    with Image.open(p) as im:
        assert im.mode in ("I;16", "I")
    out = io.load_image(p)
    expected = np.floor(a16 / 257.0 + 0.5).astype(np.uint8)
    assert np.array_equal(out[:, :, 0], expected) and out[0, 2, 0] == 255 and out[0, 1, 0] == 1
    assert np.array_equal(io.load_image(Image.open(p).convert("I"))[:, :, 1], expected)


def test_float_pil_and_cmyk():
    f = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    out = io.load_image(Image.fromarray(f, mode="F"))
    assert np.array_equal(out[:, :, 2], np.array([[0, 128], [255, 64]], np.uint8))
    cmyk = Image.fromarray(_rgb()).convert("CMYK")
    assert io.load_image(cmyk).shape == (5, 7, 3)


def test_pil_int32_out_of_16bit_range_rejected():
    img = Image.fromarray(np.array([[0, 70000]], dtype=np.int32), mode="I")
    with pytest.raises(io.ImageLoadError, match="32-bit"):
        io.load_image(img)


# ------------------------------------------------------------------------------------------ numpy / torch


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda a: a, lambda a: a),
        (lambda a: a[:, :, 0], lambda a: np.repeat(a[:, :, :1], 3, 2)),
        (lambda a: a[:, :, :1], lambda a: np.repeat(a[:, :, :1], 3, 2)),
        (lambda a: np.concatenate([a, a[:, :, :1]], 2), lambda a: a),
        (lambda a: a.astype(np.uint16) * 257, lambda a: a),
        (lambda a: a.astype(np.float32) / 255.0, lambda a: a),
        (lambda a: a.astype(np.float64) / 255.0, lambda a: a),
        (lambda a: np.asfortranarray(a), lambda a: a),
    ],
    ids=["hwc-u8", "hw-u8", "hw1-u8", "hwc4-alpha", "u16", "f32-unit", "f64-unit", "fortran"],
)
def test_numpy_conversions(make, expected):
    a = _rgb()
    out = io.load_image(make(a))
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3) and out.flags.c_contiguous
    assert np.array_equal(out, expected(a))


@pytest.mark.parametrize(
    "make",
    [
        lambda a: torch.from_numpy(a).permute(2, 0, 1),
        lambda a: torch.from_numpy(a),
        lambda a: torch.from_numpy(a).permute(2, 0, 1)[None],
        lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255,
        lambda a: (torch.from_numpy(a).permute(2, 0, 1).float() / 255).to(torch.bfloat16).float(),
    ],
    ids=["chw-u8", "hwc-u8", "1chw-u8", "chw-float", "chw-float-roundtrip"],
)
def test_tensor_conversions(make):
    a = _rgb(6, 9)
    out = io.load_image(make(a))
    assert out.shape == (6, 9, 3) and out.dtype == np.uint8
    tol = 0 if make(a).dtype == torch.uint8 else 1  # bf16 round trip may move a grey level
    assert np.abs(out.astype(int) - a.astype(int)).max() <= tol


def test_tensor_gray_chw():
    t = torch.arange(12, dtype=torch.uint8).view(1, 3, 4)
    out = io.load_image(t)
    assert out.shape == (3, 4, 3) and np.array_equal(out[:, :, 2], t[0].numpy())


@pytest.mark.parametrize(
    "obj,exc,match",
    [
        (np.zeros((4, 4, 2), np.uint8), ValueError, "C = 1, 3 or 4"),
        (np.zeros((4,), np.uint8), ValueError, "H x W"),
        (np.zeros((0, 4, 3), np.uint8), ValueError, "empty"),
        (np.zeros((4, 4, 3), np.int64), TypeError, "unsupported dtype"),
        (np.zeros((4, 4, 3), bool), TypeError, "unsupported dtype"),
        (np.full((4, 4, 3), 2.0, np.float32), ValueError, r"\[0, 1\]"),
        (np.full((4, 4, 3), np.nan, np.float32), ValueError, "NaN"),
        (torch.zeros(2, 3, 4, 4), ValueError, "single image"),
        ([[1, 2]], TypeError, "expected a file path, PIL.Image"),
        (None, TypeError, "NoneType"),
    ],
    ids=["2ch", "1d", "empty", "int64", "bool", "float>1", "nan", "batch2", "list", "none"],
)
def test_bad_arrays(obj, exc, match):
    with pytest.raises(exc, match=match):
        io.load_image(obj)


# ------------------------------------------------------------------------------------------ files


def test_load_from_path_str_and_pathlike(tmp_path):
    a = _rgb(8, 6)
    p = tmp_path / "x.png"
    Image.fromarray(a).save(p)
    assert np.array_equal(io.load_image(p), a) and np.array_equal(io.load_image(str(p)), a)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        io.load_image(tmp_path / "nope.png")


def test_directory(tmp_path):
    with pytest.raises(io.ImageLoadError, match="directory"):
        io.load_image(tmp_path)


def test_non_image_file(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("hello, not an image")
    with pytest.raises(io.ImageLoadError, match="notes.jpg.*not an image"):
        io.load_image(p)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    p = tmp_path / f"full.{fmt.lower()}"
    Image.fromarray(_rgb(64, 64)).save(p, format=fmt)
    data = p.read_bytes()
    q = tmp_path / f"cut.{fmt.lower()}"
    q.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.ImageLoadError, match=f"cut.{fmt.lower()}"):
        io.load_image(q)


def test_pixel_limit(tmp_path):
    p = tmp_path / "big.png"
    Image.fromarray(_rgb(100, 100)).save(p)
    with pytest.raises(io.ImageTooLargeError, match="10,000 pixels.*5,000"):
        io.load_image(p, max_pixels=5000)
    with pytest.raises(io.ImageTooLargeError, match="limit"):
        io.load_image(_rgb(100, 100), max_pixels=5000)
    with pytest.raises(io.ImageTooLargeError):
        io.load_image(Image.fromarray(_rgb(100, 100)), max_pixels=5000)
    assert io.load_image(p, max_pixels=10_000).shape == (100, 100, 3)
    assert issubclass(io.ImageTooLargeError, ValueError)


def test_pillow_decompression_bomb_reported_clearly(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    Image.fromarray(_rgb(100, 100)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow errors above 2x this
    with pytest.raises(io.ImageTooLargeError, match="bomb.png"):
        io.load_image(p, max_pixels=None)


# ------------------------------------------------------------------------------------------ writers


def test_voc_palette_known_entries():
    pal = io.voc_palette()
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    known = {
        0: (0, 0, 0),
        1: (128, 0, 0),
        2: (0, 128, 0),
        3: (128, 128, 0),
        4: (0, 0, 128),
        8: (64, 0, 0),
        15: (192, 128, 128),
        20: (0, 64, 128),
        255: (224, 224, 192),
    }
    for i, c in known.items():
        assert tuple(pal[i]) == c, i
    assert len({tuple(c) for c in pal}) == 256


def test_save_mask_palette_png(tmp_path):
    labels = torch.tensor([[0, 1, 2], [20, 170, 255]])
    p = io.save_mask(tmp_path / "m.png", labels)
    with Image.open(p) as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), labels.numpy())
        assert im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]
    assert [f.name for f in tmp_path.iterdir()] == ["m.png"]


@pytest.mark.parametrize(
    "labels,path,match",
    [
        (np.array([[0, 256]]), "m.png", r"\[0, 255\]"),
        (np.array([[-1, 0]]), "m.png", r"\[0, 255\]"),
        (np.zeros((2, 2, 2), int), "m.png", "H x W"),
        (np.zeros((2, 2), np.float32), "m.png", "integers"),
        (np.zeros((2, 2), int), "m.jpg", ".png"),
    ],
    ids=["256", "negative", "3d", "float", "jpg"],
)
def test_save_mask_errors(tmp_path, labels, path, match):
    with pytest.raises((ValueError, TypeError), match=match):
        io.save_mask(tmp_path / path, labels)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_save_overlay_with_legend(tmp_path, ext):
    img = _rgb(40, 60)
    labels = np.zeros((40, 60), int)
    labels[:, 30:] = 2
    p = io.save_overlay(tmp_path / f"o{ext}", img, labels, ["background", "cat", "a rather long class name"])
    with Image.open(p) as im:
        assert im.size[0] == 60 and im.size[1] > 40  # legend strip below the image
        out = np.asarray(im.convert("RGB"))
    if ext == ".png":
        pal = io.voc_palette()
        blend = (img * 0.5 + pal[labels] * 0.5 + 0.5).astype(np.uint8)
        assert np.abs(out[:40].astype(int) - blend.astype(int)).max() <= 1
        assert (out[40:] != 255).any()  # something drawn in the legend


def test_overlay_legend_wraps_many_classes():
    names = [f"class number {i}" for i in range(30)]
    labels = np.arange(30).repeat(2).reshape(6, 10)
    canvas = io.render_overlay(_rgb(6, 10), labels, names)
    assert canvas.size[0] == 10 and canvas.size[1] > 6 + 30 * 10  # one legend row per class at this width


def test_save_overlay_errors(tmp_path):
    with pytest.raises(ValueError, match="extension"):
        io.save_overlay(tmp_path / "o.xyz", _rgb(), np.zeros((5, 7), int), ["a"])
    with pytest.raises(ValueError, match="does not match"):
        io.save_overlay(tmp_path / "o.png", _rgb(), np.zeros((4, 7), int), ["a"])
    with pytest.raises(ValueError, match="alpha"):
        io.save_overlay(tmp_path / "o.png", _rgb(), np.zeros((5, 7), int), ["a"], alpha=2)


def test_save_probs_npy(tmp_path):
    probs = torch.rand(3, 4, 5, dtype=torch.float64)
    p = io.save_probs(tmp_path / "p.npy", probs)
    back = np.load(p)
    assert back.dtype == np.float32 and np.allclose(back, probs.numpy(), atol=1e-7)
    with pytest.raises(ValueError, match=".npy"):
        io.save_probs(tmp_path / "p.bin", probs)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["p.npy"]


def test_atomic_write_replaces_and_cleans_up_on_failure(tmp_path):
    dest = tmp_path / "out.bin"
    io.atomic_write(dest, lambda f: f.write(b"first"))
    assert dest.read_bytes() == b"first"

    def failing(f):
        f.write(b"partial")
        raise RuntimeError("disk full (simulated)")

    with pytest.raises(RuntimeError, match="disk full"):
        io.atomic_write(dest, failing)
    assert dest.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    io.atomic_write(dest, lambda f: f.write(b"second"))
    assert dest.read_bytes() == b"second"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        io.atomic_write(tmp_path / "missing" / "x.bin", lambda f: f.write(b""))


def test_writers_never_overwrite_input(tmp_path):
    src = tmp_path / "photo.png"
    Image.fromarray(_rgb()).save(src)
    before = src.read_bytes()
    labels = np.zeros((5, 7), int)
    with pytest.raises(ValueError, match="refusing to overwrite the input"):
        io.save_mask(src, labels, protect=[src])
    with pytest.raises(ValueError, match="refusing"):
        io.save_overlay(tmp_path / "." / "photo.png", _rgb(), labels, ["a"], protect=[str(src)])
    link = tmp_path / "alias.png"
    os.link(src, link)  # same file under another name
    with pytest.raises(ValueError, match="refusing"):
        io.save_mask(link, labels, protect=[src])
    assert src.read_bytes() == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_atomic_write_new_file_mode_follows_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        dest = io.atomic_write(tmp_path / "new.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert oct(dest.stat().st_mode & 0o777) == oct(0o666 & ~umask)  # as open(path, "w"), not mkstemp's 0600


def test_atomic_write_keeps_mode_of_replaced_file(tmp_path):
    dest = tmp_path / "existing.bin"
    dest.write_bytes(b"old")
    dest.chmod(0o640)
    io.atomic_write(dest, lambda f: f.write(b"new"))
    assert dest.read_bytes() == b"new" and oct(dest.stat().st_mode & 0o777) == oct(0o640)


def test_public_writers_get_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = io.save_probs(tmp_path / "p.npy", torch.zeros(1, 2, 2))
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_no_redundant_load_image_alias():
    assert not hasattr(io, "to_rgb_uint8") and "to_rgb_uint8" not in io.__all__


# -------------------------------------------------------------------------- EXIF, palettes, legend fonts


def _oriented_jpeg(path, orientation: int, h: int = 6, w: int = 10):
    a = np.zeros((h, w, 3), np.uint8)
    a[0, 0] = (255, 0, 0)  # a marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=100, subsampling=0)
    return path


@pytest.mark.parametrize(("orientation", "shape"), [(1, (6, 10)), (3, (6, 10)), (6, (10, 6)), (8, (10, 6))])
def test_exif_orientation_applied_and_opt_out(tmp_path, orientation, shape):
    path = _oriented_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    up = io.load_image(path)
    assert up.shape[:2] == shape and io.probe_image(path) == shape
    stored = io.load_image(path, exif_orientation=False)
    assert stored.shape[:2] == (6, 10) and io.probe_image(path, exif_orientation=False) == (6, 10)
    # the marker moved where the tag says (6: rotate 90 clockwise -> top-left goes to the top-right)
    corner = {1: (0, 0), 3: (5, 9), 6: (0, 5), 8: (9, 0)}[orientation]
    assert up[corner][0] > 200 and up[corner][1] < 60


def test_probe_image_errors_like_load_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnothing")
    with pytest.raises(io.ImageLoadError, match="bad.png"):
        io.probe_image(bad)
    with pytest.raises(FileNotFoundError):
        io.probe_image(tmp_path / "missing.png")
    Image.fromarray(_rgb(40, 40)).save(tmp_path / "big.png")
    with pytest.raises(io.ImageTooLargeError, match="1,000"):
        io.probe_image(tmp_path / "big.png", max_pixels=1000)
    with pytest.raises(TypeError, match="exif_orientation"):
        io.load_image(tmp_path / "big.png", exif_orientation="yes")


def test_label_palettes():
    voc = io.voc_palette()
    assert np.array_equal(io.label_palette(background=True), voc)
    user = io.label_palette(background=False)
    assert np.array_equal(user[:255], voc[1:256]) and (user[:255] != 0).any(axis=1).all()
    assert (user[io.UNKNOWN_LABEL] == 0).all()


def test_save_mask_with_a_palette(tmp_path):
    labels = np.array([[0, 1], [255, 1]])
    pal = io.label_palette(background=False)
    with Image.open(io.save_mask(tmp_path / "m.png", labels, palette=pal)) as im:
        assert np.array_equal(np.asarray(im), labels)
        assert np.array_equal(np.asarray(im.getpalette()[:768], np.uint8).reshape(256, 3), pal)
    with pytest.raises(ValueError, match="palette"):
        io.save_mask(tmp_path / "x.png", labels, palette=pal[:10])


def test_legend_scales_with_the_image():
    small = io.render_overlay(_rgb(60, 80), np.zeros((60, 80), int), ["cat"])
    big = io.render_overlay(np.zeros((1200, 1600, 3), np.uint8), np.zeros((1200, 1600), int), ["cat"])
    assert io.legend_text_height(60, 80) == 12 and io.legend_text_height(1200, 1600) == 40
    assert big.size[1] - 1200 > 2.5 * (small.size[1] - 60)


def test_unknown_label_has_its_own_legend_entry():
    labels = np.zeros((30, 40), int)
    labels[:, 20:] = io.UNKNOWN_LABEL
    assert io._legend_name(io.UNKNOWN_LABEL, ["cat"]) == io.UNKNOWN_NAME
    with_unknown = io.render_overlay(
        _rgb(30, 40), labels, ["cat"], palette=io.label_palette(background=False)
    )
    assert with_unknown.size[1] > 30


def _ink(text: str, height: int = 32) -> np.ndarray:
    from naclip import _fonts

    return np.asarray(_fonts.render_text(text, height))[..., 3]


def test_legend_draws_accented_latin_with_a_real_glyph():
    from naclip import _fonts

    if not _fonts._primary_paths():
        pytest.skip("no scalable font installed (Pillow's built-in font only)")
    assert _fonts._fallback_for("é") is not None
    assert not np.array_equal(_ink("café"), _ink("caf?"))  # not the '?' of a missing glyph


@pytest.mark.parametrize("text", ["中文", "🦩"], ids=["cjk", "emoji"])
def test_legend_covers_other_scripts_or_says_why_not(text, recwarn):
    from naclip import _fonts

    fonts = {_fonts._fallback_for(ch) for ch in text}
    _fonts._warned.difference_update(text)
    strip = _ink(text)
    if None in fonts:  # no installed font covers it: a '?' and one clear warning naming the packages
        assert np.array_equal(strip, _ink("?" * len(text)))
        assert any("fonts-noto" in str(w.message) and text[0] in str(w.message) for w in recwarn.list)
    else:
        assert strip.any() and not np.array_equal(strip, _ink("?" * len(text)))
        assert not [w for w in recwarn.list if "no installed font" in str(w.message)]


def test_legend_without_any_covering_font_degrades_clearly(monkeypatch, recwarn):
    from naclip import _fonts

    real = _fonts._fallback_for
    monkeypatch.setattr(_fonts, "_fallback_for", lambda ch: None if ch == "\u4e2d" else real(ch))
    _fonts._warned.discard("\u4e2d")
    assert np.array_equal(_ink("a\u4e2d"), _ink("a?"))
    msgs = [str(w.message) for w in recwarn.list if "no installed font" in str(w.message)]
    assert len(msgs) == 1 and "U+4E2D" in msgs[0] and "fonts-noto-cjk" in msgs[0]
    _ink("\u4e2d")  # reported once per character, not per legend
    assert len([w for w in recwarn.list if "no installed font" in str(w.message)]) == 1
