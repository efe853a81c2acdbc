"""Short-context text encoding equals plain ``encode_text`` on several random open_clip text towers, and the
towers it cannot prove safe take the full-context path (no download: random init, tiny configs)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

from naclip.text import TEMPLATES, encode_queries, prompts_for, text_encoding_path
from naclip.text_tower import FULL_CONTEXT, SHORT_CONTEXT, TextEncoder

VISION = {"layers": 1, "width": 32, "head_width": 16, "patch_size": 16, "image_size": 32}
QUERIES = ["sky", "a person in a shirt", "potted plant", "tv monitor, screen"]
LONG = " ".join(["very"] * 90) + " long"  # past the context: the tokenizer truncates, EOT at the last slot
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _text(context_length: int = 77, **kw) -> dict:
    return {"context_length": context_length, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, **kw}


def _clip(**text_kw):
    torch.manual_seed(0)
    return open_clip.CLIP(embed_dim=16, vision_cfg=VISION, text_cfg=_text(**text_kw)).eval()


def _custom(**text_kw):
    torch.manual_seed(0)
    return open_clip.CustomTextCLIP(embed_dim=16, vision_cfg=VISION, text_cfg=_text(**text_kw)).eval()


def _coca():
    torch.manual_seed(0)
    mm = {"width": 32, "heads": 2, "layers": 1, "context_length": 76}
    return open_clip.CoCa(
        embed_dim=16,
        multimodal_cfg=mm,
        text_cfg=_text(76, embed_cls=True, output_tokens=True),
        vision_cfg=VISION,
    ).eval()


def _hf_bert():
    transformers = pytest.importorskip("transformers")
    from open_clip.hf_model import HFTextEncoder

    model = _custom()
    cfg = transformers.BertConfig(
        vocab_size=49408, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model.text = HFTextEncoder(
        "bert", output_dim=16, config=cfg, pooler_type="cls_pooler", proj_type="linear"
    )
    return model.eval()


class _OverriddenCLIP(open_clip.CLIP):
    def encode_text(self, text, normalize: bool = False):
        return super().encode_text(text, normalize=normalize) * 2


def _overridden():
    torch.manual_seed(0)
    return _OverriddenCLIP(embed_dim=16, vision_cfg=VISION, text_cfg=_text()).eval()


# (builder, context length, expected path): which towers take which path (docs/text-encoding.md)
TOWERS = {
    "clip-argmax-77": (_clip, 77, SHORT_CONTEXT),
    "clip-argmax-32ctx": (lambda: _clip(context_length=32), 32, SHORT_CONTEXT),
    "clip-custom-blocks-qknorm": (lambda: _clip(qk_norm=True), 77, SHORT_CONTEXT),
    "clip-layerscale": (lambda: _clip(ls_init_value=0.1), 77, SHORT_CONTEXT),
    "customtext-argmax": (_custom, 77, SHORT_CONTEXT),
    "customtext-eos": (lambda: _custom(pool_type="eos", eos_id=49407), 77, SHORT_CONTEXT),
    "customtext-first": (lambda: _custom(pool_type="first"), 77, SHORT_CONTEXT),
    "customtext-proj-bias": (lambda: _custom(proj_bias=True), 77, SHORT_CONTEXT),
    "siglip-style-noncausal-last": (lambda: _custom(no_causal_mask=True, pool_type="last"), 64, FULL_CONTEXT),
    "causal-last-token": (lambda: _custom(pool_type="last"), 77, FULL_CONTEXT),
    "noncausal-argmax": (lambda: _custom(no_causal_mask=True), 77, FULL_CONTEXT),
    "coca-cls": (_coca, 76, FULL_CONTEXT),
    "hf-bert": (_hf_bert, 77, FULL_CONTEXT),
    "encode-text-overridden": (_overridden, 77, FULL_CONTEXT),
}


@pytest.fixture(scope="module", params=list(TOWERS), ids=list(TOWERS))
def tower(request):
    build, ctx, path = TOWERS[request.param]
    return build(), SimpleTokenizer(context_length=ctx), path


def _prompts() -> list[str]:
    return [p for q in [*QUERIES, LONG] for p in prompts_for(q, TEMPLATES[::7])]


def test_short_context_equals_encode_text(tower):
    model, tok, path = tower
    tokens = tok(_prompts())
    enc = TextEncoder(model, max_rows=7)  # several batches of different lengths
    assert enc.path == path, enc.reason
    assert (enc.reason == "") == (path == SHORT_CONTEXT)
    with torch.inference_mode():
        ref = model.encode_text(tokens)
        out = enc.encode(tokens)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert (out - ref).abs().max().item() <= TOL[torch.float32]


def test_encode_queries_equals_plain_classifier(tower):
    model, tok, _ = tower
    templates = TEMPLATES[:9]
    ref = []
    with torch.inference_mode():
        for q in QUERIES:
            e = model.encode_text(tok(prompts_for(q, templates))).float()
            e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
            ref.append(e / e.norm())
    out = encode_queries(model, tok, QUERIES, templates=templates, queries_per_batch=3)
    assert (out - torch.stack(ref)).abs().max().item() <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_short_context_low_precision(dtype):
    from open_clip.model import convert_weights_to_lp

    model = _clip()
    convert_weights_to_lp(model, dtype=dtype)
    tokens = SimpleTokenizer()(_prompts())
    enc = TextEncoder(model, max_rows=5)
    assert enc.path == SHORT_CONTEXT
    with torch.inference_mode():
        ref, out = model.encode_text(tokens), enc.encode(tokens)
    assert out.dtype == ref.dtype
    # a few bf16 ulps (other batch shapes round differently)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=2**-6)


def test_monkeypatched_encode_text_is_respected():
    model = _clip()
    model.encode_text = lambda text, normalize=False: torch.zeros(len(text), 16)
    path, reason = text_encoding_path(model)
    assert path == FULL_CONTEXT and "encode_text" in reason
    assert torch.equal(TextEncoder(model).encode(SimpleTokenizer()(["a"])), torch.zeros(1, 16))


def test_replaced_attention_mask_falls_back():
    model = _clip()
    model.attn_mask = torch.zeros(77, 77)  # made bi-directional
    path, reason = text_encoding_path(model)
    assert path == FULL_CONTEXT and "causal" in reason


def test_tokens_of_another_length_go_through_encode_text():
    model = _clip(context_length=32)
    with pytest.raises(RuntimeError):  # plain encode_text's own shape error, not a silent different result
        TextEncoder(model).encode(SimpleTokenizer(context_length=77)(["sky"]))


def test_duplicate_queries_and_templates_encoded_once():
    model = _clip()
    tok = SimpleTokenizer()
    rows = []
    real = TextEncoder.encode

    def counting(self, tokens):
        rows.append(len(tokens))
        return real(self, tokens)

    templates = ("a {c}.", "a {c}.", "the {c}.")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TextEncoder, "encode", counting)
        out = encode_queries(model, tok, ["sky", "tree", "sky"], templates=templates)
    assert rows == [4]  # 2 distinct queries x 2 distinct prompts
    ref = encode_queries(model, tok, ["sky", "tree"], templates=("a {c}.", "a {c}.", "the {c}."))
    assert torch.equal(out[0], out[2]) and torch.allclose(out[:2], ref, atol=1e-6)
    with torch.inference_mode():
        e = model.encode_text(tok(["a sky.", "a sky.", "the sky."])).float()
    e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
    assert torch.allclose(out[0], e / e.norm(), atol=1e-5)  # duplicate templates keep their weight
