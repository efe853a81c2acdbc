"""Attention strategies for the modified last ViT block (NACLIP spec section 1.2).

Every strategy maps per-head projections ``q, k, v`` of shape ``[B, H, T, D]`` (any strides; ``T = 1 + gh*gw``
tokens, token 0 = CLS, patch token ``1 + r*gw + c`` at grid row ``r``, column ``c``) to the attention output
``[B, H, T, D]`` (contiguous, input dtype). ``scale = D**-0.5`` throughout. ``G`` is the Gaussian addition
``G[i, j] = exp(-((r_i-r_j)**2 + (c_i-c_j)**2) / (2*std**2))`` between patch tokens, ``0`` on the CLS row and
column (not ``-inf``), added to the scaled logits. All computation goes through
:func:`naclip_kernels.gaussian_attention`:

=========  ==================================================================  ==============================
name       attention matrix ``A`` (rows = queries)                             needs
=========  ==================================================================  ==============================
naclip     ``softmax(scale * K K^T + G)``                                      K, V, ``gaussian_std > 0``
kk         ``softmax(scale * K K^T)``                                          K, V
nonly      ``softmax(s * G)``, ``s = scale * mean_{h,i,j} |q_i| |k_j|``        Q, K, V, ``gaussian_std > 0``
vanilla    ``softmax(scale * Q K^T)``                                          Q, K, V
csa        ``softmax(scale * Q Q^T) + softmax(scale * K K^T)`` (SCLIP)         Q, K, V, ``arch='vanilla'``
qq         ``softmax(scale * Q Q^T)`` (ClearCLIP)                              Q, V
=========  ==================================================================  ==============================

The output is ``A V`` per head. ``csa`` rows sum to 2 (not renormalised, as in the official code).

``nonly``: the official code computes ONE scalar ``s`` over all heads, all ``T x T`` pairs (CLS included) *and
all batch items*, and crashes for batch > 1 (``zeros((num_heads, T, T))`` broadcast against ``[B*H, T, d]`` in
``bmm``). Here ``s`` is computed **per image** (over heads and pairs only), so a batch gives the same result
as running its images one by one; for batch 1 this is exactly the official value.

Registry: :data:`STRATEGIES` (name -> :class:`AttentionStrategy`), :func:`get_strategy`,
:func:`validate_config`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

import naclip_kernels
from naclip._validate import check_number

__all__ = [
    "ARCHS",
    "STRATEGIES",
    "AttentionStrategy",
    "Term",
    "get_strategy",
    "nonly_bias_multiplier",
    "validate_config",
]

#: Last-block architectures (spec section 1.1): ``reduced`` (NACLIP) and ``vanilla`` (standard CLIP block).
ARCHS: tuple[str, ...] = ("reduced", "vanilla")

GridHW = tuple[int, int]


def nonly_bias_multiplier(q: Tensor, k: Tensor) -> Tensor:
    """Per-image scalar ``s_b = scale * mean_{h,i,j} |q_{b,h,i}| * |k_{b,h,j}|`` of the ``nonly`` strategy.

    ``q, k``: ``[B, H, T, D]``; ``scale = D**-0.5``; norms over ``D``; the mean runs over heads and all ``T x
    T`` token pairs including CLS. Returns a float32 tensor ``[B]``. Uses the identity ``mean_{i,j} a_i b_j =
    mean_i a_i * mean_j b_j`` (no ``T x T`` matrix).
    """
    scale = q.shape[-1] ** -0.5
    qn = torch.linalg.vector_norm(q.float(), dim=-1).mean(dim=-1)  # [B, H]
    kn = torch.linalg.vector_norm(k.float(), dim=-1).mean(dim=-1)  # [B, H]
    return (qn * kn).mean(dim=-1) * scale


@dataclass(frozen=True)
class Term:
    """One attention term ``softmax(logits) V``, the strategy's output being the sum of its terms.

    ``rows`` / ``cols``: which projections (``"q"`` or ``"k"``) give the logits ``scale * rows cols^T``;
    ``gaussian``: add the Gaussian ``G`` (``std = gaussian_std``); ``neighbourhood_only``: the logits are
    ``s_b * G`` alone (scale 0, ``s_b`` from :func:`nonly_bias_multiplier`, one kernel call per image).
    """

    rows: str
    cols: str
    gaussian: bool = False
    neighbourhood_only: bool = False


def _attend(a: Tensor, b: Tensor, v: Tensor | None, grid_hw: GridHW, std: float | None, backend, **extra):
    """One term through the kernels: the output ``[B, H, T, D]`` (``v`` given) or, for ``v=None``, the
    float32 attention matrix ``[B, H, T, T]`` of the dense reference."""
    if v is None:
        return naclip_kernels.reference_attention_probs(a, b, grid_hw, std, num_prefix_tokens=1, **extra)
    return naclip_kernels.gaussian_attention(
        a, b, v, grid_hw, std, num_prefix_tokens=1, backend=backend, **extra
    )


def _run_term(term: Term, q, k, v, grid_hw: GridHW, gaussian_std: float | None, backend) -> Tensor:
    a, b = (q if term.rows == "q" else k), (q if term.cols == "q" else k)
    std = gaussian_std if term.gaussian else None
    if not term.neighbourhood_only:
        return _attend(a, b, v, grid_hw, std, backend)
    # Logits are 0 * (rows cols^T) + s_b * G: the kernel's plain path with scale 0 and bias_scale s_b.
    # bias_scale is a Python float in the kernel API, so each image is its own call (views, no copies).
    parts = [
        _attend(a[i : i + 1], b[i : i + 1], None if v is None else v[i : i + 1], grid_hw, std, backend,
                scale=0.0, bias_scale=s_b)
        for i, s_b in enumerate(nonly_bias_multiplier(q, k).tolist())
    ]  # fmt: skip
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


@dataclass(frozen=True)
class AttentionStrategy:
    """One entry of the registry: a name and its :class:`Term` s (data; one runner gives both the
    forward and the attention matrix).

    ``strategy(q, k, v, grid_hw, gaussian_std, backend)`` -> ``[B, H, T, D]`` (see the module docstring for
    the formula), the sum of the terms' outputs (``csa``: ``A_qq V + A_kk V``, not renormalised). ``q`` may
    be ``None`` when ``needs_query`` is false (the caller then skips the Q projection). ``grid_hw = (gh,
    gw)`` with ``T == 1 + gh*gw``; ``gaussian_std`` is ignored when ``uses_gaussian`` is false. ``backend``
    is passed to :func:`naclip_kernels.gaussian_attention` (``None`` = the global default). :meth:`probs`
    gives the float32 attention matrix ``[B, H, T, T]`` through the kernels' dense reference (small ``T``
    only; for fixtures and debugging).
    """

    name: str
    terms: tuple[Term, ...]
    description: str
    required_arch: str | None = None

    @property
    def needs_query(self) -> bool:
        """Whether ``q`` is used (by a term, or by the ``nonly`` multiplier)."""
        return any("q" in (t.rows, t.cols) or t.neighbourhood_only for t in self.terms)

    @property
    def uses_gaussian(self) -> bool:
        return any(t.gaussian for t in self.terms)

    def __call__(
        self,
        q: Tensor | None,
        k: Tensor,
        v: Tensor,
        grid_hw: GridHW,
        gaussian_std: float | None,
        backend: str | None = None,
    ) -> Tensor:
        return self._run(q, k, v, grid_hw, gaussian_std, backend)

    def probs(self, q: Tensor | None, k: Tensor, grid_hw: GridHW, gaussian_std: float | None) -> Tensor:
        return self._run(q, k, None, grid_hw, gaussian_std, None)

    def _run(self, q, k, v, grid_hw, gaussian_std, backend) -> Tensor:
        if self.needs_query and q is None:
            raise ValueError(f"strategy {self.name!r} needs the query projection q; got q=None")
        std = gaussian_std if self.uses_gaussian else None
        outs = [_run_term(t, q, k, v, tuple(grid_hw), std, backend) for t in self.terms]
        return outs[0] if len(outs) == 1 else sum(outs[1:], outs[0])


_QQ, _KK, _QK = Term("q", "q"), Term("k", "k"), Term("q", "k")

#: name -> strategy, in the order of the spec's table.
STRATEGIES: dict[str, AttentionStrategy] = {
    s.name: s
    for s in (
        AttentionStrategy("naclip", (Term("k", "k", gaussian=True),), "softmax(scale*K K^T + G) V (NACLIP)"),
        AttentionStrategy(
            "nonly",
            (Term("k", "k", gaussian=True, neighbourhood_only=True),),
            "softmax(s*G) V, s per image (neighbourhood only)",
        ),
        AttentionStrategy("kk", (_KK,), "softmax(scale*K K^T) V (key-key only)"),
        AttentionStrategy("vanilla", (_QK,), "softmax(scale*Q K^T) V (plain CLIP)"),
        AttentionStrategy(
            "csa",
            (_QQ, _KK),
            "(softmax(scale*Q Q^T) + softmax(scale*K K^T)) V (SCLIP; arch='vanilla' only)",
            required_arch="vanilla",
        ),
        AttentionStrategy("qq", (_QQ,), "softmax(scale*Q Q^T) V (ClearCLIP, query-query)"),
    )
}


def get_strategy(name: str) -> AttentionStrategy:
    """The registered strategy ``name`` (one of :data:`STRATEGIES`); ``ValueError`` listing them otherwise."""
    if not isinstance(name, str) or name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}; got {name!r}")
    return STRATEGIES[name]


def validate_config(arch: str, strategy: str, gaussian_std: float | None) -> float | None:
    """Check an ``(arch, strategy, gaussian_std)`` combination like the official ``set_params``.

    ``arch`` in :data:`ARCHS`; ``strategy`` in :data:`STRATEGIES`; ``csa`` only with ``arch="vanilla"``;
    ``gaussian_std`` a finite number ``> 0`` for the Gaussian strategies (``naclip``, ``nonly``), ignored (may
    be anything, including ``None``) for the others. Returns ``gaussian_std`` as a float (or ``None`` when
    unused and not a number). Raises ``ValueError`` / ``TypeError`` naming the argument, the expected and the
    actual value.
    """
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"arch must be one of {list(ARCHS)}; got {arch!r}")
    strat = get_strategy(strategy)
    if strat.required_arch is not None and arch != strat.required_arch:
        raise ValueError(
            f"strategy {strategy!r} requires arch={strat.required_arch!r} (as in the official code); "
            f"got arch={arch!r}"
        )
    if not strat.uses_gaussian:
        if gaussian_std is None or isinstance(gaussian_std, bool):
            return None
        try:
            return float(gaussian_std)
        except (TypeError, ValueError):
            return None
    return check_number(f"gaussian_std (strategy {strategy!r})", gaussian_std, positive=True)
