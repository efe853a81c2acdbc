"""Fixtures of the eval tests: a tiny random-init open_clip model config (registered by file, as the CLI's
``--model-config`` does) and the matching reference Segmenter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_NAME = "naclip-tiny-eval"
#: A small open_clip CLIP: ViT with 2 blocks of width 64 (2 heads), patch 16; 1-block text tower of width 32
#: with a 16-token context (prompts are truncated; the weights are random anyway).
TINY_CONFIG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SEED = 0


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / f"{TINY_NAME}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_config):
    """The Segmenter ``naclip eval --model-config <tiny> --pretrained none --seed 0`` builds (same seed, same
    construction order, so the same random weights)."""
    import open_clip
    import torch

    from naclip.segmenter import Segmenter

    open_clip.add_model_config(tiny_config)
    torch.manual_seed(SEED)
    return Segmenter.from_pretrained(TINY_NAME, None, device="cpu")


@pytest.fixture(scope="session")
def tiny_model_args(tiny_config) -> list[str]:
    """``naclip eval`` arguments selecting the tiny random-init model."""
    return ["--model-config", str(tiny_config), "--model", TINY_NAME, "--pretrained", "none"]
