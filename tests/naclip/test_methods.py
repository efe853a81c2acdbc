"""naclip.methods: registry, layer mapping, ResCLIP / SC-CLIP stages (batching, non-square grids, chunking),
the per-method post-processing and the Segmenter / preset wiring, on small random models."""

from __future__ import annotations

import pytest
import torch
from naclip_test_support import tiny_clip

import naclip_kernels
from naclip import inference
from naclip.methods import METHOD_NAMES, _blocks, build_visual, get_method, method_preset, resclip, scclip
from naclip.methods._params import map_layer_index, map_layer_range
from naclip.presets import get_preset
from naclip.segmenter import Segmenter

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def visual():
    return tiny_clip(seed=1, vision_layers=3).visual


def _images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _text(d: int = 32, q: int = 4) -> torch.Tensor:
    t = torch.randn(q, d, generator=torch.Generator().manual_seed(5))
    return t / t.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------ registry / params


def test_registry_and_unknown_names():
    assert METHOD_NAMES == ("naclip", "clearclip", "sclip", "resclip", "scclip")
    with pytest.raises(ValueError, match="method: expected one of"):
        get_method("maskclip")
    with pytest.raises(ValueError, match="ablation strategy"):
        build_visual("maskclip", None)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("clearclip", {"rcs": True}, "takes no parameters"),
        ("resclip", {"temp": 0.3}, "unknown \\['temp'\\]"),
        ("resclip", {"rcs_layers": (2,)}, "not an intermediate block|\\[0, 2\\)"),
        ("resclip", {"rcs_weights": (2.0, 1.5)}, "rcs_weights\\[1\\]"),
        ("resclip", {"temp_thd": -0.1}, "temp_thd"),
        ("scclip", {"pre_adjust_idx": 5}, "pre_adjust_idx"),
        ("scclip", {"multi_start_idx": 1, "multi_end_idx": 1}, "multi_end_idx"),
    ],
    ids=[
        "clearclip-param",
        "resclip-unknown",
        "resclip-layer",
        "resclip-lam",
        "resclip-thd",
        "scclip-pre",
        "scclip-empty",
    ],
)
def test_bad_params_name_the_argument(visual, name, params, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_visual(name, visual, params=params)


def test_arch_rules(visual):
    with pytest.raises(ValueError, match="arch"):
        build_visual("sclip", visual, arch="reduced")
    with pytest.raises(ValueError, match="arch"):
        build_visual("scclip", visual, arch="vanilla")
    assert build_visual("clearclip", visual, arch="vanilla").arch == "vanilla"


@pytest.mark.parametrize(
    ("depth", "rcs", "scclip_layers"),
    [
        (12, (5, 6, 7, 8), (8, 3, 3, 10)),
        (24, tuple(range(10, 18)), (16, 6, 6, 20)),
        (3, (1,), (1, 1, 1, 2)),
    ],
    ids=["vit-b-12", "vit-l-24", "tiny-3"],
)
def test_layer_mapping_keeps_the_depth_fraction(depth, rcs, scclip_layers):
    assert resclip.default_rcs_layers(depth) == rcs
    got = scclip.default_scclip_layers(depth)
    assert (got["pre_adjust_idx"], got["post_adjust_idx"], got["multi_start_idx"], got["multi_end_idx"]) == (
        scclip_layers
    )
    assert map_layer_index(5, 12, upper=10) == 5 and map_layer_range(5, 9, 12) == (5, 6, 7, 8)


# ---------------------------------------------------------------------------------------------------- ResCLIP


def test_rcs_term_is_the_mean_of_ordinary_attentions():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 1 + 3 * 5, 8, generator=g) for _ in range(3))
    q2, k2 = torch.randn_like(q), torch.randn_like(k)
    nv = type("Stub", (), {"_layers": (0, 3), "backend": "torch"})()
    out = resclip.ResclipVisual._rcs_attention(nv, {0: (q, k), 3: (q2, k2)}, v, (3, 5))
    dense = (
        naclip_kernels.reference_attention_probs(q, k, (3, 5), None)
        + naclip_kernels.reference_attention_probs(q2, k2, (3, 5), None)
    ) / 2
    torch.testing.assert_close(out, dense @ v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("h", "w"), [(64, 96), (80, 48)], ids=["4x6", "5x3"])
