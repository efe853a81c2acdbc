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


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_network(monkeypatch, tmp_path, closed_port):
    """No ``HF_HUB_OFFLINE``; the hub endpoint is a closed loopback port; any lookup or connection to a
    non-loopback address is refused in-process (recorded), so nothing leaves the machine."""
    import socket

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("NACLIP_CHECKPOINT", raising=False)
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    blocked: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host, *args, **kw):
        if host not in ("127.0.0.1", "localhost", "::1"):
            blocked.append(str(host))
            raise socket.gaierror(f"blocked by the test: {host}")
        return real_getaddrinfo(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    return {"blocked": blocked, "cache": tmp_path / "empty-cache"}
