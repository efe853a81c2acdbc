"""NaclipVisual against the official golden fixtures and open_clip's own forward.

Every ``dense_forward`` case (31) and the ``pos_embed`` case of ``../shared/reference/fixtures`` are
replayed at fp32 ``atol = rtol = 1e-4`` on the ``torch`` and ``reference`` kernel backends, a few on
``triton`` (interpreter on CPU). The tiny ViT is built from the manifest's model block.
"""

from __future__ import annotations

import copy

import numpy as np
import open_clip
import pytest
import torch
from naclip_test_support import fixture_case_ids, triton_skip_reason
from open_clip.transformer import QuickGELU, Transformer, VisionTransformer

import naclip.strategies as strategies_mod
from naclip.inference import CLIP_MEAN, CLIP_STD, normalize
from naclip.model import NaclipVisual
from naclip.testing import build_visual_from_manifest

ATOL = RTOL = 1e-4  # fp32 fixture tolerance (manifest "recommended")


DENSE_IDS = fixture_case_ids("dense_forward")
TRITON_DENSE_IDS = [
    "dense/img_224x320_b1/reduced/naclip/std5",
    "dense/img_320x224_b1/reduced/nonly/std5",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_visual(manifest, fixture_tensors):
    return build_visual_from_manifest(manifest["model"], fixture_tensors["weights.safetensors"])


@pytest.fixture(scope="module")
def normalise(manifest):
    conv = manifest["conventions"]["image_normalisation"]
    assert tuple(conv["mean"]) == CLIP_MEAN and tuple(conv["std"]) == CLIP_STD
    return lambda u8: normalize(u8.float())


def _tensor(fixture_tensors, case, ref):
    key, _, suffix = ref.partition(" ")
    t = fixture_tensors[case["file"]][key]
    return t[: case["batch"]] if suffix else t


def _image(fixture_tensors, case, normalise):
    return normalise(_tensor(fixture_tensors, case, case["inputs"]["image"])[: case["batch"]])


def _replay_dense(visual, case, fixture_tensors, normalise, backend):
    model = NaclipVisual(
        visual,
        arch=case["arch"],
        strategy=case["attn_strategy"],
        gaussian_std=case["gaussian_std"] if case["gaussian_std"] is not None else 5.0,
        backend=backend,
    )
    images = _image(fixture_tensors, case, normalise)
    outputs = case["outputs"]
    diffs = {}
    with torch.no_grad():
        dense = model(images)
        expected = fixture_tensors[case["file"]][outputs["dense"]]
        assert dense.shape == expected.shape
        assert dense.dtype == torch.float32
        torch.testing.assert_close(dense, expected, atol=ATOL, rtol=RTOL)
        diffs["dense"] = (dense - expected).abs().max().item()
        if "last_block_in" in outputs:
            lbi = model.last_block_input(images)
            exp_lbi = _tensor(fixture_tensors, case, outputs["last_block_in"])
            torch.testing.assert_close(lbi, exp_lbi, atol=ATOL, rtol=RTOL)
            diffs["last_block_in"] = (lbi - exp_lbi).abs().max().item()
            if "pre_ln_post" in outputs:
                # The last block alone, fed the official last_block_in.
                pre = model.forward_last_block(exp_lbi, tuple(case["grid_hw"]))
                exp_pre = fixture_tensors[case["file"]][outputs["pre_ln_post"]]
                torch.testing.assert_close(pre, exp_pre, atol=ATOL, rtol=RTOL)
                diffs["pre_ln_post"] = (pre - exp_pre).abs().max().item()
    return diffs


def _dense_params(ids, backends, marks=()):
    return [
        pytest.param(cid, b, id=f"{b}:{cid.removeprefix('dense/')}", marks=list(marks))
        for b in backends
        for cid in ids
    ]


def test_all_dense_cases_collected():
    assert len(DENSE_IDS) == 31, "the fixture manifest should hold 31 dense_forward cases"


@pytest.mark.parametrize(("case_id", "backend"), _dense_params(DENSE_IDS, ("torch", "reference")))
def test_dense_forward_matches_official(case_id, backend, cases, tiny_visual, fixture_tensors, normalise):
    diffs = _replay_dense(tiny_visual, cases[case_id], fixture_tensors, normalise, backend)
    assert diffs["dense"] < ATOL


@pytest.mark.triton
@pytest.mark.parametrize(("case_id", "backend"), _dense_params(TRITON_DENSE_IDS, ("triton",)))
def test_dense_forward_matches_official_triton(
    case_id, backend, cases, tiny_visual, fixture_tensors, normalise
):
    reason = triton_skip_reason()
    if reason:
        pytest.skip(reason)
    diffs = _replay_dense(tiny_visual, cases[case_id], fixture_tensors, normalise, backend)
    assert diffs["dense"] < ATOL


def test_pos_embed_matches_official(manifest, tiny_visual, fixture_tensors):
    (case,) = [c for c in manifest["cases"] if c["kind"] == "pos_embed"]
    gh, gw = case["grid_hw"]
    got = NaclipVisual(tiny_visual).interpolate_pos_embed(gh, gw)
    expected = fixture_tensors[case["file"]][case["outputs"]["pos_embed"]]
    assert got.shape == expected.shape == (1, 1 + gh * gw, manifest["model"]["width"])
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_pos_embed_scale_factor_rule_differs_from_size_resampling(tiny_visual):
    # The official (g + 0.1) / g scale-factor rule is not size-based resampling; guard against a "cleanup".
    model = NaclipVisual(tiny_visual)
    got = model.interpolate_pos_embed(14, 20)[0, 1:]
    pe = tiny_visual.positional_embedding[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    by_size = torch.nn.functional.interpolate(pe, size=(14, 20), mode="bicubic", align_corners=False)
    assert (got - by_size.permute(0, 2, 3, 1).reshape(14 * 20, -1)).abs().max() > 1e-3


def test_pos_embed_native_grid_is_stored(tiny_visual):
    model = NaclipVisual(tiny_visual)
    assert model.pretrained_grid == (14, 14)
    assert torch.equal(model.interpolate_pos_embed(14, 14)[0], tiny_visual.positional_embedding)


def test_pos_embed_quirk_nonsquare_with_pretrained_token_count(tiny_visual):
    # 112 x 448 at P=16 -> 7 x 28 = 196 patches = the pretrained count: the official code uses the 14x14
    # table as is.
    model = NaclipVisual(tiny_visual)
    assert torch.equal(model.interpolate_pos_embed(7, 28)[0], tiny_visual.positional_embedding)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 112, 448))
    assert out.shape == (1, 1 + 7 * 28, 32)


