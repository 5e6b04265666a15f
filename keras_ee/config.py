"""The settings of one training run, kept apart from the code that runs it.

A `TrainConfig` is what `keras_ee.experiment.train(config, workdir)` consumes and what a
run folder's `config.json` holds. It round-trips through JSON, and `--config FILE` on the
command line reads the same keys from a `.json` or `.toml` file.

Example:

    cfg = TrainConfig(dataset="cifar100", data_dir="../shared/data", model="msdnet_cifar_5",
                      method="l2w", method_options={"q": 0.75, "delta": 0.8}, epochs=300,
                      batch_size=64)
    cfg.to_json("cfg.json"); TrainConfig.from_file("cfg.json") == cfg  # True
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

SCHEDULES = ("cosine", "constant", "step")
CONFIDENCES = ("max_softmax", "margin", "entropy")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run.

    Args:
        dataset: a name from `keras_ee.data.available()` or `npz:PATH`; default the
            built-in `digits` (no download).
        data_dir: folder with local copies of the data (official formats).
        val_size: held-out validation images for calibration (default: the loader's).
        imbalance_factor: long-tailed CIFAR (200, 100, 50, 20); None for balanced.
        train_size: train on a stratified subset of this many training images
            (smaller-scale runs); None uses the whole training split.
        meta_split_size: for methods with a meta stream (outer steps on held-out
            batches, e.g. HDKD): None (default) feeds them the validation split, as
            the HDKD paper does; the thresholds calibrated on it are then
            optimistic. A count or fraction holds out a separate split of that
            size from the training images instead.
        model: a preset of `keras_ee.models.available()`.
        model_options: keyword overrides for the preset (widths, blocks, ...).
        method: a registered training method (`keras-ee methods`) or
            `package.module:Class` for one outside keras-ee.
        method_options: the method's options (see `keras-ee methods`).
        epochs, batch_size: as in `model.fit` (L2W takes two half-batch steps per batch). For a
            method with phases, `epochs` is phase I (IMTA: phase II adds `phase2_epochs`).
        learning_rate: initial SGD learning rate; None means the papers' rule
            0.1 * batch_size / 64.
        schedule: `cosine` (per iteration, the papers' choice), `step` (x0.1 at 50% and
            75% of training) or `constant`.
        momentum, nesterov, weight_decay: SGD settings (papers: 0.9, False, 1e-4).
        seed: seeds data splits, shuffling, augmentation and initialization.
        confidence: confidence measure for calibration (`max_softmax`, `margin`, `entropy`).
        budgets: Mul-Add budgets logged by `BudgetCallback` each epoch (e.g. [15e6]).
        evaluate: run the budget evaluation after training.
        dump_dtype: dtype of the saved logits (`float32` or `float16`).
    """

    dataset: str = "digits"
    data_dir: str | None = None
    val_size: int | None = None
    imbalance_factor: int | None = None
    train_size: int | None = None
    meta_split_size: int | None = None
    model: str = "multiexit_cnn"
    model_options: dict = dataclasses.field(default_factory=dict)
    method: str = "l2w"
    method_options: dict = dataclasses.field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float | None = None
    schedule: str = "cosine"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    seed: int = 0
    confidence: str = "max_softmax"
    budgets: list = dataclasses.field(default_factory=list)
    evaluate: bool = True
    dump_dtype: str = "float32"

    def __post_init__(self):
        def bad(field, expected):
            value = getattr(self, field)
            raise ValueError(f"config `{field}` must be {expected}; received {value!r} ({type(value).__name__}).")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for field in ("dataset", "model", "method", "schedule", "confidence", "dump_dtype"):
            if not isinstance(getattr(self, field), str):
                bad(field, "a string")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            bad("data_dir", "a folder path (string) or None")
        for field in ("nesterov", "evaluate"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "true or false")
        if not is_int(self.epochs) or self.epochs < 1:
            bad("epochs", "a positive integer")
        if not is_int(self.batch_size) or self.batch_size < 2:
            bad("batch_size", "an integer >= 2")
        if not is_int(self.seed):
            bad("seed", "an integer")
        for field in ("val_size", "train_size", "meta_split_size"):
            v = getattr(self, field)
            if v is not None and not (is_int(v) and v >= 1 or is_number(v) and isinstance(v, float) and 0 < v < 1):
                bad(field, "a positive integer count, a fraction in (0, 1), or None")
        if self.imbalance_factor is not None and not (is_number(self.imbalance_factor) and self.imbalance_factor >= 1):
            bad("imbalance_factor", "a number >= 1 (200, 100, 50, 20) or None")
        if self.learning_rate is not None and not (is_number(self.learning_rate) and self.learning_rate > 0):
            bad("learning_rate", "a positive number or None")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}")
        if not is_number(self.momentum) or not 0 <= self.momentum < 1:
            bad("momentum", "a number in [0, 1)")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "a number >= 0")
        if self.confidence not in CONFIDENCES:
            bad("confidence", f"one of {CONFIDENCES}")
        if self.dump_dtype not in ("float32", "float16"):
            bad("dump_dtype", "'float32' or 'float16'")
        if not isinstance(self.model_options, dict):
            bad("model_options", "a dict")
        if not isinstance(self.method_options, dict):
            bad("method_options", "a dict")
        if not isinstance(self.budgets, list) or any(not is_number(b) or b <= 0 for b in self.budgets):
            bad("budgets", "a list of positive, finite Mul-Add counts")

    @property
    def initial_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else 0.1 * self.batch_size / 64

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}.")
        return cls(**values)

    def to_json(self, path) -> None:
        from keras_ee.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        """Read a `.json` or `.toml` config file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
        try:
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not a text file ({e.reason}).") from None
        if path.suffix == ".toml":
            import tomllib

            try:
                values = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {str(path)!r} is not valid TOML ({e}).") from None
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"config file {str(path)!r} is not valid JSON ({e}); use .json or .toml.") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of settings; received {type(values).__name__}.")
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as e:
            raise ValueError(f"config file {str(path)!r}: {e}") from None

    def differences(self, other: "TrainConfig") -> dict:
        """Keys whose values differ: {key: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}
