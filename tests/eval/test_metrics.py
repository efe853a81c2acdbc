"""Metrics: hand-computed cases, an independent mmseg-style (histc) computation, torchmetrics where equal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from naclip.eval.metrics import IGNORE_INDEX, compute_metrics, joint_histogram


def _hist(pairs):
    h = torch.zeros(256, 256, dtype=torch.int64)
    for gt, pred in pairs:
        h += joint_histogram(np.asarray(gt, dtype=np.uint8), np.asarray(pred, dtype=np.int64))
    return h


def _mmseg_style(gts, preds, c):
    """mmseg IoUMetric definitions, written independently: per image drop label==255, histc over [0, C-1]
    of intersect / pred / label (values outside the range fall out of the histogram), sum, then ratios."""
    ai = torch.zeros(c, dtype=torch.float64)
    ap = torch.zeros(c, dtype=torch.float64)
    al = torch.zeros(c, dtype=torch.float64)
    for gt, pred in zip(gts, preds, strict=True):
        gt = torch.as_tensor(gt.astype(np.int64))
        pred = torch.as_tensor(pred.astype(np.int64))
        keep = gt != IGNORE_INDEX
        gt, pred = gt[keep], pred[keep]
        inter = pred[pred == gt]
        ai += torch.histc(inter.double(), bins=c, min=0, max=c - 1)
        ap += torch.histc(pred.double(), bins=c, min=0, max=c - 1)
        al += torch.histc(gt.double(), bins=c, min=0, max=c - 1)
    union = al + ap - ai
    iou, acc = (ai / union).numpy(), (ai / al).numpy()
    return iou, acc, float(ai.sum() / al.sum())


def test_hand_computed_three_classes():
    gt = [[0, 0, 1], [1, 2, 255]]
    pred = [[0, 1, 1], [1, 1, 0]]
    m = compute_metrics(_hist([(gt, pred)]), 3)
    np.testing.assert_array_equal(m.intersect, [1, 2, 0])
    np.testing.assert_array_equal(m.area_label, [2, 2, 1])
    np.testing.assert_array_equal(m.area_pred, [1, 4, 0])
    np.testing.assert_array_equal(m.union, [2, 4, 1])
    np.testing.assert_allclose(m.iou, [0.5, 0.5, 0.0], rtol=0, atol=0)
    np.testing.assert_allclose(m.acc, [0.5, 1.0, 0.0], rtol=0, atol=0)
    assert m.miou == pytest.approx(1 / 3, abs=1e-15)
    assert m.macc == pytest.approx(0.5, abs=1e-15)
    assert m.aacc == pytest.approx(0.6, abs=1e-15)
    assert m.ignored_pixels == 1
    assert m.out_of_range_label_pixels == {} and m.out_of_range_pred_pixels == 0


def test_absent_class_is_nan_and_excluded():
    gt = [[0, 0, 1], [1, 2, 255]]
    pred = [[0, 1, 1], [1, 1, 0]]
    m = compute_metrics(_hist([(gt, pred)]), 4)  # class 3 in neither gt nor pred
    assert math.isnan(m.iou[3]) and math.isnan(m.acc[3])
    assert m.miou == pytest.approx(1 / 3, abs=1e-15)
    assert m.macc == pytest.approx(0.5, abs=1e-15)


def test_class_only_predicted_has_zero_iou_and_nan_acc():
    gt = [[0, 0], [1, 1]]
    pred = [[0, 2], [1, 1]]  # class 2 predicted once, never in gt
    m = compute_metrics(_hist([(gt, pred)]), 3)
    assert m.iou[2] == 0.0 and math.isnan(m.acc[2])
    np.testing.assert_allclose(m.iou, [0.5, 1.0, 0.0])
    assert m.miou == pytest.approx(0.5)
    assert m.macc == pytest.approx(0.75)


def test_ignore_pixels_never_count_even_with_any_prediction():
    gt = np.full((3, 4), 255, dtype=np.uint8)
    gt[0, 0] = 1
    pred = np.full((3, 4), 1)
    m = compute_metrics(_hist([(gt, pred)]), 2)
    np.testing.assert_array_equal(m.area_pred, [0, 1])
    assert m.iou[1] == 1.0 and math.isnan(m.iou[0])
    assert m.ignored_pixels == 11


def test_out_of_range_labels_are_counted_and_follow_mmseg():
    gt = np.array([[0, 5, 5], [1, 7, 255]], dtype=np.uint8)  # C = 2: values 5 and 7 are out of range
    pred = np.array([[0, 1, 0], [1, 1, 0]])
    m = compute_metrics(_hist([(gt, pred)]), 2)
    assert m.out_of_range_label_pixels == {5: 2, 7: 1}
    # mmseg: the predictions on those pixels count in the predicted areas, the labels in no class
    np.testing.assert_array_equal(m.area_pred, [2, 3])
    np.testing.assert_array_equal(m.area_label, [1, 1])
    iou, acc, aacc = _mmseg_style([gt], [pred], 2)
    np.testing.assert_allclose(m.iou, iou, rtol=1e-15)
    np.testing.assert_allclose(m.acc, acc, rtol=1e-15)
    assert m.aacc == pytest.approx(aacc, rel=1e-15)


def test_out_of_range_predictions_are_misses():
    gt = np.array([[0, 1, 1]], dtype=np.uint8)
    pred = np.array([[0, 9, 300]])  # 300 is clipped to 255: also out of range
    m = compute_metrics(_hist([(gt, pred)]), 2)
    assert m.out_of_range_pred_pixels == 2
    np.testing.assert_allclose(m.iou, [1.0, 0.0])
    assert m.aacc == pytest.approx(1 / 3)


@pytest.mark.parametrize("num_classes", [2, 5, 21, 171], ids=lambda c: f"C{c}")
def test_matches_independent_mmseg_style_on_random_images(num_classes):
    rng = np.random.default_rng(num_classes)
    gts, preds = [], []
    for i in range(5):
        h, w = 7 + 3 * i, 11 + i  # non-square, odd sizes
        gt = rng.integers(0, num_classes + 3, (h, w)).astype(np.uint8)  # a few out-of-range values
        gt[rng.random((h, w)) < 0.1] = 255
        gts.append(gt)
        preds.append(rng.integers(0, num_classes, (h, w)))
    m = compute_metrics(_hist(zip(gts, preds, strict=True)), num_classes)
    iou, acc, aacc = _mmseg_style(gts, preds, num_classes)
    np.testing.assert_allclose(m.iou, iou, rtol=1e-14, equal_nan=True)
    np.testing.assert_allclose(m.acc, acc, rtol=1e-14, equal_nan=True)
    assert m.aacc == pytest.approx(aacc, rel=1e-14)
    assert m.miou == pytest.approx(float(np.nanmean(iou)), rel=1e-14)
    assert m.macc == pytest.approx(float(np.nanmean(acc)), rel=1e-14)


def test_dataset_level_not_per_image_mean():
    # image A: class 1 perfect on 1 pixel; image B: class 1 on 99 pixels, all missed -> dataset IoU 1/100
    a_gt, a_pred = np.array([[1]], dtype=np.uint8), np.array([[1]])
    b_gt, b_pred = np.ones((9, 11), dtype=np.uint8), np.zeros((9, 11), dtype=np.int64)
    m = compute_metrics(_hist([(a_gt, a_pred), (b_gt, b_pred)]), 2)
    assert m.iou[1] == pytest.approx(1 / 100)


def _torchmetrics():
    return pytest.importorskip("torchmetrics", reason="torchmetrics (dev extra) cross-checks the definitions")


@pytest.mark.parametrize("num_classes", [3, 21], ids=lambda c: f"C{c}")
def test_torchmetrics_jaccard_dataset_level_with_ignore(num_classes):
    _torchmetrics()
    from torchmetrics.classification import MulticlassJaccardIndex

    rng = np.random.default_rng(7 + num_classes)
    metric = MulticlassJaccardIndex(num_classes=num_classes, average="none", ignore_index=255)
    hist = torch.zeros(256, 256, dtype=torch.int64)
    for i in range(4):
        gt = rng.integers(0, num_classes, (9, 13 + i)).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.15] = 255
        pred = rng.integers(0, num_classes, gt.shape)
        metric.update(torch.from_numpy(pred), torch.from_numpy(gt.astype(np.int64)))
        hist += joint_histogram(gt, pred)
    ours = compute_metrics(hist, num_classes)
    theirs = metric.compute().double().numpy()
    defined = ~np.isnan(ours.iou)  # torchmetrics reports 0 for an empty union; we report NaN
    assert defined.any()
    np.testing.assert_allclose(ours.iou[defined], theirs[defined], rtol=1e-6)


def test_torchmetrics_mean_iou_single_image():
    _torchmetrics()
    from torchmetrics.segmentation import MeanIoU

    rng = np.random.default_rng(3)
    c = 6
    gt = rng.integers(0, c - 1, (17, 23))  # class 5 absent from gt
    pred = rng.integers(0, c - 1, (17, 23))  # ... and from pred: NaN for us, excluded by torchmetrics too
    per_class = MeanIoU(num_classes=c, per_class=True, input_format="index")
    mean = MeanIoU(num_classes=c, per_class=False, input_format="index")
    per_class.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    mean.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    ours = compute_metrics(joint_histogram(gt.astype(np.uint8), pred), c)
    theirs = per_class.compute().double().numpy()
    assert math.isnan(ours.iou[5])
    np.testing.assert_allclose(ours.iou[:5], theirs[:5], rtol=1e-6)
    assert ours.miou == pytest.approx(float(mean.compute()), rel=1e-6)


@pytest.mark.parametrize(
    ("label", "pred", "match"),
    [
        (np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64), "label must hold integers"),
        (np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.int64), "shape"),
        (np.zeros((2, 2, 1), np.uint8), np.zeros((2, 2, 1), np.int64), "2-D"),
        (np.full((2, 2), 300, np.int64), np.zeros((2, 2), np.int64), "0..255"),
        (np.zeros((2, 2), np.uint8), np.full((2, 2), -1), "pred values must be >= 0"),
    ],
    ids=["float-label", "shape-mismatch", "3d", "label-above-255", "negative-pred"],
)
def test_joint_histogram_rejects_bad_input(label, pred, match):
    with pytest.raises((ValueError, TypeError), match=match):
        joint_histogram(label, pred)


@pytest.mark.parametrize(
    ("num_classes", "exc"),
    [(0, ValueError), (256, ValueError), (2.0, TypeError), (True, TypeError)],
    ids=["zero", "256", "float", "bool"],
)
def test_compute_metrics_rejects_bad_num_classes(num_classes, exc):
    with pytest.raises(exc, match=rf"num_classes: expected an int in \[1, 255\], got .*{num_classes!r}"):
        compute_metrics(torch.zeros(256, 256, dtype=torch.int64), num_classes)


def test_compute_metrics_rejects_bad_hist():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(torch.zeros(255, 256, dtype=torch.int64), 3)
    with pytest.raises(TypeError, match="integers"):
        compute_metrics(torch.zeros(256, 256), 3)
