"""Benchmark of NACLIP's Gaussian-bias attention: time and peak memory per method and sequence length.

Usage::

    python -m bench.attention [--quick] [--device cpu|cuda] [--out bench/results] [--threads 2]

Methods (key-key attention ``softmax(scale * K K^T + G) V`` as NACLIP runs it, 12 heads, D = 64):

* ``reference``   naclip_kernels.reference_attention (dense fp32 scores + materialised bias); skipped above
  ``--ref-cap-gb`` of estimated memory.
* ``torch``       gaussian_attention(backend="torch"): query-chunked SDPA with the bias built per chunk.
* ``sdpa_dense``  F.scaled_dot_product_attention(k, k, v, attn_mask=G), G precomputed (build time excluded
  from the timing, its memory included).
* ``sdpa_nobias`` F.scaled_dot_product_attention(k, k, v): the floor (no bias at all).
* ``flex``        torch.compile(flex_attention) with a Gaussian score_mod (compile time excluded); a failure
  is recorded as "did not compile: <reason>".
* ``triton``      gaussian_attention(backend="triton") (CUDA only).

Time: for each N one fresh subprocess builds every method, warms each up, then times ``--repeats`` rounds in
which every method runs once (round-robin, so load changes on a shared machine hit all methods alike); median
and min wall time per method (CUDA: synchronised). Peak memory: extra bytes over the inputs during one call,
output included, measured in a separate fresh subprocess per (N, method) on the first call (``flex``: in the
timing process, on the first call after compiling). CPU: growth of the process's resident set, ``VmHWM``
(high-water mark, reset through ``/proc/self/clear_refs`` after ``malloc_trim``) minus ``VmRSS`` before the
call (falls back to sampling ``VmRSS`` every 0.2 ms). CUDA: ``torch.cuda.max_memory_allocated`` minus the
allocation before the call. For ``sdpa_dense`` the dense mask ``G`` is counted too.

Writes ``attention_<device>[_quick].{csv,json,png}`` (PNG only when matplotlib imports) into ``--out``
atomically and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
import threading
import time
from pathlib import Path

from bench._flex import compiled_flex_attention, gaussian_score_mod
from bench._meta import machine_info, malloc_trim, reset_peak_rss, run_worker, status_kb, write_text

# (N, batch, grid): 197 = one 224 crop (x162 = all sliding-window crops of a 2048x1024 image, batched);
# 16385 = a 2048x2048 image at patch 16.
FULL_CASES = [
    (197, 162, (14, 14)),
    (785, 1, (28, 28)),
    (1025, 1, (32, 32)),
    (4097, 1, (64, 64)),
    (16385, 1, (128, 128)),
]
QUICK_CASES = [(197, 162, (14, 14)), (785, 1, (28, 28)), (4097, 1, (64, 64))]
METHODS = ["reference", "torch", "sdpa_dense", "sdpa_nobias", "flex", "triton"]
HEADS, HEAD_DIM, SIGMA = 12, 64, 5.0
FIELDS = [
    "device",
    "dtype",
    "N",
    "batch",
    "heads",
    "head_dim",
    "grid",
    "method",
    "status",
    "time_s_median",
    "time_s_min",
    "repeats",
    "peak_extra_mb",
    "mem_method",
    "ratio_vs_sdpa_nobias",
    "ratio_vs_sdpa_dense",
    "note",
]


# --------------------------------------------------------------------------------------------- worker side


def _rss_bytes() -> int:
    return status_kb("VmRSS") * 1024


class _RssPoller:
    """Fallback when VmHWM cannot be reset: samples VmRSS every ``interval`` seconds."""

    def __init__(self, interval: float = 2e-4) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = _rss_bytes()
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_bytes())


def _cpu_peak_extra(fn) -> tuple[int, str]:
    """Peak RSS growth during one call of ``fn`` (bytes) and the method used."""
    malloc_trim()
    rss0 = _rss_bytes()
    if reset_peak_rss():
        fn()
        return max(0, status_kb("VmHWM") * 1024 - rss0), "VmHWM delta (clear_refs reset, malloc_trim)"
    with _RssPoller() as p:
        fn()
    return max(0, p.peak - rss0), "polled VmRSS delta (0.2 ms, malloc_trim)"


def _flex_fn(k, v, grid_w: int, sigma: float):
    flex, score_mod = compiled_flex_attention(), gaussian_score_mod(grid_w, sigma)
    scale = k.shape[-1] ** -0.5
    return lambda: flex(k, k, v, score_mod=score_mod, scale=scale)


def _build(method: str, k, v, grid: tuple[int, int], cuda: bool, sync):
    """(fn, note, setup_bytes) for one method; raises on a flex compile failure (first call compiles)."""
    import torch
    import torch.nn.functional as F

    import naclip_kernels as nk

    gh, gw = grid
    if method == "reference":
        return (lambda: nk.reference_attention(k, k, v, grid, SIGMA)), "", 0
    if method == "torch":
        return (lambda: nk.gaussian_attention(k, k, v, grid, SIGMA, backend="torch")), "", 0
    if method == "triton":
        return (lambda: nk.gaussian_attention(k, k, v, grid, SIGMA, backend="triton")), "", 0
    if method == "sdpa_nobias":
        return (lambda: F.scaled_dot_product_attention(k, k, v)), "", 0
    if method == "sdpa_dense":
        before = torch.cuda.memory_allocated() if cuda else _rss_bytes()
        G = nk.gaussian_bias(grid, SIGMA, dtype=k.dtype if cuda else torch.float32, device=k.device)
        sync()
        setup = (torch.cuda.memory_allocated() if cuda else _rss_bytes()) - before
        fn = lambda: F.scaled_dot_product_attention(k, k, v, attn_mask=G)
        return fn, "G precomputed (time excluded, memory included)", setup
    if method == "flex":
        fn = _flex_fn(k, v, gw, SIGMA)
        t0 = time.perf_counter()
        fn()
        sync()
        return fn, f"torch.compile(flex_attention); compile+first call {time.perf_counter() - t0:.1f} s", 0
    raise ValueError(f"unknown method {method!r}")


def _peak(fn, cuda: bool, sync) -> tuple[int, str]:
    import torch

    if not cuda:
        return _cpu_peak_extra(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base, "cuda max_memory_allocated delta"


def _worker(cfg: dict) -> dict:
    """mode "mem": peak memory of one method's first call in this fresh process (flex: after compiling).
    mode "time": every method of one size in this process, timed round-robin (so that load changes on a
    shared machine hit all methods alike); flex's memory is measured here too (it needs its compile)."""
    import torch

    torch.set_num_threads(cfg["threads"])
    dev = torch.device(cfg["device"])
    dtype = getattr(torch, cfg["dtype"])
    N, B, grid = cfg["N"], cfg["batch"], tuple(cfg["grid"])
    gen = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(B, HEADS, N, HEAD_DIM, generator=gen).to(dev, dtype)
    v = torch.randn(B, HEADS, N, HEAD_DIM, generator=gen).to(dev, dtype)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def fail(e: Exception, what: str) -> dict:
        return {"status": f"{what}: {type(e).__name__}: {e}".splitlines()[0][:300]}

    res: dict[str, dict] = {}
    fns = {}
    for m in cfg["methods"]:
        try:
            fn, note, setup = _build(m, k, v, grid, cuda, sync)
        except Exception as e:  # a failing baseline is a result, not a crash
            res[m] = fail(e, "did not compile" if m == "flex" else "failed")
            continue
        res[m] = {"status": "ok", "note": note}
        if cfg["mode"] == "mem" or m == "flex":
            peak, how = _peak(fn, cuda, sync)
            res[m].update(peak_extra_mb=(peak + setup) / 2**20, mem_method=how)
        fns[m] = fn
    if cfg["mode"] == "mem":
        return res
    for m, fn in list(fns.items()):
        try:
            for _ in range(cfg["warmup"]):
                fn()
            sync()
        except Exception as e:
            res[m] = fail(e, "failed")
            del fns[m]
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(cfg["repeats"]):
        for m, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[m].append(time.perf_counter() - t0)
    for m, ts in times.items():
        res[m].update(time_s_median=statistics.median(ts), time_s_min=min(ts), repeats=len(ts))
    return res