def test_resclip_batch_equals_single_images(visual, h, w):
    nv = build_visual("resclip", visual, params={"rcs_layers": (0, 1)})
    x, text = _images(2, h, w), _text()
    both = nv(x, text)
    single = torch.cat([nv(x[i : i + 1], text) for i in range(2)])
    assert both.shape == (2, 1 + (h // 16) * (w // 16), 32)
    torch.testing.assert_close(both, single, atol=1e-5, rtol=1e-5)


def test_resclip_sfr_needs_text_and_switches(visual):
    nv = build_visual("resclip", visual)
    assert nv.needs_text
    with pytest.raises(ValueError, match="text"):
        nv(_images(1, 64, 64))
    plain = build_visual("resclip", visual, params={"rcs": False, "sfr": False})
    naclip = build_visual("naclip", visual)
    assert not plain.needs_text
    torch.testing.assert_close(plain(_images(1, 64, 80)), naclip(_images(1, 64, 80)), atol=1e-5, rtol=1e-5)


def test_sfr_dense_attention_is_chunk_invariant(visual, monkeypatch):
    nv = build_visual("resclip", visual)
    x, text = _images(1, 80, 112, seed=3), _text()
    full = nv(x, text)
    monkeypatch.setattr(_blocks, "DENSE_CHUNK_BYTES", 1)  # one query row per chunk
    monkeypatch.setattr(resclip, "_PATH_CHUNK_ELEMS", 1)  # one start patch per path chunk
    torch.testing.assert_close(nv(x, text), full, atol=1e-6, rtol=1e-6)


def test_patch_labels_match_torch_mode_and_threshold():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(1, 5, 32, 48, generator=g) * 3, dim=1)
    labels = resclip.patch_labels(probs, (16, 16), 0.4)
    top, pred = probs.max(dim=1)
    pred[top < 0.4] = 0
    cells = pred[0].unfold(0, 16, 16).unfold(1, 16, 16).reshape(2, 3, -1)
    assert torch.equal(labels[0], torch.mode(cells, dim=-1).values)


def test_sfr_bias_rows_are_normalised_and_path_check_decays():
    labels = torch.tensor([[1, 2, 1], [1, 1, 1]])
    with_path = resclip.sfr_bias(labels, 5.0, delete_same_entity=True)
    without = resclip.sfr_bias(labels, 5.0, delete_same_entity=False)
    torch.testing.assert_close(with_path.sum(dim=1), torch.ones(6), atol=1e-6, rtol=0)
    assert with_path.shape == (6, 6) and not torch.equal(with_path, without)
    valid, steps, max_steps = resclip._path_valid(labels, 2, 3)
    assert max_steps == 2 and steps[0, 5] == 2
    assert valid[0, 3] and not valid[0, 2]  # (0,0) -> (1,0) stays on label 1; (0,0) -> (0,2) crosses a 2


# ---------------------------------------------------------------------------------------------------- SC-CLIP


@pytest.mark.parametrize(("h", "w"), [(96, 160), (176, 96)], ids=["6x10", "11x6"])
def test_scclip_non_square_batch_equals_single_images(visual, h, w):
    nv = build_visual("scclip", visual)
    x = _images(2, h, w, seed=6)
    both = nv(x)
    single = torch.cat([nv(x[i : i + 1]) for i in range(2)])
    assert both.shape == (2, (h // 16) * (w // 16), 32) and nv.num_prefix_tokens == 0
    torch.testing.assert_close(both, single, atol=1e-5, rtol=1e-5)


def test_lof_is_chunk_invariant_and_small_grids_work(monkeypatch):
    x = torch.randn(1, 63, 16, generator=torch.Generator().manual_seed(7))
    mask, lof = scclip.lof_outliers(x)
    monkeypatch.setattr(scclip, "_LOF_CHUNK_ELEMS", 1)
    mask2, lof2 = scclip.lof_outliers(x)
    assert torch.equal(mask, mask2) and torch.equal(lof, lof2)
    assert 1 <= int(mask.sum()) <= 4  # ~5 % of 63 tokens
    small, _ = scclip.lof_outliers(x[:, :7])  # fewer tokens than the 30 neighbours
    assert small.shape == (1, 7)


def test_repair_outliers_takes_the_mean_of_clean_neighbours():
    x = torch.arange(12.0).view(1, 12, 1)  # 3x4 grid, value = flat index
    out = scclip.repair_outliers(x, torch.tensor([[False, True] + [False] * 10]), (3, 4))
    assert out[0, 1, 0] == (0 + 2 + 4 + 5 + 6) / 5  # neighbours of (0, 1): (0,0) (0,2) (1,0) (1,1) (1,2)
    assert torch.equal(out[0, [0, *range(2, 12)]], x[0, [0, *range(2, 12)]])


# ------------------------------------------------------------------------------------- pipeline / presets


def test_area_filter_and_no_renormalisation():
    logits = torch.zeros(1, 3, 4, 4)
    logits[0, 1, :, :3] = 1.0  # class 1 wins 12 pixels, class 2 the other 4
    logits[0, 2, :, 3] = 1.0
    labels, probs = inference.postprocess(
        logits,
        torch.zeros(1, 3, 4, 4),
        [0, 1, 2],
        ori_shape=(4, 4),
        pamr_steps=0,
        area_thd=0.3,
        renormalize=False,
    )
    assert (probs[2] == 0).all() and (labels[:, 3] != 2).all()  # 4 / 16 <= 0.3: class 2 removed
    assert not torch.allclose(probs.sum(0), torch.ones(4, 4))


def test_padded_crops_cut_back_to_the_crop():
    calls = []

    class Fake(torch.nn.Module):
        patch_size = (16, 16)

        def forward(self, x):
            calls.append(tuple(x.shape[-2:]))
            b, _, h, w = x.shape
            return torch.ones(b, 1 + (h // 16) * (w // 16), 2)

    out = inference.slide_logits(
        Fake(), torch.zeros(1, 3, 40, 50), torch.eye(2), crop=64, stride=32, pad_crops=True
    )
    assert calls == [(48, 64)] and out.shape == (1, 2, 40, 50)


def test_method_presets_replace_naclips_settings():
    voc = get_preset("voc21")
    clear = method_preset("clearclip", voc)
    assert (clear.prob_thd, clear.logit_scale, clear.crop, clear.stride, clear.mode) == (
        0.5,
        50.0,
        448,
        224,
        "slide",
    )
    assert clear.classes == voc.classes and not clear.pamr
    res = method_preset("resclip", get_preset("voc20"))
    assert res.mode == "whole" and res.params["temp_thd"] == 0.10 and res.params["sfr_weights"] == (2.1, 0.6)
    assert method_preset("sclip", voc).area_thd == 0.1
    assert method_preset("naclip", voc) is voc


def test_segmenter_applies_preset_params_explicit_ones_win():
    clip = tiny_clip(seed=2, vision_layers=3)
    seg = Segmenter(
        clip,
        lambda texts: torch.zeros(len(texts), 77, dtype=torch.long),
        method="resclip",
        method_params={"temp_thd": 0.42},
    )
    assert seg.config.logit_scale == 40.0 and seg.config.mode == "slide" and not seg.config.pamr
    seg.predict(torch.zeros(64, 80, 3, dtype=torch.uint8), preset="voc20")
    assert seg.visual.temp_thd == 0.42 and seg.visual.rcs_weights == (2.0, 0.6)
    assert Segmenter(clip, None, method="clearclip").config.logit_scale == 50.0


@pytest.mark.parametrize("name", ["resclip", "scclip"])
def test_stage_methods_refuse_a_bare_last_block(visual, name):
    nv = build_visual(name, visual)
    with pytest.raises(TypeError, match="forward_intermediates"):
        nv.forward_last_block(torch.zeros(1, 17, 64), (4, 4))
