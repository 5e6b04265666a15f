"""Argument checks shared by the builders (clear, specific error messages)."""

from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np

_T = TypeVar("_T")


def check_int(name: str, value: object, minimum: int | None = None, where: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{where}`{name}` must be an int, received {value!r} of type {type(value).__name__}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}`{name}` must be >= {minimum}, received {value}.")
    return int(value)


def check_int_tuple(
    name: str, value: Any, minimum: int | None = 1, where: str = "", length: int | None = None
) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{where}`{name}` must be a sequence of ints, received {value!r}.")
    out = tuple(check_int(f"{name}[{i}]", v, minimum, where) for i, v in enumerate(value))
    if not out:
        raise ValueError(f"{where}`{name}` must not be empty.")
    if length is not None and len(out) != length:
        raise ValueError(f"{where}`{name}` must have {length} entries, received {len(out)}: {out}.")
    return out


def check_input_shape(input_shape: Any, where: str = "", min_size: int = 1) -> tuple[int, ...]:
    if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__len__"):
        raise TypeError(f"{where}`input_shape` must be a tuple (height, width, channels), received {input_shape!r}.")
    if len(input_shape) != 3:
        raise ValueError(
            f"{where}`input_shape` must be (height, width, channels) "
            f"(channels-last, no batch axis), received {tuple(input_shape)}."
        )
    shape = tuple(check_int("input_shape", v, 1, where) for v in input_shape)
    if min(shape[:2]) < min_size:
        raise ValueError(f"{where}input height and width must be >= {min_size}, received input_shape={shape}.")
    return shape


def check_bool(name: str, value: object, where: str = "") -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}`{name}` must be a bool, received {value!r}.")
    return bool(value)


def check_choice(name: str, value: _T, choices: Iterable[_T], where: str = "") -> _T:
    if value not in choices:
        raise ValueError(f"{where}`{name}` must be one of {list(choices)}, received {value!r}.")
    return value


def check_fraction(
    name: str, value: object, low: float, high: float, where: str = "", low_inclusive: bool = True
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}`{name}` must be a number, received {value!r}.")
    ok_low = value >= low if low_inclusive else value > low
    if not (ok_low and value < high):
        bracket = "[" if low_inclusive else "("
        raise ValueError(f"{where}`{name}` must be in {bracket}{low}, {high}), received {value}.")
    return float(value)


def conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a conv/pool with symmetric padding."""
    return (size + 2 * pad - kernel) // stride + 1
