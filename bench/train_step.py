"""Training-step benchmark (pytest-benchmark): timm ``vit_small_patch16_224`` with Gaussian-biased attention.

One step = forward + cross-entropy + backward + AdamW step, random-init model (``pretrained=False``), float32,
random inputs, ``torch.set_num_threads($NACLIP_BENCH_THREADS or 2)``. Cases: 224x224 batch 32 (N=197)
and 512x512 batch 4 (N = 1025, the model built at ``img_size=512``). Variants, all with sigma = 5 grid cells,
``bias_scale = 1``, the bias in every block:

* ``sdpa``                 the unpatched model (timm ``Attention``: SDPA, no bias) - the floor;
* ``patched_fixed``        :func:`naclip_kernels.nn.patch_vit` with a fixed sigma (torch backend);
* ``patched_learnable``    the same with a learnable per-head sigma (``[H]`` per block, trained by AdamW);
* ``patched_learnable_aten`` the same with the fused CPU backward switched off (``NACLIP_CPU_KERNEL=0``:
                           aten's flash backward plus one flash forward per block for the sigma gradient);
* ``dense_fixed``          the same bias as a dense ``[N, N]`` SDPA ``attn_mask`` (built once, not timed);
* ``dense_learnable``      per block a differentiable dense ``[1, H, N, N]`` mask from a learnable ``[H]``
                           sigma (the reference's dense bias), rebuilt every step, passed to the same blocks.

Time: pytest-benchmark ``pedantic`` (1 warm-up step, ``$BENCH_ROUNDS`` or 3 timed steps); the summary uses
medians. Peak memory: the resident-set growth during one more step (``VmHWM`` reset through
``/proc/self/clear_refs`` after ``malloc_trim``, minus ``VmRSS`` before the step; gradients freed first, AdamW
state already allocated), so it counts activations, saved tensors, gradients and masks. All variants run in
one pytest session; the summary (``bench/results/train_step_cpu.{json,md}``, machine, versions, git sha,
load) is written when the module finishes. Not collected by the normal test run; run it with::

    PYTHONPATH=$PWD python -m pytest bench/train_step.py -p no:cacheprovider [--benchmark-json out.json]

Targets (issue 10): ``patched_learnable`` <= 1.15x ``sdpa`` at N = 1025, and less peak memory than
``dense_learnable`` / ``dense_fixed``.
"""

from __future__ import annotations

import json
import os
import statistics

import pytest
import torch
import torch.nn.functional as F

from bench._meta import machine_info, malloc_trim, reset_peak_rss, status_kb, write_text
from naclip_kernels import check_inputs, gaussian_bias
from naclip_kernels._cpu_kernel import ENV_SWITCH
from naclip_kernels.nn import patch_vit
from naclip_kernels.reference import _dense_bias

timm = pytest.importorskip("timm")
pytest.importorskip("pytest_benchmark")

SIGMA = 5.0
THREADS = int(os.environ.get("NACLIP_BENCH_THREADS", "2"))  # the same variable as bench/conftest.py
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CASES = {"224px-b32-N197": (224, 32), "512px-b4-N1025": (512, 4)}
VARIANTS = (
    "sdpa",
    "patched_fixed",
    "patched_learnable",
    "patched_learnable_aten",
    "dense_fixed",
    "dense_learnable",
)
RESULTS: dict[str, dict[str, dict]] = {}
OUT = os.path.join(os.path.dirname(__file__), "results", "train_step_cpu")


def _add_dense_sigmas(model) -> None:
    """Give every block a learnable per-head ``dense_sigma`` ``[H]`` for the ``dense_learnable`` variant."""
    heads = model.blocks[0].attn.num_heads
    for blk in model.blocks:
        blk.register_parameter("dense_sigma", torch.nn.Parameter(torch.full((heads,), SIGMA)))


def _learnable_masks(model, grid: tuple[int, int], n: int) -> list[torch.Tensor]:
    """Per block ``G(sigma_h)`` ``[1, H, N, N]``, differentiable in the block's ``dense_sigma``."""
    heads = model.blocks[0].attn.num_heads
    z = torch.empty(1, heads, n, 1)
    specs = [check_inputs(z, z, z, grid, blk.dense_sigma, num_prefix_tokens=model.num_prefix_tokens)
             for blk in model.blocks]  # fmt: skip
    return [_dense_bias(spec, torch.float32)[None] for spec in specs]


