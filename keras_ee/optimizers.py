"""The papers' optimizers: `torch.optim.SGD`, `Adam` and `AdamW`'s steps, as Keras optimizers.

The early-exit papers (MSDNet, IMTA, L2W-DEN, the budget-aware gater) train with PyTorch's
optimizers, whose steps differ from Keras' in ways that change training:

- `SGD(weight_decay=wd)` adds `wd * p` to the gradient *before* momentum (L2, coupled, on
  every parameter: BatchNorm scales and shifts and biases included). Keras' `SGD` decays the
  weights apart from momentum (decoupled): at momentum 0.9 about 10x less regularisation at
  steady state than the papers'.
- PyTorch's momentum buffer holds gradients (`v <- mu v + g`, `p <- p - lr v`; Nesterov
  `p <- p - lr (g + mu v)`), the learning rate applied when it is used; Keras' holds
  learning-rate-scaled steps. They differ whenever the learning rate changes (every
  iteration under a cosine schedule).
- `Adam` adds its epsilon (1e-8) to the bias-corrected `sqrt(v_hat)`
  (`p <- p - lr m_hat / (sqrt(v_hat) + eps)`); Keras adds its (1e-7) before the bias
  correction, which makes the first steps on tiny gradients smaller. `Adam(weight_decay=)`
  is coupled L2 (L2W-DEN's weight-predicting network: `Adam(lr=1e-4, weight_decay=1e-4)`);
  `AdamW` decays decoupled, `p <- p (1 - lr wd)` before the Adam step (timm, the
  budget-aware paper's code).

Each class here is a `keras.optimizers.Optimizer` that takes exactly PyTorch's step (checked
against `torch.optim` in float64, `tests/test_optimizers.py`). Keras' own decoupled weight
decay is never applied on top: the base class gets `weight_decay=None` behaviour and the
decay is part of the step. `exclude_from_weight_decay` still works (the AdamW of
`make_optimizer` excludes rank <= 1 variables, as timm). They work with
learning-rate schedules, `use_ema`, `LossScaleOptimizer`, `tf.distribute` and saving.

Each step is written once, in `next_values` (a pure function of the variable's value, its
gradient, the learning rate and the optimizer's buffers): `update_step` assigns its result
and `keras_ee.training.core.lookahead_step` (the bilevel methods' look-ahead) differentiates
through it without assigning anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras
from keras import ops

from keras_ee import validation
from keras_ee._typing import Tensor
from keras_ee.schedules import make_schedule

if TYPE_CHECKING:
    from keras_ee.config import TrainConfig

SEMANTICS = "pytorch"  # what a run records for these (Keras' own optimizers: "keras")


def _constant(value: float, dtype: str) -> Tensor:
    """A Python float as a tensor of `dtype`, rounded once (`ops.cast` would round via float32)."""
    return ops.convert_to_tensor(value, dtype)


class PyTorchOptimizer(keras.optimizers.Optimizer):
    """Base of the PyTorch-semantics optimizers: their weight decay is part of `next_values`.

    Subclasses define `slots(variable)` (their buffers for `variable`) and `next_values`.
    """

    semantics = SEMANTICS

    def __init__(self, learning_rate: Any, weight_decay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=None, **kwargs)
        # Set after the base: Keras' decoupled `_apply_weight_decay` is disabled below, so this
        # value is only read by `next_values` (and `get_config`).
        self.weight_decay = validation.check_number(
            "weight_decay", 0.0 if weight_decay is None else weight_decay, low=0.0
        )

    def _apply_weight_decay(self, variables: Sequence[keras.Variable]) -> None:
        """Nothing: the decay is in the step (`next_values`), as PyTorch's."""

    def decays(self, variable: keras.Variable) -> bool:
        """Whether `variable` gets weight decay (not excluded by `exclude_from_weight_decay`)."""
        return bool(self.weight_decay) and self._use_weight_decay(variable)

    def slots(self, variable: keras.Variable) -> list[keras.Variable]:
        raise NotImplementedError

    def next_values(
        self,
        variable: keras.Variable,
        value: Tensor,
        gradient: Tensor,
        learning_rate: Tensor,
        slots: Sequence[Tensor],
        sqrt: Callable[[Tensor], Tensor] = ops.sqrt,
    ) -> tuple[Tensor, list[Tensor]]:
        """`(new value, new buffers)` after one step; pure (nothing assigned).

        `slots` are the current values of `self.slots(variable)`; `sqrt` lets the look-ahead
        substitute a square root with a finite derivative at 0.
        """
        raise NotImplementedError

    def update_step(self, gradient: Tensor, variable: keras.Variable, learning_rate: Tensor) -> None:
        slots = self.slots(variable)
        new_value, new_slots = self.next_values(variable, variable, gradient, learning_rate, slots)
        for slot, new in zip(slots, new_slots):
            self.assign(slot, new)
        self.assign(variable, new_value)