@pytest.mark.parametrize(("gh", "gw"), [(1, 1), (5, 7), (14, 15), (31, 23), (3, 40)], ids=lambda g: str(g))
def test_pos_embed_interpolated_shapes(tiny_visual, gh, gw):
    out = NaclipVisual(tiny_visual).interpolate_pos_embed(gh, gw)
    assert out.shape == (1, 1 + gh * gw, 128)
    assert torch.equal(out[0, 0], tiny_visual.positional_embedding[0])  # CLS row copied


def test_size_not_multiple_of_patch_follows_conv_floor(tiny_visual):
    # 237 x 333 -> grid 14 x 20: identical to the top-left 224 x 320 crop (conv1 drops the remainder).
    torch.manual_seed(0)
    images = torch.randn(1, 3, 237, 333)
    model = NaclipVisual(tiny_visual, backend="torch")
    with torch.no_grad():
        full = model(images)
        crop = model(images[:, :, :224, :320].contiguous())
    assert full.shape == (1, 1 + 14 * 20, 32)
    torch.testing.assert_close(full, crop, atol=1e-6, rtol=1e-6)


def test_vanilla_vanilla_equals_open_clip_forward(tiny_visual):
    # arch=vanilla, strategy=vanilla is plain CLIP: compare with open_clip's own tower (tokens, pooled CLS).
    torch.manual_seed(1)
    images = torch.randn(2, 3, 224, 224)
    model = NaclipVisual(tiny_visual, arch="vanilla", strategy="vanilla", backend="torch")
    with torch.no_grad():
        dense = model(images)
        inter = tiny_visual.forward_intermediates(
            images, indices=[2], normalize_intermediates=True, output_fmt="NLC", output_extra_tokens=True
        )
        pooled = tiny_visual(images)
    tokens = inter["image_intermediates"][0] @ tiny_visual.proj
    torch.testing.assert_close(dense[:, 1:], tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense[:, 0], pooled, atol=1e-5, rtol=1e-5)


