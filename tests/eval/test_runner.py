"""The evaluation loop with a protocol predictor (``predict(image) -> labels``): order, workers, limit,
resume. The real Segmenter runs in test_cli_e2e.py; real ranks (torchrun, gloo) in
test_resume_distributed.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from naclip.eval.datasets import EvalDataset
from naclip.eval.metrics import compute_metrics, joint_histogram
from naclip.eval.records import read_logs
from naclip.eval.runner import evaluate, select_indices
from naclip.eval.synthetic import make_synthetic_dataset

FP = {"test": "runner"}


def colour_predictor(image: np.ndarray) -> torch.Tensor:
    """A deterministic function of the pixels (a legitimate predictor, not a stub of one)."""
    return torch.from_numpy((image[..., 0].astype(np.int64) // 12) % 21)


def _expected_hist(ds: EvalDataset, indices) -> torch.Tensor:
    h = torch.zeros(256, 256, dtype=torch.int64)
    for i in indices:
        item = ds[i]
        h += joint_histogram(item["label"], colour_predictor(item["image"]))
    return h


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    make_synthetic_dataset("voc21", root, num_images=7, seed=3)
    return EvalDataset("voc21", root)


@pytest.mark.parametrize("workers", [0, 2], ids=["in-process", "2-workers"])
def test_evaluate_matches_direct_computation(voc, workers):
    out = evaluate(voc, colour_predictor, num_workers=workers)
    assert torch.equal(out.hist, _expected_hist(voc, range(len(voc))))
    assert out.processed == 7 and out.resumed == 0
    ref = compute_metrics(out.hist, 21)
    np.testing.assert_array_equal(out.metrics.iou, ref.iou)


def test_visit_order_is_dataset_order(voc):
    seen = []

    def spy(image):
        seen.append(int(image.sum()))
        return colour_predictor(image)

    evaluate(voc, spy, num_workers=2)
    assert seen == [int(voc[i]["image"].sum()) for i in range(len(voc))]


def test_limit_selects_first_images(voc):
    idx = select_indices(len(voc), 3)
    out = evaluate(voc, colour_predictor, indices=idx)
    assert out.indices == (0, 1, 2)
    assert torch.equal(out.hist, _expected_hist(voc, idx))
    assert select_indices(5, 99) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="limit"):
        select_indices(5, 0)


def test_resume_skips_logged_images_and_sums_exactly(voc, tmp_path):
    calls = []

    def counting(image):
        calls.append(1)
        return colour_predictor(image)

    first = evaluate(voc, counting, indices=[0, 1, 2], log_dir=tmp_path, fingerprint=FP)
    assert len(calls) == 3 and first.processed == 3
    calls.clear()
    full = evaluate(voc, counting, log_dir=tmp_path, fingerprint=FP)
    assert len(calls) == 4 and full.resumed == 3 and full.processed == 4
    assert torch.equal(full.hist, _expected_hist(voc, range(len(voc))))
    calls.clear()
    again = evaluate(voc, counting, log_dir=tmp_path, fingerprint=FP)  # everything logged: no prediction
    assert calls == [] and torch.equal(again.hist, full.hist)
    recs, torn = read_logs(list(tmp_path.glob("rank*.log")), FP)
    assert sorted(recs) == list(range(7)) and torn == 0


def test_resume_with_other_fingerprint_is_refused(voc, tmp_path):
    evaluate(voc, colour_predictor, indices=[0], log_dir=tmp_path, fingerprint=FP)
    with pytest.raises(ValueError, match="different run"):
        evaluate(voc, colour_predictor, log_dir=tmp_path, fingerprint={"test": "other"})


def test_score_mode_uses_stored_predictions(voc, tmp_path):
    from PIL import Image

    for i in range(len(voc)):
        item = voc[i]
        Image.fromarray(colour_predictor(item["image"]).numpy().astype(np.uint8)).save(
            tmp_path / f"{item['stem']}.png"
        )
    ds = EvalDataset("voc21", voc.root, pred_dir=tmp_path)
    out = evaluate(ds, None)
    assert torch.equal(out.hist, _expected_hist(voc, range(len(voc))))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"indices": [0, 99]}, "indices must lie"),
        ({"indices": [1, 1]}, "must not repeat"),
        ({"num_workers": -1}, "num_workers"),
        ({"log_dir": "x"}, "fingerprint is required"),
    ],
    ids=["out-of-range", "repeat", "workers", "no-fingerprint"],
)
def test_bad_arguments(voc, kwargs, match):
    with pytest.raises(ValueError, match=match):
        evaluate(voc, colour_predictor, **kwargs)


def test_predictor_with_wrong_shape_is_named(voc):
    with pytest.raises(ValueError, match=r"prediction for image '2008_000000' has shape \(2, 2\)"):
        evaluate(voc, lambda im: torch.zeros(2, 2, dtype=torch.long))


def test_no_predictor_and_no_predictions(voc):
    with pytest.raises(ValueError, match="nothing to score"):
        evaluate(voc, None)


def test_progress_bar_shows_rate_and_running_miou(voc, tmp_path, capsys):
    evaluate(voc, colour_predictor, indices=[0, 1], log_dir=tmp_path, fingerprint=FP)
    evaluate(voc, colour_predictor, indices=[0, 1, 2], log_dir=tmp_path, fingerprint=FP, progress=True)
    err = capsys.readouterr().err
    assert "resuming: 2 of 3 images already done" in err
    assert "img/s" in err and "mIoU" in err


def test_no_output_without_progress(voc, capsys):
    evaluate(voc, colour_predictor, indices=[0])
    assert capsys.readouterr() == ("", "")