@keras.saving.register_keras_serializable(package="keras_ee")
class SGD(PyTorchOptimizer):
    """`torch.optim.SGD`'s step (dampening 0), the optimizer of the early-exit papers.

    Per variable `p` with gradient `g`, learning rate `lr` (from the schedule, now):

        g <- g + weight_decay * p          (coupled L2, every variable)
        v <- momentum * v + g              (v starts at 0: the first step has v = g)
        p <- p - lr * v                    (nesterov: p <- p - lr * (g + momentum * v))

    The momentum buffer holds gradients, not learning-rate-scaled steps as Keras' `SGD`
    (whose weight decay is also decoupled). MSDNet ("Multi-Scale Dense Networks for Resource
    Efficient Image Classification", ICLR 2018), IMTA ("Improved Techniques for Training
    Adaptive Deep Networks", ICCV 2019) and L2W-DEN ("Learning to Weight Samples for Dynamic
    Early-exiting Networks", ECCV 2022) all train with `SGD(lr, momentum=0.9,
    weight_decay=1e-4)`.

    Args:
        learning_rate: a float, a `keras.optimizers.schedules.LearningRateSchedule` or a callable.
        momentum: in [0, 1).
        weight_decay: L2 coefficient added to the gradient (>= 0).
        nesterov: Nesterov momentum, as PyTorch's.
        **kwargs: the base `keras.optimizers.Optimizer` arguments (clipnorm, use_ema, ...).
    """

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name or "sgd", **kwargs)
        self.momentum = validation.check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        nesterov = validation.check_bool("nesterov", nesterov)
        if nesterov and self.momentum == 0:
            raise ValueError("`nesterov=True` needs a momentum > 0 (as torch.optim.SGD).")
        self.nesterov = nesterov

    def build(self, variables: Sequence[keras.Variable]) -> None:
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum") if self.momentum else []

    def slots(self, variable: keras.Variable) -> list[keras.Variable]:
        return [self.momentums[self._get_variable_index(variable)]] if self.momentum else []

    def next_values(self, variable, value, gradient, learning_rate, slots, sqrt=ops.sqrt):  # type: ignore[no-untyped-def]
        dtype = variable.dtype
        g = ops.cast(gradient, dtype)
        lr = ops.cast(learning_rate, dtype)
        if self.decays(variable):
            g = g + value * _constant(self.weight_decay, dtype)
        if not self.momentum:
            return value - g * lr, []
        mu = _constant(self.momentum, dtype)
        v = slots[0] * mu + g
        step = g + v * mu if self.nesterov else v
        return value - step * lr, [v]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"momentum": self.momentum, "nesterov": self.nesterov})
        return config


@keras.saving.register_keras_serializable(package="keras_ee")
class Adam(PyTorchOptimizer):
    """`torch.optim.Adam`'s step: coupled L2 weight decay, epsilon after the bias correction.

    Per variable `p` with gradient `g` at step `t` (1-based):

        g <- g + weight_decay * p                                 (coupled L2)
        m <- beta_1 m + (1 - beta_1) g;  v <- beta_2 v + (1 - beta_2) g^2
        (amsgrad: v_max <- max(v_max, v), used for v below)
        p <- p - lr / (1 - beta_1^t) * m / (sqrt(v) / sqrt(1 - beta_2^t) + epsilon)

    Keras' `Adam` adds epsilon to `sqrt(v)` before the bias correction, and its
    `weight_decay` is decoupled. L2W-DEN ("Learning to Weight Samples for Dynamic
    Early-exiting Networks", ECCV 2022) trains its weight-predicting network with
    `torch.optim.Adam(lr=1e-4, weight_decay=1e-4)`.
    """

    decoupled = False

    def __init__(
        self,
        learning_rate: Any = 0.001,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name or type(self).__name__.lower(), **kwargs
        )
        self.beta_1 = validation.check_number("beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        self.beta_2 = validation.check_number("beta_2", beta_2, low=0.0, high=1.0, high_open=True)
        self.epsilon = validation.check_number("epsilon", epsilon, low=0.0)
        amsgrad = validation.check_bool("amsgrad", amsgrad)
        self.amsgrad = amsgrad

    def build(self, variables: Sequence[keras.Variable]) -> None:
        if self.built:
            return
        super().build(variables)
        self._momentums, self._velocities = self.add_optimizer_variables(variables, ["momentum", "velocity"])
        self._velocity_hats = self.add_optimizer_variables(variables, "velocity_hat") if self.amsgrad else []

    def slots(self, variable: keras.Variable) -> list[keras.Variable]:
        i = self._get_variable_index(variable)
        return [self._momentums[i], self._velocities[i]] + ([self._velocity_hats[i]] if self.amsgrad else [])

    def next_values(self, variable, value, gradient, learning_rate, slots, sqrt=ops.sqrt):  # type: ignore[no-untyped-def]
        dtype = variable.dtype
        g = ops.cast(gradient, dtype)
        lr = ops.cast(learning_rate, dtype)
        if self.decays(variable):
            wd = _constant(self.weight_decay, dtype)
            if self.decoupled:
                value = value * (1 - lr * wd)
            else:
                g = g + value * wd
        t = ops.cast(self.iterations + 1, dtype)
        b1 = _constant(self.beta_1, dtype)
        b2 = _constant(self.beta_2, dtype)
        m = slots[0] + (g - slots[0]) * (1 - b1)
        v = slots[1] * b2 + ops.square(g) * (1 - b2)
        new_slots = [m, v]
        if self.amsgrad:
            v = ops.maximum(slots[2], v)
            new_slots.append(v)
        step_size = lr / (1 - ops.power(b1, t))
        denom = sqrt(v) / ops.sqrt(1 - ops.power(b2, t)) + _constant(self.epsilon, dtype)
        return value - m * step_size / denom, new_slots

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"beta_1": self.beta_1, "beta_2": self.beta_2, "epsilon": self.epsilon, "amsgrad": self.amsgrad})
        return config


