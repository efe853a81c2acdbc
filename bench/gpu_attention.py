"""GPU attention benchmark (one run, side by side): forward and forward+backward medians of the Triton backend
(fixed and learnable sigma) vs SDPA-flash without bias (the floor), SDPA with a dense bias mask, and
FlexAttention with a Gaussian ``score_mod``; 12 heads, D=64, N in {162 crops x 197, 1025, 4097, 16385},
bf16/fp16. Writes ``gpu_attention.json`` (GPU, driver, versions, git sha, load) to the given directory.

    python -m bench.gpu_attention OUT_DIR [--budget-s 420]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench._flex import compiled_flex_attention, gaussian_score_mod

#: (label, batch, grid): 162 sliding-window crops of a 2048x1024 image, one image at 512 / 1024 / 2048 px.
CASES = [
    ("crops162xN197", 162, (14, 14)),
    ("N1025", 8, (32, 32)),
    ("N4097", 1, (64, 64)),
    ("N16385", 1, (128, 128)),
]
H, D, SIGMA = 12, 64, 5.0


def _meta() -> dict:
    import triton

    def cmd(*a: str) -> str | None:
        try:
            return subprocess.run(a, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
        except Exception:  # informational only
            return None

    return {
        "gpu": torch.cuda.get_device_name(0),
        "driver": cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "git_sha": cmd("git", "rev-parse", "--short", "HEAD"),
        "git_dirty": bool(cmd("git", "status", "--porcelain")), "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }  # fmt: skip


def _flex(grid_w: int, sigma: torch.Tensor):
    """FlexAttention with NACLIP's Gaussian as a score_mod capturing a sigma tensor (token 0 = CLS)."""
    compiled, score_mod = compiled_flex_attention(), gaussian_score_mod(grid_w, sigma)
    return lambda k, v: compiled(k, k, v, score_mod=score_mod)


def _methods(grid: tuple[int, int], dt: torch.dtype):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from naclip_kernels import gaussian_attention, gaussian_bias

    mask = gaussian_bias(grid, SIGMA, dtype=dt, device="cuda")
    sig_fixed = torch.tensor(SIGMA, device="cuda")
    sig_learn = torch.tensor(SIGMA, device="cuda", requires_grad=True)

    def flash(k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(k, k, v)

    return {
        "triton_fixed_sigma": (lambda k, v: gaussian_attention(k, k, v, grid, SIGMA, backend="triton"), ()),
        "triton_learnable_sigma": (
            lambda k, v: gaussian_attention(k, k, v, grid, sig_learn, backend="triton"),
            (sig_learn,),
        ),
        "sdpa_flash_nobias": (flash, ()),
        "sdpa_dense_mask": (lambda k, v: F.scaled_dot_product_attention(k, k, v, attn_mask=mask), ()),
        "flex_score_mod": (_flex(grid[1], sig_fixed), ()),
    }


def _time(fn, k, v, extra, backward: bool) -> float:
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(k, v))
    leaves = (k, v, *extra)
    g = torch.randn_like(k)

    def step():
        torch.autograd.grad(fn(k, v), leaves, g)

    return do_bench(step)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining cases after this long")
    a = p.parse_args(argv)
    t0 = time.time()
    rows = []
    for label, B, grid in CASES:
        N = 1 + grid[0] * grid[1]
        for dt in (torch.bfloat16, torch.float16):
            gen = torch.Generator(device="cuda").manual_seed(0)
            base_k = torch.randn(B, N, H, D, device="cuda", dtype=dt, generator=gen).transpose(1, 2)
            base_v = torch.randn(B, N, H, D, device="cuda", dtype=dt, generator=gen).transpose(1, 2)
            for name, (fn, extra) in _methods(grid, dt).items():
                for backward in (False, True):
                    mode = "fwd+bwd" if backward else "fwd"
                    r = {"case": label, "B": B, "H": H, "N": N, "D": D, "dtype": str(dt)[6:], "method": name}
                    r["mode"] = mode
                    if time.time() - t0 > a.budget_s:
                        r["skipped"] = "time budget"
                    else:
                        k = base_k.detach().requires_grad_(backward)
                        v = base_v.detach().requires_grad_(backward)
                        try:
                            r["ms"] = _time(fn, k, v, extra, backward)
                        except Exception as e:  # e.g. OOM, a backend refusing the shape
                            r["error"] = f"{type(e).__name__}: {e}"[:300]
                    print(json.dumps(r), flush=True)
                    rows.append(r)
    _ratios(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "gpu_attention.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": _meta(), "rows": rows}, indent=1))
    os.replace(tmp, path)
    print(f"wrote {path} in {time.time() - t0:.0f}s")
    return 0 if all("ms" in r or "skipped" in r for r in rows) else 1


def _ratios(rows: list[dict]) -> None:
    """Add the issue's ratios (same case, dtype and mode, one run): speed vs flex / flash, learnable/fixed."""
    ms = {(r["case"], r["dtype"], r["mode"], r["method"]): r.get("ms") for r in rows}
    for r in rows:
        if r["method"] != "triton_fixed_sigma" or r.get("ms") is None:
            continue
        key = (r["case"], r["dtype"], r["mode"])
        for other, name in (("flex_score_mod", "speedup_vs_flex"), ("sdpa_flash_nobias", "speed_vs_flash")):
            if ms.get((*key, other)):
                r[name] = ms[(*key, other)] / r["ms"]
        if ms.get((*key, "triton_learnable_sigma")):
            r["learnable_over_fixed"] = ms[(*key, "triton_learnable_sigma")] / r["ms"]


if __name__ == "__main__":
    sys.exit(main())
