"""The golden fixtures of ClearCLIP, SCLIP, ResCLIP and SC-CLIP (official code on the tiny ViT) replayed
through naclip's methods: every case on the torch backend, a small subset on Triton (interpreter on CPU)."""

from __future__ import annotations

import json

import pytest
from naclip_test_support import ADDONS_DIR, triton_skip_reason

from naclip.testing.replay_fixtures import main as replay_main
from naclip.testing.replay_fixtures import replay

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHOD_DIRS = ("clearclip", "sclip", "resclip", "scclip")


def _dir(name: str):
    d = ADDONS_DIR / name
    if not (d / "manifest.json").is_file():
        raise pytest.UsageError(f"add-on fixtures missing at {d} (set $NACLIP_ADDONS_DIR); they are required")
    return d


def _check(results, cases) -> None:
    bad = [r.line() for r in results if not r.passed]
    assert not bad, "\n".join(bad)
    by_id = {r.case_id: r for r in results}
    for case in cases:  # every stored output was compared; labels exactly
        res = by_id[case["id"]]
        assert set(case["outputs"]) <= set(res.diffs) | set(res.mismatched), case["id"]
        assert all(n == 0 for n in res.mismatched.values())
        assert res.max_abs_diff < 1e-4


@pytest.mark.parametrize("method", METHOD_DIRS)
def test_every_case_replays_on_torch(method: str) -> None:
    d = _dir(method)
    cases = json.loads((d / "manifest.json").read_text())["cases"]
    results = replay(d, "torch")
    assert len(results) == len(cases)
    _check(results, cases)


def test_non_square_scclip_runs_where_the_official_code_crashes() -> None:
    results = replay(_dir("scclip"), "torch", kinds=["dense_forward_raises"])
    assert len(results) == 2 and all(r.passed for r in results)
    assert all(r.mismatched == {"outlier_indices": 0} for r in results)  # the same LOF outliers as official


def test_cli_reports_the_addon_cases(capsys) -> None:
    assert (
        replay_main([str(_dir("clearclip")), "--backend", "torch", "--match", "dense/img_224x320_b1/*"]) == 0
    )
    out = capsys.readouterr().out
    assert "3 cases, 0 failed" in out and out.count("ok   dense/img_224x320_b1/") == 3


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize(
    ("method", "pattern"),
    [
        ("clearclip", "dense/img_320x224_b1/clearclip"),
        ("sclip", "dense/img_224x320_b1/csa"),
        ("resclip", "dense/img_224x320_b1/rcs_only/ade"),
        ("scclip", "dense/img_224x224_b2[[]0:1]/scclip/m2"),
    ],
    ids=["clearclip-320x224", "sclip-224x320", "resclip-rcs-224x320", "scclip-m2"],
)
def test_triton_subset(method: str, pattern: str) -> None:
    reason = triton_skip_reason()
    if reason:
        pytest.skip(reason)
    d = _dir(method)
    cases = [
        c
        for c in json.loads((d / "manifest.json").read_text())["cases"]
        if c["id"] == pattern.replace("[[]", "[")
    ]
    results = replay(d, "triton", match=pattern)
    assert len(results) == 1
    _check(results, cases)
