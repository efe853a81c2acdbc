"""Input validation shared by every backend of :func:`naclip_kernels.gaussian_attention`.

Every public entry point validates its arguments here, so that bad input fails with one clear ``ValueError`` /
``TypeError`` that names the argument, the expected value and the value received, instead of crashing deep
inside torch or Triton. Backends receive the resulting :class:`AttentionSpec` and may assume it is consistent.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "MAX_MULTIPLIER",
    "SUPPORTED_DTYPES",
    "AttentionSpec",
    "check_inputs",
    "check_grid",
    "check_sigma",
    "check_prefix",
    "has_internal_overlap",
]

#: Floating dtypes accepted for q, k and v (float64 only on the ``torch`` and ``reference`` backends).
SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Largest accepted ``|scale|`` and ``|bias_scale|``. Logits are accumulated in float32 (max ~3.4e38), so a
#: multiplier near that range overflows to inf and turns rows into NaN for ordinary data; up to 2^64 the
#: products of unit-scale inputs stay ~19 orders of magnitude inside float32 and every backend matches the
#: float64 oracle (a bias_scale of 2^64 already makes each patch row a one-hot on its own key).
MAX_MULTIPLIER = 2.0**64


@dataclass(frozen=True)
class AttentionSpec:
    """Validated description of one ``gaussian_attention`` call.

    Attributes:
        B, H, N, D: batch size, heads, tokens (prefix + patches), head dim; shared by q, k and v.
        grid_hw: ``(gh, gw)`` patch grid, or ``None`` (only possible when ``sigma is None``).
        sigma: Gaussian standard deviation in grid cells (> 0): a Python float, a floating tensor of shape
            ``[]`` or ``[H]`` (per head) on q's device, or ``None`` for no bias.
        scale: multiplier of ``q @ k^T`` (``D ** -0.5`` when the caller passed ``None``).
        num_prefix_tokens: ``P``, tokens before the patch grid (CLS, registers); they get zero bias.
        bias_scale: multiplier of the Gaussian ``G``: a Python float or a floating tensor ``[]`` / ``[H]``.
        dtype, device: of q, k and v (all equal).
    """

    B: int
    H: int
    N: int
    D: int
    grid_hw: tuple[int, int] | None
    sigma: float | torch.Tensor | None
    scale: float
    num_prefix_tokens: int
    bias_scale: float | torch.Tensor
    dtype: torch.dtype
    device: torch.device

    @property
    def has_bias(self) -> bool:
        """True when the Gaussian term contributes: ``sigma`` given, ``bias_scale`` a tensor or ``!= 0``."""
        if self.sigma is None:
            return False
        return isinstance(self.bias_scale, torch.Tensor) or self.bias_scale != 0.0

    @property
    def has_tensor_params(self) -> bool:
        """True when ``sigma`` or ``bias_scale`` is a tensor (possibly learnable)."""
        return isinstance(self.sigma, torch.Tensor) or isinstance(self.bias_scale, torch.Tensor)


def _is_int(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, torch.Tensor):
        return False
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def _real(name: str, x: Any, *, expected: str) -> float:
    """Return ``x`` as a Python float, rejecting bools, complex numbers, tensors and non-numbers."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be {expected}; got {x!r} of type {type(x).__name__}")
    return float(x)


def check_prefix(num_prefix_tokens: Any) -> int:
    """Validate ``num_prefix_tokens`` (a non-negative int, not a bool) and return it as an int."""
    if not _is_int(num_prefix_tokens):
        raise TypeError(
            "num_prefix_tokens must be a non-negative int; "
            f"got {num_prefix_tokens!r} of type {type(num_prefix_tokens).__name__}"
        )
    p = operator.index(num_prefix_tokens)
    if p < 0:
        raise ValueError(f"num_prefix_tokens must be a non-negative int; got {p}")
    return p


