"""naclip._validate: the one set of argument validators (types, bounds, NaN/inf, message contents)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

from naclip._validate import (
    check_bool,
    check_choice,
    check_int,
    check_ints,
    check_number,
    check_positive_int,
    check_probability,
    unwrap_int,
)

_INT_FORMS = {
    "int": lambda v: check_int("arg", v),
    "int-min0": lambda v: check_int("arg", v, minimum=0),
    "int-range": lambda v: check_int("arg", v, minimum=-5, maximum=5),
    "positive-int": lambda v: check_positive_int("arg", v),
}
_NUMBER_FORMS = {
    "number": lambda v: check_number("arg", v),
    "positive-number": lambda v: check_number("arg", v, positive=True),
    "probability": lambda v: check_probability("arg", v),
}
_ALL_FORMS = {
    **_INT_FORMS,
    **_NUMBER_FORMS,
    "ints": lambda v: check_ints("arg", [v]),
}


def _raises(exc: type[Exception], value: object, *, name: str = "arg"):
    """pytest.raises whose message must name the argument and show the value's repr."""
    return pytest.raises(exc, match=rf"^{re.escape(name)}: expected .*{re.escape(repr(value))}")


@pytest.mark.parametrize("form", list(_INT_FORMS), ids=list(_INT_FORMS))
@pytest.mark.parametrize("value", [True, False], ids=["True", "False"])
def test_bool_is_not_an_int(form, value):
    with _raises(TypeError, value):
        _INT_FORMS[form](value)


@pytest.mark.parametrize("form", list(_NUMBER_FORMS), ids=list(_NUMBER_FORMS))
@pytest.mark.parametrize("value", [True, False], ids=["True", "False"])
def test_bool_is_not_a_number(form, value):
    with _raises(TypeError, value):
        _NUMBER_FORMS[form](value)


def test_bool_is_not_an_int_in_a_sequence():
    with pytest.raises(
        ValueError, match=r"^arg: expected a non-empty sequence of ints >= 1, got \[2, True\]"
    ):
        check_ints("arg", [2, True])


@pytest.mark.parametrize("form", list(_INT_FORMS), ids=list(_INT_FORMS))
@pytest.mark.parametrize("value", [3.0, "3", None], ids=["float", "str", "None"])
def test_int_forms_refuse_other_types(form, value):
    with pytest.raises(
        TypeError, match=rf"^arg: expected .*got {type(value).__name__} {re.escape(repr(value))}"
    ):
        _INT_FORMS[form](value)


@pytest.mark.parametrize("form", list(_ALL_FORMS), ids=list(_ALL_FORMS))
@pytest.mark.parametrize("kind", [np.int64, np.int32, np.uint8], ids=["int64", "int32", "uint8"])
def test_numpy_ints_are_accepted_and_returned_as_python_numbers(form, kind):
    out = _ALL_FORMS[form](kind(1))
    out = out[0] if isinstance(out, tuple) else out
    assert out == 1 and type(out) in (int, float) and not isinstance(out, np.generic)


@pytest.mark.parametrize("form", list(_NUMBER_FORMS), ids=list(_NUMBER_FORMS))
@pytest.mark.parametrize(
    "value", [math.nan, math.inf, -math.inf, np.float32("nan")], ids=["nan", "inf", "-inf", "np-nan"]
)
def test_nan_and_inf_are_refused(form, value):
    with _raises(ValueError, value):
        _NUMBER_FORMS[form](value)


