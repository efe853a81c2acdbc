"""Dataset readers: the 8 layouts, label conventions, clear errors, the COCO-Object converter."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from naclip.eval.convert_coco_object import (
    RAW_THING_VALUES,
    convert_coco_object,
    from_label_train_ids,
    from_raw_stuffthingmap,
)
from naclip.eval.convert_coco_object import main as convert_main
from naclip.eval.datasets import DATASETS, EvalDataset, canonical_dataset_name
from naclip.eval.synthetic import make_synthetic_dataset

REDUCED = {"voc20", "context59", "ade20k"}


def _expected(name: str, stored: np.ndarray) -> np.ndarray:
    """The benchmark convention, written out independently of the reader."""
    if name in REDUCED:
        out = stored.astype(np.int64) - 1
        out[stored == 0] = 255
        out[stored == 255] = 255
        return out.astype(np.uint8)
    return stored


@pytest.mark.parametrize("name", list(DATASETS), ids=list(DATASETS))
def test_reader_yields_converted_labels_in_order(tmp_path, name):
    stored = make_synthetic_dataset(name, tmp_path, num_images=3, seed=11)
    ds = EvalDataset(name, tmp_path)
    assert len(ds) == 3 and ds.num_classes == DATASETS[name].num_classes
    assert [s.id for s in ds.samples] == sorted(stored) if DATASETS[name].split_file is None else list(stored)
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"] == i
        assert item["image"].dtype == np.uint8 and item["image"].shape[2] == 3
        assert item["label"].shape == item["image"].shape[:2]
        np.testing.assert_array_equal(item["label"], _expected(name, stored[item["id"]]))
        valid = item["label"][item["label"] != 255]
        assert valid.max(initial=0) < ds.num_classes


def test_reduce_zero_label_maps_background_to_ignore(tmp_path):
    make_synthetic_dataset("voc20", tmp_path, num_images=1, seed=0)
    ds = EvalDataset("voc20", tmp_path)
    raw = np.array(Image.open(ds.samples[0].label_path))
    lab = ds[0]["label"]
    assert (lab[raw == 0] == 255).all() and (lab[raw == 255] == 255).all()
    sel = (raw != 0) & (raw != 255)
    np.testing.assert_array_equal(lab[sel], raw[sel] - 1)


@pytest.mark.parametrize("name", ["voc21", "context59", "coco_stuff", "cityscapes", "ade20k"])
def test_root_may_be_the_parent_folder(tmp_path, name):
    make_synthetic_dataset(name, tmp_path, num_images=2, wrap=True)
    ds = EvalDataset(name, tmp_path)
    assert ds.root == tmp_path / DATASETS[name].root_candidates[-1]
    assert len(ds) == 2


def test_cityscapes_ids_and_stems(tmp_path):
    make_synthetic_dataset("cityscapes", tmp_path, num_images=3)
    ds = EvalDataset("city", tmp_path)
    assert [s.id for s in ds.samples] == [
        "aachen/aachen_000000_000019",
        "aachen/aachen_000002_000019",
        "bochum/bochum_000001_000019",
    ]
    assert ds.samples[0].stem == "aachen_000000_000019_leftImg8bit"
    assert ds.samples[0].label_path.name == "aachen_000000_000019_gtFine_labelTrainIds.png"


@pytest.mark.parametrize(
    ("alias", "name"),
    [("PC59", "context59"), ("city", "cityscapes"), ("ade", "ade20k"), ("stuff", "coco_stuff")],
)
def test_aliases(alias, name):
    assert canonical_dataset_name(alias) == name


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="unknown dataset 'voc22'.*voc21"):
        canonical_dataset_name("voc22")


# ------------------------------------------------------------------------------------------------ errors


def test_wrong_root_names_the_missing_folder(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(FileNotFoundError, match=r"image folder 'JPEGImages' not found.*VOCdevkit/VOC2012"):
        EvalDataset("voc21", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        EvalDataset("voc21", tmp_path / "nope")


def test_missing_split_file_is_named(tmp_path):
    make_synthetic_dataset("voc21", tmp_path, num_images=2)
    (tmp_path / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"split file .*ImageSets/Segmentation/val.txt is missing"):
        EvalDataset("voc21", tmp_path)


def test_missing_label_folder_is_named(tmp_path):
    make_synthetic_dataset("ade20k", tmp_path, num_images=2)
    shutil.rmtree(tmp_path / "annotations/validation")
    with pytest.raises(FileNotFoundError, match=r"label folder .*annotations/validation is missing"):
        EvalDataset("ade20k", tmp_path)


def test_wrong_split_mentions_split(tmp_path):
    make_synthetic_dataset("coco_stuff", tmp_path, num_images=1)
    with pytest.raises(FileNotFoundError, match="images/train2017"):
        EvalDataset("coco_stuff", tmp_path, split="train")


def test_missing_label_names_the_image(tmp_path):
    stored = make_synthetic_dataset("context60", tmp_path, num_images=3)
    victim = list(stored)[1]
    (tmp_path / f"SegmentationClassContext/{victim}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of 3 images have no label file.*{victim}.jpg"):
        EvalDataset("context60", tmp_path)


def test_missing_image_listed_in_split(tmp_path):
    make_synthetic_dataset("voc21", tmp_path, num_images=2)
    with open(tmp_path / "ImageSets/Segmentation/val.txt", "a") as f:
        f.write("2099_000000\n")
    with pytest.raises(FileNotFoundError, match="1 of 3 images listed are missing.*2099_000000.jpg"):
        EvalDataset("voc21", tmp_path)


def test_empty_split_file(tmp_path):
    make_synthetic_dataset("voc21", tmp_path, num_images=1)
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="lists no image ids"):
        EvalDataset("voc21", tmp_path)


def test_colour_label_is_rejected(tmp_path):
    stored = make_synthetic_dataset("ade20k", tmp_path, num_images=1)
    sid = next(iter(stored))
    path = tmp_path / f"annotations/validation/{sid}.png"
    Image.fromarray(np.zeros((*stored[sid].shape, 3), np.uint8)).save(path)
    with pytest.raises(ValueError, match=r"mode 'RGB'.*single-channel"):
        EvalDataset("ade20k", tmp_path)[0]


def test_16bit_label_above_255_is_rejected(tmp_path):
    stored = make_synthetic_dataset("cityscapes", tmp_path, num_images=1)
    ds = EvalDataset("cityscapes", tmp_path)
    arr = stored[next(iter(stored))].astype(np.uint16)
    arr[0, 0] = 1000
    Image.fromarray(arr).save(ds.samples[0].label_path)  # 16-bit greyscale PNG
    with pytest.raises(ValueError, match=r"holds values in \d+..1000; expected 0..255"):
        ds[0]


def test_label_size_mismatch(tmp_path):
    make_synthetic_dataset("voc21", tmp_path, num_images=1)
    ds = EvalDataset("voc21", tmp_path)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(ds.samples[0].label_path)
    with pytest.raises(ValueError, match="but its label"):
        ds[0]


def test_out_of_range_values_are_kept_for_counting(tmp_path):
    stored = make_synthetic_dataset("voc21", tmp_path, num_images=1)
    ds = EvalDataset("voc21", tmp_path)
    arr = stored[next(iter(stored))].copy()
    arr[:2, :3] = 42
    Image.fromarray(arr).save(ds.samples[0].label_path)
    assert (ds[0]["label"] == 42).sum() == 6


def test_predictions_lookup_and_errors(tmp_path):
    make_synthetic_dataset("cityscapes", tmp_path / "d", num_images=2)
    pred = tmp_path / "pred"
    pred.mkdir()
    ds = EvalDataset("cityscapes", tmp_path / "d")
    shapes = [ds[i]["label"].shape for i in range(2)]
    Image.fromarray(np.full(shapes[0], 3, np.uint8)).save(pred / f"{ds.samples[0].stem}_mask.png")
    with pytest.raises(FileNotFoundError, match=r"1 of 2 predictions are missing"):
        EvalDataset("cityscapes", tmp_path / "d", pred_dir=pred)
    Image.fromarray(np.full((3, 3), 3, np.uint8)).save(pred / f"{ds.samples[1].stem}.png")
    ds2 = EvalDataset("cityscapes", tmp_path / "d", pred_dir=pred)
    assert (ds2[0]["pred"] == 3).all()
    with pytest.raises(ValueError, match="original resolution"):
        ds2[1]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        EvalDataset("cityscapes", tmp_path / "d", pred_dir=tmp_path / "none")


# ------------------------------------------------------------------------------------- COCO-Object


def test_coco_object_mappings_agree_and_match_the_spec():
    assert len(RAW_THING_VALUES) == 80 and RAW_THING_VALUES[-1] == 89
    train_ids = np.arange(256, dtype=np.uint8)
    train_ids = train_ids[(train_ids <= 170) | (train_ids == 255)]
    obj = from_label_train_ids(train_ids)
    np.testing.assert_array_equal(obj[:80], np.arange(1, 81))
    assert (obj[80:171] == 0).all() and obj[-1] == 0
    # raw stuffthingmap values: thing k (ascending) <-> train id k; stuff 91..181 <-> 80..170
    raw = np.array([*RAW_THING_VALUES, *range(91, 182), 255], dtype=np.uint8)
    np.testing.assert_array_equal(from_raw_stuffthingmap(raw), obj)


@pytest.mark.parametrize(
    ("fn", "bad"), [(from_label_train_ids, 171), (from_raw_stuffthingmap, 11), (from_raw_stuffthingmap, 90)]
)
def test_coco_object_unknown_values_are_errors(fn, bad):
    with pytest.raises(ValueError, match=rf"{bad} \(1 px\)"):
        fn(np.array([[0, bad]], dtype=np.uint8))


def test_coco_object_missing_labels_point_to_the_converter(tmp_path):
    stored = make_synthetic_dataset("coco_object", tmp_path, num_images=2)
    for sid in stored:
        (tmp_path / f"annotations/val2017/{sid}_instanceTrainIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"python -m naclip.eval.convert_coco_object --root"):
        EvalDataset("coco_object", tmp_path)
    assert convert_main(["--root", str(tmp_path)]) == 0
    ds = EvalDataset("coco_object", tmp_path)
    for i in range(2):
        np.testing.assert_array_equal(ds[i]["label"], stored[ds[i]["id"]])
    assert convert_coco_object(tmp_path) == (0, 2)  # existing outputs are kept
    assert convert_coco_object(tmp_path, overwrite=True) == (2, 0)


def test_coco_object_converter_from_raw_maps(tmp_path):
    make_synthetic_dataset("coco_stuff", tmp_path, num_images=2, seed=5)
    ann = tmp_path / "annotations/val2017"
    lut = np.full(256, 255, np.uint8)  # train id -> raw value
    lut[:80] = RAW_THING_VALUES
    lut[80:171] = np.arange(91, 182)
    expected = {}
    for p in sorted(ann.glob("*_labelTrainIds.png")):
        tid = np.array(Image.open(p))
        stem = p.name[: -len("_labelTrainIds.png")]
        Image.fromarray(lut[tid]).save(ann / f"{stem}.png")
        expected[stem] = np.where(tid < 80, tid.astype(np.int64) + 1, 0)
        p.unlink()  # force the raw path
    assert convert_coco_object(tmp_path) == (2, 0)
    for stem, exp in expected.items():
        np.testing.assert_array_equal(np.array(Image.open(ann / f"{stem}_instanceTrainIds.png")), exp)


def test_coco_object_converter_errors(tmp_path, capsys):
    assert convert_main(["--root", str(tmp_path)]) == 2
    assert "no images/val2017" in capsys.readouterr().err
    make_synthetic_dataset("coco_stuff", tmp_path, num_images=1)
    for p in (tmp_path / "annotations/val2017").glob("*.png"):
        p.unlink()
    with pytest.raises(FileNotFoundError, match="neither <id>_labelTrainIds.png nor the raw"):
        convert_coco_object(Path(tmp_path))


#: Class counts of the benchmarks (spec §3), independent of the code under test.
EXPECTED_CLASSES = {
    "voc21": 21,
    "voc20": 20,
    "context60": 60,
    "context59": 59,
    "coco_object": 81,
    "coco_stuff": 171,
    "cityscapes": 19,
    "ade20k": 150,
}


@pytest.mark.parametrize("name", list(DATASETS), ids=list(DATASETS))
def test_spec_title_and_classes_agree_with_preset(name):
    from naclip.presets import get_preset

    spec, preset = DATASETS[name], get_preset(name)
    assert spec.num_classes == EXPECTED_CLASSES[name] == len(preset.class_names)
    assert spec.title == preset.title
    assert spec.title.endswith(f"({spec.num_classes} classes)")


def test_synthetic_palette_is_the_voc_palette(tmp_path):
    from naclip.io import voc_palette

    make_synthetic_dataset("voc21", tmp_path, num_images=1, seed=0)
    ds = EvalDataset("voc21", tmp_path)
    with Image.open(ds.samples[0].label_path) as im:
        assert im.mode == "P"
        pal = np.array(im.getpalette(), dtype=np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(pal, voc_palette()[: len(pal)])
    assert not list(tmp_path.rglob("*.tmp*")), "temporary files left behind"
