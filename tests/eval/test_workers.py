"""DataLoader workers of the evaluation loop die with their parent, even when it is SIGKILLed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from naclip.eval import runner

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads worker pids from /proc")

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import numpy as np, torch
    from naclip.eval.datasets import EvalDataset
    from naclip.eval.runner import evaluate
    from naclip.eval.synthetic import make_synthetic_dataset

    root, pids = Path(sys.argv[1]), Path(sys.argv[2])
    make_synthetic_dataset("voc21", root, num_images=6)

    def children():
        out = []
        for task in Path("/proc/self/task").iterdir():
            out += (task / "children").read_text().split()
        return out

    def predict(image):
        if not pids.exists():  # first image: the workers are up; report them and hang
            pids.write_text(" ".join(children()))
            while True:
                time.sleep(1)
        return torch.zeros(image.shape[:2], dtype=torch.long)

    class Stuck(EvalDataset):  # workers busy in __getitem__ (torch's idle-time parent check cannot act)
        def __getitem__(self, i):
            if i >= 2:
                time.sleep(3600)
            return super().__getitem__(i)

    evaluate(Stuck("voc21", root), predict, num_workers=2)
    """
)


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a reaped or exited worker counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait(predicate, limit_s: float) -> bool:
    """Poll ``predicate`` every 0.1 s for up to ``limit_s`` (a bound on waiting, not a timing assertion)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_sigkilled_parent_takes_its_workers_along(tmp_path):
    pids_file = tmp_path / "pids"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "data"), str(pids_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert _wait(lambda: pids_file.exists() and pids_file.read_text(), 120), proc.stderr
        workers = [int(p) for p in pids_file.read_text().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        assert _wait(lambda: not any(_alive(p) for p in workers), 30), [p for p in workers if _alive(p)]
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in [int(x) for x in pids_file.read_text().split()] if pids_file.exists() else []:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_watchdog_ends_a_worker_whose_parent_changed(monkeypatch):
    # the non-Linux path: no prctl; a parent pid that is not ours -> the process exits at once
    exits = []

    def fake_exit(code):
        exits.append(code)
        if threading.current_thread() is threading.main_thread():
            raise SystemExit(code)

    monkeypatch.setattr(runner.sys, "platform", "darwin")
    monkeypatch.setattr(runner.os, "_exit", fake_exit)
    with pytest.raises(SystemExit):
        runner._die_with_parent(parent_pid=-1)
    assert exits and set(exits) == {1}


def test_worker_init_is_picklable_and_remembers_the_parent():
    import pickle

    init = pickle.loads(pickle.dumps(runner._WorkerInit()))
    assert init.parent_pid == os.getpid()
