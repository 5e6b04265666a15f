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
        model: a preset of `keras_ee.models.available()`.
        model_options: keyword overrides for the preset (widths, blocks, ...).
        method: training method, `baseline` or `l2w`.
        method_options: keyword arguments of the method (`q`, `delta`, ...).
        epochs, batch_size: as in `model.fit` (L2W takes two half-batch steps per batch).
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
            raise ValueError(f"config `{field}` must be {expected}; received {getattr(self, field)!r}.")

        if not isinstance(self.epochs, int) or self.epochs < 1:
            bad("epochs", "a positive integer")
        if not isinstance(self.batch_size, int) or self.batch_size < 2:
            bad("batch_size", "an integer >= 2")
        if self.learning_rate is not None and not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            bad("learning_rate", "a positive number or None")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}")
        if not 0 <= self.momentum < 1:
            bad("momentum", "in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", ">= 0")
        if self.dump_dtype not in ("float32", "float16"):
            bad("dump_dtype", "'float32' or 'float16'")
        if not isinstance(self.model_options, dict):
            bad("model_options", "a dict")
        if not isinstance(self.method_options, dict):
            bad("method_options", "a dict")
        if any((not isinstance(b, (int, float))) or b <= 0 for b in self.budgets):
            bad("budgets", "a list of positive Mul-Add counts")

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
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_file(cls, path) -> "TrainConfig":
        """Read a `.json` or `.toml` config file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
        text = path.read_text()
        if path.suffix == ".toml":
            import tomllib

            values = tomllib.loads(text)
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"config file {str(path)!r} is not valid JSON ({e}); use .json or .toml.") from e
        if not isinstance(values, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping of settings; received {type(values).__name__}.")
        return cls.from_dict(values)

    def differences(self, other: "TrainConfig") -> dict:
        """Keys whose values differ: {key: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}
