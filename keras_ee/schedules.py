"""Learning-rate schedules as the papers' own training code computes them.

Keras evaluates a schedule at the optimizer's iteration count, one per optimizer step. The
papers' code sets the learning rate once per loaded batch (`adjust_learning_rate(optimizer,
epoch, args, batch=i, nBatch=len(train_loader))` before the batch's steps), so a method that
takes several optimizer steps per batch (L2W's half-batch exchange, the budget-aware code's two
half-batch steps) takes all of them at the batch's rate; and the step decay of MSDNet's and
IMTA's code changes the rate only at epoch boundaries. These schedules take the optimizer
steps per batch and per epoch and compute exactly that:

- `StepDecayPerEpoch`: x0.1 from epoch `0.5 E`, x0.01 from epoch `0.75 E` (`--lr-type multistep`
  on CIFAR in MSDNet-PyTorch's `main.py` and IMTA's `main_GE.py` / `main_IMTA.py`), constant
  within an epoch.
- `CosinePerBatch`: `0.5 lr (1 + cos(pi t / T))` at loaded batch t of T (L2W-DEN's
  `tools/utils.py` `adjust_learning_rate`, MSDNet-PyTorch's `--lr-type cosine`); with a warm-up
  and a final rate, the budget-aware code's per-iteration arrays (gphi_MSDNet's
  `utils.cosine_scheduler`, as BEiT's and ConvNeXt's): `np.linspace(0, lr, W)` over the first W
  batches, then `final + 0.5 (lr - final) (1 + cos(pi i / (T - W)))`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
from keras import ops

from keras_ee import validation as v
from keras_ee.config import WARMUP_SCHEDULES

if TYPE_CHECKING:
    from keras_ee.config import TrainConfig


def _batch_index(step: Any, steps_per_batch: int) -> Any:
    # The loaded batch an optimizer step belongs to (float64: exact for any realistic count).
    return ops.floor(ops.cast(step, "float64") / float(steps_per_batch))


@keras.saving.register_keras_serializable(package="keras_ee")
class StepDecayPerEpoch(keras.optimizers.schedules.LearningRateSchedule):
    """`initial_learning_rate * factor ** k` in epoch e, k the number of `milestones` m with
    `e >= m * epochs`; the epoch of optimizer step s is `s // steps_per_epoch`.

    With the defaults, MSDNet-PyTorch's and IMTA's `--lr-type multistep` on CIFAR (x0.1 from
    epoch 0.5 E, x0.01 from 0.75 E).

    Args:
        initial_learning_rate: float.
        steps_per_epoch: optimizer steps per epoch (batches x the method's steps per batch).
        epochs: E, the epochs the schedule spans.
        milestones: fractions of E (increasing).
        factor: the decay at each milestone.

    Example:
    ```python
    lr = StepDecayPerEpoch(0.1, steps_per_epoch=782, epochs=300)  # 0.01 from epoch 150
    ```
    """

    def __init__(
        self,
        initial_learning_rate: float,
        steps_per_epoch: int,
        epochs: int,
        milestones: Sequence[float] = (0.5, 0.75),
        factor: float = 0.1,
    ) -> None:
        self.initial_learning_rate = float(initial_learning_rate)
        self.steps_per_epoch = v.check_int("steps_per_epoch", steps_per_epoch, 1, where="StepDecayPerEpoch: ")
        self.epochs = v.check_int("epochs", epochs, 1, where="StepDecayPerEpoch: ")
        self.milestones = [float(m) for m in milestones]
        if any(b < a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"StepDecayPerEpoch: `milestones` must increase, received {list(milestones)}.")
        self.factor = float(factor)

    def __call__(self, step: Any) -> Any:
        epoch = _batch_index(step, self.steps_per_epoch)
        lr = ops.convert_to_tensor(self.initial_learning_rate, "float64")
        # As their code: `if epoch >= E * 0.75: lr *= 0.1 ** 2 elif epoch >= E * 0.5: lr *= 0.1`
        # (the milestones increase, so the last one reached decides).
        for k, milestone in enumerate(self.milestones, start=1):
            lr = ops.where(
                ops.greater_equal(epoch, self.epochs * milestone), self.initial_learning_rate * self.factor**k, lr
            )
        return ops.cast(lr, "float32")

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
            "milestones": list(self.milestones),
            "factor": self.factor,
        }


@keras.saving.register_keras_serializable(package="keras_ee")
class CosinePerBatch(keras.optimizers.schedules.LearningRateSchedule):
    """A cosine decay over loaded batches, every optimizer step of a batch at the batch's rate,
    after an optional linear warm-up (`np.linspace(0, lr, warmup_batches)`).

    At batch t of `total_batches` T (optimizer step s is in batch `s // steps_per_batch`; past
    the end, the last batch's rate), with W = `warmup_batches`:
    `lr * t / (W - 1)` for t < W (0 for W = 1), else
    `final + 0.5 (lr - final) (1 + cos(pi (t - W) / (T - W)))`.

    Args:
        initial_learning_rate: float, the peak rate lr.
        total_batches: T.
        steps_per_batch: optimizer steps per loaded batch (the method's).
        warmup_batches: W (< T).
        final_learning_rate: the rate the cosine ends at (gphi_MSDNet's `--min_lr`).

    Example:
    ```python
    lr = CosinePerBatch(0.1, total_batches=300 * 782, steps_per_batch=2)  # L2W-DEN
    ```
    """

    def __init__(
        self,
        initial_learning_rate: float,
        total_batches: int,
        steps_per_batch: int = 1,
        warmup_batches: int = 0,
        final_learning_rate: float = 0.0,
    ) -> None:
        self.initial_learning_rate = float(initial_learning_rate)
        self.total_batches = v.check_int("total_batches", total_batches, 1, where="CosinePerBatch: ")
        self.steps_per_batch = v.check_int("steps_per_batch", steps_per_batch, 1, where="CosinePerBatch: ")
        self.warmup_batches = v.check_int("warmup_batches", warmup_batches, 0, where="CosinePerBatch: ")
        if self.warmup_batches >= self.total_batches:
            raise ValueError(
                f"CosinePerBatch: `warmup_batches` ({warmup_batches}) must be smaller than "
                f"`total_batches` ({total_batches})."
            )
        self.final_learning_rate = float(final_learning_rate)

    def __call__(self, step: Any) -> Any:
        lr, final = self.initial_learning_rate, self.final_learning_rate
        w, t_total = self.warmup_batches, self.total_batches
        t = ops.minimum(_batch_index(step, self.steps_per_batch), float(t_total - 1))
        cosine = final + 0.5 * (lr - final) * (1.0 + ops.cos(math.pi * (t - w) / float(t_total - w)))
        if w == 0:
            return ops.cast(cosine, "float32")
        warmup = t * (lr / (w - 1)) if w > 1 else ops.zeros_like(t)
        return ops.cast(ops.where(ops.less(t, float(w)), warmup, cosine), "float32")

    def get_config(self) -> dict[str, Any]:
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "total_batches": self.total_batches,
            "steps_per_batch": self.steps_per_batch,
            "warmup_batches": self.warmup_batches,
            "final_learning_rate": self.final_learning_rate,
        }


def make_schedule(
    config: TrainConfig,
    total_steps: int,
    learning_rate: float | None = None,
    warmup_steps: int = 0,
    steps_per_epoch: int | None = None,
    steps_per_batch: int = 1,
) -> Any:
    """The learning-rate schedule of `config.schedule` over `total_steps` optimizer iterations
    (from `learning_rate`, default the run's).

    `steps_per_epoch` (optimizer steps per epoch) and `steps_per_batch` (the method's optimizer
    steps per loaded batch) place the epochs and batches of `step_per_epoch` and
    `cosine_per_batch` (`keras_ee.schedules`); the others count optimizer steps only. With
    `warmup_steps` (optimizer steps), a linear warm-up from 0 first: Keras' `CosineDecay`
    warm-up for `cosine` and `constant` (a cosine with `alpha=1`), the budget-aware code's for
    `cosine_per_batch`. The step schedules have no warm-up (the config refuses one).
    """
    lr = config.initial_learning_rate if learning_rate is None else learning_rate
    if warmup_steps > 0 and config.schedule not in WARMUP_SCHEDULES:
        raise ValueError(
            f"config `warmup_epochs` must be 0 with schedule {config.schedule!r}; warm-up works with "
            f"{', '.join(WARMUP_SCHEDULES)}."
        )
    if config.schedule in ("step_per_epoch", "cosine_per_batch"):
        if steps_per_epoch is None or steps_per_epoch < 1 or total_steps % steps_per_epoch:
            raise ValueError(
                f"schedule {config.schedule!r} needs the optimizer steps per epoch dividing the total "
                f"{total_steps}; received steps_per_epoch={steps_per_epoch!r}."
            )
        if config.schedule == "step_per_epoch":
            return StepDecayPerEpoch(lr, steps_per_epoch, total_steps // steps_per_epoch)
        if warmup_steps >= total_steps:
            raise ValueError(
                f"config `warmup_epochs` ({config.warmup_epochs}) must be fewer than the epochs of the "
                f"phase ({total_steps // steps_per_epoch}) with schedule 'cosine_per_batch'."
            )
        return CosinePerBatch(
            lr,
            total_batches=max(1, total_steps // steps_per_batch),
            steps_per_batch=steps_per_batch,
            warmup_batches=warmup_steps // steps_per_batch,
            final_learning_rate=config.min_learning_rate,
        )
    if warmup_steps > 0:
        return keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps=max(1, total_steps - warmup_steps),
            alpha=1.0 if config.schedule == "constant" else 0.0,
            warmup_target=lr,
            warmup_steps=warmup_steps,
        )
    if config.schedule == "constant":
        return lr
    if config.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total_steps))
    bounds = [max(1, int(total_steps * 0.5)), max(2, int(total_steps * 0.75))]
    return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, [lr, lr * 0.1, lr * 0.01])
