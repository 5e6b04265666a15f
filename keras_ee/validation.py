"""The argument checks, in one place: each says what it received and what it expected.

Imported as `from keras_ee import validation as v`; a method-, model- or format-specific rule
stays with its owner but is built from these functions.
"""

import math
import numbers
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
    """`value` as a float in [low, high) (`(low, high)` unless `low_inclusive`)."""
    return check_number(name, value, low, high, low_open=not low_inclusive, high_open=True, where=where)


def conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a conv/pool with symmetric padding."""
    return (size + 2 * pad - kernel) // stride + 1


# === Scalars, choices, labels, logits and costs ===
# The training methods', optimizers', data's and dumps' checks (issue 31: one home per rule).


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    where: str = "",
) -> float:
    """`value` as a float, or a clear error unless it is a finite number in [low, high]
    (`(low, ...` with `low_open`, `..., high)` with `high_open`; either bound None for none):
    the methods' and optimizers' scalar options."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}`{name}` must be a number; received {value!r}.")
    value = float(value)
    ok = (
        np.isfinite(value)
        and (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        raise ValueError(f"{where}`{name}` must be a finite number in {left}{lo}, {hi}{right}; received {value}.")
    return value


def check_counts(where: str = "", **values: object) -> None:
    """A clear error unless every value is an int >= 1 (widths, depths, intervals, counts)."""
    for name, value in values.items():
        check_int(name, value, 1, where)


def check_labels(labels: object, num_classes: int | None = None, what: str = "labels") -> np.ndarray:
    """Validates a label vector and returns it as int64.

    Integer dtypes are taken as they are; floating-point labels are accepted only
    when every value is integral (1.0, not 1.5) and finite. Booleans, strings and
    objects are refused, as are labels < 0 and, when `num_classes` is given,
    labels >= `num_classes`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"Expected `{what}` to be a 1-D vector of class indices. Received shape {labels.shape}.")
    if labels.dtype == np.bool_:
        raise TypeError(
            f"Expected `{what}` to hold integer class indices. Received dtype bool "
            "(convert with labels.astype(int) if True/False really are classes 1/0)."
        )
    if labels.size == 0:
        return labels.astype(np.int64)
    if np.issubdtype(labels.dtype, np.floating):
        finite = np.isfinite(labels)
        if not finite.all():
            bad = int(np.argmin(finite))
            raise ValueError(
                f"Expected `{what}` to hold class indices. Received {labels[bad]} (NaN or inf) at index {bad}."
            )
        fractional = labels != np.floor(labels)
        if fractional.any():
            bad = int(np.argmax(fractional))
            raise ValueError(
                f"Expected `{what}` to hold class indices, but it holds non-integer "
                f"values, e.g. {float(labels[bad])!r} at index {bad}; float labels must be "
                "integral (0.0, 1.0, ...), they are never rounded or truncated."
            )
    elif not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"Expected `{what}` to have an integer dtype. Received {labels.dtype}.")
    lo, hi = labels.min(), labels.max()
    if lo < 0:
        raise ValueError(f"Expected `{what}` to be >= 0. Received a minimum of {lo}.")
    limit = np.iinfo(np.int64).max if num_classes is None else num_classes
    if hi >= limit:
        raise ValueError(f"Expected `{what}` in [0, {limit}). Received a maximum of {hi}.")
    return labels.astype(np.int64, copy=False)


_LOGIT_DTYPES = (np.float16, np.float32, np.float64)


def check_exit_logits(logits: np.ndarray, where: str) -> None:
    """Logits of every exit, `(K, N, C)`: float16/32/64 in native byte order."""
    if logits.ndim != 3:
        raise ValueError(
            f"{where} must have shape (num_exits, num_samples, num_classes); received shape {logits.shape}."
        )
    if logits.dtype.type not in _LOGIT_DTYPES:
        raise TypeError(f"{where} must be float16, float32 or float64; received dtype {logits.dtype}.")
    if not logits.dtype.isnative:
        raise TypeError(
            f"{where} is stored in non-native byte order (dtype {logits.dtype.str}); expected native "
            f"{logits.dtype.newbyteorder('=').str} (re-save it with save_dump, which converts it)."
        )


def check_logits_pair(val_logits: np.ndarray, test_logits: np.ndarray, val_where: str, test_where: str) -> None:
    """Validation and test logits of one model: the same exits and classes."""
    vs, ts = val_logits.shape, test_logits.shape
    if vs[2] != ts[2]:
        raise ValueError(
            f"class-count mismatch: {val_where} has shape {vs} ({vs[2]} classes) but {test_where} has shape "
            f"{ts} ({ts[2]} classes); both must come from the same model (shape (num_exits, N, num_classes))."
        )
    if vs[0] != ts[0]:
        raise ValueError(
            f"exit-count mismatch: {val_where} has shape {vs} ({vs[0]} exits) but {test_where} has shape "
            f"{ts} ({ts[0]} exits); both must come from the same model (shape (num_exits, N, num_classes))."
        )


def check_labels_of_logits(labels: np.ndarray, logits_shape: tuple, where: str, split: str) -> None:
    """The labels of logits `(K, N, C)`: integer class ids, shape (N,), in [0, C), not empty.

    The one check of labels against their logits: the dump's files, `save_dump` and
    `EarlyExitModel.from_model`. `where` names them in the message, `split` the logits.
    """
    n, c = logits_shape[1], logits_shape[2]
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(
            f"{where} must have shape ({n},) to match the {split} logits {logits_shape}; received shape {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{where} must hold integer class ids; received dtype {labels.dtype}.")
    if labels.size == 0:
        raise ValueError(f"{where} is empty: expected at least one {split} sample.")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= c:
        bad = int(np.argmax((labels < 0) | (labels >= c)))
        raise ValueError(
            f"{where} must lie in [0, {c}) (num_classes of the logits); received values in [{lo}, {hi}] "
            f"(first bad label {int(labels[bad])} at index {bad})."
        )


def _cost(value: object, key: str, k: int, where: str, bad_type: type[Exception]) -> int | float:
    """One cost as a Python int or float (as given), or a clear error naming the exit."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise bad_type(f"{where}: `{key}` of exit_{k} is {value!r} ({type(value).__name__}); expected a number.")
    if isinstance(value, numbers.Integral):
        value = int(value)
    elif isinstance(value, np.floating) and value.dtype.itemsize < 8:
        value = float(str(value))  # float32 0.2 is stored as 0.2, not 0.20000000298023224
    else:
        value = float(value)
    if not math.isfinite(value):
        raise ValueError(
            f"{where}: `{key}` of exit_{k} is {value!r}; expected a finite number >= 0 "
            "(NaN, Infinity and overflowing literals such as 1e309 are not costs)."
        )
    if value < 0:
        raise ValueError(f"{where}: `{key}` of exit_{k} is negative ({value!r}); expected a number >= 0.")
    return value


def check_exit_costs(
    values: object, key: str, num_exits: int, where: str, bad_type: type[Exception] = TypeError
) -> list:
    """One cumulative cost per exit (`mul_adds`, `params`): finite, >= 0, non-decreasing, kept as given."""
    if isinstance(values, np.ndarray):
        values = list(values) if values.ndim == 1 else values  # numpy scalars: see _number
    if not isinstance(values, (list, tuple)):
        raise bad_type(
            f"{where}: `{key}` must be a list with one number per exit ({num_exits}); "
            f"received {type(values).__name__} {str(values)[:60]!r}."
        )
    if len(values) != num_exits:
        raise ValueError(
            f"{where}: `{key}` must have one entry per exit ({num_exits}, as in the logits); received {len(values)}."
        )
    out = [_cost(v, key, k + 1, where, bad_type) for k, v in enumerate(values)]
    for k in range(1, len(out)):
        if out[k] < out[k - 1]:
            raise ValueError(
                f"{where}: `{key}` decreases at exit_{k + 1} ({out[k]!r} < {out[k - 1]!r} of exit_{k}); "
                "costs are cumulative (backbone up to the exit plus every head so far), so they must be "
                "non-decreasing."
            )
    return out
