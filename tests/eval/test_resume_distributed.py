"""Real processes: ``python -m naclip.eval`` killed with SIGKILL mid-run and resumed, and ``torchrun`` with 2
CPU ranks (gloo); both must end with the confusion matrix of an uninterrupted single-process run, bit for
bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from naclip.cli import main as naclip_main
from naclip.eval.records import encode_record, read_log
from naclip.eval.synthetic import make_synthetic_dataset

NUM_IMAGES = 14
SETTINGS = [
    "--no-pamr",
    "--short-side",
    "64",
    "--crop",
    "32",
    "--stride",
    "16",
    "--workers",
    "0",
    "--no-progress",
]

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("NACLIP_CHECKPOINT", None)
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_args):
    """Synthetic Cityscapes (two cities) and its uninterrupted single-process result."""
    base = tmp_path_factory.mktemp("resume")
    root = base / "data"
    make_synthetic_dataset("cityscapes", root, num_images=NUM_IMAGES, sizes=[(64, 80), (72, 64)], seed=9)
    out = base / "reference"
    argv = ["eval", "--dataset", "cityscapes", "--root", str(root), "--out", str(out)]
    assert naclip_main(argv + tiny_model_args + SETTINGS) == 0
    return (
        root,
        tiny_model_args,
        np.load(out / "confusion.npy"),
        json.loads((out / "results.json").read_text()),
    )


def _eval_cmd(root, model_args, out) -> list[str]:
    args = ["--dataset", "cityscapes", "--root", str(root), "--out", str(out)]
    return [sys.executable, "-m", "naclip.eval", *args, *model_args, *SETTINGS]


def _count_records(log) -> int:
    try:
        return len(read_log(log).records)
    except (FileNotFoundError, ValueError):
        return 0


def test_sigkill_mid_run_then_resume_is_bit_identical(reference, tmp_path):
    root, model_args, ref_hist, ref_res = reference
    out = tmp_path / "run"
    log = out / "progress" / "rank0.log"
    proc = subprocess.Popen(_eval_cmd(root, model_args, out), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while _count_records(log) < 3:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the run did not start logging in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = _count_records(log)
    assert 3 <= done < NUM_IMAGES, f"killed too late: {done} of {NUM_IMAGES} images logged"
    assert not (out / "results.json").exists()
    # Also leave a torn record at the end, as a kill in the middle of a write would.
    full = encode_record(NUM_IMAGES - 1, torch.from_numpy(ref_hist))
    torn = full[: len(full) // 2]
    with open(log, "ab") as f:
        f.write(torn)

    resumed = subprocess.run(_eval_cmd(root, model_args, out), env=_env(), capture_output=True, text=True,
                             timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["run"]["resumed_images"] == done
    assert res["run"]["processed_images"] == NUM_IMAGES - done
    assert res["run"]["torn_bytes_discarded"] == len(torn)
    hist = np.load(out / "confusion.npy")
    np.testing.assert_array_equal(hist, ref_hist)
    assert res["per_class"] == ref_res["per_class"] and res["mIoU"] == ref_res["mIoU"]
    st = read_log(log)
    assert sorted(st.records) == list(range(NUM_IMAGES)) and st.good_bytes == st.file_bytes


def test_torchrun_two_gloo_ranks_match_one_process(reference, tmp_path):
    root, model_args, ref_hist, ref_res = reference
    out = tmp_path / "dist"
    cmd = _eval_cmd(root, model_args, out)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cmd[1:]]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["run"]["world_size"] == 2 and res["run"]["processed_images"] == NUM_IMAGES
    np.testing.assert_array_equal(np.load(out / "confusion.npy"), ref_hist)
    assert res["per_class"] == ref_res["per_class"]
    r0 = read_log(out / "progress" / "rank0.log").records
    r1 = read_log(out / "progress" / "rank1.log").records
    assert sorted(r0) == list(range(0, NUM_IMAGES, 2)) and sorted(r1) == list(range(1, NUM_IMAGES, 2))