# --------------------------------------------------------------------------------------------- driver side


def _ref_bytes(N: int, B: int) -> int:
    return 3 * B * HEADS * N * N * 4 + N * N * 4


def _run_case(cfg: dict, timeout: float) -> dict:
    args = ["-m", "bench.attention", "--worker", json.dumps(cfg)]
    return run_worker(args, threads=cfg["threads"], timeout=timeout)


def _markdown(rows: list[dict]) -> str:
    head = (
        "| N (batch) | dtype | method | median s | min s | vs SDPA no-bias | vs SDPA dense | peak extra MB "
        "| status |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda x, p: "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{p}f}"
    for r in rows:
        lines.append(
            f"| {r['N']} ({r['batch']}) | {r['dtype']} | {r['method']} | {fmt(r.get('time_s_median'), 4)} | "
            f"{fmt(r.get('time_s_min'), 4)} | {fmt(r.get('ratio_vs_sdpa_nobias'), 2)} | "
            f"{fmt(r.get('ratio_vs_sdpa_dense'), 2)} | {fmt(r.get('peak_extra_mb'), 1)} | {r['status']} |"
        )
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001 - optional dependency
        return f"no plot (matplotlib unavailable: {type(e).__name__})"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for dtype in sorted({r["dtype"] for r in rows}):
        for m in METHODS:
            pts = [r for r in rows if r["method"] == m and r["dtype"] == dtype and r["status"] == "ok"]
            if not pts:
                continue
            lab = f"{m} ({dtype})"
            axes[0].plot([p["N"] for p in pts], [p["time_s_median"] for p in pts], marker="o", label=lab)
            axes[1].plot(
                [p["N"] for p in pts], [max(p["peak_extra_mb"], 0.1) for p in pts], marker="o", label=lab
            )
    for ax, yl in zip(axes, ("median time [s]", "peak extra memory [MB]"), strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N (N=197: 162 crops batched)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Gaussian-bias attention, {HEADS} heads, D={HEAD_DIM}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_text(path, buf.getvalue())
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes/repeats (N in 197x162, 785, 4097)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--out", default="bench/results", help="output directory (default bench/results)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads per worker (default 2)")
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    ap.add_argument("--sizes", default=None, help="comma-separated N subset of the chosen case list")
    ap.add_argument("--dtypes", default=None, help="default: float32 on cpu, float16,bfloat16 on cuda")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--ref-cap-gb", type=float, default=6.0, help="skip the reference above this estimate")
    ap.add_argument("--timeout", type=float, default=None, help="per-case subprocess timeout in seconds")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:
        print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device available", file=sys.stderr)
        return 2
    cases = QUICK_CASES if args.quick else FULL_CASES
    if args.sizes:
        want = {int(s) for s in args.sizes.split(",")}
        cases = [c for c in cases if c[0] in want]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown methods {bad}; choose from {METHODS}")
    if args.device == "cpu":
        methods = [m for m in methods if m != "triton"]
    dtypes = (
        args.dtypes.split(",")
        if args.dtypes
        else (["float32"] if args.device == "cpu" else ["float16", "bfloat16"])
    )
    repeats = args.repeats or (3 if args.quick else 5)
    timeout = args.timeout or (600.0 if args.quick else 1800.0)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.device, threads=args.threads)

    rows: list[dict] = []
    for dtype in dtypes:
        for N, B, grid in cases:
            base_cfg = {
                "device": args.device,
                "dtype": dtype,
                "N": N,
                "batch": B,
                "grid": list(grid),
                "threads": args.threads,
                "warmup": 1 if args.quick else 2,
                "repeats": repeats if N < 16000 else max(2, repeats - 2),
            }
            run_methods = [
                m for m in methods if not (m == "reference" and _ref_bytes(N, B) > args.ref_cap_gb * 2**30)
            ]
            timed = _run_case({**base_cfg, "mode": "time", "methods": run_methods}, timeout)
            for m in methods:
                row = {
                    "device": args.device,
                    "dtype": dtype,
                    "N": N,
                    "batch": B,
                    "heads": HEADS,
                    "head_dim": HEAD_DIM,
                    "grid": f"{grid[0]}x{grid[1]}",
                    "method": m,
                }
                if m not in run_methods:
                    row["status"] = f"skipped: needs ~{_ref_bytes(N, B) / 2**30:.0f} GB > --ref-cap-gb"
                else:
                    row.update(timed.get(m, {"status": timed.get("status", "failed: no result")}))
                    if row["status"] == "ok" and "peak_extra_mb" not in row:
                        mem = _run_case({**base_cfg, "mode": "mem", "methods": [m]}, timeout).get(m, {})
                        row.update({k: mem[k] for k in ("peak_extra_mb", "mem_method") if k in mem})
                        if mem.get("status", "ok") != "ok":
                            row["note"] = (row.get("note", "") + f"; memory run {mem['status']}").strip("; ")
                rows.append(row)
                print(
                    f"[bench] N={N} B={B} {dtype} {m}: {row['status']} "
                    f"{row.get('time_s_median', float('nan')):.4f} s",
                    file=sys.stderr,
                    flush=True,
                )
            same = [r for r in rows if r["N"] == N and r["dtype"] == dtype and r["status"] == "ok"]
            base = {r["method"]: r["time_s_median"] for r in same}
            for r in same:
                for key, ref in (
                    ("ratio_vs_sdpa_nobias", "sdpa_nobias"),
                    ("ratio_vs_sdpa_dense", "sdpa_dense"),
                ):
                    if ref in base:
                        r[key] = r["time_s_median"] / base[ref]

    stem = f"attention_{args.device}" + ("_quick" if args.quick else "")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in FIELDS})
    write_text(out_dir / f"{stem}.csv", buf.getvalue())
    meta = {
        "machine": machine,
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "sigma": SIGMA,
        "repeats": repeats,
        "timing": "median and min of wall time over repeats after warm-up (CUDA synchronised)",
        "memory": __doc__.split("Peak memory:")[1].split("\n\n")[0].strip().replace("\n", " "),
        "rows": rows,
    }
    write_text(out_dir / f"{stem}.json", json.dumps(meta, indent=2))
    plot_note = _plot(rows, out_dir / f"{stem}.png")
    print(
        f"\nMachine: {machine['cpu_model']}, {machine['cpu_count']} CPUs, "
        f"torch {machine['versions']['torch']}, triton {machine['versions']['triton']}, "
        f"{args.threads} threads, git {machine['git_sha']}"
        f"{' (dirty)' if machine['git_dirty'] else ''}, "
        f"load at start {machine['loadavg_at_start']}"
    )
    print(f"Memory: {meta['memory']}\n")
    print(_markdown(rows))
    print(
        f"\nwrote {out_dir / stem}.csv/.json"
        + ("" if plot_note else "/.png")
        + (f" ({plot_note})" if plot_note else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