def test_nonly_batch_equals_per_image(tiny_visual):
    torch.manual_seed(2)
    images = torch.randn(3, 3, 160, 208)  # grid 10 x 13, odd N
    model = NaclipVisual(tiny_visual, strategy="nonly", gaussian_std=2.0, backend="torch")
    with torch.no_grad():
        batch = model(images)
        single = torch.cat([model(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["naclip", "kk", "vanilla"])
def test_batch_equals_per_image(tiny_visual, strategy):
    torch.manual_seed(3)
    images = torch.randn(2, 3, 96, 144)
    model = NaclipVisual(tiny_visual, strategy=strategy, backend="torch")
    with torch.no_grad():
        batch = model(images)
        single = torch.cat([model(images[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


def test_set_params_takes_effect_without_stale_state(tiny_visual):
    torch.manual_seed(4)
    images = torch.randn(1, 3, 224, 224)
    model = NaclipVisual(tiny_visual, gaussian_std=5.0, backend="torch")
    with torch.no_grad():
        out5 = model(images)
        model.set_params(gaussian_std=1.5)
        out15 = model(images)
        fresh15 = NaclipVisual(tiny_visual, gaussian_std=1.5, backend="torch")(images)
        model.set_params(arch="vanilla", strategy="csa")
        out_csa = model(images)
    assert (out5 - out15).abs().max() > 1e-3
    torch.testing.assert_close(out15, fresh15, atol=0, rtol=0)
    assert (out_csa - out15).abs().max() > 1e-3
    assert (model.arch, model.strategy, model.gaussian_std) == ("vanilla", "csa", 1.5)


def test_set_params_invalid_changes_nothing(tiny_visual):
    model = NaclipVisual(tiny_visual)
    with pytest.raises(ValueError, match="csa.*vanilla"):
        model.set_params(strategy="csa")
    with pytest.raises(ValueError, match="gaussian_std"):
        model.set_params(gaussian_std=0.0)
    assert (model.arch, model.strategy, model.gaussian_std) == ("reduced", "naclip", 5.0)


def test_query_rows_skipped_for_key_strategies(tiny_visual):
    # Poisoning the Q rows of in_proj must not change naclip/kk (they never compute Q) but must break vanilla.
    visual = copy.deepcopy(tiny_visual)
    torch.manual_seed(5)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        clean = {
            s: NaclipVisual(visual, strategy=s, backend="torch")(images) for s in ("naclip", "kk", "vanilla")
        }
        attn = visual.transformer.resblocks[-1].attn
        attn.in_proj_weight[: attn.embed_dim] = float("nan")
        poisoned = {s: NaclipVisual(visual, strategy=s, backend="torch")(images) for s in clean}
    torch.testing.assert_close(poisoned["naclip"], clean["naclip"], atol=0, rtol=0)
    torch.testing.assert_close(poisoned["kk"], clean["kk"], atol=0, rtol=0)
    assert torch.isnan(poisoned["vanilla"]).any()


def test_kernel_receives_strided_views(tiny_visual, monkeypatch):
    seen = []
    original = strategies_mod.naclip_kernels.gaussian_attention

    def spy(q, k, v, grid_hw, sigma, **kw):
        seen.append((q, k, v, grid_hw, sigma, kw))
        return original(q, k, v, grid_hw, sigma, **kw)

    monkeypatch.setattr(strategies_mod.naclip_kernels, "gaussian_attention", spy)
    model = NaclipVisual(tiny_visual, backend="torch")
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 320))
    ((q, k, v, grid_hw, sigma, kw),) = seen
    assert q is k  # key-key attention
    assert k.shape == v.shape == (1, 2, 1 + 14 * 20, 64)
    assert not k.is_contiguous() and not v.is_contiguous()  # [B, T, H, D] memory seen as [B, H, T, D]
    assert (
        k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    )  # both views of one K|V projection
    assert grid_hw == (14, 20) and sigma == 5.0
    assert kw["num_prefix_tokens"] == 1 and kw["backend"] == "torch"


def test_transformer_batch_first_false(tiny_visual, manifest, fixture_tensors, cases, normalise):
    # A tower whose blocks run in LND layout (nn.MultiheadAttention(batch_first=False)) gives the same result.
    visual = copy.deepcopy(tiny_visual)
    cfg = manifest["model"]
    lnd = Transformer(cfg["width"], cfg["layers"], cfg["heads"], act_layer=QuickGELU, batch_first=False)
    lnd.load_state_dict(visual.transformer.state_dict())
    visual.transformer = lnd.eval()
    _replay_dense(
        visual, cases["dense/img_224x320_b1/reduced/naclip/std5"], fixture_tensors, normalise, "torch"
    )
    _replay_dense(visual, cases["dense/img_224x224_b2/vanilla/csa"], fixture_tensors, normalise, "torch")


def _custom_block_visual(manifest, fixture_tensors, **kw):
    cfg = manifest["model"]
    visual = VisionTransformer(
        image_size=cfg["input_resolution"],
        patch_size=cfg["patch_size"],
        width=cfg["width"],
        layers=cfg["layers"],
        heads=cfg["heads"],
        mlp_ratio=4.0,
        output_dim=cfg["output_dim"],
        act_layer=QuickGELU,
        block_type="custom",
        **kw,
    )
    sd = {k.removeprefix("visual."): v for k, v in fixture_tensors["weights.safetensors"].items()}
    missing, unexpected = visual.load_state_dict(sd, strict=False)
    return visual.eval(), missing, unexpected


def test_open_clip_attention_class_block(manifest, fixture_tensors, cases, normalise):
    # open_clip's own Attention (CustomResidualAttentionBlock) exposes the same parameter names.
    visual, missing, unexpected = _custom_block_visual(manifest, fixture_tensors)
    assert not missing and not unexpected
    for cid in ("dense/img_224x320_b1/reduced/naclip/std5", "dense/img_224x224_b2/vanilla/vanilla"):
        _replay_dense(visual, cases[cid], fixture_tensors, normalise, "torch")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"qk_norm": True}, "qk_norm"),
        ({"scale_attn": True}, "ln_attn"),
        ({"scale_heads": True}, "scale_heads"),
    ],
    ids=["qk_norm", "scale_attn", "scale_heads"],
)
def test_unsupported_last_block_rejected(manifest, fixture_tensors, kw, match):
    visual, _, _ = _custom_block_visual(manifest, fixture_tensors, **kw)
    with pytest.raises(ValueError, match=match):
        NaclipVisual(visual)


