"""The 8 benchmark presets equal the official class-name files and configs (spec §3, §5).

Choice for the ``"wood "`` quirk (last line of ``cls_context60.txt`` has a trailing space): the presets store
every query **stripped** of surrounding whitespace (``"wood"``), the same normalisation that user-given class
lists get. The test therefore compares with the reference lines after stripping each ", "-separated query,
asserts that this normalisation changes exactly one line of all eight files (context60's ``"wood "``), and
that the CLIP tokenizer produces identical tokens for both spellings in all 80 prompts, so the text features
are unchanged.
"""

from __future__ import annotations

from importlib import resources

import open_clip
import pytest
import torch

from naclip.presets import PRESET_NAMES, PRESETS, Preset, get_preset
from naclip.text import prompts_for

FILES = {
    "voc21": "cls_voc21.txt",
    "voc20": "cls_voc20.txt",
    "context60": "cls_context60.txt",
    "context59": "cls_context59.txt",
    "coco_object": "cls_coco_object.txt",
    "coco_stuff": "cls_coco_stuff.txt",
    "cityscapes": "cls_city_scapes.txt",
    "ade20k": "cls_ade20k.txt",
}
# name -> (classes, queries, prob_thd, short_side, mode), spec §3 and the classnames README
SETTINGS = {
    "voc21": (21, 56, 0.1, 336, "whole"),
    "voc20": (20, 30, 0.0, 336, "whole"),
    "context60": (60, 60, 0.1, 336, "slide"),
    "context59": (59, 59, 0.0, 336, "slide"),
    "coco_object": (81, 113, 0.1, 336, "slide"),
    "coco_stuff": (171, 171, 0.0, 336, "slide"),
    "cityscapes": (19, 19, 0.0, 560, "slide"),
    "ade20k": (150, 150, 0.0, 336, "slide"),
}


def _reference_lines(classnames_dir, name: str) -> list[str]:
    raw = (classnames_dir / FILES[name]).read_bytes()
    assert not raw.endswith(b"\n")  # the official files have no trailing newline
    return raw.decode("utf-8").split("\n")


def test_all_presets_present():
    assert tuple(PRESET_NAMES) == tuple(FILES) and list(PRESETS) == list(FILES) and len(PRESETS) == 8


@pytest.mark.parametrize("name", list(FILES))
def test_preset_classes_equal_reference_file(classnames_dir, name):
    ref = _reference_lines(classnames_dir, name)
    preset = get_preset(name)
    spec = preset.classes
    stripped = [", ".join(q.strip() for q in line.split(", ")) for line in ref]
    assert spec.lines() == stripped
    # query level: every reference synonym (split on ", " as in the official get_cls_idx) is one query
    ref_queries = [q.strip() for line in ref for q in line.split(", ")]
    ref_qidx = [i for i, line in enumerate(ref) for _ in line.split(", ")]
    assert list(spec.queries) == ref_queries and list(spec.query_to_class) == ref_qidx


def test_whitespace_normalisation_only_touches_context60_wood(classnames_dir):
    changed = []
    for name in FILES:
        for i, line in enumerate(_reference_lines(classnames_dir, name)):
            if line != ", ".join(q.strip() for q in line.split(", ")):
                changed.append((name, i, line))
    assert changed == [("context60", 59, "wood ")]
    assert get_preset("context60").classes.queries[59] == "wood"


def test_wood_trailing_space_gives_identical_tokens():
    tok = open_clip.get_tokenizer("ViT-B-16")
    assert torch.equal(tok(prompts_for("wood ")), tok(prompts_for("wood")))


@pytest.mark.parametrize("name", list(FILES))
def test_preset_settings(name):
    n_cls, n_q, thd, short, mode = SETTINGS[name]
    p = PRESETS[name]
    assert isinstance(p, Preset) and p.name == name
    assert p.classes.num_classes == n_cls and len(p.classes.queries) == n_q
    assert (p.prob_thd, p.short_side, p.long_side, p.mode, p.pamr) == (thd, short, 2048, mode, True)
    assert len(set(p.class_names)) == n_cls


def test_display_names():
    assert get_preset("voc21").class_names[0] == "background"
    assert get_preset("coco_object").class_names[0] == "background"
    assert get_preset("context60").class_names[0] == "background"
    voc = get_preset("voc21").class_names
    assert (voc[4], voc[11], voc[20]) == ("boat", "diningtable", "tvmonitor")
    assert get_preset("voc20").class_names == get_preset("voc21").class_names[1:]
    assert get_preset("voc21").classes.synonyms[4] == ("ship",)


@pytest.mark.parametrize("alias", ["VOC21", "coco-object", " ade20k "], ids=["upper", "dash", "spaces"])
def test_get_preset_aliases(alias):
    assert get_preset(alias).name == alias.strip().lower().replace("-", "_")


@pytest.mark.parametrize("bad", ["voc", "pascal_context", ""], ids=["voc", "pc", "empty"])
def test_unknown_preset(bad):
    with pytest.raises(ValueError, match="unknown preset.*voc21, voc20, context60"):
        get_preset(bad)
    with pytest.raises(KeyError):
        PRESETS[bad]


def test_get_preset_type_error():
    with pytest.raises(TypeError, match="preset"):
        get_preset(21)  # type: ignore[arg-type]


def test_package_ships_own_format_not_reference_files():
    data = resources.files("naclip").joinpath("data")
    names = sorted(p.name for p in data.iterdir())
    assert "classes.json" in names
    assert not any(n.endswith(".txt") for n in names)
