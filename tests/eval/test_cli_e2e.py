"""Stub-free end to end: ``naclip eval`` / ``naclip score`` with a real (tiny, random-init) open_clip model
wrapped in naclip.Segmenter, on synthetic datasets in all 8 layouts; metrics checked exactly against an
independent per-class computation from the labels on disk and the Segmenter's own predictions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from naclip.cli import main as naclip_main
from naclip.eval.datasets import DATASETS, EvalDataset
from naclip.eval.paper import PAPER_MIOU
from naclip.eval.synthetic import make_synthetic_dataset
from naclip.presets import get_preset

SIZES = [(40, 56), (48, 37), (35, 47)]
#: Small settings so a CPU run takes seconds: short side 48, 32x32 windows at stride 16 (several windows).
FAST = ["--no-pamr", "--short-side", "48", "--crop", "32", "--stride", "16", "--prob-thd", "0"]


def _ground_truth(name: str, root: Path) -> tuple[EvalDataset, list[np.ndarray]]:
    """Ground truth read and converted here (not by the reader), in the reader's sample order."""
    ds = EvalDataset(name, root)  # only for the file list
    gts = []
    for s in ds.samples:
        stored = np.array(Image.open(s.label_path)).astype(np.int64)
        if DATASETS[name].reduce_zero_label:
            stored = np.where((stored == 0) | (stored == 255), 255, stored - 1)
        gts.append(stored)
    return ds, gts


def _segment(seg, ds: EvalDataset, name: str, **predict_kw) -> list[np.ndarray]:
    out = []
    for s in ds.samples:
        image = np.array(Image.open(s.image_path).convert("RGB"))
        out.append(seg.predict(image, preset=name, **predict_kw).labels.numpy())
    return out


def _per_class_percent(gts, preds, c):
    """IoU / Acc per class in percent from boolean masks (NaN where undefined), aAcc."""
    inter = np.zeros(c)
    lab = np.zeros(c)
    prd = np.zeros(c)
    for gt, pred in zip(gts, preds, strict=True):
        valid = gt != 255
        for k in range(c):
            g, p = (gt == k), (pred == k) & valid
            inter[k] += (g & p).sum()
            lab[k] += g.sum()
            prd[k] += p.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = 100 * inter / (lab + prd - inter)
        acc = 100 * inter / lab
    return iou, acc, 100 * inter.sum() / lab.sum()


def _check_results(res: dict, gts, preds, name: str):
    c = DATASETS[name].num_classes
    iou, acc, aacc = _per_class_percent(gts, preds, c)
    names = list(get_preset(name).class_names)
    assert list(res["per_class"]) == names
    got_iou = np.array([np.nan if v is None else v for v in res["per_class"].values()])
    got_acc = np.array([np.nan if v is None else v for v in res["per_class_acc"].values()])
    np.testing.assert_allclose(got_iou, iou, rtol=1e-12, atol=0, equal_nan=True)
    np.testing.assert_allclose(got_acc, acc, rtol=1e-12, atol=0, equal_nan=True)
    assert res["mIoU"] == pytest.approx(float(np.nanmean(iou)), rel=1e-12)
    assert res["mAcc"] == pytest.approx(float(np.nanmean(acc)), rel=1e-12)
    assert res["aAcc"] == pytest.approx(float(aacc), rel=1e-12)
    assert np.isfinite(iou).sum() >= 2, "degenerate case: too few defined classes to test anything"


#: Layouts whose saved predictions are also compared with the reference Segmenter (the others only with
#: the saved masks, to keep the text encoding of 150-171 classes out of the reference).
CHECK_MODEL = {"context59", "cityscapes"}