@pytest.mark.parametrize(
    "kw",
    [{"qk_norm": True}, {"scale_heads": True}, {"scaled_cosine_attn": True}, {"scale_attn_inner": True}],
    ids=["qk_norm", "scale_heads", "scaled_cosine", "inner_norm"],
)
def test_last_block_and_sdpa_share_attention_checks(manifest, fixture_tensors, kw):
    # One list of unsupported attention options: the last-block error quotes the SDPA fallback reason.
    from naclip.model import _attn_unsupported, _sdpa_unsupported_reasons

    visual, _, _ = _custom_block_visual(manifest, fixture_tensors, **kw)
    attn_reasons = _attn_unsupported(visual.transformer.resblocks[-1].attn)
    assert len(attn_reasons) == 1
    assert _sdpa_unsupported_reasons(visual.transformer.resblocks[0]) == attn_reasons
    with pytest.raises(ValueError) as info:
        NaclipVisual(visual)
    assert attn_reasons[0] in str(info.value) and "resblocks[-1].attn" in str(info.value)


def test_layerscale_vanilla_matches_open_clip():
    torch.manual_seed(6)
    visual = VisionTransformer(
        image_size=64,
        patch_size=16,
        width=64,
        layers=2,
        heads=4,
        mlp_ratio=2.0,
        ls_init_value=0.5,
        output_dim=16,
    ).eval()
    images = torch.randn(2, 3, 64, 64)
    model = NaclipVisual(visual, arch="vanilla", strategy="vanilla", backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(model(images)[:, 0], visual(images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("dtype", "mixed", "atol"),
    [
        pytest.param(torch.float16, False, 2e-2, id="fp16"),
        pytest.param(torch.bfloat16, False, 1e-1, id="bf16"),
        pytest.param(torch.float16, True, 2e-2, id="fp16-openclip-mixed"),
    ],
)
def test_low_precision_weights(tiny_visual, dtype, mixed, atol):
    # Whole tower in fp16/bf16 (pure, or open_clip's mixed precision: linear/conv low, the rest fp32);
    # fp32 images are cast to the weights' dtype and the output keeps it.
    torch.manual_seed(8)
    images = torch.randn(1, 3, 224, 320)
    low = copy.deepcopy(tiny_visual)
    if mixed:
        open_clip.convert_weights_to_lp(low, dtype=dtype)
    else:
        low = low.to(dtype)
    with torch.no_grad():
        ref = NaclipVisual(tiny_visual, backend="torch")(images)
        out = NaclipVisual(low, backend="torch")(images)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=atol)


def test_errors(tiny_visual):
    with pytest.raises(TypeError, match="VisionTransformer"):
        NaclipVisual(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="strategy"):
        NaclipVisual(tiny_visual, strategy="gav")
    with pytest.raises(ValueError, match="arch"):
        NaclipVisual(tiny_visual, arch="reduced_no_ffn")
    with pytest.raises(ValueError, match="csa"):
        NaclipVisual(tiny_visual, arch="reduced", strategy="csa")
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="gaussian_std"):
            NaclipVisual(tiny_visual, strategy="nonly", gaussian_std=bad)
    with pytest.raises(TypeError, match="gaussian_std"):
        NaclipVisual(tiny_visual, gaussian_std="5")
    NaclipVisual(
        tiny_visual, strategy="kk", gaussian_std=0
    )  # std is irrelevant for kk, as in the official code
    with pytest.raises(TypeError, match="backend"):
        NaclipVisual(tiny_visual, backend=3)
    model = NaclipVisual(tiny_visual)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(3, 224, 224))
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, 224, 224, dtype=torch.uint8))
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        model(torch.randn(1, 3, 15, 224))
    with pytest.raises(ValueError, match="tokens"):
        model.forward_last_block(torch.randn(1, 197, 128), (14, 15))
    with pytest.raises(ValueError, match="gh"):
        model.interpolate_pos_embed(0, 3)


