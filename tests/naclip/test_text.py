"""Class parsing, prompt templates and the text classifier (tiny random open_clip CLIP, no download)."""

from __future__ import annotations

import open_clip
import pytest
import torch
from naclip_test_support import tiny_clip

from naclip.text import TEMPLATES, ClassSpec, TextFeatureCache, encode_queries, parse_classes, prompts_for


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    return tiny_clip(vision_layers=1), open_clip.get_tokenizer("ViT-B-16")


# ------------------------------------------------------------------------------------------ templates


def test_templates_are_openai_imagenet_80():
    assert len(TEMPLATES) == 80
    assert TEMPLATES[0] == "a bad photo of a {c}." and TEMPLATES[-1] == "a tattoo of the {c}."
    assert "itap of a {c}." in TEMPLATES
    assert all(t.count("{c}") == 1 for t in TEMPLATES)
    assert list(TEMPLATES) == [t("{c}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    assert len(set(TEMPLATES)) == 80


def test_prompts_for_inserts_query_verbatim():
    p = prompts_for("traffic {light}")
    assert len(p) == 80 and p[0] == "a bad photo of a traffic {light}."


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "classes,synonyms,names,qidx",
    [
        (
            "sky, cloud; tree; person",
            (("sky", "cloud"), ("tree",), ("person",)),
            ("sky", "tree", "person"),
            (0, 0, 1, 2),
        ),
        (
            ["sky, cloud", "tree", "person"],
            (("sky", "cloud"), ("tree",), ("person",)),
            ("sky", "tree", "person"),
            (0, 0, 1, 2),
        ),
        ([" wood ", "a, b ,  c"], (("wood",), ("a", "b", "c")), ("wood", "a"), (0, 1, 1, 1)),
        (["1,2-dichloro, x", "a,b"], (("1,2-dichloro", "x"), ("a,b",)), ("1,2-dichloro", "a,b"), (0, 0, 1)),
        ("cat", (("cat",),), ("cat",), (0,)),
        (["person in shirt, body"], (("person in shirt", "body"),), ("person in shirt",), (0, 0)),
    ],
    ids=["string", "list", "whitespace-stripped", "comma-without-space-is-one-name", "single", "multiword"],
)
def test_parse_classes(classes, synonyms, names, qidx):
    spec = parse_classes(classes)
    assert spec.synonyms == synonyms and spec.names == names
    assert spec.query_to_class == qidx
    assert spec.queries == tuple(s for syn in synonyms for s in syn)
    assert spec.num_classes == len(synonyms)
    assert parse_classes(spec) is spec


def test_parse_classes_same_synonym_in_two_classes_allowed():
    # the official COCO-Object list has "bed" both among the background synonyms and as a class
    spec = parse_classes(["sky, bed", "bed"], names=["background", "bed"])
    assert spec.queries == ("sky", "bed", "bed") and spec.query_to_class == (0, 0, 1)


@pytest.mark.parametrize(
    "classes,exc,match",
    [
        ([], ValueError, "at least one class"),
        ("", ValueError, "at least one class"),
        ("   ", ValueError, "at least one class"),
        ("sky; ; tree", ValueError, r"classes\[1\]: empty"),
        ("sky, , cloud", ValueError, "empty class name or synonym"),
        (["sky, "], ValueError, "empty"),
        ("sky; tree; sky ", ValueError, "duplicate class name 'sky'"),
        (["sky, cloud", "sky"], ValueError, "duplicate class name 'sky'"),
        ("sky, sky", ValueError, "repeated synonym"),
        ([1, 2], TypeError, "list of str"),
        (42, TypeError, "str or a list"),
    ],
    ids=[
        "empty-list",
        "empty-str",
        "blank-str",
        "empty-class",
        "empty-synonym",
        "trailing-comma",
        "dup",
        "dup-first",
        "dup-synonym",
        "non-str",
        "int",
    ],
)
def test_parse_classes_errors(classes, exc, match):
    with pytest.raises(exc, match=match):
        parse_classes(classes)


def test_parse_classes_names_checked():
    with pytest.raises(ValueError, match="names"):
        parse_classes(["a", "b"], names=["x"])
    with pytest.raises(ValueError, match="duplicate class name 'x'"):
        parse_classes(["a", "b"], names=["x", "x"])
    assert parse_classes(["a", "b"], names=["x", "y"]).lines() == ["a", "b"]
    assert isinstance(parse_classes("a, b"), ClassSpec)


# ------------------------------------------------------------------------------------------ classifier


def _manual_classifier(model, tokenizer, queries):
    rows = []
    with torch.no_grad():
        for q in queries:
            e = model.encode_text(tokenizer([t.format(c=q) for t in TEMPLATES]))
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(dim=0)
            rows.append(e / e.norm())
    return torch.stack(rows)


def test_encode_queries_matches_per_query_formula_and_chunking(clip_and_tokenizer):
    model, tok = clip_and_tokenizer
    queries = ["sky", "cloud", "person in shirt", "tree"]
    ref = _manual_classifier(model, tok, queries)
    calls = []
    out = encode_queries(model, tok, queries, queries_per_batch=3, progress=lambda d, t: calls.append((d, t)))
    assert out.shape == (4, 32) and out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    assert torch.allclose(out.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert calls == [(0, 4), (3, 4), (4, 4)]
    one = encode_queries(model, tok, queries, queries_per_batch=1)
    assert torch.allclose(one, out, atol=1e-5)


def test_encode_queries_whitespace_variant_gives_same_tokens(clip_and_tokenizer):
    _, tok = clip_and_tokenizer
    assert torch.equal(tok(prompts_for("wood ")), tok(prompts_for("wood")))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"queries": []}, "queries"),
        ({"queries": "sky"}, "queries"),
        ({"queries_per_batch": 0}, "queries_per_batch"),
        ({"templates": ()}, "templates"),
    ],
    ids=["empty", "bare-str", "zero-batch", "no-templates"],
)
def test_encode_queries_errors(clip_and_tokenizer, kwargs, match):
    model, tok = clip_and_tokenizer
    args = {"queries": ["sky"]} | kwargs
    with pytest.raises(ValueError, match=match):
        encode_queries(model, tok, **args)


