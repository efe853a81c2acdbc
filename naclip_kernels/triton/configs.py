"""Launch configurations of the Triton kernels: autotune lists, pruning rules, the triton-version gate.

Everything here is host-side policy; the register/shared-memory measurements behind the rules are in
``docs/kernel.md`` and the report tool's results (``python -m naclip_kernels.report``).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

__all__ = [
    "BIAS_MAX_SCORES_PER_THREAD",
    "BWD_CONFIGS",
    "CONFIGS",
    "INTERPRETER_CONFIG",
    "MAX_HEAD_DIM",
    "autotuned",
    "block_d",
    "installed_gather_branch",
    "bwd_config_allowed",
    "config_allowed",
    "heuristic_config",
    "interpreting",
    "launch_config",
    "n_bucket",
    "parse_version",
    "use_gather_branch",
]

#: Largest supported head dim.
MAX_HEAD_DIM = 128
#: Forward autotune configurations (also compiled one by one by ``python -m naclip_kernels.report``).
CONFIGS: list[dict[str, int]] = [
    {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
]
#: Backward autotune configurations per kernel (``dkdv``: BLOCK_N keys per program, ``dq``: BLOCK_M queries).
BWD_CONFIGS: dict[str, list[dict[str, int]]] = {
    "dkdv": [
        {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    ],  # BLOCK_M = 64 spilled on sm_80 (triton 3.8) even without the bias: docs/kernel.md
    "dq": [
        {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    ],
}
#: The single configuration of every kernel under ``TRITON_INTERPRET=1`` (small blocks: several query and key
#: tiles at the interpreter's test sizes, so masking, the band split and the tail tiles are all exercised).
INTERPRETER_CONFIG: dict[str, int] = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
#: With the bias on, configs with more score elements per thread than this spill (docs/kernel.md).
BIAS_MAX_SCORES_PER_THREAD = 32
#: fp16/bf16 bias configs measured to spill at D=64 without the gather branch (triton 3.6, ``report``), as
#: ``(kernel, BLOCK_M, BLOCK_N, num_warps, num_stages)``; kernel "dq-grad" is dq with bias gradients.
SPILLS_WITHOUT_BRANCH = {("fwd", 64, 64, 4, 3), ("dq", 64, 64, 4, 2), ("dq-grad", 64, 32, 4, 2)}
_BWD_HEURISTIC = {"dkdv": 1, "dq": 2}  # fp16/bf16 index in BWD_CONFIGS without autotuning (fp32: 0)
_SMEM_BUDGET = 160 * 1024  # the sm_80 limit (163 KB) minus a margin
_CONFIG_KEYS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
_ELEM_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4}
#: First triton (major, minor) whose layout passes keep the softmax single with the gather branch.
_GATHER_BRANCH_MIN_VERSION = (3, 7)
_VERSION_RE = re.compile(r"\s*v?(\d+)(?:\.(\d+))?")


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` is set (read when the kernels were defined, so set it before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def parse_version(version: object) -> tuple[int, int] | None:
    """``(major, minor)`` of ``"3.8.0"``, ``"3.7.0+git1a2b"``, ``"3.10.0rc1"``, ``"3"``; else None."""
    if not isinstance(version, str):
        return None
    m = _VERSION_RE.match(version)
    return None if m is None else (int(m.group(1)), int(m.group(2) or 0))


def _installed_triton() -> str:
    try:
        import triton
    except Exception:  # pragma: no cover - triton missing
        return ""
    return str(getattr(triton, "__version__", "") or "")


#: ``triton.__version__`` of the installed triton ("" when missing), read by :func:`installed_gather_branch`.
TRITON_VERSION: str = _installed_triton()


def use_gather_branch(dtype: torch.dtype, version: object) -> bool:
    """The kernels' ``GATHER_BRANCH`` for ``dtype`` on triton ``version``: True only for fp16/bf16 on
    triton >= 3.7. fp32 never (the branch duplicates its softmax), nor an unparsable version (the branch-free
    kernel is correct everywhere; it only costs shared memory, counted by :func:`config_allowed`)."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    parsed = parse_version(version)
    return parsed is not None and parsed >= _GATHER_BRANCH_MIN_VERSION


