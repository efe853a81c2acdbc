"""``naclip.collection``: input expansion (folders, --recursive, patterns), the mirrored output tree,
decode-ahead, --skip-existing / resume, the manifest, and torchrun (2 real gloo ranks vs 1 process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from naclip_test_support import REPO_ROOT, register_tiny_config
from PIL import Image

from naclip import collection
from naclip.cli import main
from naclip.collection import MANIFEST_NAME, CollectionError, collect_inputs, plan_outputs, prefetch

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = "naclip-test-collection"
CLASSES = ["--classes", "sky, cloud; tree; person"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """CLI arguments selecting a tiny random CLIP with fixed weights (a checkpoint, so every process of a
    torchrun job holds the same model)."""
    import open_clip

    d = tmp_path_factory.mktemp("tiny_collection")
    cfg = register_tiny_config(d, TINY)
    torch.manual_seed(0)
    ckpt = d / "tiny.pt"
    torch.save(open_clip.create_model(TINY, pretrained=None).state_dict(), ckpt)
    return ["--model-config", str(cfg), "--model", TINY, "--checkpoint", str(ckpt), "--short-side", "48",
            "--no-progress", "--device", "cpu", "--backend", "torch"]  # fmt: skip


def _image(path: Path, h: int = 40, w: int = 56, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``src/`` with the same stem in several folders, an odd-sized image and a non-image file."""
    src = tmp_path / "src"
    _image(src / "b.png", seed=1)
    _image(src / "a.jpg", 33, 47, seed=2)  # odd sizes
    _image(src / "x" / "a.png", seed=3)
    _image(src / "x" / "y" / "a.png", 48, 40, seed=4)
    _image(src / "z" / "c.webp", seed=5)
    (src / "x" / "notes.txt").write_text("not an image")
    return src


def _rels(inputs) -> list[str]:
    return [inp.rel.as_posix() for inp in inputs]


