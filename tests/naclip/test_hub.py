"""load_clip: offline error, local checkpoints (open_clip / wrapped / safetensors / TorchScript), names."""

from __future__ import annotations

import time

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

from naclip import hub
from naclip.hub import CHECKPOINT_ENV, WeightsUnavailableError, load_clip

# Tiny plain-ViT CLIP configs registered for these tests only (random init in milliseconds, not seconds).
SMALL = "naclip-test-ViT-t-16"
SMALL_P32 = "naclip-test-ViT-t-32"


def _tiny_cfg(patch):
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": patch},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }


@pytest.fixture(scope="module", autouse=True)
def tiny_configs():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(open_clip.factory._MODEL_CONFIGS, SMALL, _tiny_cfg(16))
        mp.setitem(open_clip.factory._MODEL_CONFIGS, SMALL_P32, _tiny_cfg(32))
        yield


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(CHECKPOINT_ENV, raising=False)
    return tmp_path / "empty-cache"


@pytest.fixture(scope="module")
def small_state(tiny_configs, tmp_path_factory):
    torch.manual_seed(0)
    model = open_clip.create_model(SMALL, pretrained=None)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    torch.save(sd, path)
    return sd, path


def _assert_same_weights(model, sd):
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize(
    ("model", "tag"), [("ViT-B-16", "openai"), ("ViT-B-32", "laion2b_s34b_b79k")], ids=["openai", "laion"]
)
def test_offline_error_is_clear_and_fast(offline, model, tag):
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip(model, tag, device="cpu", cache_dir=offline)
    elapsed = time.perf_counter() - start
    err = info.value
    msg = str(err)
    assert isinstance(err, RuntimeError)
    assert elapsed < 5.0, f"offline failure took {elapsed:.1f}s"
    for needle in (model, tag, str(offline), "--checkpoint", CHECKPOINT_ENV, "HF_HUB_OFFLINE"):
        assert needle in msg, f"{needle!r} missing from: {msg}"
    assert err.__cause__ is None and err.__suppress_context__  # no deep huggingface_hub traceback
    assert (err.model, err.pretrained) == (model, tag) and str(offline) in err.cache_dirs