@pytest.mark.parametrize(
    ("gh", "gw", "exc", "match"),
    [
        (14.0, 14, TypeError, "gh: expected a positive int, got float 14.0"),
        (14, "14", TypeError, "gw: expected a positive int, got str '14'"),
        (True, 14, TypeError, "gh: expected a positive int, got bool True"),
        (14, -2, ValueError, "gw: expected a positive int, got -2"),
    ],
    ids=["float", "str", "bool", "negative"],
)
def test_interpolate_pos_embed_argument_errors(tiny_visual, gh, gw, exc, match):
    with pytest.raises(exc, match=match):
        NaclipVisual(tiny_visual).interpolate_pos_embed(gh, gw)


def test_interpolate_pos_embed_accepts_numpy_and_tensor_ints(tiny_visual):
    model = NaclipVisual(tiny_visual)
    ref = model.interpolate_pos_embed(10, 12)
    assert ref.shape[1] == 1 + 10 * 12
    torch.testing.assert_close(model.interpolate_pos_embed(np.int64(10), np.int32(12)), ref, rtol=0, atol=0)
    torch.testing.assert_close(model.interpolate_pos_embed(torch.tensor(10), 12), ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("grid_hw", "exc", "match"),
    [
        (14, TypeError, "grid_hw must be a .gh, gw. tuple"),
        ("ab", TypeError, "grid_hw must be a .gh, gw. tuple"),
        ((14, 14, 1), ValueError, "grid_hw must be a .gh, gw. tuple"),
        ((14.0, 14), TypeError, r"grid_hw\[0\]: expected a positive int, got float 14.0"),
        ((14, 0), ValueError, r"grid_hw\[1\]: expected a positive int, got 0"),
    ],
    ids=["int", "str", "three", "float", "zero"],
)
def test_forward_last_block_validates_grid_hw(tiny_visual, grid_hw, exc, match):
    model = NaclipVisual(tiny_visual, backend="torch")
    width = model.width
    with pytest.raises(exc, match=match):
        model.forward_last_block(torch.randn(1, 197, width), grid_hw)


