"""The one dtype parser of naclip and the precision placement of a model (open_clip's ``precision=``).

:func:`resolve_dtype` / :func:`dtype_name` turn the accepted spellings into a torch dtype / canonical name
(``fp32``, ``fp16``, ``bf16``); :func:`place` moves a module to a device and applies open_clip's mixed
precision. Used by :class:`naclip.Segmenter`, :func:`naclip.hub.load_clip` and the CLIs; imports only torch
(and open_clip lazily), so neither of them imports the other for it.
"""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "dtype_name", "place", "resolve_dtype"]

#: Canonical dtype names (CLI choices and open_clip ``precision`` strings) -> torch dtype.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {
    **DTYPES,
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The one dtype parser of naclip (used by :class:`Segmenter`, :func:`naclip.hub.load_clip` and the CLIs).

    ``None`` -> ``None``; ``torch.float32`` / ``torch.float16`` / ``torch.bfloat16`` -> itself; a string,
    case-insensitive, surrounding whitespace and an optional ``"torch."`` prefix ignored: ``"fp32"``,
    ``"float32"``, ``"float"``, ``"fp16"``, ``"float16"``, ``"half"``, ``"bf16"``, ``"bfloat16"`` (so
    ``"torch.float16"`` and ``str(torch.float16)`` work) -> the torch dtype.

    Raises ``TypeError`` for anything that is not ``None``, a ``str`` or a ``torch.dtype``, and
    ``ValueError`` for an unknown name or another torch dtype (e.g. ``torch.int8``).
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPE_NAMES:
            return dtype
    elif isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
    else:
        raise TypeError(
            f"dtype: expected None, a str (fp32, fp16, bf16) or a torch dtype, got {type(dtype).__name__} "
            f"{dtype!r}"
        )
    raise ValueError(f"dtype: expected one of fp32, fp16, bf16 (or a matching torch dtype), got {dtype!r}")


def dtype_name(dtype: str | torch.dtype | None) -> str:
    """Canonical name (``"fp32"``, ``"fp16"``, ``"bf16"``) of anything :func:`resolve_dtype` accepts;
    ``None`` -> ``"fp32"`` (the default precision). Same errors as :func:`resolve_dtype`."""
    resolved = resolve_dtype(dtype)
    return "fp32" if resolved is None else _DTYPE_NAMES[resolved]


def place(module: torch.nn.Module, device: str | torch.device | None, dtype: torch.dtype | None) -> None:
    """Move ``module`` in place to ``device`` and set its precision like open_clip's ``precision=``
    (spec §1.5, the same path as :func:`naclip.hub.load_clip`).

    ``float32``: every floating parameter/buffer in fp32. ``float16`` / ``bfloat16``: open_clip's mixed
    precision (``open_clip.model.convert_weights_to_lp``): conv/linear/attention projection weights and
    ``proj`` / ``text_projection`` in the low-precision dtype; LayerNorms, the class and positional
    embeddings stay fp32 (the model is first brought back to fp32, so a model that was half already gets
    its LayerNorms in fp32 again). ``dtype=None`` leaves the precision unchanged.
    """
    if dtype is None:
        if device is not None:
            module.to(device=device)
        return
    module.to(device=device, dtype=torch.float32)
    if dtype != torch.float32:
        from open_clip.model import convert_weights_to_lp

        convert_weights_to_lp(module, dtype=dtype)