def installed_gather_branch(dtype: torch.dtype) -> bool:
    """:func:`use_gather_branch` for the installed triton (:data:`TRITON_VERSION`)."""
    return use_gather_branch(dtype, TRITON_VERSION)


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two >= 16 (the ``BLOCK_D`` constexpr)."""
    return max(16, 1 << (int(head_dim) - 1).bit_length())


def n_bucket(n: int) -> int:
    """Autotune bucket for N: the next power of two, clamped to [64, 16384]."""
    return min(16384, max(64, 1 << (int(n) - 1).bit_length()))


def _check(config: Any, dtype: torch.dtype, head_dim: int, n: int) -> None:
    if not isinstance(config, dict) or any(k not in config for k in _CONFIG_KEYS):
        raise ValueError(f"config must be a dict with keys {list(_CONFIG_KEYS)}; got {config!r}")
    if dtype not in _ELEM_SIZE:
        raise TypeError(f"dtype must be torch.float16, torch.bfloat16 or torch.float32; got {dtype!r}")
    if not 1 <= int(head_dim) <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {MAX_HEAD_DIM}]; got {head_dim}")
    if int(n) < 1:
        raise ValueError(f"n must be a positive token count; got {n}")


def config_allowed(
    config: dict,
    *,
    dtype: torch.dtype,
    head_dim: int,
    has_bias: bool,
    n: int,
    gather_branch: bool | None = None,
) -> bool:
    """Whether the forward autotuner may launch ``config`` (a :data:`CONFIGS` entry). Dropped: a shared-memory
    estimate above 160 KB (inputs, the bias tile's layout conversion, and without ``gather_branch`` the
    pipeliner's staging of the gathered tile); fp32 tiles above 64x64; ``BLOCK_M > 64`` for ``n <= 128``;
    tiles above 128x64 with < 8 warps at head dims > 64; with the bias, more than
    :data:`BIAS_MAX_SCORES_PER_THREAD` score elements per thread (they spill). TypeError / ValueError for bad
    arguments."""
    _check(config, dtype, head_dim, n)
    bm, bn = int(config["BLOCK_M"]), int(config["BLOCK_N"])
    warps, stages = int(config["num_warps"]), max(int(config["num_stages"]), 1)
    elem, bd = _ELEM_SIZE[dtype], block_d(head_dim)
    if gather_branch is None:
        gather_branch = installed_gather_branch(dtype)
    smem = elem * bd * (bm + 2 * bn * stages)
    if has_bias:
        smem += 4 * bm * bn  # layout conversion of the gathered tile
        if not gather_branch:
            smem += 4 * bm * bn * (stages - 1)  # cp.async staging buffers of the pipelined gather
    if smem > _SMEM_BUDGET or (elem == 4 and (bn > 64 or bm > 64)):
        return False
    if (
        elem == 2
        and has_bias
        and not gather_branch
        and ("fwd", bm, bn, warps, stages) in SPILLS_WITHOUT_BRANCH
    ):
        return False
    if n_bucket(n) <= 128 and bm > 64:
        return False
    if bd > 64 and bm * bn > 128 * 64 and warps < 8:
        return False
    return not (has_bias and bm * bn > BIAS_MAX_SCORES_PER_THREAD * 32 * warps)


def bwd_config_allowed(
    config: dict,
    *,
    kernel: str,
    dtype: torch.dtype,
    head_dim: int,
    has_bias: bool,
    n: int,
    bias_grad: bool = False,
    gather_branch: bool | None = None,
) -> bool:
    """Whether the backward autotuner may launch ``config`` (a ``BWD_CONFIGS[kernel]`` entry) for ``kernel``
    ``"dkdv"`` or ``"dq"``: shared-memory estimate within 160 KB (resident tiles + staged tiles + the bias
    tile's conversion), fp32 tiles at most 64x64, the forward's score-elements-per-thread cap with the bias,
    half that cap for the dq kernel's three gathers with ``bias_grad`` (32 spill on sm_80), and without the
    gather branch (``gather_branch``, default: the installed triton's) the :data:`SPILLS_WITHOUT_BRANCH`."""
    if kernel not in BWD_CONFIGS:
        raise ValueError(f"kernel must be one of {sorted(BWD_CONFIGS)}; got {kernel!r}")
    _check(config, dtype, head_dim, n)
    bm, bn = int(config["BLOCK_M"]), int(config["BLOCK_N"])
    warps, stages = int(config["num_warps"]), max(int(config["num_stages"]), 1)
    elem, bd = _ELEM_SIZE[dtype], block_d(head_dim)
    resident, streamed = (bn, bm) if kernel == "dkdv" else (bm, bn)
    smem = elem * bd * 2 * (resident + streamed * stages) + (4 * bm * bn if has_bias else 0)
    if smem > _SMEM_BUDGET or (elem == 4 and (bn > 64 or bm > 64)):
        return False
    if n_bucket(n) <= 128 and resident > 64:
        return False
    if gather_branch is None:
        gather_branch = installed_gather_branch(dtype)
    name = f"{kernel}-grad" if bias_grad else kernel
    if (
        elem == 2
        and has_bias
        and not gather_branch
        and (name, bm, bn, warps, stages) in SPILLS_WITHOUT_BRANCH
    ):
        return False
    cap = BIAS_MAX_SCORES_PER_THREAD // (2 if bias_grad and kernel == "dq" else 1)
    return not (has_bias and bm * bn > cap * 32 * warps)


def heuristic_config(
    dtype: torch.dtype, head_dim: int, n: int, *, has_bias: bool = True, gather_branch: bool | None = None
) -> dict[str, int]:
    """Fixed forward config without autotuning (``NACLIP_TRITON_AUTOTUNE=0`` on a GPU); always admitted by
    :func:`config_allowed` for the same arguments."""
    small = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    if dtype == torch.float32:
        return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}
    if n <= 256:
        return small
    warps = 8 if head_dim > 64 or has_bias else 4
    cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": warps, "num_stages": 3}
    ok = config_allowed(
        cfg, dtype=dtype, head_dim=head_dim, has_bias=has_bias, n=n, gather_branch=gather_branch
    )
    return cfg if ok else small


def launch_config(kernel: str, dtype: torch.dtype, head_dim: int, n: int, has_bias: bool) -> dict | None:
    """The fixed config of ``kernel`` (``"fwd"``, ``"dkdv"``, ``"dq"``) under the interpreter or with
    ``NACLIP_TRITON_AUTOTUNE=0``; None means autotune."""
    if interpreting():
        return INTERPRETER_CONFIG
    if os.environ.get("NACLIP_TRITON_AUTOTUNE", "1") not in ("0", "false", "False", "no"):
        return None
    if kernel == "fwd":
        return heuristic_config(dtype, head_dim, n, has_bias=has_bias)
    return dict(BWD_CONFIGS[kernel][0 if dtype == torch.float32 else _BWD_HEURISTIC[kernel]])


def _pruner(kernel: str):
    """``early_config_prune`` of ``kernel``'s autotuner: the configs its rule admits (never none)."""

    def prune(configs: list, named_args: dict, **kwargs: Any) -> list:
        merged = {**named_args, **kwargs}
        args = {
            "dtype": merged["K"].dtype,
            "head_dim": int(merged["HEAD_DIM"]),
            "has_bias": bool(merged["HAS_BIAS"]),
            "n": int(merged["N_BUCKET"]),
        }
        kept = []
        for cfg in configs:
            c = {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            if kernel == "fwd":
                branch = merged.get("GATHER_BRANCH")
                ok = config_allowed(c, **args, gather_branch=None if branch is None else bool(branch))
            else:
                ok = bwd_config_allowed(c, kernel=kernel, **args, bias_grad=bool(merged.get("BIAS_GRAD")))
            if ok:
                kept.append(cfg)
        return kept or [configs[0]]

    return prune


def autotuned(kernel_fn, kernel: str, key: list[str]):
    """``kernel_fn`` wrapped in ``triton.autotune`` over ``kernel``'s config list with its pruning rule."""
    import triton

    configs = CONFIGS if kernel == "fwd" else BWD_CONFIGS[kernel]
    return triton.autotune(
        configs=[
            triton.Config(
                {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                num_warps=c["num_warps"],
                num_stages=c["num_stages"],
            )
            for c in configs
        ],
        key=key,
        prune_configs_by={"early_config_prune": _pruner(kernel)},
    )(kernel_fn)
