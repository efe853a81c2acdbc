"""pytest configuration of the benchmark suites under ``bench/`` (never collected by the plain ``pytest`` run,
whose testpaths is ``tests/``): torch threads, and the run's machine / versions / git sha / load average added
to the ``--benchmark-json`` output (``bench/_meta.machine_info``)."""

from __future__ import annotations

import os

import pytest

THREADS = int(os.environ.get("NACLIP_BENCH_THREADS", "2"))


def pytest_configure(config):
    import torch

    torch.set_num_threads(THREADS)


def pytest_benchmark_update_json(config, benchmarks, output_json):
    from bench._meta import machine_info

    device = os.environ.get("NACLIP_BENCH_DEVICE", "cpu")
    info = machine_info(device, threads=THREADS)
    info["loadavg_at_end"] = os.getloadavg()
    info["note"] = (
        "shared machine (other engineers' jobs run concurrently): compare ratios within this run, "
        "not absolute times across runs"
    )
    output_json["naclip_machine"] = info


@pytest.fixture(scope="session")
def bench_device() -> str:
    return os.environ.get("NACLIP_BENCH_DEVICE", "cpu")
