"""Cases and methods of the autograd attention benchmark (shared by the pytest-benchmark suite and the memory
script): key-key attention ``softmax(scale * K K^T + G) V`` as NACLIP trains it, 12 heads, D = 64, sigma = 5.

Methods (``fwd``: one forward; ``fwdbwd``: forward + backward of ``(out * dO).sum()`` w.r.t. k and v, and
sigma where it is learnable):

* ``torch_fixed``    gaussian_attention(backend="torch"), sigma a Python float.
* ``torch_sigma``    the same with a learnable sigma tensor ``[]`` (requires grad).
* ``torch_fixed_aten`` / ``torch_sigma_aten``   the same two with the fused float32 CPU backward switched off
  (``NACLIP_CPU_KERNEL=0``: aten's flash backward, plus one flash forward for the sigma gradient).
* ``sdpa_dense``     F.scaled_dot_product_attention with the precomputed ``[N, N]`` mask (no grad).
* ``sdpa_nobias``    F.scaled_dot_product_attention without bias: the floor.
* ``dense_sigma``    the dense learnable route: ``G`` built from a sigma tensor with autograd, then SDPA.
* ``flex_sigma``     torch.compile(flex_attention), Gaussian ``score_mod`` capturing a sigma tensor (CPU:
  forward only; torch has no FlexAttention backward on CPU).
* ``triton_fixed`` / ``triton_sigma``   gaussian_attention(backend="triton") (CUDA only).
"""

from __future__ import annotations

HEADS, HEAD_DIM, SIGMA = 12, 64, 5.0
#: (N, batch, grid): 197 x 162 = every sliding-window crop of a 2048 x 1024 image in one batch.
CASES = {
    "N197x162": (197, 162, (14, 14)),
    "N1025": (1025, 1, (32, 32)),
    "N4097": (4097, 1, (64, 64)),
    "N16385": (16385, 1, (128, 128)),
}
METHODS = [
    "torch_fixed",
    "torch_sigma",
    "torch_fixed_aten",
    "torch_sigma_aten",
    "sdpa_dense",
    "sdpa_nobias",
    "dense_sigma",
    "flex_sigma",
    "triton_fixed",
    "triton_sigma",
]


def skip_reason(case: str, method: str, mode: str, device: str) -> str | None:
    """Why a (case, method, mode) is not run here, or None. Skips are listed in the README table."""
    if method.endswith("_aten") and (device != "cpu" or mode == "fwd"):
        return "the aten comparison is of the CPU backward (the forward is the same code)"
    if method.startswith("triton") and device != "cuda":
        return "Triton needs a CUDA GPU (none lent to this run)"
    if method == "flex_sigma" and mode == "fwdbwd" and device == "cpu":
        return "FlexAttention has no backward on CPU"
    N = CASES[case][0]
    if N >= 16385 and mode == "fwdbwd" and method in ("dense_sigma", "flex_sigma", "sdpa_dense"):
        return "N=16385 fwd+bwd: too slow / too large on a shared 2-core machine (dense N x N mask 1 GB)"
    if N >= 16385 and method == "dense_sigma":
        return "N=16385: the dense learnable mask and its grad need > 3 GB"
    if method == "flex_sigma" and device == "cpu" and N >= 4097:
        return "FlexAttention CPU compile of N >= 4097 takes minutes on this machine"
    return None


def make_inputs(case: str, device: str = "cpu", dtype: str = "float32"):
    import torch

    N, B, grid = CASES[case]
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    k, v, do = (torch.randn(B, HEADS, N, HEAD_DIM, generator=gen).to(device, dt) for _ in range(3))
    return k, v, do, grid


def _flex(grid_w: int, scale: float):
    from bench._flex import compiled_flex_attention, gaussian_score_mod

    flex = compiled_flex_attention()
    return lambda k, v, sigma: flex(k, k, v, score_mod=gaussian_score_mod(grid_w, sigma), scale=scale)


def build(method: str, mode: str, k, v, do, grid):
    """A zero-argument callable running one iteration (fresh leaves each call, so no grad accumulates)."""
    import torch
    import torch.nn.functional as F

    import naclip_kernels as nk
    from naclip_kernels.reference import _factors_t

    backward = mode == "fwdbwd"
    learnable = "sigma" in method
    sig_t = torch.tensor(SIGMA, device=k.device)
    if method == "sdpa_dense":
        G = nk.gaussian_bias(grid, SIGMA, dtype=torch.float32, device=k.device)
    if method == "flex_sigma":
        flex = _flex(grid[1], HEAD_DIM**-0.5)

    def forward(kk, vv, sig):
        if method.startswith(("torch", "triton")):
            backend = method.split("_")[0]
            s = sig if learnable else SIGMA
            return nk.gaussian_attention(kk, kk, vv, grid, s, backend=backend)
        if method == "sdpa_dense":
            return F.scaled_dot_product_attention(kk, kk, vv, attn_mask=G)
        if method == "sdpa_nobias":
            return F.scaled_dot_product_attention(kk, kk, vv)
        if method == "dense_sigma":
            gh, gw = grid
            s1 = sig.reshape(1)
            patch = (
                _factors_t(gh, s1)[0][:, None, :, None] * _factors_t(gw, s1)[0][None, :, None, :]
            ).reshape(gh * gw, gh * gw)
            mask = F.pad(patch, (1, 0, 1, 0))
            return F.scaled_dot_product_attention(kk, kk, vv, attn_mask=mask)
        if method == "flex_sigma":
            return flex(kk, vv, sig)
        raise ValueError(f"unknown method {method!r}")

    def step():
        if not backward:
            with torch.no_grad():
                return forward(k, v, sig_t)
        kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
        sig = sig_t.detach().requires_grad_(learnable)
        leaves = [kk, vv] + ([sig] if sig.requires_grad else [])
        out = forward(kk, vv, sig)
        return torch.autograd.grad(out, leaves, do)

    return _without_fused_kernel(step) if method.endswith("_aten") else step


def _without_fused_kernel(step):
    """``step`` run with ``NACLIP_CPU_KERNEL=0`` (restored after each call)."""
    import os
    from unittest import mock

    from naclip_kernels._cpu_kernel import ENV_SWITCH

    def run():
        with mock.patch.dict(os.environ, {ENV_SWITCH: "0"}):
            return step()

    return run