def test_properties(tiny_visual):
    model = NaclipVisual(tiny_visual)
    assert model.patch_size == (16, 16)
    assert model.pretrained_grid == (14, 14)
    assert model.output_dim == 32 and model.width == 128 and model.num_heads == 2
    assert model.grid_for(375, 500) == (23, 31)
    assert "naclip" in repr(model)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_visual.parameters())
    assert model.visual is tiny_visual  # wraps, does not copy


@pytest.mark.slow
def test_random_open_clip_vit_b16_nonsquare():
    # A real-size open_clip ViT-B-16 (random init, no download) on a 500 x 375 (W x H) image.
    torch.manual_seed(7)
    clip = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    model = NaclipVisual(clip.visual, backend="torch")
    with torch.no_grad():
        out = model(torch.randn(1, 3, 375, 500))
    assert out.shape == (1, 1 + 23 * 31, 512)
    assert torch.isfinite(out).all()
    # vanilla/vanilla at the native size equals open_clip's encode_image (CLS) path.
    model.set_params(arch="vanilla", strategy="vanilla")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(images)[:, 0], clip.encode_image(images), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ blocks 0 .. L-2 through SDPA
def _random_block(kind: str) -> torch.nn.Module:
    """A ViT-B-16-sized open_clip block (width 768, 12 heads, MLP 3072, QuickGELU) with random biases."""
    from open_clip.transformer import CustomResidualAttentionBlock, ResidualAttentionBlock

    torch.manual_seed(11)
    if kind == "custom":
        block = CustomResidualAttentionBlock(768, 12, 4.0, act_layer=QuickGELU)
    else:
        block = ResidualAttentionBlock(
            768,
            12,
            4.0,
            act_layer=QuickGELU,
            ls_init_value=0.3 if kind == "layerscale" else None,
            batch_first=kind != "lnd",
        )
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return block.eval()


