"""Fixtures shared by the ``naclip`` tests (the session-wide ones live in ``tests/conftest.py``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module with one intra-op thread: its tiny matmuls and random inits only pay threading overhead
    (and stall badly on a shared 2-core box). Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cases(manifest):
    """Fixture cases by id."""
    return {c["id"]: c for c in manifest["cases"]}