def test_offline_default_cache_named(offline, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(WeightsUnavailableError, match="openai") as info:
        load_clip(device="cpu")
    assert str(constants.HF_HUB_CACHE) in str(info.value)


def test_random_init_needs_no_download(offline, monkeypatch):
    monkeypatch.setenv(CHECKPOINT_ENV, "/nonexistent/ignored-for-random-init.pt")
    model, tokenizer = load_clip(SMALL, None, device="cpu")
    assert not model.training
    assert isinstance(model.visual, open_clip.transformer.VisionTransformer)
    assert tokenizer(["a photo of a cat"]).shape == (1, 77)


def test_checkpoint_round_trip(offline, small_state):
    sd, path = small_state
    model, _ = load_clip(SMALL, None, device="cpu", checkpoint=path)
    # pretrained=None + explicit checkpoint: the checkpoint wins (None only disables the env var / download).
    _assert_same_weights(model, sd)


def test_checkpoint_from_env_and_pretrained_path(offline, monkeypatch, small_state):
    sd, path = small_state
    monkeypatch.setenv(CHECKPOINT_ENV, str(path))
    model, _ = load_clip(SMALL, "openai", device="cpu")  # env var beats the (unavailable) tag
    _assert_same_weights(model, sd)
    monkeypatch.delenv(CHECKPOINT_ENV)
    model, _ = load_clip(SMALL, str(path), device="cpu")  # open_clip-style pretrained=<file>
    _assert_same_weights(model, sd)


def test_checkpoint_wrapped_and_safetensors(offline, tmp_path, small_state):
    from safetensors.torch import save_file

    sd, _ = small_state
    wrapped = tmp_path / "train.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    _assert_same_weights(load_clip(SMALL, None, device="cpu", checkpoint=wrapped)[0], sd)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    _assert_same_weights(load_clip(SMALL, None, device="cpu", checkpoint=st)[0], sd)


def test_checkpoint_dtype(offline, small_state):
    _, path = small_state
    model, _ = load_clip(SMALL, None, device="cpu", dtype="bf16", checkpoint=path)
    assert model.visual.conv1.weight.dtype == torch.bfloat16


def test_quick_gelu_follows_tag(offline, small_state, monkeypatch):
    # OpenAI / MetaCLIP weights need QuickGELU: open_clip's tag entry says so ('openai' for ViT-B-16 does).
    assert open_clip.get_pretrained_cfg("ViT-B-16", "openai")["quick_gelu"] is True
    sd, path = small_state
    real = open_clip.get_pretrained_cfg

    def fake_cfg(model, tag):
        return (
            {"hf_hub": "nobody/none/", "quick_gelu": True}
            if (model, tag) == (SMALL, "qg-tag")
            else real(model, tag)
        )

    monkeypatch.setattr(hub.open_clip, "get_pretrained_cfg", fake_cfg)
    model, _ = load_clip(SMALL, "qg-tag", device="cpu", checkpoint=path)  # local file loaded "as" that tag
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    _assert_same_weights(model, sd)
    # Without a QuickGELU tag the model config decides (plain GELU here).
    model, _ = load_clip(SMALL, None, device="cpu", checkpoint=path)
    assert not isinstance(model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    with pytest.raises(WeightsUnavailableError, match="nobody/none"):
        load_clip(SMALL, "qg-tag", device="cpu")


def test_checkpoint_mismatch_names_the_architecture(offline, small_state):
    _, path = small_state
    with pytest.raises(ValueError, match=r"patch 16, width 64, 2 layers") as info:
        load_clip(SMALL_P32, None, device="cpu", checkpoint=path)
    assert str(path) in str(info.value)


def test_missing_and_unreadable_checkpoint(offline, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.pt.*checkpoint argument"):
        load_clip(SMALL, None, device="cpu", checkpoint=tmp_path / "nope.pt")
    monkeypatch.setenv(CHECKPOINT_ENV, str(tmp_path / "env.pt"))
    with pytest.raises(FileNotFoundError, match=CHECKPOINT_ENV):
        load_clip(SMALL, "openai", device="cpu")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read checkpoint"):
        load_clip(SMALL, None, device="cpu", checkpoint=junk)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_state_dict_read(tmp_path):
    # OpenAI releases are TorchScript archives whose state dict carries extra scalar entries.
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Parameter(torch.ones(2, 2))
            self.register_buffer("input_resolution", torch.tensor(224))

        def forward(self, x):
            return x @ self.proj

    path = tmp_path / "ViT-X.pt"
    torch.jit.script(Tiny()).save(str(path))
    sd, is_jit = hub._read_state_dict(path)
    assert is_jit and set(sd) == {"proj"}


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ("ViT-B-17", r"not an open_clip model name.*ViT-B-16"),
        ("RN50", "ModifiedResNet"),
        ("coca_ViT-B-32", "CoCa"),
        ("ViT-B-16-SigLIP", "timm"),
    ],
    ids=["unknown", "resnet", "coca", "timm"],
)
def test_rejected_models(offline, model, match):
    with pytest.raises(ValueError, match=match):
        load_clip(model, None, device="cpu")


def test_unknown_tag_lists_tags(offline):
    with pytest.raises(ValueError, match=r"pretrained='nope'.*openai"):
        load_clip("ViT-B-16", "nope", device="cpu")


def test_openai_spelling_and_bad_args(offline):
    assert hub._resolve_model_name("ViT-B/16") == "ViT-B-16"  # OpenAI spelling
    assert hub._resolve_model_name("vit-l-14") == "ViT-L-14"
    with pytest.raises(ValueError, match="dtype"):
        load_clip(SMALL, None, device="cpu", dtype="fp8")
    with pytest.raises(TypeError, match="dtype"):
        load_clip(SMALL, None, device="cpu", dtype=16)


@pytest.mark.parametrize(
    ("dtype", "precision"),
    [("torch.float16", "fp16"), (torch.bfloat16, "bf16"), (None, "fp32"), ("half", "fp16")],
    ids=["torch-prefix", "torch-dtype", "none", "alias"],
)
def test_precision_uses_the_shared_dtype_parser(dtype, precision):
    from naclip.segmenter import dtype_name

    assert hub._resolve_precision(dtype) == precision == dtype_name(dtype)
    with pytest.raises(TypeError, match="model"):
        load_clip(16, None)


# --------------------------------------------------------------------- no network without HF_HUB_OFFLINE


def test_unreachable_hub_fails_at_once_without_retries(no_network, caplog):
    with pytest.raises(WeightsUnavailableError) as info:
        load_clip("ViT-B-16", "openai", device="cpu", cache_dir=no_network["cache"])
    msg = str(info.value)
    assert "No network" in msg and "127.0.0.1" in msg and "--checkpoint" in msg and CHECKPOINT_ENV in msg
    assert not [r for r in caplog.records if "Retry" in r.getMessage()]


def test_unreachable_hub_still_uses_the_cache(no_network, small_state, monkeypatch):
    # a cached file is found through huggingface_hub's cache lookup, without any download attempt
    sd, path = small_state
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED, SMALL, {"cached": {"hf_hub": "org/small/", "quick_gelu": False}}
    )
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub,
        "try_to_load_from_cache",
        lambda repo, f, cache_dir=None: str(path) if "bin" in f else None,
    )
    monkeypatch.setattr(open_clip, "download_pretrained", lambda *a, **k: pytest.fail("download attempted"))
    model, _ = load_clip(SMALL, "cached", device="cpu", cache_dir=no_network["cache"])
    _assert_same_weights(model, sd)


def test_probe_reports_a_closed_port_and_accepts_an_open_one(closed_port):
    import socket

    assert "cannot connect to 127.0.0.1" in hub._unreachable(f"http://127.0.0.1:{closed_port}")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert hub._unreachable(f"http://127.0.0.1:{server.getsockname()[1]}/x") is None


def test_probe_goes_through_the_proxy(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub._probe_target("https://huggingface.co") == ("proxy.example", 3128)
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    assert hub._probe_target("https://huggingface.co") == ("huggingface.co", 443)


# ------------------------------------------------------------------------------- checkpoint messages


def test_checkpoint_gives_no_random_init_warning(offline, small_state, caplog):
    with caplog.at_level("WARNING"):
        load_clip(SMALL, None, device="cpu", checkpoint=small_state[1])
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]


@pytest.mark.parametrize("kind", ["corrupt", "pickled-object"])
def test_bad_checkpoint_never_advises_weights_only_false(offline, tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "corrupt":
        path.write_bytes(b"\x80\x04" + b"garbage" * 20)
    else:
        torch.save({"weights": torch.ones(2), "hook": print}, path)
    with pytest.raises(ValueError, match="could not read checkpoint") as info:
        load_clip(SMALL, None, device="cpu", checkpoint=path)
    assert "weights_only" not in str(info.value) and str(path) in str(info.value)


def test_patch_size_without_building_the_model():
    assert hub.vit_patch_size(SMALL_P32) == 32 and hub.vit_patch_size("ViT-B-16") == 16
    assert hub.vit_patch_size("hf-hub:org/repo") is None
    with pytest.raises(ValueError, match="not an open_clip model name"):
        hub.vit_patch_size("ViT-B-17")
