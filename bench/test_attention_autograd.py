"""pytest-benchmark suite: forward and forward+backward of the Gaussian-bias attention, per N (groups).

Run (not part of the normal test run)::

    PYTHONPATH=. python -m pytest bench/test_attention_autograd.py -p no:cacheprovider \
        --benchmark-json=bench/results/attention_autograd_cpu.json [-k N4097]

``NACLIP_BENCH_DEVICE=cuda`` runs on the GPU (Triton included); ``NACLIP_BENCH_THREADS`` sets torch threads
(default 2); ``NACLIP_BENCH_ROUNDS`` overrides the timed rounds per method (default 5; 3 from N = 4097; 1 from
N = 16385; each after one warm-up call). Methods and cases: ``bench/_autograd_cases.py``. Every method of
one group runs in the same process, one after the other with the same rounds, so ratios within a group are
comparable; peak memory is measured separately, one process per method (``python -m bench.autograd_memory``).
"""

from __future__ import annotations

import os

import pytest

from bench._autograd_cases import CASES, METHODS, build, make_inputs, skip_reason

_inputs: dict = {}


def _cached_inputs(case: str, device: str):
    if (case, device) not in _inputs:
        _inputs.clear()  # one case alive at a time
        _inputs[(case, device)] = make_inputs(case, device)
    return _inputs[(case, device)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention(benchmark, bench_device, case, mode, method):
    why = skip_reason(case, method, mode, bench_device)
    if why:
        pytest.skip(why)
    k, v, do, grid = _cached_inputs(case, bench_device)
    step = build(method, mode, k, v, do, grid)
    sync = (lambda: __import__("torch").cuda.synchronize()) if bench_device == "cuda" else (lambda: None)
    step()  # warm-up (and compile for flex)
    sync()
    benchmark.group = f"{case}-{mode}"
    benchmark.extra_info.update(case=case, mode=mode, method=method, N=CASES[case][0], batch=CASES[case][1])
    n = CASES[case][0]
    rounds = int(os.environ.get("NACLIP_BENCH_ROUNDS") or (1 if n >= 16385 else 3 if n >= 4097 else 5))
    benchmark.pedantic(lambda: (step(), sync()), rounds=rounds, iterations=1, warmup_rounds=0)