def _setup(variant: str, size: int, batch: int):
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=size)
    model.train()
    grid = model.patch_embed.grid_size
    n = model.num_prefix_tokens + grid[0] * grid[1]
    if variant.startswith("patched"):
        learn = "learnable" in variant
        patch_vit(model, sigma=SIGMA, learnable_sigma=learn, per_head_sigma=learn,
                  backend="torch")  # fmt: skip
    fixed_mask = gaussian_bias(grid, SIGMA, num_prefix_tokens=model.num_prefix_tokens)  # [N, N]
    if variant == "dense_learnable":
        _add_dense_sigmas(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(2))

    def forward():
        if variant == "dense_fixed":
            return model.forward_head(model.forward_features(x, attn_mask=fixed_mask))
        if variant == "dense_learnable":
            h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
            for blk, mask in zip(model.blocks, _learnable_masks(model, grid, n), strict=True):
                h = blk(h, attn_mask=mask)
            return model.forward_head(model.norm(h))
        return model(x)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(forward(), y).backward()
        opt.step()

    return model, opt, step, n


def _peak_step_bytes(opt, step) -> int:
    opt.zero_grad(set_to_none=True)
    malloc_trim()
    rss0 = status_kb("VmRSS") * 1024
    if not reset_peak_rss():
        pytest.skip("cannot reset VmHWM (needs Linux /proc/self/clear_refs)")
    step()
    return max(0, status_kb("VmHWM") * 1024 - rss0)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    torch.set_num_threads(THREADS)
    meta = machine_info("cpu", threads=THREADS)
    yield
    meta["loadavg_at_end"] = os.getloadavg()
    _write_summary(meta)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_train_step(benchmark, monkeypatch, case, variant):
    if variant.endswith("_aten"):
        monkeypatch.setenv(ENV_SWITCH, "0")
    size, batch = CASES[case]
    model, opt, step, n = _setup(variant, size, batch)
    benchmark.group = case
    benchmark.extra_info.update(case=case, variant=variant, tokens=n, batch=batch)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    peak = _peak_step_bytes(opt, step)
    benchmark.extra_info["peak_step_bytes"] = peak
    times = list(benchmark.stats.stats.data)
    RESULTS.setdefault(case, {})[variant] = {
        "tokens": n,
        "batch": batch,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "times_s": times,
        "peak_step_mib": round(peak / 2**20, 1),
    }


def _write_summary(meta: dict) -> None:
    if not RESULTS:
        return
    for rows in RESULTS.values():
        base = rows.get("sdpa")
        for row in rows.values():
            if base:
                row["time_vs_sdpa"] = round(row["median_s"] / base["median_s"], 3)
    n1025 = RESULTS.get("512px-b4-N1025", {})
    targets = {}
    if {"patched_learnable", "sdpa", "dense_learnable", "dense_fixed"} <= n1025.keys():
        learn = n1025["patched_learnable"]
        targets = {
            "patched_learnable_time_vs_sdpa_N1025": learn["time_vs_sdpa"],
            "target_time_le_1.15x": learn["time_vs_sdpa"] <= 1.15,
            "patched_learnable_mem_lt_dense_learnable": learn["peak_step_mib"]
            < n1025["dense_learnable"]["peak_step_mib"],
            "patched_fixed_mem_lt_dense_fixed": n1025["patched_fixed"]["peak_step_mib"]
            < n1025["dense_fixed"]["peak_step_mib"],
        }
    doc = {"benchmark": "train_step", "sigma": SIGMA, "rounds": ROUNDS, "machine": meta, "results": RESULTS,
           "targets": targets}  # fmt: skip
    write_text(OUT + ".json", json.dumps(doc, indent=2) + "\n")
    write_text(OUT + ".md", markdown(RESULTS, meta))


def markdown(results: dict, meta: dict) -> str:
    lines = [
        f"Training step of timm vit_small_patch16_224 (fwd + bwd + AdamW), CPU `{meta['cpu_model']}`, "
        f"{meta['torch_threads']} threads, torch {meta['versions'].get('torch')}, git {meta['git_sha']}, "
        f"load {meta['loadavg_at_start']} -> {meta.get('loadavg_at_end')} (shared machine: ratios count).",
        "",
        "| case | variant | median step (s) | vs sdpa | peak step memory (MiB) |",
        "|---|---|---:|---:|---:|",
    ]
    for case, rows in results.items():
        for variant in VARIANTS:
            if variant in rows:
                r = rows[variant]
                ratio = r.get("time_vs_sdpa", float("nan"))
                lines.append(
                    f"| {case} | {variant} | {r['median_s']:.3f} | {ratio:.2f}x | {r['peak_step_mib']:.0f} |"
                )
    return "\n".join(lines) + "\n"
