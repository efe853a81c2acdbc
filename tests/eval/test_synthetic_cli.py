"""``python -m naclip.eval.synthetic``: a real command line that writes a dataset naclip eval reads."""

from __future__ import annotations

import contextlib
import runpy
import sys

import numpy as np
import pytest
from PIL import Image

from naclip.eval.datasets import EvalDataset
from naclip.eval.synthetic import main, make_synthetic_dataset


def test_help_prints_the_usage(monkeypatch, capsys):
    # as ``python -m naclip.eval.synthetic --help`` (its __main__ block), in this process
    monkeypatch.setattr(sys, "argv", ["python -m naclip.eval.synthetic", "--help"])
    monkeypatch.delitem(sys.modules, "naclip.eval.synthetic", raising=False)
    with pytest.raises(SystemExit) as info:
        runpy.run_module("naclip.eval.synthetic", run_name="__main__")
    out = capsys.readouterr().out
    assert info.value.code == 0 and "--dataset" in out and "--root" in out and "naclip eval" in out


@pytest.mark.parametrize("name", ["voc21", "cityscapes"])
def test_writes_what_the_reader_reads(tmp_path, capsys, name):
    argv = ["--dataset", name, "--root", str(tmp_path / "a"), "--num-images", "3", "--size", "20x30",
            "--size", "31x17", "--seed", "5"]  # fmt: skip
    assert main(argv) == 0
    assert "wrote 3" in capsys.readouterr().out
    ds = EvalDataset(name, tmp_path / "a")
    assert sorted(ds[i]["image"].shape for i in range(3)) == [(20, 30, 3), (20, 30, 3), (31, 17, 3)]
    expected = make_synthetic_dataset(name, tmp_path / "b", num_images=3, sizes=[(20, 30), (31, 17)], seed=5)
    stored = {s.id: np.asarray(Image.open(s.label_path)) for s in ds.samples}
    assert stored.keys() == expected.keys()
    assert all(np.array_equal(stored[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--dataset", "nope"], "unknown dataset", id="unknown-dataset"),
        pytest.param(["--dataset", "voc21", "--size", "0x4"], "expected HxW", id="bad-size"),
    ],
)
def test_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) if "--size" in argv else contextlib.nullcontext():  # argparse exits
        rc = main([*argv, "--root", str(tmp_path / "r")])
        assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
