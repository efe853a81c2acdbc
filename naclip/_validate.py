"""The one small set of argument validators of naclip (used at the public boundaries, never re-run inside).

Each returns the checked value (ints as ``int``, numbers as ``float``) or raises, naming the argument, the
expected and the actual value: ``TypeError`` for a wrong type (``bool`` is never an int or a number here),
``ValueError`` for a value out of range. :func:`unwrap_int` turns a 0-d integer torch tensor into an ``int``
first, where sizes may come from tensors.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_ints",
    "check_number",
    "check_positive_int",
    "check_probability",
    "unwrap_int",
]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an int in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"an int >= {minimum}"
    return "an int" if maximum is None else f"an int <= {maximum}"


def check_int(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None, expected: str = ""
) -> int:
    """``int(value)`` for an integer (numpy ints too) with ``minimum <= value <= maximum`` (bounds
    optional). ``expected`` replaces the default wording ``"an int >= minimum"`` of the messages."""
    text = expected or _int_text(minimum, maximum)
    if not _is_int(value):
        raise TypeError(f"{name}: expected {text}, got {type(value).__name__} {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name}: expected {text}, got {value!r}")
    return int(value)


def unwrap_int(value: Any) -> Any:
    """``int(value)`` for a 0-d integer torch tensor (sizes often come from ``.shape`` or ``.sum()``); any
    other value unchanged, for a ``check_*`` function to judge (a bool tensor stays a tensor: not an int)."""
    if not isinstance(value, torch.Tensor) or value.ndim != 0:
        return value
    is_int = not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return int(value) if is_int else value


def check_positive_int(name: str, value: Any) -> int:
    """``int(value)`` for an int ``>= 1``; messages say ``"expected a positive int"``."""
    return check_int(name, value, minimum=1, expected="a positive int")


def check_ints(name: str, value: Any, *, minimum: int = 1) -> tuple[int, ...]:
    """A non-empty sequence of ints ``>= minimum`` -> tuple (``TypeError`` for a non-sequence)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a sequence of ints >= {minimum}, got {value!r}")
    if not value or not all(_is_int(v) and v >= minimum for v in value):
        raise ValueError(f"{name}: expected a non-empty sequence of ints >= {minimum}, got {value!r}")
    return tuple(int(v) for v in value)


def check_number(name: str, value: Any, *, positive: bool = False) -> float:
    """``float(value)`` for a finite real number (``> 0`` when ``positive``)."""
    text = "a finite number > 0" if positive else "a finite number"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {text}, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)) or (positive and not float(value) > 0):
        raise ValueError(f"{name}: expected {text}, got {value!r}")
    return float(value)


def check_probability(name: str, value: Any) -> float:
    """``float(value)`` for a real number in ``[0, 1]`` (NaN refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number in [0, 1], got {type(value).__name__} {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def check_bool(name: str, value: Any, *, allow_none: bool = False) -> bool | None:
    """``value`` if it is a ``bool`` (or ``None`` when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        text = "a bool or None" if allow_none else "a bool"
        raise TypeError(f"{name}: expected {text}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices`` (a bool only matches a bool: ``True`` is not ``1`` here);
    ``ValueError`` listing them otherwise."""
    if isinstance(value, bool):
        if any(c is value for c in choices):
            return value
    elif isinstance(value, str | int | float | type(None)) and value in choices:
        return value
    raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
