"""The persistent text-feature cache: keys, hits equal to encoding, corrupt entries, two processes at once,
the ``naclip cache`` command, and ``--templates`` (tiny random open_clip CLIP, no download)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import open_clip
import pytest
import torch
from naclip_test_support import tiny_clip

from naclip import Segmenter
from naclip.cli import main
from naclip.text import TEMPLATE_SETS, TEMPLATES, encode_queries, load_templates
from naclip.text_cache import DiskTextCache, cache_root, weights_digest
from naclip.text_tower import TextEncoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUERIES = ["sky", "cloud", "tree", "person in shirt"]
FEW = ("a photo of a {c}.", "a {c}.", "art of the {c}.")  # few templates keep the encodings cheap


@pytest.fixture(scope="module")
def tok():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture
def encodes(monkeypatch):
    """Rows passed to the text tower, per call (counts what was encoded rather than read)."""
    rows: list[int] = []
    real = TextEncoder.encode

    def counting(self, tokens):
        rows.append(len(tokens))
        return real(self, tokens)

    monkeypatch.setattr(TextEncoder, "encode", counting)
    return rows


def _seg(tok, cache, *, seed=0, templates=FEW, text_batch=8, **kw):
    from naclip.segmenter import SegmentConfig

    config = SegmentConfig(templates=templates, text_batch=text_batch)
    return Segmenter(tiny_clip(seed, vision_layers=1), tok, config=config, text_cache=cache, **kw)


def _entries(root: Path) -> list[Path]:
    return sorted(root.rglob("*.feat"))


def test_hit_in_a_new_segmenter_equals_encoding(tok, tmp_path, encodes):
    feats, _, _ = _seg(tok, tmp_path).text_features("sky, cloud; tree; person in shirt")
    assert sum(encodes) == 4 * 3 and len(_entries(tmp_path)) == 4
    encodes.clear()
    again, _, _ = _seg(tok, tmp_path).text_features(QUERIES)  # another process would see the same files
    assert encodes == [] and torch.equal(again, feats)
    ref = encode_queries(tiny_clip(0, vision_layers=1), tok, QUERIES, templates=FEW)
    assert torch.equal(feats, ref)  # the cache stores the float32 rows bit for bit


def test_partial_hit_encodes_only_the_new_query_and_reports_it(tok, tmp_path, encodes):
    _seg(tok, tmp_path).text_features(QUERIES[:2])
    encodes.clear()
    calls = []
    feats, _, _ = _seg(tok, tmp_path).text_features(QUERIES[:3], progress=lambda d, t: calls.append((d, t)))
    assert encodes == [3] and calls == [(0, 1), (1, 1)]
    ref = encode_queries(tiny_clip(0, vision_layers=1), tok, QUERIES[:3], templates=FEW)
    assert torch.allclose(feats, ref, atol=1e-6)


@pytest.mark.parametrize(
    "change",
    ["text-weights", "templates", "dtype", "tokenizer-context"],
)
def test_what_changes_features_changes_the_key(tok, tmp_path, encodes, change):
    _seg(tok, tmp_path).text_features(QUERIES[:1])
    encodes.clear()
    if change == "text-weights":
        seg = _seg(tok, tmp_path)
        with torch.no_grad():
            seg.clip_model.ln_final.bias.add_(1e-3)
    elif change == "templates":
        seg = _seg(tok, tmp_path, templates=FEW[:2])
    elif change == "dtype":
        seg = _seg(tok, tmp_path, dtype="bf16")
    else:
        seg = _seg(tok, tmp_path)
        seg.tokenizer = _ShortTok()
    seg.text_features(QUERIES[:1])
    assert encodes, f"{change}: served from the cache"
    assert len(list((tmp_path / "text-v1").iterdir())) == 2


class _ShortTok:
    """The ViT-B-16 tokenizer with another truncation (cuts every prompt to 5 tokens + EOT)."""

    def __call__(self, texts):
        t = open_clip.tokenize(texts)
        t[:, 6:] = 0
        t[:, 5] = 49407
        return t


def test_image_tower_weights_do_not_change_the_key(tok, tmp_path, encodes):
    a, b = tiny_clip(0, vision_layers=1), tiny_clip(0, vision_layers=1)
    with torch.no_grad():
        b.visual.conv1.weight.add_(1.0)
        b.logit_scale.add_(1.0)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.token_embedding.weight[5, 0] += 1e-6
    assert weights_digest(a) != weights_digest(b)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "empty", "flipped-byte", "garbage", "other-query"],
)
def test_corrupt_entries_are_recomputed_and_replaced(tok, tmp_path, encodes, damage):
    good, _, _ = _seg(tok, tmp_path).text_features(QUERIES[:2])
    victim = _entries(tmp_path)[0]
    data = victim.read_bytes()
    if damage == "truncated":
        victim.write_bytes(data[:-3])
    elif damage == "empty":
        victim.write_bytes(b"")
    elif damage == "flipped-byte":
        victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0x10]))
    elif damage == "garbage":
        victim.write_bytes(os.urandom(len(data)))
    else:
        other = next(p for p in _entries(tmp_path) if p != victim)
        victim.write_bytes(other.read_bytes())
    encodes.clear()
    seg = _seg(tok, tmp_path)
    again, _, _ = seg.text_features(QUERIES[:2])
    assert encodes == [3] and torch.allclose(again, good, atol=1e-6)
    assert len(DiskTextCache(tmp_path).get(seg._text_context(FEW), QUERIES[:2])) == 2  # replaced, valid


def test_unwritable_cache_warns_and_still_returns_features(tok, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="cannot write"):
        feats, _, _ = _seg(tok, blocker / "cache").text_features(QUERIES[:1])
    assert feats.shape == (1, 32)


def test_cache_root_semantics(monkeypatch, tmp_path):
    monkeypatch.setenv("NACLIP_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("NACLIP_CACHE_DIR", "")
    assert cache_root() is None
    monkeypatch.delenv("NACLIP_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "naclip"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "naclip"


def test_segmenter_rejects_a_bad_text_cache(tok):
    with pytest.raises(TypeError, match="text_cache"):
        Segmenter(tiny_clip(0, vision_layers=1), tok, text_cache=3)


def _fill(cache: Path, go, out: Path) -> None:
    """One cache-filling process: waits for ``go``, encodes 12 queries one by one, saves its features."""
    torch.set_num_threads(1)
    go.wait(timeout=120)
    seg = _seg(open_clip.get_tokenizer("ViT-B-16"), cache, text_batch=1)
    feats, _, _ = seg.text_features([f"class {i}" for i in range(12)])
    torch.save(feats, out)


@pytest.mark.skipif(
    not hasattr(os, "fork"), reason="forked processes (imports shared with the test) need fork"
)
def test_two_processes_fill_the_cache_at_once(tok, tmp_path, encodes):
    ctx = multiprocessing.get_context("fork")  # real processes, without paying the imports again
    cache, go = tmp_path / "cache", ctx.Event()
    procs = [ctx.Process(target=_fill, args=(cache, go, tmp_path / f"out{i}.pt")) for i in range(2)]
    for p in procs:
        p.start()
    go.set()  # both start encoding (and writing the same entries) together
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    outs = [torch.load(tmp_path / f"out{i}.pt") for i in range(2)]
    queries = [f"class {i}" for i in range(12)]
    ref = encode_queries(tiny_clip(0, vision_layers=1), tok, queries, templates=FEW, queries_per_batch=1)
    assert all(torch.allclose(o, ref, atol=1e-6) for o in outs)
    assert len(_entries(cache)) == 12 and not list(cache.rglob("*.tmp"))
    encodes.clear()
    feats, _, _ = _seg(tok, cache).text_features(queries)  # every entry is whole and valid
    assert encodes == [] and torch.allclose(feats, ref, atol=1e-6)


def test_cache_command_info_and_clear(tok, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NACLIP_CACHE_DIR", str(tmp_path))
    _seg(tok, None).text_features(QUERIES)
    assert main(["cache", "info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path) in out and "4 entries" in out and "3 templates" in out and "short-context" in out
    assert main(["cache", "clear"]) == 0
    assert "removed 4" in capsys.readouterr().out and _entries(tmp_path) == []
    assert main(["cache", "info"]) == 0 and "0 entries" in capsys.readouterr().out
    monkeypatch.setenv("NACLIP_CACHE_DIR", "")
    assert main(["cache", "info"]) == 0 and "off" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ templates


def test_builtin_template_sets():
    assert load_templates("imagenet80") == TEMPLATES
    assert len(load_templates("imagenet7")) == 7 and load_templates("photo") == ("a photo of a {c}.",)
    assert set(TEMPLATE_SETS) == {"imagenet80", "imagenet7", "photo"}


def test_template_file(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# my templates\n\na photo of a {}.\n  a {c} in the wild  \n", encoding="utf-8")
    assert load_templates(f) == ("a photo of a {c}.", "a {c} in the wild")


@pytest.mark.parametrize(
    "text,match",
    [
        ("a photo of a cat.\n", r"t.txt:1: expected exactly one"),
        ("a {} and a {}.\n", "exactly one"),
        ("a {} {x}.\n", "no other braces"),
        ("a {}}.\n", "no other braces"),
        ("# only comments\n\n", "no template lines"),
    ],
    ids=["no-placeholder", "two-placeholders", "named-field", "stray-brace", "empty"],
)
def test_bad_template_files(tmp_path, text, match):
    f = tmp_path / "t.txt"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_templates(f)


def test_unknown_template_set():
    with pytest.raises(ValueError, match="neither a built-in set"):
        load_templates("imagenet81")


def test_segment_templates_option_is_a_one_line_error(tmp_path, capsys):
    img = tmp_path / "x.png"
    img.write_bytes(b"")
    assert (
        main(["segment", str(img), "--classes", "a", "--out", str(tmp_path / "o"), "--templates", "nope"])
        == 2
    )
    assert "--templates" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> list[str]:
    """``naclip segment`` arguments for a tiny random CLIP saved as a local checkpoint (the offline path)."""
    import json

    d = tmp_path_factory.mktemp("tiny_text_model")
    cfg = d / "naclip-text-cache-tiny.json"
    cfg.write_text(
        json.dumps(
            {
                "embed_dim": 32,
                "vision_cfg": {
                    "image_size": 64,
                    "layers": 1,
                    "width": 32,
                    "head_width": 16,
                    "patch_size": 16,
                },
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
            }
        )
    )
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    torch.save(open_clip.create_model(cfg.stem, pretrained=None).state_dict(), d / "tiny.pt")
    return [
        "--model-config",
        str(cfg),
        "--model",
        cfg.stem,
        "--checkpoint",
        str(d / "tiny.pt"),
        "--device",
        "cpu",
    ]


def _segment(tmp_path, args, out, *extra) -> int:
    from PIL import Image

    img = tmp_path / "x.png"
    if not img.exists():
        Image.new("RGB", (40, 32), (90, 120, 200)).save(img)
    argv = ["segment", str(img), "--classes", "sky, cloud; tree", "--out", str(tmp_path / out), "--no-pamr"]
    return main([*argv, "--short-side", "32", *args, *extra])


def test_segment_second_run_reads_the_cache(tmp_path, tiny_ckpt, encodes, monkeypatch, capsys):
    monkeypatch.setenv("NACLIP_CACHE_DIR", str(tmp_path / "cache"))
    assert _segment(tmp_path, tiny_ckpt, "a") == 0
    assert sum(encodes) == 3 * 80 and "text features" in capsys.readouterr().err  # bar under 32 queries
    encodes.clear()
    assert _segment(tmp_path, tiny_ckpt, "b") == 0
    assert encodes == [] and "text features" not in capsys.readouterr().err
    assert (tmp_path / "a" / "x_mask.png").read_bytes() == (tmp_path / "b" / "x_mask.png").read_bytes()
    assert _segment(tmp_path, tiny_ckpt, "c", "--no-text-cache", "--no-progress") == 0
    assert sum(encodes) == 3 * 80
    encodes.clear()
    assert _segment(tmp_path, tiny_ckpt, "d", "--templates", "photo", "--no-progress") == 0
    assert sum(encodes) == 3  # one template per query, its own cache context
    assert len(list((tmp_path / "cache" / "text-v1").iterdir())) == 2


def test_segment_without_cache_writes_nothing(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setenv("NACLIP_CACHE_DIR", str(tmp_path / "cache"))
    assert _segment(tmp_path, tiny_ckpt, "a", "--no-text-cache", "--no-progress") == 0
    assert not (tmp_path / "cache").exists()