@pytest.mark.parametrize("kind", ["mha", "lnd", "layerscale", "custom"])
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_sdpa_block_equals_open_clip_block(kind, grad):
    # Odd T = 1 + 10*13; B = 2. no_grad exercises nn.MultiheadAttention's native fast path as the reference.
    from naclip.model import _sdpa_block_forward, _sdpa_unsupported_reasons

    block = _random_block(kind)
    assert _sdpa_unsupported_reasons(block) == []
    torch.manual_seed(12)
    x = torch.randn(2, 131, 768)
    with torch.set_grad_enabled(grad):
        ref = block(x.transpose(0, 1)).transpose(0, 1) if kind == "lnd" else block(x)
        got = _sdpa_block_forward(block, x)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_sdpa_block_passes_strided_views(monkeypatch):
    from naclip import model as model_mod

    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        seen.append((q, k, v, args, kw))
        return original(q, k, v, *args, **kw)

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", spy)
    block = _random_block("mha")
    with torch.no_grad():
        model_mod._sdpa_block_forward(block, torch.randn(1, 37, 768))
    ((q, k, v, args, kw),) = seen
    assert q.shape == k.shape == v.shape == (1, 12, 37, 64)
    assert not q.is_contiguous() and q.stride(-1) == 1
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert args == () and kw == {}  # no mask, no dropout, default 1/sqrt(D) scale


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"qk_norm": True}, "qk_norm"),
        ({"scale_attn": True}, "ln_attn"),
        ({"scale_heads": True}, "head_scale"),
        ({"scaled_cosine_attn": True}, "cosine"),
        ({"scale_attn_inner": True}, "ln_inner"),
    ],
    ids=["qk_norm", "scale_attn", "scale_heads", "scaled_cosine", "inner_norm"],
)
def test_sdpa_fallback_for_unsupported_block(monkeypatch, kw, match):
    # Blocks with options the SDPA path does not reproduce run their own forward, with the same result.
    from open_clip.transformer import CustomTransformer, Transformer

    from naclip.model import _sdpa_unsupported_reasons

    torch.manual_seed(13)
    visual = VisionTransformer(
        image_size=64, patch_size=16, width=64, layers=3, heads=4, mlp_ratio=2.0, output_dim=16
    ).eval()
    odd = Transformer(64, 3, 4, mlp_ratio=2.0, block_type="custom", **kw).eval()
    assert not isinstance(odd, CustomTransformer)
    visual.transformer.resblocks[0] = odd.resblocks[0]  # only block 0 is unsupported
    reasons = _sdpa_unsupported_reasons(visual.transformer.resblocks[0])
    assert len(reasons) == 1 and match in reasons[0]
    assert _sdpa_unsupported_reasons(visual.transformer.resblocks[1]) == []
    if "scaled_cosine_attn" in kw:
        return  # open_clip 3.x's own scaled-cosine forward fails on 4-D q/k (torch.bmm); reasons checked only

    calls = []
    block_cls = type(odd.resblocks[0])
    original = block_cls.forward

    def spy(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(block_cls, "forward", spy)
    model = NaclipVisual(visual, arch="vanilla", strategy="vanilla", backend="torch")
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        lbi = model.last_block_input(images)
        x, _ = model._embed(images)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
    assert calls[0] is visual.transformer.resblocks[0]  # the stock path ran for block 0
    torch.testing.assert_close(lbi, x, atol=1e-5, rtol=1e-5)


def test_sdpa_fallback_for_hooks_and_foreign_blocks(tiny_visual):
    from naclip.model import _sdpa_unsupported_reasons

    visual = copy.deepcopy(tiny_visual)
    blocks = visual.transformer.resblocks
    assert all(_sdpa_unsupported_reasons(b) == [] for b in blocks)
    seen = []
    handle = blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    assert "hooks" in _sdpa_unsupported_reasons(blocks[0])[0]
    with torch.no_grad():
        NaclipVisual(visual, backend="torch")(torch.randn(1, 3, 224, 240))
    assert seen == [(1, 1 + 14 * 15, 128)]  # the hook ran: block 0 took its own forward
    handle.remove()

    class MyBlock(type(blocks[1])):
        pass

    blocks[1].__class__ = MyBlock
    assert "not open_clip's" in _sdpa_unsupported_reasons(blocks[1])[0]
