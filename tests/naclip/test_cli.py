"""``naclip segment`` end to end with a tiny random open_clip CLIP (model config + checkpoint made in tmp)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from naclip import cli
from naclip.cli import main
from naclip.collection import MANIFEST_NAME
from naclip.io import voc_palette

TINY = "naclip-test-tiny"  # an open_clip model config registered from a JSON file (no weights download)
TINY_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``{"config": JSON path, "checkpoint": random-weights state dict path}`` of the tiny CLIP."""
    import open_clip

    d = tmp_path_factory.mktemp("tiny_model")
    cfg = d / f"{TINY}.json"
    cfg.write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    ckpt = d / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return {"config": str(cfg), "checkpoint": str(ckpt)}


def _image(path: Path, h: int = 48, w: int = 72, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _args(tiny: dict, *extra: str) -> list[str]:
    return [
        "--model-config", tiny["config"], "--model", TINY, "--checkpoint", tiny["checkpoint"],
        "--short-side", "48", "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip


def _written(out: Path) -> list[str]:
    """The file names in ``out``, without the run's manifest (its own tests are in test_collection.py)."""
    return sorted(p.name for p in out.iterdir() if p.name != MANIFEST_NAME)


def _segment(tiny: dict, inputs: list, out: Path, *extra: str) -> int:
    return main(["segment", *map(str, inputs), "--out", str(out), *_args(tiny, *extra)])


# ---------------------------------------------------------------------------------------------- happy path


def test_writes_mask_overlay_probs(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "a.png", 48, 72, 1)
    _image(src / "b.jpg", 60, 40, 2)
    (src / "notes.txt").write_text("not an image; skipped by the directory scan")
    out = tmp_path / "out"
    rc = _segment(tiny, [src], out, "--classes", "sky, cloud; tree; person", "--probs", "--mode", "slide")
    assert rc == 0, capsys.readouterr().err
    assert (out / MANIFEST_NAME).is_file()
    names = _written(out)
    assert names == sorted(f"{s}_{k}" for s in "ab" for k in ("mask.png", "overlay.png", "probs.npy"))
    for stem, (h, w) in {"a": (48, 72), "b": (60, 40)}.items():
        mask = Image.open(out / f"{stem}_mask.png")
        assert mask.mode == "P" and mask.size == (w, h)
        assert int(np.asarray(mask).max()) < 3
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.size[0] == w and overlay.size[1] > h  # legend strip below the image
        probs = np.load(out / f"{stem}_probs.npy")
        assert probs.shape == (3, h, w) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(probs.argmax(0), np.asarray(mask))
    err = capsys.readouterr().err
    assert "2 of 2 image(s) segmented" in err


def test_classes_file_equals_classes_string(tiny: dict, tmp_path: Path) -> None:
    """Same classes from a file (official format, trailing newline) and on the command line, on two attention
    backends: the same probabilities."""
    img = _image(tmp_path / "x.png")
    f = tmp_path / "classes.txt"
    f.write_text("sky, cloud\ntree\nperson\n")
    assert _segment(tiny, [img], tmp_path / "o1", "--classes", "sky, cloud; tree; person", "--probs") == 0
    rc = _segment(tiny, [img], tmp_path / "o2", "--classes-file", str(f), "--probs", "--backend", "reference")
    assert rc == 0
    p1, p2 = np.load(tmp_path / "o1/x_probs.npy"), np.load(tmp_path / "o2/x_probs.npy")
    assert p1.shape == (3, 48, 72)
    np.testing.assert_allclose(p1, p2, atol=1e-5, rtol=1e-5)


def test_preset_and_overrides(tiny: dict, tmp_path: Path) -> None:
    img = _image(tmp_path / "x.png")
    rc = _segment(tiny, [img], tmp_path / "o", "--preset", "voc21", "--no-pamr", "--no-overlay", "--probs")
    assert rc == 0
    assert _written(tmp_path / "o") == ["x_mask.png", "x_probs.npy"]
    assert np.load(tmp_path / "o/x_probs.npy").shape[0] == 21
    # a preset keeps its real background class 0 (black, VOC palette) and its threshold semantics
    assert np.array_equal(_palette(tmp_path / "o/x_mask.png"), voc_palette())
    assert set(np.unique(np.asarray(Image.open(tmp_path / "o/x_mask.png"))).tolist()) <= set(range(21))


def test_same_stem_inputs_get_distinct_outputs(tiny: dict, tmp_path: Path) -> None:
    a, b = _image(tmp_path / "p.png", seed=1), _image(tmp_path / "p.jpg", seed=2)
    assert _segment(tiny, [a, b, a], tmp_path / "o", "--classes", "a; b", "--no-overlay") == 0
    assert _written(tmp_path / "o") == ["p_jpg_mask.png", "p_png_mask.png"]


# ---------------------------------------------------------------------------------------------- user errors


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        pytest.param("sky;; tree", "empty", id="empty-class"),
        pytest.param("cat; dog; cat", "duplicate", id="duplicate"),
        pytest.param("sky, ; tree", "empty", id="empty-synonym"),
        pytest.param("", "at least one class", id="empty-list"),
    ],
)
def test_bad_classes_are_one_line_errors(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, classes: str, message: str
) -> None:
    img = _image(tmp_path / "x.png")
    assert _segment(tiny, [img], tmp_path / "o", "--classes", classes) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --classes: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing is written before the classes are valid


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--preset", "voc99"], "unknown preset 'voc99'", id="unknown-preset"),
        pytest.param(["--classes", "a", "--method", "magic"], "invalid choice: 'magic'", id="unknown-method"),
        pytest.param(
            ["--classes", "a", "--classes-file", "/nonexistent"], "not allowed with", id="two-sources"
        ),
        pytest.param(["--classes-file", "/nonexistent/c.txt"], "does not exist", id="missing-classes-file"),
    ],
)
def test_usage_errors(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, argv, message) -> None:
    img = _image(tmp_path / "x.png")
    assert _segment(tiny, [img], tmp_path / "o", *argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_input_and_version(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["segment", str(tmp_path / "missing.jpg"), "--classes", "a", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("naclip ")


def test_bad_file_among_good_files(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "in"
    src.mkdir()
    _image(src / "good1.png", seed=1)
    _image(src / "good2.jpg", seed=2)
    (src / "fake.png").write_bytes(b"this is not a PNG")
    data = (src / "good2.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 3])
    rc = _segment(tiny, [src], tmp_path / "out", "--classes", "a; b")
    assert rc == 1
    written = _written(tmp_path / "out")
    assert written == ["good1_mask.png", "good1_overlay.png", "good2_mask.png", "good2_overlay.png"]
    err = capsys.readouterr().err
    assert "2 of 4 image(s) segmented" in err and "2 failed:" in err
    assert "fake.png" in err and "truncated.jpg" in err and "Traceback" not in err


def test_max_pixels(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the limit applies to the file (64x64 = 4096 px) and the resized model input (40x40 -> 48x48 = 2304 px)
    small, big = _image(tmp_path / "small.png", 40, 40), _image(tmp_path / "big.png", 64, 64)
    assert _segment(tiny, [small, big], tmp_path / "o", "--classes", "a; b", "--max-pixels", "3000") == 1
    assert _written(tmp_path / "o") == ["small_mask.png", "small_overlay.png"]
    assert "big.png" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ file safety


def test_never_overwrites_an_input(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a = _image(tmp_path / "a.png", seed=1)
    victim = _image(tmp_path / "a_mask.png", seed=2)  # an input named like a's output, in the output dir
    before = victim.read_bytes()
    assert _segment(tiny, [a, victim], tmp_path, "--classes", "a; b") == 2
    err = capsys.readouterr().err
    assert "would overwrite an input" in err and "a_mask.png" in err
    assert victim.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "a_mask.png"]


def test_rerun_into_the_input_directory_skips_earlier_outputs(tiny: dict, tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    assert _segment(tiny, [tmp_path], tmp_path, "--classes", "a; b") == 0
    first = (tmp_path / "a_mask.png").read_bytes()
    assert _segment(tiny, [tmp_path], tmp_path, "--classes", "a; b") == 0  # a_mask/a_overlay are not inputs
    assert _written(tmp_path) == ["a.png", "a_mask.png", "a_overlay.png"]
    assert (tmp_path / "a_mask.png").read_bytes() == first


def test_outputs_are_atomic(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A writer that dies half-way leaves neither a partial file nor a temporary file behind."""
    img = _image(tmp_path / "x.png")
    out = tmp_path / "o"
    real_save = Image.Image.save

    def dying_save(self, fp, format=None, **kw):  # noqa: A002 - PIL's signature
        if format == "PNG" and self.mode == "RGB":  # the overlay (the mask is a palette image)
            fp.write(b"\x89PNG partial")
            raise OSError("disk full")
        return real_save(self, fp, format, **kw)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    assert _segment(tiny, [img], out, "--classes", "a; b") == 1
    assert _written(out) == ["x_mask.png"]
    assert "disk full" in capsys.readouterr().err
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert Image.open(out / "x_mask.png").size == (72, 48)


# ------------------------------------------------------------------------------------------------- offline


def test_offline_weights_error_is_one_clear_message(tmp_path: Path) -> None:
    """``python -m naclip``, no cached ViT-B-16/openai weights, HF_HUB_OFFLINE=1: exit 2, fast, one line."""
    img = _image(tmp_path / "x.png")
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "c")
    )
    env.pop("NACLIP_CHECKPOINT", None)
    proc = subprocess.run(
        [sys.executable, "-m", "naclip", "segment", str(img), "--classes", "a; b",
         "--out", str(tmp_path / "o"), "--no-progress"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1  # no retries
    assert "ViT-B-16" in err and "openai" in err and "--checkpoint" in err and "NACLIP_CHECKPOINT" in err
    assert not (tmp_path / "o").exists()


def test_no_network_without_hf_hub_offline_fails_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, no_network: dict
) -> None:
    """The README's promise without ``HF_HUB_OFFLINE``: one probe, no retries, the same one clear line."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    img = _image(tmp_path / "x.png")
    argv = ["segment", str(img), "--classes", "a; b", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Retry" not in err
    assert "No network" in err and "ViT-B-16" in err and "--checkpoint" in err and "NACLIP_CHECKPOINT" in err
    assert not (tmp_path / "o").exists()


def test_eval_and_score_are_registered() -> None:
    import naclip.cli.eval as eval_cli  # part of the package: a broken import must fail, not skip
    import naclip.cli.score as score_cli

    assert callable(eval_cli.add_parser) and callable(score_cli.add_parser)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"segment", "eval", "score"} <= set(sub.choices)


def test_broken_eval_import_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "naclip.cli.eval", None)  # import naclip.cli.eval -> ImportError
    monkeypatch.delattr(cli, "eval", raising=False)
    with pytest.raises(ImportError):
        cli.build_parser()


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_explicit_backend_is_passed_through(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, backend: str
) -> None:
    # an explicit --backend auto must reach the Segmenter as "auto" (not None, which would let
    # NACLIP_ATTN_BACKEND override it)
    from naclip.segmenter import Segmenter

    seen = {}

    def fake_from_pretrained(*args, **kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setenv("NACLIP_ATTN_BACKEND", "reference")
    monkeypatch.setattr(Segmenter, "from_pretrained", staticmethod(fake_from_pretrained))
    img = _image(tmp_path / "x.png")
    assert _segment(tiny, [img], tmp_path / "o", "--classes", "a", "--backend", backend) == 2
    assert "stop here" in capsys.readouterr().err
    assert seen["backend"] == backend


def test_choices_come_from_their_single_homes() -> None:
    import naclip_kernels.api
    from naclip import inference, methods, segmenter, strategies

    assert cli.MODES == inference.MODES
    assert cli.BACKENDS == naclip_kernels.api.BACKENDS
    assert tuple(segmenter.DTYPES) == cli.DTYPES
    assert tuple(dict.fromkeys([*methods.METHOD_NAMES, *strategies.STRATEGIES])) == cli.METHODS
    seg = next(a for a in cli.build_parser()._actions if a.dest == "command").choices["segment"]
    choices = {a.dest: a.choices for a in seg._actions if a.choices is not None}
    assert choices["method"] == cli.METHODS and choices["mode"] == cli.MODES
    assert choices["backend"] == cli.BACKENDS and choices["dtype"] == cli.DTYPES


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (cli.probability, "0.25", 0.25),
        (cli.probability, "1", 1.0),
        (cli.positive_int, "3", 3),
        (cli.non_negative_int, "0", 0),
    ],
    ids=["prob", "prob-one", "positive", "zero"],
)
def test_argparse_type_helpers_accept(parse, text: str, expected) -> None:
    assert parse(text) == expected


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [
        (cli.probability, "1.5", "expected a number in [0, 1], got '1.5'"),
        (cli.probability, "nan", "expected a number in [0, 1], got 'nan'"),
        (cli.probability, "x", "expected a number in [0, 1], got 'x'"),
        (cli.positive_int, "0", "expected an integer >= 1, got '0'"),
        (cli.positive_int, "2.5", "expected an integer >= 1, got '2.5'"),
        (cli.non_negative_int, "-1", "expected an integer >= 0, got '-1'"),
    ],
    ids=["prob-range", "prob-nan", "prob-text", "positive-zero", "positive-float", "non-negative"],
)
def test_argparse_type_helpers_reject(parse, text: str, message: str) -> None:
    import argparse

    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert str(info.value) == message


# ------------------------------------------------------------------------- early errors, before the model


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> list:
    """Fails the test if the model is loaded (every check below must come first)."""
    from naclip.segmenter import Segmenter

    calls: list = []

    def refuse(*args, **kw):
        calls.append(kw)
        raise AssertionError("the model was loaded before the input checks")

    monkeypatch.setattr(Segmenter, "from_pretrained", staticmethod(refuse))
    return calls


def _garbage(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image holds")
    return path


@pytest.mark.parametrize(
    ("make", "extra", "message"),
    [
        pytest.param(
            lambda d: _image(d / "tiny.png", 8, 40), [], "smaller than one 16x16 patch", id="below-patch"
        ),
        pytest.param(
            lambda d: _image(d / "wide.png", 20, 4000), [], "aspect ratio", id="resized-below-patch"
        ),
        pytest.param(
            lambda d: _image(d / "big.png", 64, 64),
            ["--max-pixels", "1000"],
            "above the limit",
            id="pixel-limit",
        ),  # fmt: skip
        pytest.param(lambda d: _garbage(d / "bad.png"), [], "not an image Pillow can read", id="unreadable"),
    ],
)
def test_bad_inputs_fail_before_the_model_loads(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, no_model: list, make, extra, message
) -> None:
    src = make(tmp_path)
    out = tmp_path / "new" / "out"
    assert _segment(tiny, [src], out, "--classes", "a; b", *extra) == 1
    err = capsys.readouterr().err
    assert message in err and src.name in err and "Traceback" not in err
    assert not no_model and not (tmp_path / "new").exists()


def test_bad_input_is_reported_before_the_model_loads(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from naclip.segmenter import Segmenter

    bad, good = _garbage(tmp_path / "bad.png"), _image(tmp_path / "good.png")
    real = Segmenter.from_pretrained.__func__
    seen_at_load: list[str] = []

    def spy(*args, **kw):
        seen_at_load.append(capsys.readouterr().err)
        return real(Segmenter, *args, **kw)

    monkeypatch.setattr(Segmenter, "from_pretrained", staticmethod(spy))
    assert _segment(tiny, [bad, good], tmp_path / "o", "--classes", "a; b", "--no-overlay") == 1
    assert "bad.png" in seen_at_load[0]
    assert _written(tmp_path / "o") == ["good_mask.png"]


def test_too_many_classes_for_a_palette_mask(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, no_model: list
) -> None:
    classes = "; ".join(f"class{i}" for i in range(256))
    assert _segment(tiny, [_image(tmp_path / "x.png")], tmp_path / "o", "--classes", classes) == 2
    err = capsys.readouterr().err
    assert "256 classes do not fit a palette PNG" in err and "255" in err
    assert not (tmp_path / "o").exists()


def test_out_below_a_file(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, no_model: list) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a directory is expected")
    assert _segment(tiny, [_image(tmp_path / "x.png")], blocker / "sub" / "out", "--classes", "a") == 2
    err = capsys.readouterr().err
    assert "cannot be created" in err and "file.txt" in err and "is a file" in err and "Traceback" not in err
    assert blocker.read_text().startswith("a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories (logic tested below)")
def test_read_only_parent_of_out(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, no_model) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert _segment(tiny, [_image(tmp_path / "x.png")], parent / "out", "--classes", "a") == 2
    finally:
        parent.chmod(0o755)
    err = capsys.readouterr().err
    assert "read-only" in err and "Traceback" not in err and not (parent / "out").exists()


def test_out_that_cannot_be_created_is_an_error_and_leaves_nothing(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the creation itself fails (a read-only file system, a permission the access check did not see): the
    # directories made on the way are removed again; works for root too
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kw):
        if Path(path).name == "out":
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    assert _segment(tiny, [_image(tmp_path / "x.png")], tmp_path / "a" / "out", "--classes", "a") == 2
    err = capsys.readouterr().err
    assert "cannot be created or written: Permission denied" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png"]


def test_failed_model_load_leaves_no_out_folder(
    tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    out = str(tmp_path / "n" / "o")
    argv = ["segment", str(_image(tmp_path / "x.png")), "--classes", "a", "--out", out, "--model-config",
            tiny["config"], "--model", TINY, "--checkpoint", str(bad), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "could not read checkpoint" in err and "weights_only" not in err
    assert not (tmp_path / "n").exists()


# ------------------------------------------------------------------------------------------ rough edges


def test_exif_orientation_is_applied_with_an_opt_out(tiny: dict, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8))  # stored 80 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes())
    assert _segment(tiny, [tmp_path / "phone.jpg"], tmp_path / "up", "--classes", "a; b") == 0
    assert Image.open(tmp_path / "up/phone_mask.png").size == (48, 80)  # upright: 48 wide, 80 high
    argv = ["--classes", "a; b", "--no-exif-orientation"]
    assert _segment(tiny, [tmp_path / "phone.jpg"], tmp_path / "raw", *argv) == 0
    assert Image.open(tmp_path / "raw/phone_mask.png").size == (80, 48)


def _palette(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).getpalette()[: 256 * 3], dtype=np.uint8).reshape(256, 3)


def test_user_classes_get_visible_colours_and_an_explicit_unknown(tiny: dict, tmp_path: Path) -> None:
    img = _image(tmp_path / "x.png")
    assert _segment(tiny, [img], tmp_path / "o", "--classes", "a; b", "--prob-thd", "1") == 0
    mask = Image.open(tmp_path / "o/x_mask.png")
    pal = _palette(tmp_path / "o/x_mask.png")
    assert (pal[:2] != 0).any(axis=1).all()  # no user class is black
    assert (pal[255] == 0).all()  # unknown is
    values = set(np.unique(np.asarray(mask)).tolist())
    assert values <= {0, 1, 255}


def test_threshold_goes_to_a_user_background_class(tiny: dict, tmp_path: Path) -> None:
    img = _image(tmp_path / "x.png")
    argv = ["--classes", "cat; backdrop, background; dog", "--prob-thd", "1", "--no-overlay"]
    assert _segment(tiny, [img], tmp_path / "o", *argv) == 0
    assert set(np.unique(np.asarray(Image.open(tmp_path / "o/x_mask.png"))).tolist()) <= {0, 1, 2}


def test_backend_default_lets_the_environment_choose(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from naclip.segmenter import Segmenter

    real = Segmenter.from_pretrained.__func__
    built: list = []

    def spy(*args, **kw):
        built.append(real(Segmenter, *args, **kw))
        return built[-1]

    monkeypatch.setenv("NACLIP_ATTN_BACKEND", "reference")
    monkeypatch.setattr(Segmenter, "from_pretrained", staticmethod(spy))
    assert _segment(tiny, [_image(tmp_path / "x.png")], tmp_path / "o", "--classes", "a", "--no-overlay") == 0
    assert built[0].visual.backend is None  # the library default, which reads NACLIP_ATTN_BACKEND
    from naclip_kernels import get_default_backend

    assert get_default_backend() == "reference"


def test_shared_options_reach_the_segmenter(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from naclip import io
    from naclip.segmenter import Segmenter

    seen: dict = {}
    real_predict, real_overlay = Segmenter.predict, io.render_overlay

    def predict(self, *args, **kw):
        seen.update(kw, gaussian_std=self.visual.gaussian_std)
        return real_predict(self, *args, **kw)

    def overlay(*args, **kw):
        seen["alpha"] = kw["alpha"]
        return real_overlay(*args, **kw)

    monkeypatch.setattr(Segmenter, "predict", predict)
    monkeypatch.setattr(io, "render_overlay", overlay)
    argv = ["--classes", "a; b", "--mode", "slide", "--crop", "32", "--stride", "16", "--gaussian-std", "2.5",
            "--alpha", "0.25"]  # fmt: skip
    assert _segment(tiny, [_image(tmp_path / "x.png")], tmp_path / "o", *argv) == 0
    assert (seen["crop"], seen["stride"], seen["gaussian_std"], seen["alpha"]) == (32, 16, 2.5, 0.25)


def test_segment_and_eval_share_one_home_for_their_options() -> None:
    from naclip.cli import eval as eval_cli
    from naclip.segmenter import SegmentConfig

    def actions(parser):
        return {a.dest: a for a in parser._actions}

    seg = actions(next(a for a in cli.build_parser()._actions if a.dest == "command").choices["segment"])
    ev = actions(eval_cli.build_parser())
    shared = ("mode", "pamr", "prob_thd", "short_side", "crop", "stride", "gaussian_std", "model",
              "pretrained", "checkpoint", "method", "device", "dtype", "backend")  # fmt: skip
    for dest in shared:
        assert seg[dest].default is None and ev[dest].default is None, dest
        assert seg[dest].help == ev[dest].help and seg[dest].choices == ev[dest].choices, dest
    cfg = SegmentConfig()
    assert (
        f"default {cfg.crop}" in seg["crop"].help
        and f"default {cfg.gaussian_std:g}" in seg["gaussian_std"].help
    )
