"""Argument checks shared by the builders (clear, specific error messages)."""

import math
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


# ------------------------------------------------------------------ TrainConfig's settings (keras_ee.config)
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