def test_text_feature_cache_lru():
    cache = TextFeatureCache(maxsize=2)
    calls = []

    def make(v):
        def f():
            calls.append(v)
            return torch.tensor([v])

        return f

    assert cache.get_or_compute("a", make(1)).item() == 1
    assert cache.get_or_compute("a", make(99)).item() == 1
    cache.get_or_compute("b", make(2))
    cache.get_or_compute("c", make(3))  # evicts "a"
    assert "a" not in cache and "b" in cache and len(cache) == 2
    assert calls == [1, 2, 3]
    cache.clear()
    assert len(cache) == 0


def test_segmenter_text_features_cached(clip_and_tokenizer, monkeypatch):
    from naclip import Segmenter

    model, tok = clip_and_tokenizer
    seg = Segmenter(model, tok)
    n_calls = []
    real = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda *a, **k: n_calls.append(1) or real(*a, **k))
    feats, qidx, names = seg.text_features("sky, cloud; tree")
    first = len(n_calls)
    assert first >= 1 and feats.shape == (3, 32) and qidx.tolist() == [0, 0, 1] and names == ["sky", "tree"]
    feats2, _, _ = seg.text_features(["sky, cloud", " tree "])  # same queries after parsing -> cache hit
    assert len(n_calls) == first and torch.equal(feats, feats2)
    seg.text_features("sky; tree")  # different queries -> recomputed
    assert len(n_calls) > first
    ref = _manual_classifier(model, tok, ["sky", "cloud", "tree"])
    assert torch.allclose(feats, ref, atol=1e-5)
