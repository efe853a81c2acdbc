"""Peak extra memory of each autograd-benchmark method, one fresh process per (case, mode, method), and the
Markdown table / plot that combine it with a pytest-benchmark JSON.

Usage::

    python -m bench.autograd_memory --cases N4097 [--modes fwdbwd] [--out bench/results]
    python -m bench.autograd_memory --report bench/results/attention_autograd_cpu.json

Memory: growth of the process's resident set during the first full-size call, after one tiny warm-up call
(``VmHWM`` after a reset, minus ``VmRSS``
before; ``bench.attention._cpu_peak_extra``), inputs excluded, everything the method allocates included
(``sdpa_dense``: its ``[N, N]`` mask; backward: the gradients). Writes ``attention_autograd_memory_cpu.json``.
``--report`` writes ``attention_autograd_cpu.md`` / ``.png`` next to the benchmark JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

from bench._autograd_cases import CASES, METHODS, skip_reason
from bench._meta import machine_info, run_worker, write_text

THREADS = 2


def _worker(case: str, mode: str, method: str) -> dict:
    import torch

    from bench._autograd_cases import build, make_inputs
    from bench.attention import _cpu_peak_extra

    torch.set_num_threads(THREADS)
    k, v, do, grid = make_inputs(case)
    # one tiny call first: lazy imports, op registration and autograd start-up are not the method's memory
    tiny = [t[:1, :, :5].contiguous() for t in (k, v, do)]
    build(method, mode, *tiny, (2, 2))()
    peak, how = _cpu_peak_extra(lambda: build(method, mode, k, v, do, grid)())
    return {"peak_extra_mb": peak / 2**20, "mem_method": how}


def _measure(case: str, mode: str, method: str, timeout: float) -> dict:
    r = run_worker(
        ["-m", "bench.autograd_memory", "--worker", case, mode, method], threads=THREADS, timeout=timeout
    )
    return r if "status" in r else {"status": "ok", **r}


def _load_memory(path: Path) -> dict:
    if not path.is_file():
        return {}
    return {(r["case"], r["mode"], r["method"]): r for r in json.loads(path.read_text())["rows"]}


def _rows(bench_json: Path, mem: dict) -> list[dict]:
    data = json.loads(bench_json.read_text())
    rows = []
    for b in data["benchmarks"]:
        x = b["extra_info"]
        m = mem.get((x["case"], x["mode"], x["method"]), {})
        rows.append({**x, "median_s": b["stats"]["median"], "rounds": b["stats"]["rounds"],
                     "peak_extra_mb": m.get("peak_extra_mb")})  # fmt: skip
    for case in CASES:
        for mode in ("fwd", "fwdbwd"):
            for method in METHODS:
                why = skip_reason(case, method, mode, "cpu")
                if why and not any(
                    r["case"] == case and r["mode"] == mode and r["method"] == method for r in rows
                ):
                    rows.append(
                        {"case": case, "mode": mode, "method": method, "N": CASES[case][0], "skip": why}
                    )
    return rows


def _table(rows: list[dict]) -> str:
    lines = ["| N (batch) | mode | method | median s | vs sdpa_dense | vs sdpa_nobias | peak extra MB |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    key = lambda r: (r["N"], r["mode"], METHODS.index(r["method"]))  # noqa: E731
    for r in sorted(rows, key=key):
        if "skip" in r:
            lines.append(f"| {r['N']} | {r['mode']} | {r['method']} | skipped: {r['skip']} | | | |")
            continue
        base = {x["method"]: x["median_s"] for x in rows if "skip" not in x and x["N"] == r["N"]
                and x["mode"] == r["mode"]}  # fmt: skip
        ratio = lambda m, r=r, base=base: f"{r['median_s'] / base[m]:.2f}" if m in base else ""  # noqa: E731
        mem = "" if r.get("peak_extra_mb") is None else f"{r['peak_extra_mb']:.0f}"
        batch = CASES[r["case"]][1]
        lines.append(f"| {r['N']} ({batch}) | {r['mode']} | {r['method']} | {r['median_s']:.3f} | "
                     f"{ratio('sdpa_dense')} | {ratio('sdpa_nobias')} | {mem} |")  # fmt: skip
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwdbwd"), strict=True):
        for m in METHODS:
            pts = sorted((r["N"], r["median_s"]) for r in rows if r["method"] == m and r["mode"] == mode
                         and "skip" not in r)  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        ax.set(xscale="log", yscale="log", xlabel="tokens N (197: 162 crops)", ylabel="median s", title=mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Gaussian-bias attention (CPU, fp32, 2 threads, 12 heads, D=64, sigma=5)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_text(path, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.autograd_memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=3, metavar=("CASE", "MODE", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--report", type=Path, help="pytest-benchmark JSON to turn into a table and plot")
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(_worker(*a.worker)), flush=True)
        return 0
    mem_path = a.out / "attention_autograd_memory_cpu.json"
    if a.report:
        rows = _rows(a.report, _load_memory(mem_path))
        md = _table(rows)
        write_text(a.report.with_suffix(".md"), md + "\n")
        _plot(rows, a.report.with_suffix(".png"))
        print(md)
        return 0
    old = _load_memory(mem_path)
    for case in a.cases:
        for mode in a.modes:
            for method in a.methods:
                if skip_reason(case, method, mode, "cpu"):
                    continue
                r = _measure(case, mode, method, a.timeout)
                old[(case, mode, method)] = {"case": case, "mode": mode, "method": method, **r}
                print(case, mode, method, r, flush=True)
    meta = machine_info("cpu", threads=THREADS)
    meta["loadavg_at_end"] = os.getloadavg()
    rows = sorted(old.values(), key=lambda r: (r["case"], r["mode"], r["method"]))
    write_text(mem_path, json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
