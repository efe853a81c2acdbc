"""Shared test configuration.

* The Triton kernel runs on CPU only in interpreter mode, and ``TRITON_INTERPRET`` is read when kernels
  are defined, so it is set here, before anything imports triton, unless the machine has an NVIDIA driver
  (then the kernel compiles for the GPU) or the variable is already set.
* The golden fixtures of the official implementation are read from ``../shared/reference/fixtures`` beside the
  repository root, or from ``$NACLIP_FIXTURES_DIR``. A missing fixtures directory is an error, never a skip.
* ``NACLIP_CACHE_DIR`` is set to "" (the on-disk text-feature cache off) unless a test passes a folder, and
  ``NACLIP_KERNELS_CACHE`` (where the fused CPU backward is compiled) to a folder under the temp dir.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The persistent text-feature cache is off in tests (never the user's folder, no order dependence); the cache
# tests pass their own folder.
os.environ["NACLIP_CACHE_DIR"] = ""
# The fused CPU backward is compiled into a per-user folder under the temp dir, never the user's cache.
os.environ.setdefault(
    "NACLIP_KERNELS_CACHE", os.path.join(tempfile.gettempdir(), f"naclip-kernels-tests-{os.getuid()}")
)

import pytest  # noqa: E402
from naclip_test_support import CLASSNAMES_DIR, FIXTURES_DIR  # noqa: E402


def _require_dir(path: Path, what: str, env: str) -> Path:
    if not path.is_dir():
        raise pytest.UsageError(
            f"{what} not found at {path}; they are required (tests fail rather than skip). "
            f"Place them there or point ${env} at them."
        )
    return path


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    d = _require_dir(FIXTURES_DIR, "golden fixtures", "NACLIP_FIXTURES_DIR")
    if not (d / "manifest.json").is_file():
        raise pytest.UsageError(f"{d} has no manifest.json")
    return d


@pytest.fixture(scope="session")
def classnames_dir() -> Path:
    return _require_dir(CLASSNAMES_DIR, "reference class-name files", "NACLIP_CLASSNAMES_DIR")


@pytest.fixture(scope="session")
def manifest(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def fixture_tensors(fixtures_dir: Path, manifest: dict) -> dict:
    """All fixture tensors, keyed by file name then tensor key (loaded once per session)."""
    from safetensors.torch import load_file

    files = {c["file"] for c in manifest["cases"]} | {"weights.safetensors"}
    return {f: load_file(str(fixtures_dir / f)) for f in files}


def pytest_sessionstart(session: pytest.Session) -> None:
    # Fail the whole run up front (not per test) when the fixtures are absent.
    _require_dir(FIXTURES_DIR, "golden fixtures", "NACLIP_FIXTURES_DIR")


def pytest_report_header(config: pytest.Config) -> list[str]:
    import torch

    return [
        f"naclip: fixtures={FIXTURES_DIR} TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')} "
        f"torch={torch.__version__} cuda={torch.cuda.is_available()}"
    ]