@pytest.mark.parametrize("name", list(DATASETS), ids=list(DATASETS))
def test_eval_end_to_end_every_layout(tmp_path, tiny_model_args, tiny_segmenter, name, capsys):
    root, out, pred_dir = tmp_path / "data", tmp_path / "out", tmp_path / "pred"
    make_synthetic_dataset(name, root, num_images=3, sizes=SIZES, seed=len(name))
    argv = ["eval", "--dataset", name, "--root", str(root), "--out", str(out), "--workers", "0"]
    argv += ["--save-pred", str(pred_dir), "--no-progress"]
    rc = naclip_main(argv + tiny_model_args + FAST)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads((out / "results.json").read_text())
    ds, gts = _ground_truth(name, root)
    preds = [np.array(Image.open(pred_dir / f"{s.stem}.png")).astype(np.int64) for s in ds.samples]
    _check_results(res, gts, preds, name)
    if name in CHECK_MODEL:
        ref = _segment(tiny_segmenter, ds, name, pamr=False, short_side=48, crop=32, stride=16, prob_thd=0.0)
        for p, r in zip(preds, ref, strict=True):
            np.testing.assert_array_equal(p, r)
    assert res["num_images"] == 3 and res["run"]["processed_images"] == 3
    assert res["config"]["mode"] == get_preset(name).mode and res["config"]["pamr"] is False
    assert res["versions"]["torch"] and "timing" in res and res["paper"] is None
    assert f"| {res['mIoU']:.2f} |" in captured.out  # the Markdown table is printed
    assert (out / "results.md").read_text().startswith("## ")
    hist = np.load(out / "confusion.npy")
    assert hist.shape == (256, 256) and hist.dtype == np.int64
    assert hist.sum() == sum(g.size for g in gts)
    if name in ("cityscapes", "voc20"):  # naclip score on the saved masks gives the same numbers
        score_out = tmp_path / "score"
        argv = [
            "score",
            "--dataset",
            name,
            "--root",
            str(root),
            "--pred",
            str(pred_dir),
            "--out",
            str(score_out),
        ]
        assert naclip_main(argv + ["--no-progress"]) == 0
        scored = json.loads((score_out / "results.json").read_text())
        assert scored["per_class"] == res["per_class"] and scored["aAcc"] == res["aAcc"]
        np.testing.assert_array_equal(np.load(score_out / "confusion.npy"), hist)


