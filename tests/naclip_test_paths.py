"""Where the tests find the shared reference material (imported by ``conftest.py`` and by test modules that
parametrize over fixture cases at collection time; a module of its own because ``conftest`` is not a unique
module name in this tree)."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_DIR = Path(
    os.environ.get("NACLIP_FIXTURES_DIR", REPO_ROOT.parent / "shared" / "reference" / "fixtures")
).resolve()
CLASSNAMES_DIR = Path(
    os.environ.get("NACLIP_CLASSNAMES_DIR", REPO_ROOT.parent / "shared" / "reference" / "classnames")
).resolve()


def fixture_case_ids(kind: str) -> list[str]:
    """Ids of the fixture cases of one ``kind``, read at collection time so that parametrized tests get
    readable ids (``pytest_sessionstart`` has already failed the run if the fixtures are missing). Test
    modules import it as ``from naclip_test_paths import fixture_case_ids``."""
    manifest = json.loads((FIXTURES_DIR / "manifest.json").read_text())
    return [c["id"] for c in manifest["cases"] if c["kind"] == kind]
