"""The benchmarks' FlexAttention baseline: NACLIP's Gaussian bias as a ``score_mod``, and the compiled op."""

from __future__ import annotations

from typing import Any


def gaussian_score_mod(grid_w: int, sigma: Any):
    """``score_mod`` adding ``G = exp(-d^2 / (2 sigma^2))`` of the grid offset between patch tokens (token 0 =
    CLS gets 0); ``sigma`` a float or a tensor, captured, so a learnable sigma gets its gradient."""
    import torch

    coef = -0.5 / (sigma * sigma)

    def score_mod(score, b, h, q_idx, kv_idx):
        qi, ki = q_idx - 1, kv_idx - 1  # token 0 = CLS
        dy = (qi // grid_w - ki // grid_w).to(torch.float32)
        dx = (qi % grid_w - ki % grid_w).to(torch.float32)
        g = torch.exp((dx * dx + dy * dy) * coef)
        return score + torch.where((q_idx > 0) & (kv_idx > 0), g, torch.zeros_like(g))

    return score_mod


def compiled_flex_attention():
    """``torch.compile(flex_attention, dynamic=False)`` (FlexAttention runs fused only when compiled)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)
