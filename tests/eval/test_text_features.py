"""``naclip eval`` and the text features: encoded (with a progress bar) before the image bar starts, taken
from the on-disk cache on a second run, ``--templates`` part of the run's fingerprint (tiny random model)."""

from __future__ import annotations

import json

import pytest

from naclip.cli import main as naclip_main
from naclip.eval import runner
from naclip.eval.synthetic import make_synthetic_dataset
from naclip.text_tower import TextEncoder

FAST = [
    "--no-pamr",
    "--short-side",
    "48",
    "--crop",
    "32",
    "--stride",
    "16",
    "--prob-thd",
    "0",
    "--workers",
    "0",
]


@pytest.fixture
def events(monkeypatch):
    """``"text"`` per text-tower call and ``"images"`` when the image loop (and its bar) starts."""
    seen: list[str] = []
    real_encode, real_evaluate = TextEncoder.encode, runner.evaluate

    def encode(self, tokens):
        seen.append("text")
        return real_encode(self, tokens)

    def evaluate(*a, **kw):
        seen.append("images")
        return real_evaluate(*a, **kw)

    monkeypatch.setattr(TextEncoder, "encode", encode)
    monkeypatch.setattr(runner, "evaluate", evaluate)
    return seen


def _eval(tmp_path, tiny_model_args, out: str, *extra: str) -> list[str]:
    root = tmp_path / "data"
    if not root.exists():
        make_synthetic_dataset("voc20", root, num_images=1, sizes=[(40, 56)], seed=0)
    argv = ["eval", "--dataset", "voc20", "--root", str(root), "--out", str(tmp_path / out)]
    return argv + tiny_model_args + FAST + list(extra)


def test_text_encoded_before_the_image_bar_and_cached(tmp_path, tiny_model_args, events, monkeypatch, capsys):
    monkeypatch.setenv("NACLIP_CACHE_DIR", str(tmp_path / "cache"))
    assert naclip_main(_eval(tmp_path, tiny_model_args, "a", "--progress")) == 0
    assert events and events[-1] == "images" and set(events[:-1]) == {"text"}
    err = capsys.readouterr().err
    assert "text features" in err  # 20 queries: a bar even under 32 queries
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["timing"]["text_features_s"] > 0
    events.clear()
    assert naclip_main(_eval(tmp_path, tiny_model_args, "b", "--progress")) == 0
    assert events == ["images"]  # all 20 queries from the disk cache
    assert "text features" not in capsys.readouterr().err
    events.clear()
    assert naclip_main(_eval(tmp_path, tiny_model_args, "c", "--no-progress", "--no-text-cache")) == 0
    assert events[0] == "text"


def test_templates_enter_the_fingerprint(tmp_path, tiny_model_args, capsys):
    f = tmp_path / "t.txt"
    f.write_text("a photo of a {}.\n")
    assert naclip_main(_eval(tmp_path, tiny_model_args, "a", "--no-progress", "--templates", str(f))) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["config"]["templates"].startswith(str(f)) and "sha256" in res["config"]["templates"]
    argv = _eval(tmp_path, tiny_model_args, "a", "--no-progress", "--templates", "photo")
    assert naclip_main(argv) == 2  # the same --out with other templates: refused, not mixed
    assert "templates" in capsys.readouterr().err
    assert naclip_main(_eval(tmp_path, tiny_model_args, "p", "--paper", "--templates", "photo")) == 2
