"""The argument checks, in one place: each says what it received and what it expected.

Imported as `from keras_ee import validation as v`; a method-, model- or format-specific rule
stays with its owner but is built from these functions.
"""

import math
import numbers
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import numpy as np

if TYPE_CHECKING:
    from keras_ee.config import RecipeConfig, TrainConfig

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
# The training methods', optimizers', data's and dumps' checks.


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


def non_finite_images(images: Any) -> np.ndarray:
    """Indices of the images (rows of `images`) with a NaN or infinite pixel (training data and
    inference inputs are refused by this one rule)."""
    a = np.asarray(images)
    if a.dtype.kind != "f" or a.size == 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))


def pixel_range(images: Any) -> tuple[float, float]:
    """`(min, max)` of a training split's stored pixels, as floats (what `keras_ee.inputs`'
    `check_pixel_range` holds an inference input to)."""
    a = np.asarray(images)
    return float(a.min()), float(a.max())


# === TrainConfig's settings (keras_ee.config) ===
# One line per wrong setting: "config `key` must be <expected>; received <value> (<type>)."


def _bad_setting(settings: object, key: str, expected: str) -> NoReturn:
    value = getattr(settings, key)
    raise ValueError(f"config `{key}` must be {expected}; received {value!r} ({type(value).__name__}).")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_recipe_config(recipe: "RecipeConfig") -> None:
    """The checks of a `keras_ee.config.RecipeConfig` (a `ValueError` naming the key)."""
    if recipe.ema is not None and not (_is_finite_number(recipe.ema) and 0 < recipe.ema < 1):
        _bad_setting(recipe, "ema", "a momentum in (0, 1), e.g. 0.9999, or None")
    if not _is_finite_number(recipe.label_smoothing) or not 0 <= recipe.label_smoothing < 1:
        _bad_setting(recipe, "label_smoothing", "a number in [0, 1)")
    for key in ("mixup", "cutmix"):
        if not _is_finite_number(getattr(recipe, key)) or getattr(recipe, key) < 0:
            _bad_setting(recipe, key, "a Beta alpha >= 0 (0: off)")
    if recipe.randaugment is not None and not (_is_finite_number(recipe.randaugment) and 0 <= recipe.randaugment <= 10):
        _bad_setting(recipe, "randaugment", "a magnitude in [0, 10] (timm's scale), or None")
    if not _is_finite_number(recipe.randaugment_std) or recipe.randaugment_std < 0:
        _bad_setting(recipe, "randaugment_std", "a number >= 0")
    if not _is_int(recipe.randaugment_ops) or recipe.randaugment_ops < 1:
        _bad_setting(recipe, "randaugment_ops", "a positive integer")
    if not _is_finite_number(recipe.random_erasing) or not 0 <= recipe.random_erasing <= 1:
        _bad_setting(recipe, "random_erasing", "a probability in [0, 1]")
    if not _is_finite_number(recipe.color_jitter) or not 0 <= recipe.color_jitter < 1:
        _bad_setting(recipe, "color_jitter", "a strength in [0, 1) (0: off)")