@keras.saving.register_keras_serializable(package="keras_ee")
class AdamW(Adam):
    """`torch.optim.AdamW`'s step: `p <- p (1 - lr weight_decay)`, then `Adam`'s (PyTorch's epsilon).

    The decay is decoupled (not in the gradient) as Keras' `AdamW`, but epsilon is added to
    the bias-corrected `sqrt(v_hat)` as PyTorch's (and timm's, which the budget-aware paper,
    "Balancing Accuracy and Efficiency in Budget-Aware Early-Exiting Neural Networks",
    trains with). Default weight decay 0.01, PyTorch's.
    """

    decoupled = True

    def __init__(self, learning_rate: Any = 0.001, weight_decay: float = 0.01, **kwargs: Any) -> None:
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, **kwargs)


OPTIMIZERS: dict[str, type[PyTorchOptimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def optimizer_semantics(optimizer: keras.optimizers.Optimizer) -> str:
    """`"pytorch"` for the optimizers of this module (also inside a `LossScaleOptimizer`), else `"keras"`."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return SEMANTICS if isinstance(optimizer, PyTorchOptimizer) else "keras"


# PyTorch's AdamW epsilon (Keras' default is 1e-7), as the budget-aware paper's timm recipe.
ADAMW_EPSILON = 1e-8


def make_optimizer(
    config: TrainConfig,
    steps: int,
    variables: Sequence[keras.Variable] = (),
    overrides: dict[str, Any] | None = None,
    warmup_steps: int = 0,
    steps_per_epoch: int | None = None,
    steps_per_batch: int = 1,
) -> keras.optimizers.Optimizer:
    """The run's optimizer for `steps` optimizer steps (the first `warmup_steps` a linear warm-up).

    `config.optimizer`: `sgd` (the papers': `keras_ee.optimizers.SGD`, PyTorch's step with
    momentum, nesterov and coupled L2 weight decay on every variable) or `adamw`
    (`keras_ee.optimizers.AdamW`, PyTorch's AdamW, epsilon 1e-8, no weight decay on
    `variables` of rank <= 1: biases, BatchNorm scales and shifts, as timm); `keras_sgd` and
    `keras_adamw` are Keras' `SGD` and `AdamW` with the same settings (decoupled decay).
    `steps_per_epoch` and `steps_per_batch` place the epochs and batches of the schedule
    (`make_schedule`). `config.recipe.ema` adds the optimizer's weight average (`use_ema`, `ema_momentum`; no
    overwriting during training: Keras' `fit` writes the average into the weights when it
    ends). `overrides` are a phase's `optimizer_options`.
    """
    settings = {
        "learning_rate": config.initial_learning_rate,
        "momentum": config.momentum,
        "nesterov": config.nesterov,
        "weight_decay": config.weight_decay,
        **(overrides or {}),
    }
    schedule = make_schedule(
        config,
        steps,
        settings["learning_rate"],
        warmup_steps=warmup_steps,
        steps_per_epoch=steps_per_epoch,
        steps_per_batch=steps_per_batch,
    )
    ema: dict[str, Any] = {"use_ema": True, "ema_momentum": float(config.recipe.ema)} if config.recipe.ema else {}
    weight_decay = float(settings["weight_decay"])
    optimizer: keras.optimizers.Optimizer
    if config.optimizer in ("adamw", "keras_adamw"):
        adamw = AdamW if config.optimizer == "adamw" else keras.optimizers.AdamW
        optimizer = adamw(learning_rate=schedule, weight_decay=weight_decay, epsilon=ADAMW_EPSILON, **ema)
        optimizer.exclude_from_weight_decay(var_list=[v for v in variables if len(v.shape) <= 1])
        return optimizer
    if config.optimizer == "sgd":
        return SGD(
            learning_rate=schedule,
            momentum=float(settings["momentum"]),
            nesterov=settings["nesterov"],
            weight_decay=weight_decay,
            **ema,
        )
    return keras.optimizers.SGD(
        learning_rate=schedule,
        momentum=settings["momentum"],
        nesterov=settings["nesterov"],
        weight_decay=weight_decay or None,
        **ema,
    )


# The methods' auxiliary optimizers whose default became PyTorch's step: option -> {name: Keras' own}.
KERAS_AUXILIARY_OPTIMIZERS = {
    "wpn_optimizer": {"adam": "keras_adam"},  # L2W's weight-predicting network
    "gater_optimizer": {"adamw": "keras_adamw", "adam": "keras_adam", "sgd": "keras_sgd"},  # gating
}
