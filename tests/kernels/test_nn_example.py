"""examples/finetune_learnable_sigma.py runs end to end and its per-head sigma moves away from the start."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_learnable_sigma.py"


def _table(text: str) -> list[list[float]]:
    rows = re.findall(r"^\s+block\s+\d+:(.*)$", text, flags=re.M)
    return [[float(s) for s in row.split()] for row in rows]


def test_finetune_example_learns_sigma_per_head():
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(EXAMPLE.parents[1]))
    args = ["--steps", "3", "--batch", "4", "--image-size", "32", "--sigma", "1.5"]
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    start, _, end = proc.stdout.partition("sigma per head after 3 steps:")
    before, after = _table(start), _table(end)
    assert len(before) == len(after) == 4 and all(
        len(row) == 3 for row in before + after
    )  # 4 blocks x 3 heads
    assert all(s == 1.5 for row in before for s in row)
    assert all(s > 0 for row in after for s in row) and sum(s != 1.5 for row in after for s in row) >= 10
    losses = [float(x) for x in re.findall(r"loss (\S+)", proc.stdout)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
