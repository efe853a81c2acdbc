"""``naclip demo``: the request handler, the ``/segment`` API through ``gradio_client``, and the page in a
real headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by selenium), all on loopback with
a tiny random model. Every socket the test process opens or resolves, and every resource the page loads, must
be on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from naclip_test_support import REPO_ROOT, tiny_clip
from PIL import Image

from naclip.cli import main
from naclip.presets import get_preset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = "cat, kitten; sofa; wall"
NAMES = ["cat", "sofa", "wall"]
IMAGE = REPO_ROOT / "assets" / "chelsea.jpg"
_LOCAL = ("127.0.0.1", "::1", "localhost")
#: Why the browser test is skipped here (``.ci/run`` installs both, and fails if the test was skipped).
BROWSER_SKIP = (
    None
    if shutil.which("chromium") and shutil.which("chromedriver")
    else "headless Chromium not installed (apt-get install chromium chromium-driver)"
)


@pytest.fixture(scope="module")
def segmenter():
    import open_clip

    from naclip import SegmentConfig, Segmenter

    cfg = SegmentConfig(short_side=64, pamr_steps=2)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    return Segmenter(tiny_clip(vision_layers=1), tokenizer, device="cpu", config=cfg)


def test_session_segments_and_writes_downloads(segmenter) -> None:
    from naclip.demo import DemoSession

    session = DemoSession(segmenter)
    try:
        rgb = np.array(Image.open(IMAGE).convert("RGB"))
        settings = {"mode": "slide", "sigma": 3.0, "prob_thd": 0.0, "pamr": False, "short_side": 48}
        overlay, heat, rows, mask_path, json_path = session.segment(rgb, CLASSES, **settings)
        assert overlay.width == rgb.shape[1] and overlay.height > rgb.shape[0]  # legend strip below
        assert heat.width > 3 * 64
        assert [r[0] for r in rows] == NAMES and sum(r[1] for r in rows) == rgb.shape[0] * rgb.shape[1]
        mask = np.asarray(Image.open(mask_path))
        assert [r[1] for r in rows] == np.bincount(mask.ravel(), minlength=3).tolist()
        import json

        settings = json.loads(Path(json_path).read_text())["settings"]
        assert (settings["mode"], settings["gaussian_std"], settings["pamr"]) == ("slide", 3.0, False)
        assert segmenter.visual.gaussian_std == 5.0  # the request's σ is not kept
        text, mode, thd, side = session.preset_settings("voc21")
        voc = get_preset("voc21")
        assert (mode, thd, side) == (voc.mode, voc.prob_thd, voc.short_side)
        assert text.split("; ")[1:] == [", ".join(s) for s in voc.classes.synonyms[1:]]
        _, _, rows, _, _ = session.segment(np.zeros((32, 48, 3), np.uint8), text, pamr=False)
        assert [r[0] for r in rows] == list(voc.classes.names)  # the preset's display names are kept
    finally:
        session.close()
    assert not session.root.exists()


@pytest.mark.parametrize(
    ("image", "classes", "message"),
    [
        pytest.param(None, "a; b", "image: upload, paste or capture", id="no-image"),
        pytest.param(np.zeros((32, 32, 3), np.uint8), "  ", "classes: type class names", id="no-classes"),
        pytest.param(np.zeros((32, 32, 3), np.uint8), "a;; b", "empty", id="empty-class"),
    ],
)
def test_session_rejects_bad_input(segmenter, image, classes: str, message: str) -> None:
    from naclip.demo import DemoSession

    session = DemoSession(segmenter)
    with pytest.raises(ValueError, match=message):
        session.segment(image, classes)
    session.close()


def test_cli_demo_options(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--help"]) == 0
    help_text = capsys.readouterr().out
    for flag in ("--model", "--pretrained", "--checkpoint", "--device", "--dtype", "--port", "--share"):
        assert flag in help_text
    assert main(["demo", "--port", "0"]) == 2
    assert "expected an integer >= 1, got '0'" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["demo", "--pretrained", "none"]) == 2
    assert "pip install 'naclip[demo]'" in capsys.readouterr().err


def test_cli_demo_loads_the_model_once_and_serves_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("gradio", reason="gradio (extra [demo], in [dev]) is not installed")
    import open_clip

    from naclip import Segmenter, demo

    cfg = tmp_path / "naclip-demo-tiny.json"
    cfg.write_text(
        '{"embed_dim": 32, "quick_gelu": true, "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, '
        '"head_width": 32, "patch_size": 16}, "text_cfg": {"context_length": 77, "vocab_size": 49408, '
        '"width": 32, "heads": 2, "layers": 1}}'
    )
    calls = []
    monkeypatch.setattr(demo, "launch", lambda seg, **kw: calls.append((seg, kw)))
    argv = ["demo", "--model-config", str(cfg), "--model", "naclip-demo-tiny", "--pretrained", "none"]
    assert main([*argv, "--device", "cpu", "--method", "kk", "--port", "8123"]) == 0
    ((seg, kw),) = calls
    assert isinstance(seg, Segmenter) and seg.visual.strategy == "kk"
    assert kw == {"host": "127.0.0.1", "port": 8123, "share": False}
    assert "naclip-demo-tiny" in open_clip.list_models()


# ------------------------------------------------------------------------------------- served on loopback


def _is_local(host) -> bool:
    return host is None or str(host) in _LOCAL


@pytest.fixture(scope="module")
def outbound():
    """Records every non-loopback address the test process connects to or resolves, while the module runs."""
    seen: list[str] = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            seen.append(f"connect {address!r}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kw):
        if not _is_local(host):
            seen.append(f"resolve {host!r}")
        return real_getaddrinfo(host, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        yield seen


@pytest.fixture(scope="module")
def served(segmenter, outbound, tmp_path_factory: pytest.TempPathFactory):
    """The demo on a free loopback port (``http://127.0.0.1:PORT/``), stopped after the module."""
    pytest.importorskip("gradio", reason="gradio (extra [demo], in [dev]) is not installed")
    from naclip import demo

    os.environ.setdefault("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = demo.launch(segmenter, port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    app.close()
    app.naclip_session.close()
    assert outbound == [], f"the demo reached beyond loopback: {outbound}"


def test_gradio_client_drives_the_segment_endpoint(served: str) -> None:
    from gradio_client import Client, handle_file

    client = Client(served, verbose=False)
    overlay, heat, areas, mask_file, json_file = client.predict(
        handle_file(str(IMAGE)), CLASSES, api_name="/segment"
    )
    w, h = Image.open(IMAGE).size
    img = Image.open(overlay)
    assert img.width == w and img.height > h
    assert [row[0] for row in areas["data"]] == NAMES
    assert Image.open(mask_file).size == (w, h)
    assert Path(json_file).suffix == ".json"


@pytest.mark.skipif(BROWSER_SKIP is not None, reason=BROWSER_SKIP or "")
def test_browser_uploads_segments_and_shows_the_result(served: str, tmp_path: Path) -> None:
    pytest.importorskip("selenium", reason="selenium (in [dev]) is not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium manager: never look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1800", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):  # fmt: skip
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        driver.get(served)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]")))
        upload.send_keys(str(IMAGE))
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
        box = driver.find_element(By.CSS_SELECTOR, "#classes textarea")
        box.clear()
        box.send_keys(CLASSES)
        driver.find_element(By.ID, "segment-btn").click()
        shown = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#overlay img")))
        wait.until(lambda d: all(n in d.find_element(By.ID, "areas").text for n in NAMES))
        size_js = "return [arguments[0].naturalWidth, arguments[0].naturalHeight]"
        natural = driver.execute_script(size_js, shown)
        w, h = Image.open(IMAGE).size
        assert natural[0] == w and natural[1] > h  # the overlay with its legend strip
        assert driver.find_elements(By.CSS_SELECTOR, "#heatmaps img")
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        remote = [u for u in resources if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]
        assert remote == [], f"the page loaded resources from outside loopback: {remote}"
        driver.save_screenshot(str(os.environ.get("NACLIP_DEMO_SCREENSHOT", tmp_path / "demo.png")))
    finally:
        driver.quit()
