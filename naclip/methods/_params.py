"""Validators of method parameters and the depth mapping of intermediate-layer indices.

Layer rule (:func:`map_layer_index`, :func:`map_layer_range`): the official defaults are 0-based block indices
of a 12-block ViT-B/16; for a ViT of ``L`` blocks index ``i`` becomes ``floor(i * L / 12 + 0.5)`` (the same
fraction of the depth, rounded half up), clamped to the valid intermediate range. ``L = 12`` maps every index
to itself; ViT-L/14 (24 blocks) doubles them. Explicit indices are always taken as given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from naclip._validate import check_int, check_number, check_probability

__all__ = [
    "REFERENCE_DEPTH",
    "check_fraction",
    "check_index",
    "check_layers",
    "check_pair",
    "check_positive",
    "map_layer_index",
    "map_layer_range",
]

#: Depth of the ViT the official layer indices were chosen for (ViT-B/16).
REFERENCE_DEPTH = 12


def map_layer_index(index: int, depth: int, *, upper: int) -> int:
    """``floor(index * depth / 12 + 0.5)`` clamped to ``[0, upper]``."""
    return min(max(int(math.floor(index * depth / REFERENCE_DEPTH + 0.5)), 0), upper)


def map_layer_range(start: int, stop: int, depth: int) -> tuple[int, ...]:
    """Intermediate blocks ``range(start, stop)`` of ViT-B/16 mapped to ``depth`` blocks: ``range(a, b)``
    with ``a, b`` mapped by :func:`map_layer_index` into ``0 .. depth-2`` (at least one block)."""
    last = depth - 2
    a = map_layer_index(start, depth, upper=last)
    b = max(a + 1, min(map_layer_index(stop, depth, upper=last + 1), last + 1))
    return tuple(range(a, b))


def check_index(name: str, value: object, count: int) -> int:
    """An int in ``[0, count)``; ``TypeError`` / ``ValueError`` naming ``name`` otherwise."""
    return check_int(name, value, minimum=0, maximum=count - 1, expected=f"an int in [0, {count})")


def check_layers(name: str, value: object, count: int) -> tuple[int, ...]:
    """A non-empty sequence of distinct ints in ``[0, count)`` -> sorted tuple."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise TypeError(f"{name}: expected a non-empty sequence of block indices, got {value!r}")
    out = tuple(check_index(f"{name}[{i}]", v, count) for i, v in enumerate(value))
    if len(set(out)) != len(out):
        raise ValueError(f"{name}: expected distinct block indices, got {list(value)}")
    return tuple(sorted(out))


#: the shared validators under the names this package has always used
check_fraction = check_probability


def check_positive(name: str, value: object) -> float:
    """A finite real ``> 0`` -> float."""
    return check_number(name, value, positive=True)


def check_pair(name: str, value: object) -> tuple[float, float]:
    """``(tau, lam)``: ``tau`` finite ``> 0``, ``lam`` in ``[0, 1]``."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(f"{name}: expected a pair (tau, lambda), got {value!r}")
    return check_positive(f"{name}[0]", value[0]), check_fraction(f"{name}[1]", value[1])


#: The keyword parameters ResCLIP accepts (``method_params``), in its official config order.
RESCLIP_PARAMS = (
    "rcs",
    "sfr",
    "rcs_layers",
    "rcs_weights",
    "sfr_weights",
    "temp_thd",
    "delete_same_entity",
    "logit_scale",
    "sfr_pamr_steps",
    "sfr_pamr_dilations",
)

#: The keyword parameters SC-CLIP accepts (``method_params``), in its official config order.
SCCLIP_PARAMS = (
    "pre_adjust_idx",
    "post_adjust_idx",
    "multi_start_idx",
    "multi_end_idx",
    "res_cls",
    "beta",
    "lof_neighbors",
    "lof_contamination",
)