def _files(out: Path) -> dict[str, bytes]:
    """Every output file below ``out`` (relative posix path -> bytes), the manifest left out."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}  # fmt: skip


def _manifest(out: Path) -> tuple[dict, list[dict]]:
    header, *records = (json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines())
    return header, records


# ----------------------------------------------------------------------------------------------- inputs


def test_image_suffixes_come_from_pillow() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".bmp"} <= set(collection.IMAGE_SUFFIXES)
    assert not {".pdf", ".eps", ".txt", ".npy"} & set(collection.IMAGE_SUFFIXES)  # save-only / undecodable


@pytest.mark.parametrize(
    ("items", "recursive", "expected"),
    [
        pytest.param(["src"], False, ["a", "b"], id="folder"),
        pytest.param(["src"], True, ["a", "b", "x/a", "x/y/a", "z/c"], id="folder-recursive"),
        pytest.param(["src/x"], True, ["a", "y/a"], id="subfolder-recursive"),
        pytest.param(["src/*.png"], False, ["b"], id="pattern"),
        pytest.param(["src/**/a.png"], True, ["x/a", "x/y/a"], id="pattern-doublestar"),
        pytest.param(["src/*/a.png"], False, ["x/a"], id="pattern-one-level"),
        pytest.param(["src/x/a.png", "src/b.png"], False, ["a", "b"], id="files-in-given-order"),
        pytest.param(["src/b.png", "src", "src/b.png"], False, ["b", "a"], id="duplicates-keep-first"),
    ],
)
def test_collect_inputs(tree: Path, monkeypatch, items, recursive: bool, expected: list[str]) -> None:
    monkeypatch.chdir(tree.parent)
    assert _rels(collect_inputs(items, recursive=recursive)) == expected


@pytest.mark.parametrize(
    ("items", "recursive", "message"),
    [
        pytest.param(["src/missing.png"], False, "does not exist", id="missing"),
        pytest.param(["src/*.gif"], False, "matches no image", id="empty-pattern"),
        pytest.param(["src/**/c.webp"], False, "only with --recursive", id="doublestar-needs-recursive"),
        pytest.param(["src/z/empty"], True, "contains no image files", id="empty-folder"),
    ],
)
def test_collect_inputs_errors(tree: Path, monkeypatch, items, recursive: bool, message: str) -> None:
    (tree / "z" / "empty" / "deeper").mkdir(parents=True)
    monkeypatch.chdir(tree.parent)
    with pytest.raises(CollectionError, match=message):
        collect_inputs(items, recursive=recursive)


def test_outputs_inside_the_input_tree_are_not_inputs(tree: Path) -> None:
    out = tree / "x"  # --out inside the scanned tree: earlier outputs there are no inputs
    _image(out / "y" / "a_mask.png")
    _image(out / "a_overlay.png")
    got = _rels(collect_inputs([str(tree)], recursive=True, out_dir=out))
    assert got == ["a", "b", "x/a", "x/y/a", "z/c"]


def test_output_names_mirror_the_tree_and_never_collide(tree: Path) -> None:
    inputs = collect_inputs(
        [str(tree), str(tree / "x" / "a.png"), str(tree / "z" / "c.webp")], recursive=False
    )
    plans = plan_outputs(inputs, Path("o"), overlay=True, probs=False)
    assert [p.mask.as_posix() for p in plans] == ["o/a_jpg_mask.png", "o/b_mask.png", "o/a_png_mask.png",
                                                  "o/c_mask.png"]  # fmt: skip
    inputs = collect_inputs([str(tree)], recursive=True)
    plans = plan_outputs(inputs, Path("o"), overlay=False, probs=True, json=True)
    assert [p.mask.as_posix() for p in plans] == ["o/a_mask.png", "o/b_mask.png", "o/x/a_mask.png",
                                                  "o/x/y/a_mask.png", "o/z/c_mask.png"]  # fmt: skip
    assert plans[2].probs.as_posix() == "o/x/a_probs.npy" and plans[2].json.as_posix() == "o/x/a.json"
    assert plans[0].overlay is None


# ------------------------------------------------------------------------------------------- decode-ahead


@pytest.mark.parametrize("depth", [0, 1, 3], ids=lambda d: f"depth{d}")
def test_prefetch_keeps_order_reports_errors_and_stays_bounded(depth: int) -> None:
    loaded, consumed, lock = [], [0], threading.Lock()

    def load(i: int) -> int:
        with lock:
            loaded.append(i)
            # alive at most: the one in the consumer's hands, ``depth`` queued, the one being decoded
            assert len(loaded) <= consumed[0] + depth + 2, "decoded further ahead than the queue depth"
        if i == 4:
            raise OSError("broken file")
        return i * 10

    got = []
    for item, value, err in prefetch(range(9), load, depth=depth):
        got.append((item, value, type(err).__name__ if err else None))
        time.sleep(0.01)  # a slow consumer: an unbounded loader would run far ahead
        with lock:
            consumed[0] += 1
    assert got == [(i, None if i == 4 else i * 10, "OSError" if i == 4 else None) for i in range(9)]


def test_prefetch_closed_early_stops_its_thread() -> None:
    it = prefetch(range(1000), lambda i: i, depth=2)
    assert next(it)[0] == 0
    it.close()
    assert not any(t.name == "naclip-decode" for t in threading.enumerate())


# --------------------------------------------------------------------------------------- end to end (CLI)


def _run(tiny: list[str], inputs: list, out: Path, *extra: str) -> int:
    return main(["segment", *map(str, inputs), "--out", str(out), *CLASSES, *tiny, *extra])


def test_recursive_run_mirrors_the_tree_and_writes_the_manifest(tiny, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _run(tiny, [tree], out, "--recursive", "--json") == 0
    expected = {
        f"{r}{k}" for r in ("a", "b", "x/a", "x/y/a", "z/c") for k in ("_mask.png", "_overlay.png", ".json")
    }
    assert set(_files(out)) == expected
    assert Image.open(out / "x" / "y" / "a_mask.png").size == (40, 48)
    header, records = _manifest(out)
    assert header["counts"] == {"done": 5, "skipped": 0, "failed": 0} and header["complete"]
    assert header["inputs"] == 5 and header["world_size"] == 1 and len(header["fingerprint"]) == 16
    assert [r["input"] for r in records] == [str(tree / p) for p in ("a.jpg", "b.png", "x/a.png", "x/y/a.png",
                                                                    "z/c.webp")]  # fmt: skip
    assert records[3]["outputs"] == ["x/y/a_mask.png", "x/y/a_overlay.png", "x/y/a.json"]
    assert all(r["status"] == "done" and r["fingerprint"] == header["fingerprint"] for r in records)
    assert not list(out.glob(".manifest.rank*"))  # the journal is merged and removed


def test_decoded_ahead_equals_predict_on_the_path(tiny, tmp_path: Path) -> None:
    """The background decode gives what ``Segmenter.predict(path)`` reads itself (EXIF orientation too)."""
    from naclip.segmenter import Segmenter

    src = _image(tmp_path / "photo.jpg", 40, 56, seed=7)
    img = Image.open(src)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    img.save(src, exif=exif)
    out = tmp_path / "o"
    assert _run(tiny, [src], out, "--prefetch", "2") == 0
    seg = Segmenter.from_pretrained(TINY, None, checkpoint=tiny[tiny.index("--checkpoint") + 1], device="cpu",
                                    backend="torch")  # fmt: skip
    ref = seg.predict(src, CLASSES[1], short_side=48)
    mask = np.asarray(Image.open(out / "photo_mask.png"))
    assert mask.shape == (56, 40)
    np.testing.assert_array_equal(mask, ref.labels.numpy())


def test_skip_existing_resumes_and_redoes_stale_or_missing_outputs(
    tiny, tree: Path, tmp_path: Path, monkeypatch
) -> None:
    from naclip.segmenter import Segmenter

    out = tmp_path / "out"
    assert _run(tiny, [tree], out, "--recursive") == 0
    first = _files(out)
    real = Segmenter.from_pretrained

    def refuse(*a, **kw):
        raise AssertionError("nothing to do: the model must not load")

    monkeypatch.setattr(Segmenter, "from_pretrained", staticmethod(refuse))
    assert _run(tiny, [tree], out, "--recursive", "--skip-existing") == 0
    header, records = _manifest(out)
    assert header["counts"] == {"done": 0, "skipped": 5, "failed": 0} and _files(out) == first
    monkeypatch.setattr(Segmenter, "from_pretrained", real)
    (out / "x" / "a_overlay.png").unlink()  # one output missing: that input only is redone
    assert _run(tiny, [tree], out, "--recursive", "--skip-existing") == 0
    _, records = _manifest(out)
    assert [r["status"] for r in records] == ["skipped", "skipped", "done", "skipped", "skipped"]
    assert _files(out) == first
    # other classes: the recorded fingerprint differs, so nothing is skipped
    old_fp = header["fingerprint"]
    assert _run(tiny, [tree], out, "--recursive", "--skip-existing", "--classes", "sky; road") == 0
    header, records = _manifest(out)
    assert header["counts"]["done"] == 5 and header["fingerprint"] != old_fp
    assert {r["fingerprint"] for r in records} == {header["fingerprint"]} and _files(out) != first


def test_interrupted_run_leaves_an_auditable_journal_and_resumes(
    tiny, tree: Path, tmp_path: Path, monkeypatch
) -> None:
    from naclip.segmenter import Segmenter

    out = tmp_path / "out"
    real_predict = Segmenter.predict
    calls = []

    def interrupted(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_predict(self, *a, **kw)

    monkeypatch.setattr(Segmenter, "predict", interrupted)
    assert _run(tiny, [tree], out, "--recursive") == 130
    assert not (out / MANIFEST_NAME).exists()
    journal = [json.loads(line) for line in (out / ".manifest.rank0.jsonl").read_text().splitlines()]
    assert [(Path(r["input"]).name, r["status"]) for r in journal] == [("a.jpg", "done"), ("b.png", "done")]
    monkeypatch.setattr(Segmenter, "predict", real_predict)
    assert _run(tiny, [tree], out, "--recursive", "--skip-existing") == 0
    header, records = _manifest(out)
    assert [r["status"] for r in records] == ["skipped", "skipped", "done", "done", "done"]
    assert header["complete"] and not (out / ".manifest.rank0.jsonl").exists()


def test_failures_are_recorded_and_fail_fast_stops(tiny, tree: Path, tmp_path: Path, capsys) -> None:
    (tree / "x" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and nothing else")
    out = tmp_path / "out"
    assert _run(tiny, [tree], out, "--recursive") == 1
    header, records = _manifest(out)
    bad = [r for r in records if r["status"] == "failed"]
    assert header["counts"] == {"done": 5, "skipped": 0, "failed": 1} and header["complete"]  # all visited
    assert len(bad) == 1 and bad[0]["input"].endswith("broken.png") and "Pillow" in bad[0]["error"]
    assert "5 of 6 image(s) segmented" in capsys.readouterr().err
    out2 = tmp_path / "out2"
    (tree / "a.jpg").write_bytes(b"not a jpeg")  # the first input now fails its pre-check
    assert _run(tiny, [tree], out2, "--recursive", "--fail-fast") == 1
    assert not out2.exists()  # stopped before the model loaded or anything was written


def test_bad_pattern_fails_before_the_model_loads(
    tiny, tree: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    from naclip.segmenter import Segmenter

    monkeypatch.setattr(Segmenter, "from_pretrained", None)  # any use fails loudly
    assert _run(tiny, [str(tree / "*.tiff")], tmp_path / "o") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pattern") and "matches no image" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ torchrun


@pytest.mark.slow
def test_torchrun_two_gloo_ranks_write_what_one_process_writes(tiny, tree: Path, tmp_path: Path) -> None:
    _image(tree / "z" / "d.png", 37, 51, seed=6)  # 6 inputs: 3 per rank
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(tiny, [tree], one, "--recursive", "--probs", "--json") == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*torchrun, "-m", "naclip", "segment", str(tree), "--out", str(two), "--recursive", "--probs",
           "--json", *CLASSES, *tiny]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    files_one, files_two = _files(one), _files(two)
    assert sorted(files_two) == sorted(files_one) and len(files_one) == 6 * 4
    for name, data in files_one.items():
        assert files_two[name] == data, f"{name} differs between 1 and 2 processes"
    h1, r1 = _manifest(one)
    h2, r2 = _manifest(two)
    assert h2["world_size"] == 2 and h2["counts"] == h1["counts"] == {"done": 6, "skipped": 0, "failed": 0}
    assert r2 == r1 and h2["fingerprint"] == h1["fingerprint"]
