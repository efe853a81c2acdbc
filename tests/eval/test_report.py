"""naclip.eval.report: environment / git metadata (the helper the benchmarks share) and atomic outputs."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from naclip.eval import report


def test_git_state_unknown_when_git_fails(monkeypatch):
    def broken(*a, **kw):
        raise OSError("no git here")

    monkeypatch.setattr(report.subprocess, "run", broken)
    assert report.git_state() == {"git_sha": None, "git_dirty": None}  # not "dirty": unknown


def test_git_state_unknown_when_status_fails(monkeypatch):
    real = subprocess.run

    def flaky(cmd, *a, **kw):
        if cmd[:2] == ["git", "status"]:
            return subprocess.CompletedProcess(cmd, 128, stdout="", stderr="fatal")
        return real(cmd, *a, **kw)

    monkeypatch.setattr(report.subprocess, "run", flaky)
    st = report.git_state()
    assert st["git_dirty"] is None
    if st["git_sha"] is not None:  # a source checkout
        assert len(st["git_sha"]) == 40


def test_naclip_version_prefers_dunder_version(monkeypatch):
    import naclip

    monkeypatch.setattr(naclip, "__version__", "9.8.7", raising=False)
    assert report.naclip_version() == "9.8.7"
    monkeypatch.delattr(naclip, "__version__", raising=False)
    monkeypatch.setattr(report, "_dist_version", lambda dist: f"meta-{dist}")
    assert report.naclip_version() == "meta-naclip"


def test_environment_info_keys():
    env = report.environment_info("cpu")
    assert set(env) == {"versions", "git_sha", "git_dirty"}
    assert env["versions"]["torch"] and env["versions"]["python"]


def test_write_outputs_atomic_and_complete(tmp_path):
    from naclip.eval.metrics import compute_metrics

    hist = np.zeros((256, 256), dtype=np.int64)
    hist[0, 0], hist[1, 1], hist[1, 0] = 5, 3, 2
    import torch

    metrics = compute_metrics(torch.from_numpy(hist), 2)
    res = report.build_results(
        dataset="voc21",
        title="T",
        split="val",
        root="r",
        class_names=["a", "b"],
        metrics=metrics,
        num_images=1,
        config={},
        run={},
        timing={},
        env=report.environment_info(None),
    )
    paths = report.write_outputs(tmp_path, res, hist)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion.npy", "results.json", "results.md"]
    assert json.loads(paths["json"].read_text())["mIoU"] == pytest.approx(res["mIoU"])
    np.testing.assert_array_equal(np.load(paths["confusion"]), hist)