@pytest.mark.parametrize(
    ("call", "value", "ok"),
    [
        (lambda v: check_int("arg", v, minimum=2, maximum=7), 2, True),
        (lambda v: check_int("arg", v, minimum=2, maximum=7), 7, True),
        (lambda v: check_int("arg", v, minimum=2, maximum=7), 1, False),
        (lambda v: check_int("arg", v, minimum=2, maximum=7), 8, False),
        (lambda v: check_int("arg", v, maximum=-3), -3, True),
        (lambda v: check_int("arg", v, maximum=-3), -2, False),
        (lambda v: check_positive_int("arg", v), 1, True),
        (lambda v: check_positive_int("arg", v), 0, False),
        (lambda v: check_ints("arg", [v, 4], minimum=3), 3, True),
        (lambda v: check_ints("arg", [v, 4], minimum=3), 2, False),
        (lambda v: check_probability("arg", v), 0.0, True),
        (lambda v: check_probability("arg", v), 1.0, True),
        (lambda v: check_probability("arg", v), -1e-9, False),
        (lambda v: check_probability("arg", v), 1.0 + 1e-9, False),
        (lambda v: check_number("arg", v, positive=True), 1e-300, True),
        (lambda v: check_number("arg", v, positive=True), 0.0, False),
        (lambda v: check_number("arg", v), -1e300, True),
    ],
    ids=[
        "int-min-edge", "int-max-edge", "int-below", "int-above", "int-max-only-edge", "int-max-only-above",
        "positive-1", "positive-0", "ints-min-edge", "ints-below", "prob-0", "prob-1", "prob-below",
        "prob-above", "positive-tiny", "positive-0.0", "number-negative",
    ],
)  # fmt: skip
def test_bounds_are_inclusive(call, value, ok):
    if ok:
        out = call(value)
        assert (out[0] if isinstance(out, tuple) else out) == value
    else:
        with pytest.raises(ValueError, match=rf"^arg: expected .*{re.escape(repr(value))}"):
            call(value)


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (
            lambda: check_int("port", 0, minimum=1, maximum=65535),
            ValueError,
            r"port: expected an int in \[1, 65535\], got 0",
        ),
        (
            lambda: check_int("num_workers", -1, minimum=0),
            ValueError,
            "num_workers: expected an int >= 0, got -1",
        ),
        (lambda: check_int("k", 9, maximum=4), ValueError, "k: expected an int <= 4, got 9"),
        (
            lambda: check_int("limit", "2", minimum=1, expected="a positive int or None"),
            TypeError,
            "limit: expected a positive int or None, got str '2'",
        ),
        (lambda: check_positive_int("batch", 0), ValueError, "batch: expected a positive int, got 0"),
        (lambda: check_ints("dilations", 8), TypeError, "dilations: expected a sequence of ints >= 1, got 8"),
        (lambda: check_ints("dilations", []), ValueError, r"dilations: expected a non-empty .*, got \[\]"),
        (
            lambda: check_number("std", "x", positive=True),
            TypeError,
            "std: expected a finite number > 0, got str 'x'",
        ),
        (lambda: check_probability("beta", 2), ValueError, r"beta: expected a number in \[0, 1\], got 2"),
        (lambda: check_bool("share", 1), TypeError, "share: expected a bool, got 1"),
        (
            lambda: check_bool("flag", "yes", allow_none=True),
            TypeError,
            "flag: expected a bool or None, got 'yes'",
        ),
        (
            lambda: check_choice("mode", "fast", ("slide", "whole")),
            ValueError,
            r"mode: expected one of \('slide', 'whole'\), got 'fast'",
        ),
    ],
    ids=[
        "int-range",
        "int-min",
        "int-max",
        "int-expected",
        "positive-int",
        "ints-type",
        "ints-empty",
        "number",
        "probability",
        "bool",
        "bool-or-none",
        "choice",
    ],
)
def test_messages_name_the_argument_the_expectation_and_the_value(call, exc, match):
    with pytest.raises(exc, match=f"^{match}$"):
        call()


@pytest.mark.parametrize(
    ("call", "value", "expected"),
    [
        (lambda v: check_bool("arg", v), True, True),
        (lambda v: check_bool("arg", v), False, False),
        (lambda v: check_bool("arg", v, allow_none=True), None, None),
        (lambda v: check_choice("arg", v, ("a", "b")), "b", "b"),
        (lambda v: check_number("arg", v), np.float32(0.5), 0.5),
        (lambda v: check_ints("arg", v), [1, np.int64(2)], (1, 2)),
    ],
    ids=["true", "false", "none-allowed", "choice", "np-float", "ints-tuple"],
)
def test_accepted_values_are_returned(call, value, expected):
    out = call(value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize("value", [None, 1, 0, "true"], ids=["None", "1", "0", "str"])
def test_check_bool_refuses_non_bools(value):
    with _raises(TypeError, value):
        check_bool("arg", value)


@pytest.mark.parametrize("value", [["a"], 1.5, True], ids=["list", "float-not-listed", "bool-not-listed"])
def test_check_choice_refuses_values_not_listed(value):
    with _raises(ValueError, value):
        check_choice("arg", value, ("a", 1, 2.0))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (torch.tensor(7), 7),
        (torch.tensor(7, dtype=torch.uint8), 7),
        (torch.tensor(-2, dtype=torch.int32), -2),
        (np.int64(7), np.int64(7)),
        (7, 7),
    ],
    ids=["int64-tensor", "uint8-tensor", "int32-tensor", "numpy-unchanged", "int-unchanged"],
)
def test_unwrap_int_turns_0d_integer_tensors_into_ints(value, expected):
    out = unwrap_int(value)
    assert out == expected and type(out) is type(expected)


@pytest.mark.parametrize(
    "value",
    [torch.tensor(True), torch.tensor(7.0), torch.tensor([7]), torch.tensor(1 + 0j)],
    ids=["bool-tensor", "float-tensor", "1-d-tensor", "complex-tensor"],
)
def test_unwrap_int_leaves_other_tensors_for_the_checks_to_refuse(value):
    assert unwrap_int(value) is value
    with pytest.raises(TypeError, match=r"^arg: expected a positive int, got Tensor "):
        check_positive_int("arg", unwrap_int(value))
