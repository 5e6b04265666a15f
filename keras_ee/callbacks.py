"""Keras callbacks for multi-exit training.

`BudgetCallback` puts budgeted-batch accuracy into the training logs, so that
`EarlyStopping`, `ModelCheckpoint`, keras-tuner and TensorBoard can use it like any
other metric.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TextIO

import keras
import numpy as np
import numpy.typing as npt

from keras_ee import calibration
from keras_ee.costs import exit_costs
from keras_ee.evaluation import accuracy_at, mean_accuracy_over, predict_exit_logits, scores_and_correct
from keras_ee.formatting import budget_label


def _exit_costs(model: keras.Model) -> list[int]:
    backbone = getattr(model, "backbone", model)
    return exit_costs(backbone)["mul_adds"]


class BudgetCallback(keras.callbacks.Callback):
    """Budgeted-batch accuracy on validation data, written into the epoch logs.

    At the end of every `every`-th epoch it computes every exit's validation logits,
    calibrates thresholds with the Rust calibrator over the default budget sweep
    (q = p/20, p = 1..39) and scores the same validation set with them. It adds

    - `val_budget_acc@<B>` for each requested Mul-Add budget B (e.g. `val_budget_acc@15M`),
      interpolated on the budget curve (NaN outside the curve's cost range);
    - `val_budget_auc`: the mean accuracy over the swept cost range (area under the
      accuracy-versus-Mul-Adds curve divided by the range);
    - `val_anytime_acc_<k>`: the accuracy of each exit on its own.

    Put it before `TensorBoard`/`CSVLogger`/`EarlyStopping` in the callback list: Keras
    passes one `logs` dict along the list, so later callbacks see these keys.

    Args:
        validation_data: a batched `tf.data.Dataset` (or any iterable) of `(x, y)`.
        budgets: Mul-Add budgets (numbers), e.g. `[15e6, 30e6]`; may be empty.
        every: run every `every` epochs; in the other epochs the keys hold NaN, so
            `CSVLogger` keeps one set of columns (`EarlyStopping` treats NaN as no
            improvement: scale its `patience` by `every`).
        kind: confidence measure passed to `calibration.exit_scores`.
        costs: cumulative Mul-Adds per exit; default `keras_ee.costs.exit_costs(model)`.
        qs: budget parameters; default the standard sweep.
        shortfall: the calibrator's rule when ties leave an exit fewer samples than its
            quota (`reference`, MSDNet's code, or `exit_all`; see
            `keras_ee.calibration.calibrate`).

    Example:

        cb = BudgetCallback(val_ds, budgets=[15e6, 30e6])
        model.fit(train_ds, epochs=10, callbacks=[cb, keras.callbacks.TensorBoard("logs")])
    """

    def __init__(
        self,
        validation_data: Iterable[Any],
        budgets: Iterable[float] = (),
        every: int = 1,
        kind: str = "max_softmax",
        costs: Sequence[float] | None = None,
        qs: npt.ArrayLike | None = None,
        shortfall: calibration.Shortfall = "reference",
    ) -> None:
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"`every` must be a positive number of epochs; received {every!r}.")
        budgets = [float(b) for b in budgets]
        if any(not np.isfinite(b) or b <= 0 for b in budgets):
            raise ValueError(f"`budgets` must be positive, finite Mul-Add counts; received {budgets}.")
        self.validation_data = validation_data
        self.budgets = budgets
        self.every = int(every)
        self.kind = kind
        self.costs = None if costs is None else [float(c) for c in costs]
        self.qs = qs
        self.shortfall = shortfall
        self.last_sweep: calibration.BudgetSweep | None = None
        self._keys: dict[str, float] | None = None

    def compute(self) -> dict[str, float]:
        """The log entries for the model's current weights."""
        logits, labels = predict_exit_logits(self.model, self.validation_data)
        costs = self.costs if self.costs is not None else _exit_costs(self.model)
        if len(costs) != logits.shape[0]:
            raise ValueError(f"BudgetCallback got {len(costs)} exit costs for a model with {logits.shape[0]} exits.")
        scores, correct = scores_and_correct(logits, labels, self.kind)
        sweep = calibration.budget_sweep(
            scores, correct, scores, correct, np.asarray(costs, np.float64), qs=self.qs, shortfall=self.shortfall
        )
        self.last_sweep = sweep
        x, y = sweep["mean_cost"], sweep["val_accuracy"]
        logs = {
            f"val_budget_acc@{budget_label(b)}": float(a) for b, a in zip(self.budgets, accuracy_at(x, y, self.budgets))
        }
        logs["val_budget_auc"] = mean_accuracy_over(x, y, float(np.min(x)), float(np.max(x)))
        if not np.isfinite(logs["val_budget_auc"]):  # a single-point curve (e.g. one exit)
            logs["val_budget_auc"] = float(np.mean(y))
        for k, acc in enumerate(calibration.anytime_accuracy(correct)):
            logs[f"val_anytime_acc_{k + 1}"] = float(acc)
        return logs

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is None:
            return
        if (epoch + 1) % self.every == 0:
            self._keys = self.compute()
            logs.update(self._keys)
        elif self._keys is not None:
            logs.update({k: float("nan") for k in self._keys})
        else:  # before the first computation: the keys are known without running the model
            keys = [f"val_budget_acc@{budget_label(b)}" for b in self.budgets] + ["val_budget_auc"]
            backbone: keras.Model = getattr(self.model, "backbone", self.model)
            keys += [f"val_anytime_acc_{k + 1}" for k in range(len(backbone.outputs))]
            logs.update({k: float("nan") for k in keys})


class EpochProgress(keras.callbacks.Callback):
    """A compact progress bar per epoch and one summary line after it.

    Keras' own bar prints every log key (dozens for a multi-exit model with per-exit
    weight statistics); this one shows the loss while training and then the accuracy
    of every exit on training and validation data, which is what one watches.
    Use it with `fit(..., verbose=0)`. `label` (e.g. "phase_2 (2/2)", set by
    `keras-ee train` for multi-phase methods) prefixes the bar and the line.
    """

    def __init__(self, stream: TextIO | None = None, label: str | None = None) -> None:
        super().__init__()
        self.stream = stream
        self.label = label
        self._bar: Any = None  # a tqdm bar while an epoch runs

    def _prefix(self, epoch: int) -> str:
        text = f"epoch {epoch + 1}/{self.epochs}"
        return f"{self.label} {text}" if self.label else text

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.epochs = self.params.get("epochs")
        self.steps = self.params.get("steps")

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        from tqdm.auto import tqdm

        self._epoch = epoch
        self._bar = tqdm(
            total=self.steps, desc=self._prefix(epoch), unit="batch", leave=False, file=self.stream, dynamic_ncols=True
        )

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(1)
            if logs and "loss" in logs:
                self._bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        import sys

        elapsed = self._bar.format_dict.get("elapsed", 0.0) if self._bar is not None else 0.0
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        logs = logs or {}

        def accs(prefix: str) -> str:
            values, k = [], 1
            while f"{prefix}exit_{k}_accuracy" in logs:
                values.append(f"{100 * float(logs[f'{prefix}exit_{k}_accuracy']):.1f}")
                k += 1
            return "/".join(values)

        parts = [self._prefix(epoch), f"loss {float(logs.get('loss', float('nan'))):.4f}", f"train acc % {accs('')}"]
        if "val_exit_1_accuracy" in logs:
            parts.append(f"val acc % {accs('val_')}")
        if "val_budget_auc" in logs:
            parts.append(f"val budget auc {100 * float(logs['val_budget_auc']):.2f}")
        parts.append(f"{elapsed:.1f}s")
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)