def check_train_config(config: "TrainConfig") -> None:
    """The checks of a `keras_ee.config.TrainConfig` (a `ValueError` naming the key); `weight_decay`
    may still be None (the config resolves it to the optimizer's default)."""
    # The choices are the config's (a function-level import: keras_ee.config imports this module).
    from keras_ee.config import (
        CONFIDENCES,
        DUMP_DTYPES,
        OPTIMIZERS,
        PRECISIONS,
        SCHEDULES,
        STRATEGIES,
        WARMUP_SCHEDULES,
        RecipeConfig,
    )

    c = config
    for key in (
        "dataset",
        "model",
        "method",
        "schedule",
        "confidence",
        "dump_dtype",
        "optimizer",
        "strategy",
        "precision",
    ):
        if not isinstance(getattr(c, key), str):
            _bad_setting(c, key, "a string")
    if c.data_dir is not None and not isinstance(c.data_dir, str):
        _bad_setting(c, "data_dir", "a folder path (string) or None")
    for key in ("nesterov", "evaluate", "sync_batchnorm"):
        if not isinstance(getattr(c, key), bool):
            _bad_setting(c, key, "true or false")
    if not _is_int(c.epochs) or c.epochs < 1:
        _bad_setting(c, "epochs", "a positive integer")
    if not _is_int(c.batch_size) or c.batch_size < 2:
        _bad_setting(c, "batch_size", "an integer >= 2")
    if not _is_int(c.seed):
        _bad_setting(c, "seed", "an integer")
    for key in ("val_size", "train_size", "meta_split_size"):
        value = getattr(c, key)
        count = _is_int(value) and value >= 1
        fraction = _is_finite_number(value) and isinstance(value, float) and 0 < value < 1
        if value is not None and not (count or fraction):
            _bad_setting(c, key, "a positive integer count, a fraction in (0, 1), or None")
    if c.samples_per_class is not None and not (_is_int(c.samples_per_class) and c.samples_per_class >= 1):
        _bad_setting(c, "samples_per_class", "a positive integer (training images per class) or None")
    if c.samples_per_class is not None and c.train_size is not None:
        _bad_setting(
            c,
            "samples_per_class",
            f"None when `train_size` is set (received train_size={c.train_size!r}); use one of the two",
        )
    if c.imbalance_factor is not None and not (_is_finite_number(c.imbalance_factor) and c.imbalance_factor >= 1):
        _bad_setting(c, "imbalance_factor", "a number >= 1 (200, 100, 50, 20) or None")
    if c.learning_rate is not None and not (_is_finite_number(c.learning_rate) and c.learning_rate > 0):
        _bad_setting(c, "learning_rate", "a positive number or None")
    if c.schedule not in SCHEDULES:
        _bad_setting(c, "schedule", f"one of {SCHEDULES}")
    if not _is_finite_number(c.momentum) or not 0 <= c.momentum < 1:
        _bad_setting(c, "momentum", "a number in [0, 1)")
    if c.optimizer not in OPTIMIZERS:
        _bad_setting(c, "optimizer", f"one of {OPTIMIZERS}")
    if c.nesterov and c.momentum == 0 and c.optimizer == "sgd":
        _bad_setting(c, "nesterov", "false when momentum is 0 (Nesterov needs momentum, as torch.optim.SGD)")
    if c.weight_decay is not None and not (_is_finite_number(c.weight_decay) and c.weight_decay >= 0):
        _bad_setting(c, "weight_decay", "a number >= 0 (or None: 1e-4 for sgd, 0.05 for adamw)")
    if not _is_int(c.warmup_epochs) or c.warmup_epochs < 0:
        _bad_setting(c, "warmup_epochs", "an integer >= 0")
    if c.warmup_epochs and c.schedule not in WARMUP_SCHEDULES:
        _bad_setting(
            c, "warmup_epochs", f"0 with schedule {c.schedule!r} (warm-up works with {', '.join(WARMUP_SCHEDULES)})"
        )
    if not _is_finite_number(c.min_learning_rate) or c.min_learning_rate < 0:
        _bad_setting(c, "min_learning_rate", "a number >= 0")
    if c.min_learning_rate and c.schedule != "cosine_per_batch":
        _bad_setting(c, "min_learning_rate", f"0 with schedule {c.schedule!r} (a final rate is cosine_per_batch's)")
    if not isinstance(c.recipe, RecipeConfig):
        _bad_setting(c, "recipe", "a keras_ee.config.RecipeConfig")
    if c.confidence not in CONFIDENCES:
        _bad_setting(c, "confidence", f"one of {CONFIDENCES}")
    if c.strategy not in STRATEGIES:
        _bad_setting(c, "strategy", f"one of {STRATEGIES}")
    if c.precision not in PRECISIONS:
        _bad_setting(c, "precision", f"one of {PRECISIONS}")
    if c.dump_dtype not in DUMP_DTYPES:
        _bad_setting(c, "dump_dtype", "'float32' or 'float16'")
    if not isinstance(c.model_options, dict):
        _bad_setting(c, "model_options", "a dict")
    if not isinstance(c.method_options, dict):
        _bad_setting(c, "method_options", "a dict")
    if not isinstance(c.budgets, list) or any(not _is_finite_number(b) or b <= 0 for b in c.budgets):
        _bad_setting(c, "budgets", "a list of positive, finite Mul-Add counts")
