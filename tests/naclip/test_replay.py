"""Fixture replay: the golden fixtures through the public API, on every backend, and its failure reporting."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from naclip.inference import CLIP_MEAN, CLIP_STD, normalize
from naclip.testing.replay_fixtures import (
    CASE_KINDS,
    CaseResult,
    FixturesError,
    load_manifest,
    replay,
    summary_line,
)
from naclip.testing.replay_fixtures import main as replay_main

SUMMARY = re.compile(r"^(\d+) cases, (\d+) failed, max abs diff (\S+)$", re.M)


def _run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "naclip.testing.replay_fixtures", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _assert_all_passed(results: list[CaseResult], expected_count: int) -> None:
    bad = [r.line() for r in results if not r.passed]
    assert not bad, "\n".join(bad)
    assert len(results) == expected_count
    assert max(r.max_abs_diff for r in results) < 1e-4


# ------------------------------------------------------------------------------------------- shared fixtures


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_all_cases_pass(fixtures_dir: Path, manifest: dict, backend: str) -> None:
    results = replay(fixtures_dir, backend)
    _assert_all_passed(results, len(manifest["cases"]))
    assert {r.kind for r in results} == set(CASE_KINDS) - {"dense_forward_raises"}  # add-on kind only
    # labels are compared exactly and reported per case
    preds = [r for r in results if r.kind == "pipeline"]
    assert preds and all(r.mismatched == {"pred": 0} for r in preds)
    # every stored output of every case was compared
    by_id = {r.case_id: r for r in results}
    for case in manifest["cases"]:
        compared = set(by_id[case["id"]].diffs) | set(by_id[case["id"]].mismatched)
        assert set(case["outputs"]) <= compared, case["id"]


@pytest.mark.slow
@pytest.mark.triton
def test_triton_subset(fixtures_dir: Path) -> None:
    """Triton (interpreter on CPU, slow): every strategy on the 5x7 kernel cases (with attention matrices),
    the non-square head_dim-32 kernel cases, a transposed-image dense case and the sliding-window pipeline."""
    results = []
    for kind, pattern in [
        ("kernel", "kernel/k_e128_h2_g5x7_b2/*"),
        ("kernel", "kernel/k_e64_h2_g14x20_b1/*"),
        ("dense_forward", "dense/img_320x224_b1/reduced/naclip/std5"),
        ("pipeline", "pipeline/p_slide_nopamr"),
    ]:
        results += replay(fixtures_dir, "triton", kinds=[kind], match=pattern)
    bad = [r.line() for r in results if not r.passed]
    assert not bad, "\n".join(bad)
    assert len(results) == 7 + 5 + 1 + 1


@pytest.mark.slow
@pytest.mark.triton
def test_cli_triton_sets_up_the_interpreter(fixtures_dir: Path) -> None:
    """Without TRITON_INTERPRET in the environment, ``--backend triton`` on CPU still works (the interpreter
    mode must be chosen before triton is imported, which importing naclip/open_clip already does)."""
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("a GPU machine compiles the kernel; the interpreter set-up is for CPU-only machines")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "naclip.testing.replay_fixtures", str(fixtures_dir), "--backend", "triton",
         "--match", "kernel/k_e128_h2_g5x7_b2/naclip/*"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert SUMMARY.search(proc.stdout).group(1, 2) == ("2", "0")


def test_cli_exit_zero_and_summary(fixtures_dir: Path) -> None:
    proc = _run_cli(str(fixtures_dir), "--backend", "torch", "--kinds", "gaussian_bias", "pamr", "pos_embed")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 + 3 + 2 + 1  # one line per case + the summary
    assert any(ln.startswith("ok   bias/g5x7/std5  max abs diff ") for ln in lines)
    assert lines[-1] == SUMMARY.search(proc.stdout).group(0)
    m = SUMMARY.search(proc.stdout)
    assert m and m.group(1) == "6" and m.group(2) == "0" and float(m.group(3)) < 1e-4


def test_missing_directory_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert replay_main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: fixtures directory") and "does not exist" in err and "Traceback" not in err
    with pytest.raises(FixturesError, match="no manifest.json"):
        replay(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(FixturesError, match="cannot read"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"cases": [{"kind": "pamr"}]}))
    with pytest.raises(FixturesError, match="case #0 lacks"):
        load_manifest(tmp_path)


def test_bad_arguments(fixtures_dir: Path) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        replay(fixtures_dir, "cuda")
    with pytest.raises(ValueError, match="unknown"):
        replay(fixtures_dir, "torch", kinds=["dense"])
    with pytest.raises(FixturesError, match="no case selected"):
        replay(fixtures_dir, "torch", match="no-such-case*")


# ------------------------------------------------------------------------------------------ modified copies


def _copy_fixtures(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


def _tweak(path: Path, key: str, fn) -> None:
    tensors = load_file(str(path))
    tensors[key] = fn(tensors[key].clone())
    save_file(tensors, str(path))


def test_corrupted_tensor_fails_and_names_the_case(fixtures_dir: Path, tmp_path: Path) -> None:
    d = _copy_fixtures(fixtures_dir, tmp_path / "fx")
    bad_id = "kernel/k_e128_h2_g5x7_b2/kk"

    def bump(t):
        t[1, 7, 3] += 5e-3  # one element, far above atol + rtol*|x|
        return t

    _tweak(d / "kernel_cases.safetensors", f"{bad_id}/out", bump)
    proc = _run_cli(str(d), "--kinds", "kernel", "--match", "kernel/k_e128_h2_g5x7_b2/*")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fails = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL")]
    assert len(fails) == 1 and bad_id in fails[0] and "exceeds tolerance: out" in fails[0]
    assert re.search(r"max abs diff 0\.005", fails[0])
    m = SUMMARY.search(proc.stdout)
    assert m and m.group(1) == "7" and m.group(2) == "1"


def test_label_mismatch_is_counted(fixtures_dir: Path, tmp_path: Path) -> None:
    d = _copy_fixtures(fixtures_dir, tmp_path / "fx")

    def flip(t):
        t[0, :2, :5] = (t[0, :2, :5] + 1) % 3
        return t

    _tweak(d / "pipeline_cases.safetensors", "p_whole_pamr_syn/pred", flip)
    (res,) = replay(d, "torch", kinds=["pipeline"], match="pipeline/p_whole_pamr_syn")
    assert not res.passed and res.mismatched == {"pred": 10}
    assert "pred mismatched pixels 10" in res.line()


def test_erroring_case_is_reported_and_run_continues(
    fixtures_dir: Path, tmp_path: Path, manifest: dict
) -> None:
    d = _copy_fixtures(fixtures_dir, tmp_path / "fx")
    m = json.loads(json.dumps(manifest))
    cases = [c for c in m["cases"] if c["kind"] == "gaussian_bias"]
    broken = json.loads(json.dumps(cases[0]))
    broken["id"] = "bias/broken"
    broken["outputs"]["addition"] = "bias/does-not-exist"
    m["cases"] = [broken, *cases]
    (d / "manifest.json").write_text(json.dumps(m))
    results = replay(d, "torch")
    assert [r.passed for r in results] == [False, True, True, True]
    assert results[0].error and "bias/does-not-exist" in results[0].error
    assert summary_line(results).startswith("4 cases, 1 failed, max abs diff ")


def test_manifest_tolerance_is_honoured(fixtures_dir: Path, tmp_path: Path, manifest: dict) -> None:
    d = _copy_fixtures(fixtures_dir, tmp_path / "fx")
    m = json.loads(json.dumps(manifest))
    rec = m["tolerances"]["recommended"]
    key = next(k for k in rec if k.startswith("fp32"))
    rec[key] = {"atol": 1e-12, "rtol": 0.0}
    (d / "manifest.json").write_text(json.dumps(m))
    results = replay(d, "torch", kinds=["gaussian_bias", "pos_embed"])
    # the Gaussian differs from the official float32 conv construction by ~1e-7; the pos-embed is bit-exact
    passed = {r.case_id: r.passed for r in results}
    assert passed == {"posembed/224x320": True, "bias/g5x7/std5": False, "bias/g5x7/std1.5": False,
                      "bias/g14x20/std5": False}  # fmt: skip


# ------------------------------------------------------------------ a different model: nothing is hard-coded


def _synthetic_fixtures(root: Path, *, width=96, heads=3, layers=2, patch=8, res=64, out_dim=24) -> Path:
    """A fixtures directory for another tiny ViT (head_dim 32, patch 8), with oracles independent of naclip:

    * ``dense_forward`` ``vanilla/vanilla`` at the native grid = the stock open_clip tower on all tokens;
    * ``gaussian_bias`` written out element by element from the formula.
    """
    from open_clip.transformer import QuickGELU, VisionTransformer

    torch.manual_seed(0)
    vt = VisionTransformer(
        image_size=res, patch_size=patch, width=width, layers=layers, heads=heads, mlp_ratio=4.0,
        output_dim=out_dim, act_layer=QuickGELU,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in vt.parameters():
            p.normal_(0, 0.2)
    weights = {f"visual.{k}": v.contiguous() for k, v in vt.state_dict().items()}
    images = torch.randint(0, 256, (2, 3, res, res), dtype=torch.uint8)
    x = normalize(images.float())
    with torch.no_grad():
        t = vt.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([vt.class_embedding.expand(2, 1, width), t], 1) + vt.positional_embedding
        t = vt.transformer(vt.ln_pre(t))
        dense = vt.ln_post(t) @ vt.proj
    gh = gw = res // patch
    n = gh * gw
    g = torch.zeros(1 + n, 1 + n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            dr, dc = i // gw - j // gw, i % gw - j % gw
            g[1 + i, 1 + j] = torch.exp(
                torch.tensor(-(dr * dr + dc * dc) / (2 * 2.0**2), dtype=torch.float64)
            )
    root.mkdir()
    save_file(weights, str(root / "weights.safetensors"))
    save_file(
        {"img/image_uint8_rgb": images, "dense/vv/dense": dense.contiguous(), "bias/g/addition": g.float()},
        str(root / "cases.safetensors"),
    )
    manifest = {
        "model": {
            "input_resolution": res, "patch_size": patch, "width": width, "layers": layers, "heads": heads,
            "head_dim": width // heads, "output_dim": out_dim, "mlp_ratio": 4,
        },
        "conventions": {"image_normalisation": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}},
        "tolerances": {"recommended": {"fp32": {"atol": 1e-4, "rtol": 1e-4}}},
        "cases": [
            {
                "kind": "dense_forward", "id": "dense/vv", "file": "cases.safetensors", "arch": "vanilla",
                "attn_strategy": "vanilla", "gaussian_std": None, "image_hw": [res, res], "batch": 1,
                "grid_hw": [gh, gw], "inputs": {"image": "img/image_uint8_rgb [first 1 of batch]"},
                "outputs": {"dense": "dense/vv/dense"},
            },
            {
                "kind": "gaussian_bias", "id": "bias/g", "file": "cases.safetensors", "grid_hw": [gh, gw],
                "gaussian_std": 2.0, "outputs": {"addition": "bias/g/addition"},
            },
        ],
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_other_model_config_and_batch_suffix(tmp_path: Path) -> None:
    root = _synthetic_fixtures(tmp_path / "syn")
    # the stored dense output has batch 2; the input takes the first image only: a shape mismatch, caught
    results = replay(root, "torch")
    assert results[1].passed, results[1].line()
    assert not results[0].passed and "shape" in results[0].line()
    # store the batch-1 output: now it must pass
    _tweak(root / "cases.safetensors", "dense/vv/dense", lambda t: t[:1].contiguous())
    results = replay(root, "torch")
    assert all(r.passed for r in results), [r.line() for r in results]
    # the head count comes from the manifest: with 2 heads (head_dim 48) the same weights give other numbers
    m = json.loads((root / "manifest.json").read_text())
    m["model"]["heads"], m["model"]["head_dim"] = 2, 48
    (root / "manifest.json").write_text(json.dumps(m))
    results = replay(root, "torch")
    assert [r.passed for r in results] == [False, True]
    assert results[0].error is None and results[0].failures == ["dense"]
    # a model block that does not fit the weights errors on the model cases only, with the reason
    m["model"]["width"], m["model"]["head_dim"] = 64, 32
    (root / "manifest.json").write_text(json.dumps(m))
    results = replay(root, "torch")
    assert [r.passed for r in results] == [False, True]
    assert results[0].error and "does not match" in results[0].error


@pytest.mark.parametrize("key", ["mean", "std"])
def test_manifest_normalisation_must_equal_clip_constants(tmp_path: Path, key: str) -> None:
    root = _synthetic_fixtures(tmp_path / "syn")
    m = json.loads((root / "manifest.json").read_text())
    m["conventions"]["image_normalisation"][key][1] += 0.5
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        FixturesError, match=rf"image_normalisation\.{key}: expected naclip\.inference\.CLIP_"
    ):
        replay(root, "torch")


@pytest.mark.parametrize("device", ["cpu"])
def test_results_are_streamed(fixtures_dir: Path, device: str) -> None:
    seen: list[str] = []
    results = replay(
        fixtures_dir, "torch", kinds=["pamr"], device=device, on_result=lambda r: seen.append(r.case_id)
    )
    assert seen == [r.case_id for r in results] == ["pamr/pamr_10_8_16", "pamr/pamr_50_vis"]