def check_grid(grid_hw: Any) -> tuple[int, int]:
    """Validate ``grid_hw`` (a pair of ints >= 1, bools rejected) and return it as a tuple."""
    if isinstance(grid_hw, (str, bytes, torch.Tensor)) or not isinstance(grid_hw, Sequence):
        raise TypeError(
            f"grid_hw must be a pair (gh, gw) of ints >= 1; got {grid_hw!r} of type {type(grid_hw).__name__}"
        )
    if len(grid_hw) != 2:
        raise ValueError(
            f"grid_hw must be a pair (gh, gw) of ints >= 1; got {len(grid_hw)} values: {grid_hw!r}"
        )
    out = []
    for axis, x in zip(("gh", "gw"), grid_hw, strict=True):
        if not _is_int(x):
            raise TypeError(
                f"grid_hw must be a pair (gh, gw) of ints >= 1; got {axis}={x!r} of type {type(x).__name__} "
                f"in grid_hw={tuple(grid_hw)!r}"
            )
        xi = operator.index(x)
        if xi < 1:
            raise ValueError(
                f"grid_hw must be a pair (gh, gw) of ints >= 1; got {axis}={xi} in {tuple(grid_hw)!r}"
            )
        out.append(xi)
    return out[0], out[1]


def check_sigma(sigma: Any) -> float:
    """Validate a Gaussian ``sigma`` (a finite real number > 0) and return it as a float."""
    s = _real("sigma", sigma, expected="None or a finite number > 0 (grid cells)")
    if not math.isfinite(s) or s <= 0.0:
        raise ValueError(f"sigma must be None or a finite number > 0 (grid cells); got {s!r}")
    return s


def _check_param_tensor(name: str, t: torch.Tensor, H: int, device: torch.device, positive: bool) -> None:
    """Shape ``[]``/``[H]``, floating dtype, q's device; values checked eagerly (skipped while compiling)."""
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor of shape [] or [H={H}]; got dtype {t.dtype}")
    if tuple(t.shape) not in ((), (H,)):
        raise ValueError(f"{name} must be a tensor of shape [] or [H={H}]; got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}; got {t.device}")
    if torch.compiler.is_compiling():
        return  # a value check would need a device sync / graph break; backends assume valid values
    d = t.detach()
    if positive and not bool(((d > 0) & torch.isfinite(d)).all()):
        raise ValueError(f"{name} must hold finite values > 0 (grid cells); got {d.tolist()}")
    if not positive and not bool((d.abs() <= MAX_MULTIPLIER).all()):
        raise ValueError(f"{name} must hold finite values with |{name}| <= 2^64; got {d.tolist()}")


