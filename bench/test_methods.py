"""Per-image CPU cost of each method (NACLIP, ClearCLIP, SCLIP, ResCLIP, SC-CLIP), side by side in one run.

pytest-benchmark suite, not part of the normal test run (``testpaths = tests``)::

    PYTHONPATH=$PWD pytest bench/test_methods.py -p no:cacheprovider [--benchmark-json FILE]
    NACLIP_BENCH_SINGLE=0 ...   # skip the single-pass 1024x1024 cases

Model: random-init open_clip ``ViT-B-16`` (``pretrained=None``), float32, ``torch`` backend, 2 threads, 21
random unit query features, PAMR off, each method's own post-processing style. Cases: ``whole`` 336x448,
``slide`` 336x448 (224/112, 6 crops; ClearCLIP's official 448/224 crop is not used: comparable work),
``single`` 1024x1024 (4096 patches, one pass). Per case the peak RSS above the RSS before the call (``VmHWM``
reset; for whole / slide an untimed warm-up call, for single the one timed call) and the median of the timed
rounds are recorded (single: 1 round, whole / slide: 3); after every case the summary
``bench/results/methods_cpu.json`` has the machine, versions, git sha, load average and every ratio to NACLIP.
"""

from __future__ import annotations

import os
import statistics

import pytest
import torch

from bench._meta import machine_info, malloc_trim, reset_peak_rss, status_kb, write_text

METHODS = ("naclip", "clearclip", "sclip", "resclip", "scclip")
CASES = {"whole": ((336, 448), 3), "slide": ((336, 448), 3), "single": ((1024, 1024), 1)}
RESULTS: dict[str, dict] = {}
_START_LOAD = os.getloadavg()
OUT = os.path.join(os.path.dirname(__file__), "results", "methods_cpu.json")


@pytest.fixture(scope="module")
def clip_model():
    import open_clip

    torch.set_num_threads(int(os.environ.get("NACLIP_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    return model


def _write_summary() -> None:
    import json

    if not RESULTS:
        return
    for row in RESULTS.values():
        base = RESULTS.get(f"naclip/{row['case']}")
        if base:
            row["time_vs_naclip"] = round(row["median_s"] / base["median_s"], 3)
            row["peak_vs_naclip"] = round(row["peak_rss_mb"] / max(base["peak_rss_mb"], 1e-9), 3)
    meta = machine_info("cpu")
    meta["loadavg_at_start"] = _START_LOAD  # machine_info's value is the load at this write
    meta["loadavg_at_end"] = os.getloadavg()
    meta["note"] = "shared machine: absolute times vary with load, ratios within this run are what count"
    write_text(OUT, json.dumps({"meta": meta, "results": RESULTS}, indent=1) + "\n")


def _text(n: int = 21, d: int = 512) -> torch.Tensor:
    t = torch.randn(n, d, generator=torch.Generator().manual_seed(1))
    return t / t.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", list(CASES))
def test_method_cost(benchmark, clip_model, method: str, case: str) -> None:
    from naclip.segmenter import Segmenter

    if case == "single" and os.environ.get("NACLIP_BENCH_SINGLE", "1") == "0":
        pytest.skip("NACLIP_BENCH_SINGLE=0")
    (h, w), rounds = CASES[case]
    seg = Segmenter(clip_model, None, method=method, backend="torch")
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(2))
    text, qidx = _text(), list(range(21))

    def run():
        with torch.inference_mode():
            return seg.predict_from_features(image, text, qidx, mode=case, pamr_steps=0)

    malloc_trim()
    before = status_kb("VmRSS")
    tracked = reset_peak_rss()
    if rounds > 1:  # an untimed first call (warm-up) measures the peak; single passes: the timed call does
        run()
    else:
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    peak_mb = (status_kb("VmHWM") - before) / 1024 if tracked else float("nan")
    benchmark.extra_info["peak_rss_above_start_mb"] = round(peak_mb, 1)
    if rounds > 1:
        benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)
    times = list(benchmark.stats.stats.data)
    RESULTS[f"{method}/{case}"] = {
        "method": method,
        "case": case,
        "image_hw": [h, w],
        "rounds": rounds,
        "median_s": round(statistics.median(times), 4),
        "peak_rss_mb": round(peak_mb, 1),
    }
    _write_summary()  # after every case, so an interrupted run keeps what it measured
