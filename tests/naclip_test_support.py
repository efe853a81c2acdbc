"""Plain helpers shared by test modules: where the shared reference material lives (also used by
``conftest.py``), fixture case ids for collection-time parametrization, and the Triton skip reason. A module
of its own because ``conftest`` is not a unique module name in this tree, so it cannot be imported as one."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = Path(
    os.environ.get("NACLIP_FIXTURES_DIR", REPO_ROOT.parent / "shared" / "reference" / "fixtures")
).resolve()
ADDONS_DIR = Path(
    os.environ.get("NACLIP_ADDONS_DIR", REPO_ROOT.parent / "shared" / "reference" / "addons")
).resolve()
CLASSNAMES_DIR = Path(
    os.environ.get("NACLIP_CLASSNAMES_DIR", REPO_ROOT.parent / "shared" / "reference" / "classnames")
).resolve()


def fixture_case_ids(kind: str) -> list[str]:
    """Ids of the fixture cases of one ``kind``, read at collection time so that parametrized tests get
    readable ids (``pytest_sessionstart`` has already failed the run if the fixtures are missing). Test
    modules import it as ``from naclip_test_support import fixture_case_ids``."""
    manifest = json.loads((FIXTURES_DIR / "manifest.json").read_text())
    return [c["id"] for c in manifest["cases"] if c["kind"] == kind]


def triton_skip_reason() -> str | None:
    """None when the Triton backend can run here (CUDA, or ``TRITON_INTERPRET=1``), else why to skip."""
    try:
        import naclip_kernels
        import naclip_kernels.triton  # noqa: F401
    except Exception as exc:  # ImportError, or triton failing to initialise
        return f"naclip_kernels.triton not importable: {type(exc).__name__}: {exc}"
    if "triton" not in naclip_kernels.available_backends():
        return "triton backend unavailable (no CUDA and TRITON_INTERPRET != 1)"
    return None


def tiny_clip(seed: int = 0, *, vision_layers: int = 2):
    """A small random open_clip ``CLIP`` (64-pixel ViT with patch 16, 64-wide 1-layer text tower, QuickGELU),
    built without any download, in eval mode."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg={
            "layers": vision_layers,
            "width": 64,
            "head_width": 32,
            "patch_size": 16,
            "image_size": 64,
        },
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
        quick_gelu=True,
    )
    return model.eval()


#: A 1-block random open_clip CLIP (64 px, patch 16) for CLI tests that build the model from a JSON config.
TINY_CLI_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_config(directory: Path, name: str, cfg: dict = TINY_CLI_CFG) -> Path:
    """Write ``cfg`` as ``<directory>/<name>.json``, register it with open_clip and return the path."""
    import open_clip

    path = directory / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return path