def _check_multiplier(name: str, x: Any, expected: str) -> float:
    """A finite Python number with ``|x| <= MAX_MULTIPLIER``."""
    f = _real(name, x, expected=expected)
    if not math.isfinite(f) or abs(f) > MAX_MULTIPLIER:
        raise ValueError(f"{name} must be {expected} with |{name}| <= 2^64 (~1.8e19); got {f!r}")
    return f


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two different indices of ``t`` address the same element (a self-overlapping view such as
    ``as_strided(x, (2, 1, 3, 4), (1, 4, 24, 1))``). O(ndim): sort the non-trivial dims by stride; the view
    is overlap-free iff each stride is at least the extent ``(size - 1) * stride + 1`` of the smaller ones."""
    dims = sorted((abs(st), sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz > 1)
    extent = 1  # elements spanned by the dims seen so far
    for stride, size in dims:
        if stride < extent:
            return True
        extent += (size - 1) * stride
    return False


def _check_tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, H, N, D]; got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(
            f"{name} must have shape [B, H, N, D] (4 dims); got {t.dim()} dims, shape {tuple(t.shape)}"
        )
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype float16, bfloat16, float32 or float64; got {t.dtype}")


def check_inputs(
    q: Any,
    k: Any,
    v: Any,
    grid_hw: Any,
    sigma: Any,
    *,
    scale: Any = None,
    num_prefix_tokens: Any = 1,
    bias_scale: Any = 1.0,
) -> AttentionSpec:
    """Validate the arguments of ``gaussian_attention`` and return an :class:`AttentionSpec`.

    Rules: q, k, v are 4-D ``[B, H, N, D]`` tensors with identical shape, dtype (float16/bfloat16/float32) and
    device, and ``B, H, N, D >= 1`` (float64 too: the ``triton`` backend refuses it itself). ``sigma`` is
    ``None``, a finite number > 0, or a floating tensor of shape ``[]`` / ``[H]`` on q's device holding such
    numbers (values checked only outside ``torch.compile``). When ``sigma`` is given,
    ``grid_hw`` is required; whenever ``grid_hw`` is given it must be a pair of ints >= 1 with
    ``num_prefix_tokens + gh * gw == N``. ``num_prefix_tokens`` is an int in ``[0, N]``. ``scale`` is ``None``
    (-> ``D ** -0.5``) or a finite number with ``|scale| <= 2^64`` (0.0 honoured). ``bias_scale`` is a finite
    number with ``|bias_scale| <= 2^64`` (:data:`MAX_MULTIPLIER`) or a tensor like ``sigma`` (any sign).
    Python bools are not accepted where ints or numbers are expected. Tensors are kept as they are (not
    copied, not converted), so gradients flow to them.

    Raises:
        TypeError: wrong type (non-tensor, non-float dtype, mixed dtypes, non-int grid, non-number sigma...).
        ValueError: wrong value (ranks, shapes, devices, grid/prefix/N mismatch, sigma <= 0 or non-finite...).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype; got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k and v must be on the same device; got q={q.device}, k={k.device}, v={v.device}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(
                f"{name} must have the same shape [B, H, N, D] as q = {tuple(q.shape)}; got {tuple(t.shape)}"
            )
    B, H, N, D = (int(s) for s in q.shape)
    if min(B, H, N, D) < 1:
        raise ValueError(f"q, k, v must have B, H, N, D >= 1; got shape {tuple(q.shape)}")

    P = check_prefix(num_prefix_tokens)
    if P > N:
        raise ValueError(f"num_prefix_tokens must be <= N = {N} (tokens in q/k/v); got {P}")

    sig: float | torch.Tensor | None
    if isinstance(sigma, torch.Tensor):
        _check_param_tensor("sigma", sigma, H, q.device, positive=True)
        sig = sigma
    else:
        sig = None if sigma is None else check_sigma(sigma)
    grid: tuple[int, int] | None = None
    if grid_hw is None:
        if sig is not None:
            raise ValueError(
                f"grid_hw must be given as (gh, gw) when sigma is not None; got grid_hw=None, sigma={sigma!r}"
            )
    else:
        grid = check_grid(grid_hw)
        if P + grid[0] * grid[1] != N:
            raise ValueError(
                f"num_prefix_tokens + gh * gw must equal N = {N} (tokens in q/k/v); got "
                f"{P} + {grid[0]} * {grid[1]} = {P + grid[0] * grid[1]} "
                f"for grid_hw={grid}, num_prefix_tokens={P}"
            )

    sc = D**-0.5 if scale is None else _check_multiplier("scale", scale, "None or a finite number")
    bs: float | torch.Tensor
    if isinstance(bias_scale, torch.Tensor):
        _check_param_tensor("bias_scale", bias_scale, H, q.device, positive=False)
        bs = bias_scale
    else:
        bs = _check_multiplier("bias_scale", bias_scale, "a finite number")

    return AttentionSpec(
        B=B,
        H=H,
        N=N,
        D=D,
        grid_hw=grid,
        sigma=sig,
        scale=sc,
        num_prefix_tokens=P,
        bias_scale=bs,
        dtype=q.dtype,
        device=q.device,
    )
