"""``naclip eval`` argument handling: what reaches ``Segmenter.from_pretrained`` (backend, dtype), the
shared choice lists, and the protected, atomic ``--save-pred`` writer."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from naclip.cli import eval as eval_cli
from naclip.eval.synthetic import make_synthetic_dataset


class _Stop(ValueError):
    pass


@pytest.fixture
def captured_from_pretrained(monkeypatch):
    """Replace Segmenter.from_pretrained by a recorder that stops the run (-> exit status 2)."""
    from naclip.segmenter import Segmenter

    calls: list[dict] = []

    def fake(*args, **kwargs):
        calls.append(kwargs)
        raise _Stop("stopped by the test")

    monkeypatch.setattr(Segmenter, "from_pretrained", staticmethod(fake))
    return calls


def _run(tmp_path: Path, extra: list[str]) -> int:
    make_synthetic_dataset("voc21", tmp_path / "data", num_images=1)
    argv = ["--dataset", "voc21", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    return eval_cli.main(argv + ["--no-progress", "--device", "cpu"] + extra)


@pytest.mark.parametrize(
    "extra,expected",
    [([], None), (["--backend", "auto"], "auto"), (["--backend", "torch"], "torch")],
    ids=["unset", "explicit-auto", "torch"],
)
def test_backend_reaches_segmenter(tmp_path, monkeypatch, captured_from_pretrained, extra, expected):
    """An explicit --backend auto is passed as "auto" (so NACLIP_ATTN_BACKEND cannot override it); without
    the flag the library default (None: the env var, else auto) applies."""
    monkeypatch.setenv("NACLIP_ATTN_BACKEND", "reference")
    assert _run(tmp_path, extra) == 2
    assert captured_from_pretrained[-1]["backend"] == expected


@pytest.mark.parametrize(
    "extra,expected",
    [([], None), (["--dtype", "fp16"], torch.float16), (["--dtype", "bf16"], torch.bfloat16)],
    ids=["unset", "fp16", "bf16"],
)
def test_dtype_reaches_segmenter(tmp_path, captured_from_pretrained, extra, expected):
    assert _run(tmp_path, extra) == 2
    assert captured_from_pretrained[-1]["dtype"] == expected


def test_choice_lists_are_the_libraries():
    from naclip.inference import MODES
    from naclip.methods import METHOD_NAMES
    from naclip.segmenter import dtype_name, resolve_dtype
    from naclip.strategies import STRATEGIES
    from naclip_kernels.api import BACKENDS

    actions = {a.dest: a for a in eval_cli.build_parser()._actions}
    assert tuple(actions["mode"].choices) == tuple(MODES)
    assert tuple(actions["backend"].choices) == tuple(BACKENDS)
    assert set(actions["method"].choices) == set(METHOD_NAMES) | set(STRATEGIES)
    assert tuple(actions["method"].choices[: len(METHOD_NAMES)]) == METHOD_NAMES
    names = {resolve_dtype(n): n for n in actions["dtype"].choices}
    assert names == {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    assert all(dtype_name(dt) == n for dt, n in names.items())


def test_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        eval_cli.build_parser().parse_args(["--dataset", "voc21", "--root", "x", "--method", "naclipp"])
    assert exc.value.code == 2
    assert "--method: invalid choice: 'naclipp'" in capsys.readouterr().err


def _fake_dataset(tmp_path: Path):
    img, lab = tmp_path / "img", tmp_path / "lab"
    img.mkdir()
    lab.mkdir()
    sample = types.SimpleNamespace(image_path=img / "a.png", label_path=lab / "a.png")
    sample.image_path.write_bytes(b"image")
    sample.label_path.write_bytes(b"label")
    return types.SimpleNamespace(samples=[sample]), sample


def test_save_pred_writes_atomically(tmp_path):
    dataset, _ = _fake_dataset(tmp_path)
    write = eval_cli._label_png_writer(str(tmp_path / "pred"), dataset)
    labels = torch.tensor([[0, 3], [255, 7]])
    write({"index": 0, "stem": "a"}, labels)
    files = sorted(p.name for p in (tmp_path / "pred").iterdir())
    assert files == ["a.png"]  # no temporary file left behind
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "pred" / "a.png")), labels.numpy())


@pytest.mark.parametrize("which", ["image_path", "label_path"])
def test_save_pred_never_overwrites_an_input(tmp_path, which):
    dataset, sample = _fake_dataset(tmp_path)
    target = getattr(sample, which)
    write = eval_cli._label_png_writer(str(target.parent), dataset)
    with pytest.raises(ValueError, match="refusing to overwrite the input file"):
        write({"index": 0, "stem": "a"}, torch.zeros(2, 2, dtype=torch.long))
    assert target.read_bytes() == (b"image" if which == "image_path" else b"label")