def test_eval_with_preset_defaults_and_pamr(tmp_path, tiny_model_args, tiny_segmenter):
    """The preset's own settings (PAMR on, short side 336, prob_thd 0.1) on two tiny images, 2 workers."""
    make_synthetic_dataset("voc21", tmp_path / "data", num_images=2, sizes=[(24, 33), (30, 20)], seed=1)
    out = tmp_path / "out"
    argv = [
        "eval",
        "--dataset",
        "voc21",
        "--root",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--workers",
        "2",
    ]
    assert naclip_main(argv + tiny_model_args + ["--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["pamr"] is True and res["config"]["prob_thd"] == 0.1
    assert res["config"]["short_side"] == 336
    ds, gts = _ground_truth("voc21", tmp_path / "data")
    preds = _segment(tiny_segmenter, ds, "voc21")
    _check_results(res, gts, preds, "voc21")


def test_score_of_segment_masks(tmp_path, tiny_segmenter):
    """Masks written by SegmentationResult.save_mask (what ``naclip segment`` writes) are scored as such."""
    root = tmp_path / "data"
    make_synthetic_dataset("cityscapes", root, num_images=2, sizes=SIZES, seed=2)
    ds, gts = _ground_truth("cityscapes", root)
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    preds = []
    for s in ds.samples:
        image = np.array(Image.open(s.image_path).convert("RGB"))
        r = tiny_segmenter.predict(image, preset="cityscapes", pamr=False, short_side=48, crop=32, stride=16)
        r.save_mask(pred_dir / f"{s.stem}_mask.png")
        preds.append(r.labels.numpy())
    out = tmp_path / "score"
    rc = naclip_main(
        ["score", "--dataset", "city", "--root", str(root), "--pred", str(pred_dir), "--out", str(out)]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    _check_results(res, gts, preds, "cityscapes")
    assert res["config"]["pred"] == str(pred_dir.resolve())


def test_score_reports_out_of_range_labels(tmp_path, capsys):
    stored = make_synthetic_dataset("voc21", tmp_path / "data", num_images=2, seed=4)
    ds = EvalDataset("voc21", tmp_path / "data")
    bad = stored[ds.samples[0].id].copy()
    bad[:2, :2] = 33
    Image.fromarray(bad).save(ds.samples[0].label_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    for s in ds.samples:
        Image.fromarray(np.zeros(stored[s.id].shape, np.uint8)).save(pred / f"{s.stem}.png")
    rc = naclip_main(["score", "--dataset", "voc21", "--root", str(tmp_path / "data"), "--pred", str(pred),
                      "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 0
    assert "4 labelled pixels have values outside 0..20" in capsys.readouterr().err
    res = json.loads((tmp_path / "o/results.json").read_text())
    assert res["label_stats"]["out_of_range_label_pixels"] == {"33": 4}


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--dataset", "voc22"], "unknown dataset 'voc22'"),
        (["--root", "/nonexistent/path"], "is not a directory"),
        (["--paper", "--mode", "slide"], r"--paper fixes these settings.*--mode 'slide' \(paper: 'whole'\)"),
        (["--checkpoint", "/nonexistent.pt"], "does not exist"),
    ],
    ids=["dataset", "root", "paper-conflict", "checkpoint"],
)
def test_eval_user_errors_exit_2_with_one_line(tmp_path, extra, match, capsys):
    make_synthetic_dataset("voc21", tmp_path / "data", num_images=1)
    argv = ["eval", "--dataset", "voc21", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    assert naclip_main(argv + extra + ["--no-progress"]) == 2  # argparse: the last --dataset/--root wins
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_paper_offline_gives_weights_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NACLIP_CHECKPOINT", raising=False)
    make_synthetic_dataset("voc21", tmp_path / "data", num_images=1)
    argv = ["eval", "--dataset", "voc21", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "o")]
    rc = naclip_main(argv + ["--paper", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ViT-B-16" in err and "--checkpoint" in err


def test_paper_numbers_table():
    from naclip.cli.eval import PAPER_SETTINGS
    from naclip.eval.paper import paper_miou

    assert paper_miou("voc21", True)[0] == 64.07 and paper_miou("voc21", False)[0] == 58.9
    assert set(PAPER_MIOU) == set(DATASETS)
    avg = np.mean([v["with_pamr"] for v in PAPER_MIOU.values()])
    assert avg == pytest.approx(42.46, abs=0.0051)  # the README average (42.455 rounded half up)
    assert PAPER_SETTINGS["model"] == "ViT-B-16" and PAPER_SETTINGS["pretrained"] == "openai"


def test_markdown_with_paper_column():
    from naclip.eval.report import markdown_table

    res = {
        "title": "T",
        "split": "val",
        "num_images": 2,
        "mIoU": 60.0,
        "aAcc": 90.0,
        "mAcc": 70.0,
        "paper": {"mIoU": 64.07, "source": "src"},
        "per_class": {"a": 50.0, "b": None},
        "per_class_acc": {"a": 60.0, "b": None},
    }
    md = markdown_table(res)
    assert "| 60.00 | 90.00 | 70.00 | 64.07 | -4.07 |" in md
    assert "| b | n/a | n/a |" in md


@pytest.mark.parametrize(
    ("method", "voc21", "average"),
    [("clearclip", 51.8, 38.1), ("sclip", 59.1, 38.2), ("resclip", 61.1, 41.4), ("scclip", 64.6, 43.9)],
    ids=["clearclip", "sclip", "resclip", "scclip"],
)
def test_method_paper_numbers(method, voc21, average):
    from naclip.eval.paper import METHOD_PAPER_MIOU, paper_average, paper_miou

    assert paper_miou("voc21", False, method)[0] == voc21
    assert paper_average(method) == average and set(METHOD_PAPER_MIOU[method][0]) == set(DATASETS)
    assert paper_miou("voc21", False, "maskclip")[0] is None


def test_markdown_paper_not_reported():
    from naclip.eval.report import markdown_table

    res = {
        "title": "T",
        "split": "val",
        "num_images": 1,
        "mIoU": 60.0,
        "aAcc": 90.0,
        "mAcc": 70.0,
        "paper": {"mIoU": None, "source": "n/r"},
        "per_class": {},
        "per_class_acc": {},
    }
    assert "| 60.00 | 90.00 | 70.00 | n/r | n/a |" in markdown_table(res)


def test_method_settings_come_from_the_method_preset():
    from naclip.cli import eval as eval_cli
    from naclip.presets import get_preset

    args = eval_cli.build_parser().parse_args(
        ["--dataset", "voc21", "--root", "x", "--method", "clearclip", "--paper"]
    )
    s = eval_cli.resolve_settings(args, get_preset("voc21"))
    assert (s["method"], s["mode"], s["crop"], s["stride"], s["prob_thd"], s["short_side"], s["pamr"]) == (
        "clearclip",
        "slide",
        448,
        224,
        0.5,
        448,
        False,
    )
    args = eval_cli.build_parser().parse_args(
        ["--dataset", "voc21", "--root", "x", "--method", "sclip", "--paper", "--crop", "448"]
    )
    with pytest.raises(eval_cli.UserError, match="--crop 448"):
        eval_cli.resolve_settings(args, get_preset("voc21"))
