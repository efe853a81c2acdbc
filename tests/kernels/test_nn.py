"""naclip_kernels.nn: GaussianAttention and patch_vit against independent float64 oracles (tests/kernels/
nn_oracle.py) for timm, open_clip and Hugging Face ViTs at non-default input sizes, exact restore, errors."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import nn_oracle as oracle
import pytest
import torch
from torch import nn

from naclip_kernels.nn import SIGMA_FLOOR, GaussianAttention, PatchHandle, patch_vit

timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

RTOL = 1e-4  # fp32 patched model vs float64 oracle: max |got - ref| / max |ref|


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).abs().max() / ref.abs().max())


# ------------------------------------------------------------------------------------------------ models
@dataclass
class Family:
    """A tiny random model, how to call it on images, its blocks, block oracle, prefix count and heads."""

    model: nn.Module
    images: torch.Tensor
    grid_hw: tuple[int, int]
    prefix: int
    heads: int
    blocks: Any  # model -> list of blocks
    block_oracle: Any
    call: Any  # (model, images) -> anything (the last block's output is captured by a hook)


def _timm(**kw) -> nn.Module:
    torch.manual_seed(0)
    base = dict(pretrained=False, depth=2, embed_dim=64, num_heads=4, num_classes=0)
    return timm.create_model("vit_tiny_patch16_224", **base, **kw).eval()


def _hf_vit_layers(m):
    return m.layers if hasattr(m, "layers") else m.encoder.layer


def build(name: str) -> Family:
    """A fresh copy of the (cached) tiny model ``name`` with its inputs."""
    return copy.deepcopy(_build(name))


@functools.cache
def _build(name: str) -> Family:
    torch.manual_seed(1)
    if name.startswith("timm"):
        kw, size = {
            "timm-fixed-cls": (dict(img_size=(48, 80)), (48, 80)),
            "timm-dynamic-cls": (dict(img_size=64, dynamic_img_size=True), (80, 48)),
            "timm-dynamic-reg4": (dict(img_size=64, dynamic_img_size=True, reg_tokens=4), (48, 112)),
            "timm-no-cls": (
                dict(img_size=64, dynamic_img_size=True, class_token=False, global_pool="avg"),
                (64, 80),
            ),
            "timm-qknorm-layerscale": (dict(img_size=(64, 48), qk_norm=True, init_values=0.1), (64, 48)),
        }[name]
        m = _timm(**kw)
        return Family(
            m,
            torch.randn(2, 3, *size),
            (size[0] // 16, size[1] // 16),
            m.num_prefix_tokens,
            4,
            lambda m: list(m.blocks),
            oracle.timm_block,
            lambda m, x: m.forward_features(x),
        )
    if name.startswith("open_clip"):
        custom = name == "open_clip-custom-qknorm"
        torch.manual_seed(0)
        extra = dict(block_type="custom", qk_norm=True) if custom else dict(ls_init_value=0.1)
        m = open_clip.transformer.VisionTransformer(
            image_size=(48, 80),
            patch_size=16,
            width=64,
            layers=2,
            heads=4,
            mlp_ratio=2.0,
            output_dim=32,
            **extra,
        ).eval()
        return Family(
            m,
            torch.randn(2, 3, 48, 80),
            (3, 5),
            1,
            4,
            lambda m: list(m.transformer.resblocks),
            oracle.open_clip_block,
            lambda m, x: m(x),
        )
    cfg = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=32,
        patch_size=8,
    )
    torch.manual_seed(0)
    call = lambda m, x: m(pixel_values=x, interpolate_pos_encoding=True)
    if name == "hf-vit":
        m = transformers.ViTModel(transformers.ViTConfig(**cfg)).eval()
        return Family(m, torch.randn(2, 3, 40, 56), (5, 7), 1, 4, _hf_vit_layers, oracle.hf_vit_block, call)
    m = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg)).eval()
    return Family(
        m,
        torch.randn(2, 3, 56, 40),
        (7, 5),
        1,
        4,
        lambda m: list(m.encoder.layers),
        oracle.hf_clip_block,
        call,
    )


FAMILIES = [
    "timm-fixed-cls",
    "timm-dynamic-cls",
    "timm-dynamic-reg4",
    "timm-no-cls",
    "timm-qknorm-layerscale",
    "open_clip-mha-layerscale",
    "open_clip-custom-qknorm",
    "hf-vit",
    "hf-clip",
]


def last_block_output(fam: Family, model: nn.Module, images: torch.Tensor, grad=False) -> torch.Tensor:
    out = {}
    blk = fam.blocks(model)[-1]
    h = blk.register_forward_hook(lambda mod, a, o: out.__setitem__("y", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.set_grad_enabled(grad):
            fam.call(model, images)
    finally:
        h.remove()
    return out["y"]


def oracle_output(fam: Family, *, patched, sigma, key_key, bias_scale=1.0, grad=False) -> torch.Tensor:
    """float64 copy of the model: the embedding's output (block 0's input), then the oracle blocks."""
    m64 = copy.deepcopy(fam.model).double()
    seen = {}
    first = fam.blocks(m64)[0]
    h = first.register_forward_pre_hook(lambda mod, a: seen.__setitem__("x", a[0]))
    try:
        with torch.no_grad():
            fam.call(m64, fam.images.double())
    finally:
        h.remove()
    with torch.set_grad_enabled(grad):
        return oracle.run_blocks(
            fam.block_oracle,
            fam.blocks(m64),
            seen["x"],
            patched=patched,
            grid_hw=fam.grid_hw,
            sigma=sigma,
            prefix=fam.prefix,
            heads=fam.heads,
            key_key=key_key,
            bias_scale=bias_scale,
        )


# ------------------------------------------------------------------------------------ patched vs oracle
ORACLE_CASES = (
    [pytest.param(n, "all", False, id=f"{n}-all") for n in FAMILIES]
    + [pytest.param(n, "last", False, id=f"{n}-last") for n in FAMILIES[::2]]
    + [pytest.param(n, "last", True, id=f"{n}-last-keykey") for n in FAMILIES[1::2] + ["hf-clip"]]
)


@pytest.mark.parametrize("name, blocks, key_key", ORACLE_CASES)
def test_patched_matches_float64_oracle(name, blocks, key_key):
    fam = build(name)
    sigma = 1.5
    with patch_vit(fam.model, sigma=sigma, blocks=blocks, key_key=key_key, backend="torch") as h:
        got = last_block_output(fam, fam.model, fam.images)
        assert isinstance(h, PatchHandle)
    n = len(fam.blocks(fam.model))
    patched = set(range(n)) if blocks == "all" else {n - 1}
    ref = oracle_output(fam, patched=patched, sigma=sigma, key_key=key_key)
    assert got.shape == ref.shape == (2, fam.prefix + fam.grid_hw[0] * fam.grid_hw[1], 64)
    err = rel_err(got, ref)
    assert err <= RTOL
    # the comparison can tell the bias apart: the unpatched oracle is much further away than the patched one
    assert rel_err(got, oracle_output(fam, patched=set(), sigma=sigma, key_key=False)) > 10 * max(err, 1e-7)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("bias_scale", [0.5, -2.0], ids=["bs0.5", "bs-2"])
def test_backends_and_bias_scale(backend, bias_scale):
    fam = build("timm-dynamic-reg4")
    with patch_vit(fam.model, sigma=0.8, blocks=[0, -1], bias_scale=bias_scale, backend=backend):
        got = last_block_output(fam, fam.model, fam.images)
    ref = oracle_output(fam, patched={0, 1}, sigma=0.8, key_key=False, bias_scale=bias_scale)
    assert rel_err(got, ref) <= RTOL


def test_grid_follows_each_forward_input():
    fam = build("timm-dynamic-cls")
    cases = []
    for size in [(32, 96), (96, 32), (48, 48)]:  # non-square both ways, then square, through one patch
        fam.images, fam.grid_hw = torch.randn(1, 3, *size), (size[0] // 16, size[1] // 16)
        cases.append((fam.images, oracle_output(fam, patched={0, 1}, sigma=1.0, key_key=False)))
    with patch_vit(fam.model, sigma=1.0, backend="torch"):
        for images, ref in cases:
            assert rel_err(last_block_output(fam, fam.model, images), ref) <= RTOL


# ----------------------------------------------------------------------------------------- exact restore
@pytest.mark.parametrize("name", ["timm-dynamic-reg4", "open_clip-mha-layerscale", "hf-vit", "hf-clip"])
def test_remove_restores_exactly(name):
    fam = build(name)
    before = last_block_output(fam, fam.model, fam.images)
    originals = [getattr(b, a) for b, a in _slots(fam)]
    state = {k: v.clone() for k, v in fam.model.state_dict().items()}
    h = patch_vit(fam.model, sigma=2.0, learnable_sigma=False)
    assert not torch.equal(last_block_output(fam, fam.model, fam.images), before)
    h.remove()
    h.remove()  # idempotent
    assert [getattr(b, a) for b, a in _slots(fam)] == originals
    assert all(getattr(b, a) is o for (b, a), o in zip(_slots(fam), originals, strict=True))
    assert torch.equal(last_block_output(fam, fam.model, fam.images), before)
    after = fam.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert not fam.model._forward_pre_hooks and all(not m._forward_pre_hooks for m in fam.model.modules())


def _slots(fam: Family) -> list[tuple[nn.Module, str]]:
    from naclip_kernels._vit_families import resolve

    return resolve(fam.model).attentions


def test_patched_modules_share_weights():
    fam = build("timm-fixed-cls")
    attn = fam.model.blocks[1].attn
    with patch_vit(fam.model, sigma=2.0, blocks="last") as h:
        new = h.modules[1]
        assert fam.model.blocks[1].attn is new and isinstance(new, GaussianAttention)
        assert new.qkv is attn.qkv and new.proj is attn.proj
        assert new.qkv.weight.data_ptr() == attn.qkv.weight.data_ptr()
        names = {n for n, _ in fam.model.named_parameters()}
        assert "blocks.1.attn.qkv.weight" in names and "blocks.1.attn.proj.bias" in names


# --------------------------------------------------------------------------------- GaussianAttention alone
@pytest.mark.parametrize(
    "grid, prefix, key_key",
    [((3, 5), 1, False), ((1, 7), 0, True), ((5, 3), 2, False), ((4, 4), 1, True)],
    ids=["g3x5-P1", "g1x7-P0-kk", "g5x3-P2", "g4x4-P1-kk"],
)
def test_module_matches_oracle(grid, prefix, key_key):
    torch.manual_seed(3)
    m = GaussianAttention(48, 3, sigma=1.3, key_key=key_key, num_prefix_tokens=prefix, backend="torch").eval()
    n = prefix + grid[0] * grid[1]
    x = torch.randn(n, 2, 48).transpose(0, 1)  # odd strides: a [B, N, C] view of an [N, B, C] tensor
    got = m(x, grid)
    (wq, wk, wv), (bq, bk, bv) = m.qkv.weight.double().chunk(3), m.qkv.bias.double().chunk(3)
    g = oracle.gaussian_g(grid, 1.3, prefix, 3)
    ref = oracle.attention(
        x.double(),
        wq,
        bq,
        wk,
        bk,
        wv,
        bv,
        m.proj.weight.double(),
        m.proj.bias.double(),
        heads=3,
        bias=g,
        key_key=key_key,
    )
    assert got.shape == x.shape and got.dtype == x.dtype
    assert rel_err(got, ref) <= RTOL


def test_from_multihead_shares_and_matches():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    m = GaussianAttention.from_multihead(mha, sigma=None, num_prefix_tokens=0)
    assert m.qkv.weight is mha.in_proj_weight and m.qkv.bias is mha.in_proj_bias and m.proj is mha.out_proj
    x = torch.randn(2, 6, 32)
    torch.testing.assert_close(m(x, None), mha(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)


def test_from_timm_shares_and_matches_unbiased():
    attn = _timm(img_size=32).blocks[0].attn
    m = GaussianAttention.from_timm(attn, sigma=None, backend="torch")
    assert m.qkv is attn.qkv and m.proj is attn.proj and m.q_norm is attn.q_norm
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(m(x, None), attn(x), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ errors
def test_unsupported_model_names_class_and_supported():
    with pytest.raises(
        TypeError, match=r"torch\.nn\.modules\.linear\.Linear.*supported: timm VisionTransformer"
    ):
        patch_vit(nn.Linear(3, 3), sigma=1.0)
    convnet = timm.create_model("resnet18", pretrained=False)
    with pytest.raises(TypeError, match="ResNet"):
        patch_vit(convnet, sigma=1.0)


def test_patching_twice_is_refused():
    m = _timm(img_size=32)
    with patch_vit(m, sigma=1.0, blocks="last"), pytest.raises(TypeError, match="already patched"):
        patch_vit(m, sigma=1.0, blocks="last")
    patch_vit(m, sigma=1.0).remove()  # fine once removed


@pytest.mark.parametrize(
    "blocks, exc, match",
    [
        ("first", ValueError, "'all', 'last'"),
        ([2], ValueError, "out of range"),
        ([-3], ValueError, "out of range"),
        ([0, -2], ValueError, "distinct"),
        ([], ValueError, "at least one"),
        ([True], TypeError, "ints"),
        (1, TypeError, "list of ints"),
    ],
    ids=["name", "too-big", "too-negative", "duplicate", "empty", "bool", "bare-int"],
)
def test_bad_blocks(blocks, exc, match):
    m = _timm(img_size=32)
    with pytest.raises(exc, match=match):
        patch_vit(m, sigma=1.0, blocks=blocks)
    assert type(m.blocks[0].attn).__name__ == "Attention"  # nothing half-patched


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_sigma(sigma):
    with pytest.raises(ValueError, match="sigma"):
        patch_vit(_timm(img_size=32), sigma=sigma)


def test_attention_dropout_in_training_is_refused():
    m = _timm(img_size=32, attn_drop_rate=0.1)
    with patch_vit(m, sigma=1.0):
        m.eval()
        m.forward_features(torch.randn(1, 3, 32, 32))  # eval: dropout is off, fine
        m.train()
        with pytest.raises(ValueError, match=r"attention dropout p=0\.1 in training mode"):
            m.forward_features(torch.randn(1, 3, 32, 32))


def test_masks_and_cross_attention_are_refused():
    m = _timm(img_size=32)
    with patch_vit(m, sigma=1.0, blocks="last") as h, pytest.raises(ValueError, match="attn_mask"):
        m.forward_features(torch.randn(1, 3, 32, 32), attn_mask=torch.zeros(5, 5))
    assert h.removed
    torch.manual_seed(0)
    mha_model = open_clip.transformer.VisionTransformer(
        image_size=32, patch_size=16, width=32, layers=1, heads=2, mlp_ratio=2.0, output_dim=8
    )
    with patch_vit(mha_model, sigma=1.0) as h:
        x = torch.randn(1, 5, 32)
        with pytest.raises(ValueError, match="self-attention only"):
            h.modules[0](x, x.clone(), x)


def test_token_count_mismatch_is_explained():
    m = GaussianAttention(16, 2, sigma=1.0)
    with pytest.raises(
        ValueError, match=r"N = 10 tokens but num_prefix_tokens \+ gh \* gw = 1 \+ 3 \* 2 = 7"
    ):
        m(torch.randn(1, 10, 16), (3, 2))
    with pytest.raises(ValueError, match="C = 16 channels"):
        m(torch.randn(1, 10, 8), (3, 3))
    with pytest.raises(ValueError, match="grid_hw must be given"):
        m(torch.randn(1, 10, 16), None)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(dim=10, num_heads=3), ValueError, "divisible"),
        (dict(dim=8, num_heads=0), ValueError, "num_heads"),
        (dict(dim=8.0, num_heads=2), TypeError, "dim"),
        (dict(dim=8, num_heads=2, per_head_sigma=True), ValueError, "learnable_sigma=True"),
        (dict(dim=8, num_heads=2, sigma=None, learnable_sigma=True), ValueError, "starting sigma"),
        (dict(dim=8, num_heads=2, backend="cuda"), ValueError, "backend"),
        (dict(dim=8, num_heads=2, key_key=1), TypeError, "key_key"),
        (dict(dim=8, num_heads=2, bias_scale=float("nan")), ValueError, "bias_scale"),
        (dict(dim=8, num_heads=2, num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
    ],
    ids=[
        "indivisible",
        "zero-heads",
        "float-dim",
        "per-head-fixed",
        "learnable-none",
        "backend",
        "bool-flag",
        "nan-bias-scale",
        "neg-prefix",
    ],
)
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GaussianAttention(**kwargs)


def test_learnable_sigma_parameter_layout():
    m = GaussianAttention(16, 4, sigma=2.0, learnable_sigma=True, per_head_sigma=True)
    assert dict(m.named_parameters())["sigma"].shape == (4,)
    assert torch.equal(m.sigma.detach(), torch.full((4,), 2.0))
    with torch.no_grad():
        m.sigma[0] = -1.0
    used = m.sigma_value()
    assert float(used.min()) == pytest.approx(SIGMA_FLOOR) and float(used[1]) == 2.0
    used.sum().backward()  # straight-through floor: every entry still gets gradient 1
    assert torch.equal(m.sigma.grad, torch.ones(4))
    scalar = GaussianAttention(16, 4, sigma=3.0, learnable_sigma=True)
    assert scalar.sigma.shape == () and "sigma=learnable[]" in repr(scalar)


# ------------------------------------------------------------------------------------------ learnable sigma
def _start_sigmas(h: PatchHandle) -> None:
    """Distinct starting sigmas per block and head, so that mixed-up gradients show."""
    with torch.no_grad():
        for i, m in h.modules.items():
            m.sigma.copy_(torch.linspace(0.9, 2.1, m.sigma.numel()).reshape(m.sigma.shape) + 0.4 * i)


GRAD_CASES = [
    pytest.param(n, ph, torch.float32, id=f"{n}-{'per-head' if ph else 'scalar'}-fp32")
    for n in ("timm-dynamic-reg4", "open_clip-mha-layerscale", "hf-clip")
    for ph in (False, True)
] + [pytest.param("timm-no-cls", ph, torch.float64, id=f"timm-no-cls-{'per-head' if ph else 'scalar'}-fp64")
     for ph in (False, True)]  # fmt: skip


@pytest.mark.parametrize("name, per_head, dtype", GRAD_CASES)
def test_sigma_gradients_match_float64_oracle(name, per_head, dtype):
    fam = build(name)
    fam.model.to(dtype)
    with patch_vit(fam.model, sigma=1.5, learnable_sigma=True, per_head_sigma=per_head, backend="torch") as h:
        _start_sigmas(h)
        starts = {i: m.sigma.detach().double().clone().requires_grad_(True) for i, m in h.modules.items()}
        out = last_block_output(fam, fam.model, fam.images.to(dtype), grad=True)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        (out.double() * w).sum().backward()
        got = {i: m.sigma.grad.double() for i, m in h.modules.items()}
    fam.model.float()
    ref_out = oracle_output(fam, patched=set(starts), sigma=starts, key_key=False, grad=True)
    ref = dict(zip(starts, torch.autograd.grad((ref_out * w).sum(), list(starts.values())), strict=True))
    tol = 1e-4 if dtype == torch.float32 else 1e-7  # fp64: the torch backend drops G < 2**-24 (band)
    assert rel_err(out, ref_out.detach()) <= tol
    for i in starts:
        assert got[i].shape == ((4,) if per_head else ())
        assert float((got[i] - ref[i]).abs().max()) <= tol * float(
            torch.stack(list(ref.values())).abs().max()
        )
    assert all(float(g.abs().max()) > 0 for g in ref.values())  # every block's sigma matters here


def test_torch_compile_fullgraph_forward_backward():
    """A patched timm ViT with learnable per-head sigma compiles as one graph (registered op, fake impl and
    autograd formula) and gives the eager results. AOT-eager backend: the graph capture and the AOTAutograd
    backward are what is checked; Inductor's C++ build would only add minutes here."""
    torch._dynamo.reset()
    m = _timm(img_size=(32, 48))
    h = patch_vit(m, sigma=1.5, learnable_sigma=True, per_head_sigma=True, backend="torch")
    _start_sigmas(h)
    x = torch.randn(2, 3, 32, 48)

    def step(model):
        model.zero_grad(set_to_none=True)
        loss = model.forward_features(x).square().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in (h.modules[0].sigma, h.modules[1].sigma)]

    eager_loss, eager_grads = step(m)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    loss, grads = step(compiled)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-7)
    h.remove()


def test_import_pulls_in_no_model_library():
    import subprocess
    import sys

    code = (
        "import sys, naclip_kernels.nn; "
        "print([m for m in ('timm', 'open_clip', 'transformers', 'PIL', 'naclip') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
