"""Budget-aware early exiting: a learned gater, a cost weight lambda, bi-level training.

Implements "Balancing Accuracy and Efficiency in Budget-Aware Early-Exiting Neural
Networks" (Addad, Lechervy and Jurie, 2024 preprint, HAL hal-04683503; no arXiv id) on
`MultiExitModel`, with the paper's CIFAR settings as defaults and each departure of the
authors' public code as an option.

The pieces (what the paper specifies, section 3):

- A gater: one small MLP per early exit k < K on confidence features `s_k` of exit k's
  prediction (max probability, margin, entropy), sigmoid output `P_k`, "the probability
  that exit k is confident enough".
- The exit distribution `Pr(1) = P_1`, `Pr(k) = P_k prod_{j<k} (1 - P_j)`,
  `Pr(K) = prod_{j<K} (1 - P_j)` (it sums to 1), sharpened with a temperature T:
  `A_k = Pr(k)^(1/T) / sum_j Pr(j)^(1/T)`. Both are computed in log space from the gater's
  pre-sigmoid outputs (`log P = log_sigmoid(z)`, `log(1 - P) = log_sigmoid(-z)`), so a P
  near 0 or 1 gives no NaN (the code adds 1e-5 inside the logs instead).
- The normalised cost `Cost_k = mul_adds[k] / mul_adds[K]` of the actual model
  (`keras_ee.costs.exit_costs`) and its weight lambda (`cost_weight`).
- Inner (backbone) loss `mean_i sum_k (A_ik + 1)(CE_ik + lambda Cost_k)` (Eq. 4/10): every
  exit keeps a weight of at least 1, and the gater's choice adds more. Cost_k is a
  constant, so lambda reaches the backbone only through dA/dtheta, i.e. through the
  features of the exits' predictions (Eq. 11). With `detach_features=True` that path is
  cut: the backbone's gradient is `(A + 1) dCE/dtheta` and lambda has no effect on it.
- Outer (gater) loss `mean_i sum_k (CE_ik + lambda Cost_k) A_ik` with the backbone fixed
  (Eq. 10/12): the gater learns to put each sample's mass on the exit where its
  cross-entropy plus the price of computing that far is lowest.

Schedule. `gater_update="alternate"` (default): every `gater_interval` loaded batches (10
on CIFAR, 100 on ImageNet) the batch is split in two halves; the backbone takes its step on
the first half, then the gater takes one step on the second half with the (updated)
backbone in inference mode, so the outer step changes the gater only (BatchNorm statistics
untouched). Every other batch is one backbone step on the whole batch.
`gater_update="exchange"` is the authors' code's loop exactly (gphi_MSDNet,
`engine.train_one_epoch`): every loaded batch is split in halves (`torch.chunk`) and the
backbone takes a step on each half in turn, two optimizer steps per batch
(`optimizer_steps_per_batch = 2`, so schedules span them); on the batches whose index within
the epoch is a multiple of `gater_interval` each backbone step is followed by a gater step
on the opposite half, the backbone in inference mode and without gradient. `reference="code"`
selects it, with the code's other settings (see `BudgetAwareGating`).
`gater_update="lookahead"` is the paper's bi-level reading with a one-step look-ahead (as
L2W): on a gater batch the backbone's next step on the first half is taken virtually
(`keras_ee.training.bilevel.LookAhead`: the real optimizer's exact step), the outer loss
is evaluated on the second half through those parameters and differentiated w.r.t. the
gater, the gater steps, then the backbone takes its real step with the updated gater (the
look-ahead's forward is reused). The look-ahead's meta forward runs in training mode (batch
statistics, discarded), as L2W's.

Gater optimizer: AdamW (default), Adam (L2 decay added to the gradient) or SGD with
momentum 0.9, each with PyTorch's step (`keras_ee.optimizers`: the code's timm AdamW, its
epsilon after the bias correction; `keras_adamw`, `keras_adam`, `keras_sgd` are Keras'
own), learning rate `gater_learning_rate` (1e-3) decaying to `gater_final_learning_rate`
(1e-5, the paper; the code: 1e-6) with the main schedule's progress
(`bilevel.follow_main_schedule`), weight decay 1e-4. The paper does not name the
optimizer; the code uses the backbone's family (AdamW in its defaults):
`gater_optimizer="sgd"` next to an SGD backbone is that.
Under `gater_update="exchange"` the main schedule is read at the batch's first iteration, so
both gater steps of a batch take one rate, as the code's per-batch arrays: after a main
cosine without warm-up, exactly the code's gater cosine. The code's gater cosine ignores a
main warm-up; this one stays at `gater_learning_rate` during it.

Inference: the ordinary threshold sweep on the clean hold-out (`keras-ee evaluate`,
geometric or the paper's per-stage mode), and, what neither the paper nor its code has,
the gater's own `P_k` as the confidence score of exit k (`--confidence gater`), calibrated
by the same sweep: `save_artifacts` writes `scores/gater.npz` (validation and test scores
of the run's dump) and `keras-ee train` reports both curves.

Logs per epoch: `exit_k_A_mean` (mean A of exit k on the training batches),
`expected_cost` (mean `sum_k A_k Cost_k`, a fraction of the last exit's Mul-Adds) and
`gater_loss` (the outer loss, mean over the epoch's gater steps).

Special cases (tested): `cost_weight=0` makes both losses pure accuracy terms (the gater
then routes each sample to its lowest-CE exit); `temperature=1` gives `A = Pr`; a very
small T makes A one-hot on the most likely exit.

Early in training the gater puts almost all of A on exit 1 (`exit_1_A_mean` 0.95-1 after an
epoch at CPU scale). That is the method, not this implementation: the authors' own loop
(gphi_MSDNet `engine.train_one_epoch`) and `reference="code"` here, from the same imported
weights on the same CIFAR-100 batches for one epoch, both take exit 1's A from 0.75 (what
T = 0.5 makes of untrained gates, P near 0.5) to 0.965 (theirs) and 0.974 (keras-ee's),
within 0.01 of each other throughout (docs/benchmarks.md, section 16). Whether the 300
epochs of the paper bring the gater out of it is not something a CPU run can show.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_ee import optimizers as ee_optimizers
from keras_ee import validation as v
from keras_ee._typing import Tensor
from keras_ee.training import bilevel, core
from keras_ee.training.methods import Method
from keras_ee.training.registry import SearchRange, register_method

if TYPE_CHECKING:
    from keras_ee.data import DatasetSplits
    from keras_ee.run_folder import RunFolder
    from keras_ee.training.model import MultiExitModel

FEATURES = ("max_prob", "margin", "entropy")
_UPDATES = ("alternate", "lookahead", "exchange")
# adamw, adam, sgd: PyTorch's steps (`keras_ee.optimizers`, the code's timm AdamW); keras_*: Keras' own.
_OPTIMIZERS = ("adamw", "adam", "sgd", "keras_adamw", "keras_adam", "keras_sgd")


def confidence_features(logits: Sequence[Tensor], names: Sequence[str] = ("max_prob", "entropy")) -> Tensor:
    """The gater's inputs: confidence features of each exit's prediction, `(batch, len(logits), F)`.

    `max_prob` is the largest softmax probability, `margin` the largest minus the second
    largest, `entropy` `-sum_c p_c log p_c` (computed as `logsumexp(z) - sum_c p_c z_c`,
    finite for any finite logits). The paper writes the entropy feature as `sum p log p`,
    its negative; the MLP's first layer absorbs the sign. Differentiable in the logits.

    Args:
        logits: list of `(batch, C)` logit tensors (the early exits').
        names: the features, a subset of `FEATURES` in any order.
    """
    columns = []
    for z in logits:
        z = core._as_float32(z)
        p = ops.softmax(z, axis=-1)
        values: dict[str, Tensor] = {}
        if "max_prob" in names or "margin" in names:
            top = ops.top_k(p, 2)[0]
            values["max_prob"] = top[:, 0]
            values["margin"] = top[:, 0] - top[:, 1]
        if "entropy" in names:
            values["entropy"] = ops.logsumexp(z, axis=-1) - ops.sum(p * z, axis=-1)
        columns.append(ops.stack([values[n] for n in names], axis=-1))
    return ops.stack(columns, axis=1)


def exit_distribution(log_p: Tensor, log_not_p: Tensor, temperature: float = 0.5) -> tuple[Tensor, Tensor]:
    """`Pr(k)` (Eq. 5) and the sharpened `A_k` (Eq. 9) from per-gate log probabilities.

    Args:
        log_p: `(batch, K - 1)` `log P_k` of the early exits (may hold -inf for P = 0).
        log_not_p: `(batch, K - 1)` `log(1 - P_k)` (may hold -inf for P = 1).
        temperature: T > 0.

    Returns:
        `(pr, a)`, both `(batch, K)`, each summing to 1 per sample.
    """
    survive = ops.cumsum(log_not_p, axis=1)  # log prod_{j<=k} (1 - P_j)
    # log prod_{j<k} (1 - P_j) as an exclusive sum (not `survive - log_not_p`: -inf - -inf is NaN).
    before = ops.concatenate([ops.zeros_like(survive[:, :1]), survive[:, :-1]], axis=1)
    log_pr = ops.concatenate([log_p + before, survive[:, -1:]], axis=1)
    pr = ops.exp(log_pr)
    a = ops.softmax(log_pr / ops.cast(temperature, log_pr.dtype), axis=1)
    return pr, a


def exit_distribution_from_probabilities(p: Tensor, temperature: float = 0.5) -> tuple[Tensor, Tensor]:
    """`exit_distribution` from gate probabilities `P` `(batch, K - 1)` in [0, 1] (0 and 1 allowed)."""
    p = ops.convert_to_tensor(p)
    return exit_distribution(ops.log(p), ops.log1p(-p), temperature)


def exit_distribution_from_logits(z: Tensor, temperature: float = 0.5) -> tuple[Tensor, Tensor]:
    """`exit_distribution` from the gater's pre-sigmoid outputs `z` `(batch, K - 1)` (stable)."""
    return exit_distribution(ops.log_sigmoid(z), ops.log_sigmoid(-z), temperature)


def _priced(ce: Tensor, relative_costs: Tensor, cost_weight: float) -> Tensor:
    """`CE + lambda Cost`. Python and numpy constants enter in float64 before the cast to CE's dtype
    (`ops.cast(0.1, "float64")` would go through float32: 0.10000000149)."""

    def constant(x: Any) -> Tensor:
        return ops.cast(x if ops.is_tensor(x) else ops.convert_to_tensor(np.asarray(x, np.float64)), ce.dtype)

    return ce + constant(cost_weight) * constant(relative_costs)[None, :]


def inner_loss_terms(ce: Tensor, a: Tensor, relative_costs: Tensor, cost_weight: float) -> Tensor:
    """`(A + 1)(CE + lambda Cost)`, `(batch, K)`: the backbone's per-sample, per-exit loss terms."""
    return (ops.cast(a, ce.dtype) + 1.0) * _priced(ce, relative_costs, cost_weight)


def outer_loss_terms(ce: Tensor, a: Tensor, relative_costs: Tensor, cost_weight: float) -> Tensor:
    """`(CE + lambda Cost) A`, `(batch, K)`: the gater's per-sample, per-exit loss terms."""
    return _priced(ce, relative_costs, cost_weight) * ops.cast(a, ce.dtype)


@keras.saving.register_keras_serializable(package="keras_ee")
class ExitGater(keras.layers.Layer):
    """One MLP per early exit: confidence features of exit k -> the pre-sigmoid `z_k`.

    Args:
        num_gates: K - 1, the early exits.
        num_features: features per exit (1-3).
        depth: hidden layers of each MLP (paper 1).
        width: hidden width (paper 500; the code 100).
        activation: hidden activation (any Keras activation name; the code uses GELU).
        **kwargs: standard layer arguments.

    Example:
    >>> gater = ExitGater(num_gates=3, num_features=2)
    >>> z = gater(features)    # (batch, 3); P = sigmoid(z)
    """

    def __init__(
        self,
        num_gates: int,
        num_features: int,
        depth: int = 1,
        width: int = 500,
        activation: str = "relu",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        v.check_counts(num_gates=num_gates, num_features=num_features)
        self.num_gates = num_gates
        self.num_features = num_features
        self.depth = depth
        self.width = width
        self.activation = activation
        self.gates = [
            bilevel.MLP(
                num_features,
                1,
                depth=depth,
                width=width,
                activation=activation,
                name=f"gate_{k + 1}",
                dtype=self.dtype_policy,
            )
            for k in range(num_gates)
        ]

    def build(self, input_shape: Any = None) -> None:
        for gate in self.gates:
            gate.build((None, self.num_features))
        self.built = True

    def call(self, features: Tensor) -> Tensor:
        return ops.concatenate([gate(features[:, k, :]) for k, gate in enumerate(self.gates)], axis=1)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], self.num_gates)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            num_gates=self.num_gates,
            num_features=self.num_features,
            depth=self.depth,
            width=self.width,
            activation=self.activation,
        )
        return config


def _parse_features(features: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(features, str):
        features = [f.strip() for f in features.replace("+", ",").split(",") if f.strip()]
    if not isinstance(features, (list, tuple)) or not features:
        raise ValueError(f"`features` must be a non-empty list drawn from {FEATURES}; received {features!r}.")
    bad = [f for f in features if f not in FEATURES]
    if bad or len(set(features)) != len(features):
        raise ValueError(f"`features` must be distinct names from {FEATURES}; received {list(features)!r}.")
    return tuple(features)


@register_method(
    "gating",
    summary="budget-aware early exiting: a learned gater routes samples, lambda prices each exit's cost",
    paper="Balancing Accuracy and Efficiency in Budget-Aware Early-Exiting Neural Networks (Addad, Lechervy and "
    "Jurie, 2024 preprint, HAL hal-04683503)",
    search_space={"lambda": SearchRange(0.01, 10.0, "log"), "temperature": SearchRange(0.1, 2.0)},
    option_types={
        "features": str | list,
        "gater_update": typing.Literal[_UPDATES],
        "gater_optimizer": typing.Literal["adamw", "adam", "sgd", "keras_adamw", "keras_adam", "keras_sgd"],
    },
    aliases={"lambda": "cost_weight"},
    reference_code={
        "cost_weight": 0.1,
        "features": ["max_prob", "margin"],
        "gater_width": 100,
        "gater_activation": "gelu",
        "gater_update": "exchange",
        "gater_final_learning_rate": 1e-6,
        "log_epsilon": 1e-5,
    },
    reference_note="YouvaADDAD/gphi_MSDNet: engine.train_one_epoch (the loop), utils.compute_uncertainty "
    "(max probability, margin), models/weightModel.py (GELU), args.py (width 100, alpha_cost 0.1, meta_min_lr "
    "1e-6); its gater optimizer is the backbone's family (AdamW by default: gater_optimizer=sgd next to SGD)",
)
@keras.saving.register_keras_serializable(package="keras_ee")
class BudgetAwareGating(bilevel.FollowsMainOptimizer, Method):
    """Budget-aware gating: a gater MLP per early exit, trained bi-level with the backbone.

    See the module docstring for the losses, the schedule and the inference scores.

    Args:
        cost_weight: lambda, the weight of the normalised exit cost (paper 2 for every
            budget; the code 0.1). `--method-option lambda=...` is its alias and `lambda`
            its keras-tuner hyper-parameter.
        temperature: T of the sharpened exit distribution (paper 0.5).
        features: the gater's inputs per exit, from `max_prob`, `margin`, `entropy`
            (paper CIFAR: max_prob + entropy, the default; ImageNet: all three; the code:
            max_prob + margin); a list or a comma-separated string.
        gater_width: hidden width (paper 500; the code 100).
        gater_depth: hidden layers (1).
        gater_activation: hidden activation (`relu` by default; the code `gelu`).
        detach_features: stop the gradient at the gater's inputs in the backbone's loss
            (default False, as the code and Eq. 11). Detached, lambda no longer reaches
            the backbone: its gradient is `(A + 1) dCE/dtheta` for any lambda.
        gater_interval: a gater step every this many loaded batches (paper CIFAR 10,
            ImageNet 100).
        gater_update: `"alternate"` (default: every batch one backbone step, a gater batch
            split between a backbone and a gater step), `"exchange"` (the authors' loop: two
            backbone steps per batch, one per half, and on every `gater_interval`-th batch of
            the epoch a gater step on the other half after each) or `"lookahead"` (one-step
            bi-level look-ahead through the real optimizer's step).
        gater_optimizer: `"adamw"` (default), `"adam"` or `"sgd"`, PyTorch's steps
            (`keras_ee.optimizers`); `"keras_adamw"`, `"keras_adam"`, `"keras_sgd"` Keras' own.
        gater_learning_rate: initial gater learning rate (1e-3).
        gater_final_learning_rate: its value when the main schedule reaches 0 (1e-5).
        gater_weight_decay: 1e-4.
        log_epsilon: 0 (default): `log P` and `log(1 - P)` from the gater's logits (no NaN for
            any P); the code's 1e-5: `log(P + 1e-5)`, `log1p(-P + 1e-5)`.
        **kwargs: standard layer arguments, and `reference`: `"paper"` (default) or `"code"`:
            the authors' code's settings of `cost_weight` (0.1), `features` (max_prob + margin),
            `gater_width` (100), `gater_activation` (gelu), `gater_update` ("exchange"),
            `gater_final_learning_rate` (1e-6) and `log_epsilon` (1e-5), unless given.

    Example:
    >>> model = MultiExitModel(backbone, method=BudgetAwareGating(cost_weight=2.0))
    >>> model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-4))
    >>> model.fit(train_ds, epochs=300)
    """

    def __init__(
        self,
        cost_weight: float = 2.0,
        temperature: float = 0.5,
        features: str | Sequence[str] = ("max_prob", "entropy"),
        gater_width: int = 500,
        gater_depth: int = 1,
        gater_activation: str = "relu",
        detach_features: bool = False,
        gater_interval: int = 10,
        gater_update: str = "alternate",
        gater_optimizer: str = "adamw",
        gater_learning_rate: float = 1e-3,
        gater_final_learning_rate: float = 1e-5,
        gater_weight_decay: float = 1e-4,
        log_epsilon: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.cost_weight = v.check_number("cost_weight", cost_weight, low=0.0)
        self.temperature = v.check_number("temperature", temperature, low=0.0, low_open=True)
        self.features = _parse_features(features)
        v.check_counts(gater_width=gater_width, gater_depth=gater_depth, gater_interval=gater_interval)
        if not isinstance(gater_activation, str):
            raise ValueError(f"`gater_activation` must be a Keras activation name; received {gater_activation!r}.")
        try:
            keras.activations.get(gater_activation)
        except (ValueError, TypeError):
            raise ValueError(
                f"`gater_activation` must be a Keras activation name (relu, gelu, ...); received {gater_activation!r}."
            ) from None
        v.check_bool("detach_features", detach_features)
        v.check_choice("gater_update", gater_update, _UPDATES)
        v.check_choice("gater_optimizer", gater_optimizer, _OPTIMIZERS)
        self.gater_width = gater_width
        self.gater_depth = gater_depth
        self.gater_activation = gater_activation
        self.detach_features = detach_features
        self.gater_interval = gater_interval
        self.gater_update = gater_update
        self.gater_optimizer_name = gater_optimizer
        self.gater_learning_rate = v.check_number("gater_learning_rate", gater_learning_rate, low=0.0, low_open=True)
        self.gater_final_learning_rate = v.check_number("gater_final_learning_rate", gater_final_learning_rate, low=0.0)
        if self.gater_final_learning_rate > self.gater_learning_rate:
            raise ValueError(
                "`gater_final_learning_rate` must be <= `gater_learning_rate`; received "
                f"{self.gater_final_learning_rate} > {self.gater_learning_rate}."
            )
        self.gater_weight_decay = v.check_number("gater_weight_decay", gater_weight_decay, low=0.0)
        self.log_epsilon = v.check_number("log_epsilon", log_epsilon, low=0.0)
        if gater_update == "exchange":  # the code's loop: a backbone step on each half of every batch
            self.optimizer_steps_per_batch = 2
            self.min_batch_per_replica = 2

    # --- setup ---------------------------------------------------------------

    def setup(self, model: MultiExitModel) -> None:
        from keras_ee import costs

        k = model.num_exits
        if k < 2:
            raise ValueError(f"budget-aware gating needs at least 2 exits; the backbone has {k}.")
        self.num_exits = k
        mul_adds = np.asarray(costs.exit_costs(model.backbone)["mul_adds"], np.float64)
        if not (np.all(np.isfinite(mul_adds)) and mul_adds[-1] > 0):
            raise ValueError(f"the exits' Mul-Adds {mul_adds.tolist()} cannot be normalised by the last exit's.")
        # Cost_k = cost[k] / cost[K] of this very model (a constant of the losses).
        self.relative_costs = (mul_adds / mul_adds[-1]).tolist()
        dtype = (
            "float64"
            if model.backbone.trainable_variables and model.backbone.trainable_variables[0].dtype == "float64"
            else "float32"
        )
        self.gater = ExitGater(
            k - 1,
            len(self.features),
            depth=self.gater_depth,
            width=self.gater_width,
            activation=self.gater_activation,
            name="gater",
            dtype=dtype,
        )
        self.gater.build((None, k - 1, len(self.features)))
        self.gater.trainable = False  # trained by its own optimizer, not the model's
        self.batch_counter = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, name="batch_counter"
        )
        self.initial_main_lr = self.add_weight(
            shape=(), dtype="float32", initializer="zeros", trainable=False, name="initial_main_lr"
        )
        if self.gater_update == "exchange":  # only then: saved gating models of the other loops load as before
            # The loaded batch's index within its epoch (the code's `data_iter_step`), reset by `callbacks()`.
            self.epoch_batch = self.add_weight(
                shape=(), dtype="int64", initializer="zeros", trainable=False, name="epoch_batch"
            )
            # The main optimizer's iteration when the batch began: the code sets every rate once
            # per loaded batch, so both gater steps read the schedules there.
            self.batch_iteration = self.add_weight(
                shape=(), dtype="int64", initializer="zeros", trainable=False, name="batch_iteration"
            )
        lr = bilevel.follow_main_schedule(
            self.gater_learning_rate,
            self._main_optimizer,
            self.initial_main_lr,
            final_learning_rate=self.gater_final_learning_rate,
            at_iteration=self.batch_iteration if self.gater_update == "exchange" else None,
        )
        wd = self.gater_weight_decay
        name = f"gater_{self.gater_optimizer_name}"
        if self.gater_optimizer_name == "adamw":
            self.gater_optimizer = ee_optimizers.AdamW(learning_rate=lr, weight_decay=wd, name=name)
        elif self.gater_optimizer_name == "adam":
            self.gater_optimizer = ee_optimizers.Adam(learning_rate=lr, weight_decay=wd, name=name)
        elif self.gater_optimizer_name == "sgd":
            self.gater_optimizer = ee_optimizers.SGD(learning_rate=lr, momentum=0.9, weight_decay=wd, name=name)
        elif self.gater_optimizer_name == "keras_adamw":
            self.gater_optimizer = keras.optimizers.AdamW(learning_rate=lr, weight_decay=wd or None, name=name)
        elif self.gater_optimizer_name == "keras_adam":
            self.gater_optimizer = keras.optimizers.Adam(learning_rate=lr, name=name)
        else:
            self.gater_optimizer = keras.optimizers.SGD(
                learning_rate=lr, momentum=0.9, weight_decay=wd or None, name=name
            )
        self.gater_optimizer.build(self.gater.weights)
        self.share_trackers = [keras.metrics.Mean(name=f"exit_{i + 1}_A_mean") for i in range(k)]
        self.cost_tracker = keras.metrics.Mean(name="expected_cost")
        self.gater_loss_tracker = keras.metrics.Mean(name="gater_loss")
        self.built = True

    @property
    def looks_ahead(self) -> bool:
        return self.gater_update == "lookahead"

    # --- the gater -------------------------------------------------------------

    def gate_inputs(self, logits: Sequence[Tensor]) -> Tensor:
        """The gater's features of the early exits' logits, `(batch, K - 1, F)`."""
        return confidence_features(logits[:-1], self.features)

    def distribution(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """`(pr, a)` of the current gater on `features` (`(batch, K - 1, F)`)."""
        z = self.gater(ops.cast(features, self.gater.compute_dtype))
        if self.log_epsilon:  # the code's `log(P + eps)`, `log1p(-P + eps)`
            p = ops.sigmoid(z)
            eps = ops.cast(self.log_epsilon, p.dtype)
            return exit_distribution(ops.log(p + eps), ops.log1p(eps - p), self.temperature)
        return exit_distribution_from_logits(z, self.temperature)

    def gate_probabilities(self, logits: Sequence[Tensor]) -> Tensor:
        """`P_k` of every early exit, `(batch, K - 1)`: the gater's confidence that exit k suffices."""
        return ops.sigmoid(self.gater(ops.cast(self.gate_inputs(logits), self.gater.compute_dtype)))

    def _costs(self, dtype: Any) -> Tensor:
        return ops.convert_to_tensor(np.asarray(self.relative_costs), dtype=dtype)

    # --- training --------------------------------------------------------------

    def metric_names(self) -> list[str]:
        return [m.name for m in (*self.share_trackers, self.cost_tracker, self.gater_loss_tracker)]

    def step_logs(self, model: MultiExitModel) -> dict[str, Tensor]:
        logs = model.model_logs()
        for m in (*self.share_trackers, self.cost_tracker, self.gater_loss_tracker):
            logs[m.name] = m.result()
        return logs

    def inner_loss(
        self, y: Tensor, logits: list[Tensor], sample_weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`(loss, per_exit, ce, a)` of the backbone's loss on one forward (differentiable).

        `per_exit[k] = mean_i sw_i (A_ik + 1)(CE_ik + lambda Cost_k)`, `loss = sum_k per_exit[k]`.
        """
        ce = core.per_exit_cross_entropy(y, logits)
        features = self.gate_inputs(logits)
        if self.detach_features:
            features = ops.stop_gradient(features)
        _, a = self.distribution(features)
        a = ops.cast(a, ce.dtype)
        terms = inner_loss_terms(ce, a, self._costs(ce.dtype), self.cost_weight)
        per_exit = core.sample_weighted_exit_losses(terms, sample_weight)
        return ops.sum(per_exit), per_exit, ce, a

    def outer_loss(self, y: Tensor, logits: list[Tensor]) -> tuple[Tensor, Tensor]:
        """`(loss, per_exit)` of the gater's loss, the backbone's outputs taken as given."""
        logits = [ops.stop_gradient(z) for z in logits]
        ce = core.per_exit_cross_entropy(y, logits)
        _, a = self.distribution(self.gate_inputs(logits))
        per_exit = ops.mean(
            outer_loss_terms(ce, ops.cast(a, ce.dtype), self._costs(ce.dtype), self.cost_weight), axis=0
        )
        return ops.sum(per_exit), per_exit

    def callbacks(self) -> list[keras.callbacks.Callback]:
        """With `gater_update="exchange"`: the callback that restarts the batch index every epoch."""
        return [EpochBatchReset(self)] if self.gater_update == "exchange" else []

    def train_step(self, model: MultiExitModel, data: Any) -> dict[str, Tensor]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self.follow(model.optimizer)
        bilevel.record_initial_learning_rate(model.optimizer, self.initial_main_lr)
        if self.gater_update == "exchange":
            self.batch_iteration.assign(ops.cast(model.optimizer.iterations, "int64"))
            self._exchange_batch(model, x, y, sample_weight)
            self.epoch_batch.assign_add(1)
            self.batch_counter.assign_add(1)
            return self.step_logs(model)
        # Either batch takes one real step (a skipped one also undoes the gater's step before it).
        model.skippable_step(
            lambda x, y, sw: bilevel.every(
                self.batch_counter,
                self.gater_interval,
                lambda x, y, sw: self._gater_batch(model, x, y, sw),
                lambda x, y, sw: self._backbone_step(model, x, y, sw),
                args=(x, y, sw),
            ),
            args=(x, y, sample_weight),
        )
        self.batch_counter.assign_add(1)
        return self.step_logs(model)

    def _gater_batch(self, model: MultiExitModel, x: Tensor, y: Tensor, sample_weight: Tensor | None) -> None:
        n = tf.shape(x)[0]

        def split(x: Tensor, y: Tensor, sample_weight: Tensor | None) -> None:
            (x_a, y_a, sw_a), (x_b, y_b, _) = core.split_halves(x, y, sample_weight)
            if self.gater_update == "lookahead":
                self._lookahead_step(model, x_a, y_a, sw_a, x_b, y_b)
            else:
                self._backbone_step(model, x_a, y_a, sw_a)
                self._gater_step(model, x_b, y_b)

        def whole(
            x: Tensor, y: Tensor, sample_weight: Tensor | None
        ) -> None:  # a batch of one sample: no half for the gater
            self._backbone_step(model, x, y, sample_weight)

        # Under tf.distribute: split only if every replica holds 2 samples (bilevel.replica_cond).
        bilevel.replica_cond(n >= 2, split, whole, args=(x, y, sample_weight))

    def _exchange_batch(self, model: MultiExitModel, x: Tensor, y: Tensor, sample_weight: Tensor | None) -> None:
        """The authors' loop (`gater_update="exchange"`) on one loaded batch.

        The batch is split as `torch.chunk(2)` does (the first half takes the odd sample); the
        backbone steps on the first half, then on the second; on every `gater_interval`-th
        batch of the epoch (`epoch_batch % interval == 0`) each backbone step is followed by a
        gater step on the other half, the backbone in inference mode. Each half's pair is one
        `skippable_step`. A replica with a single sample takes one backbone step on it.
        """

        def exchange(x: Tensor, y: Tensor, sample_weight: Tensor | None) -> None:
            first, second = core.split_halves(x, y, sample_weight, larger_first=True)
            for (x_t, y_t, sw_t), (x_g, y_g, _) in ((first, second), (second, first)):
                model.skippable_step(lambda *args: self._exchange_half(model, *args), args=(x_t, y_t, sw_t, x_g, y_g))

        def whole(x: Tensor, y: Tensor, sample_weight: Tensor | None) -> None:
            model.skippable_step(lambda *args: self._backbone_step(model, *args), args=(x, y, sample_weight))

        bilevel.replica_cond(tf.shape(x)[0] >= 2, exchange, whole, args=(x, y, sample_weight))

    def _exchange_half(
        self, model: MultiExitModel, x_t: Tensor, y_t: Tensor, sw_t: Tensor | None, x_g: Tensor, y_g: Tensor
    ) -> None:
        self._backbone_step(model, x_t, y_t, sw_t)
        bilevel.every(
            self.epoch_batch,
            self.gater_interval,
            lambda x, y: self._gater_step(model, x, y),
            lambda x, y: None,
            args=(x_g, y_g),
        )

    def _record(self, a: Tensor) -> None:
        for k, tracker in enumerate(self.share_trackers):
            tracker.update_state(ops.cast(a[:, k], "float32"))
        self.cost_tracker.update_state(ops.cast(ops.sum(a * self._costs(a.dtype)[None, :], axis=1), "float32"))

    def _backbone_step(self, model: MultiExitModel, x: Tensor, y: Tensor, sample_weight: Tensor | None) -> None:
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss, per_exit, ce, a = self.inner_loss(y, logits, sample_weight)
            scaled = model.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        model.apply_step(grads, per_exit)
        model.update_step_metrics(loss, y, logits, ce)
        self._record(a)

    def _apply_gater(
        self,
        model: MultiExitModel,
        grads: Sequence[Tensor | None],
        per_exit: Tensor,
        lookahead: bilevel.LookAheadResult | None = None,
    ) -> None:
        """The gater's step on `grads`; with a look-ahead's result, skipped where its loss scale overflowed."""
        variables = self.gater.weights
        grads = [ops.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        if self.gater_optimizer_name == "keras_adam":  # L2 decay in the gradient, as torch.optim.Adam
            grads = [g + self.gater_weight_decay * v for g, v in zip(grads, variables)]
        finite, inner_finite = (None, None) if lookahead is None else (lookahead.finite, lookahead.inner_finite)
        model.record_nonfinite(per_exit, phase=1, when=inner_finite)

        def step(grads: list[Tensor], per_exit: Tensor) -> None:
            # Under tf.distribute: each replica's share of the mean gradient (the optimizer sums).
            self.gater_optimizer.apply(bilevel.global_mean_gradients(grads), variables)
            self.gater_loss_tracker.update_state(ops.cast(ops.sum(per_exit), "float32"))

        bilevel.unless_overflow(finite, step, args=(grads, per_exit))

    def gater_gradients(self, model: MultiExitModel, x: Tensor, y: Tensor) -> tuple[list[Tensor | None], Tensor]:
        """`(grads, per_exit)`: the outer loss's gradient w.r.t. the gater's weights on `(x, y)`.

        The backbone runs in inference mode (BatchNorm statistics are neither used from
        the batch nor updated) and receives no gradient.
        """
        logits = model(x, training=False)
        values = [v.value for v in self.gater.weights]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(values)
            loss, per_exit = self.outer_loss(y, logits)
        return tape.gradient(loss, values), per_exit

    def _gater_step(self, model: MultiExitModel, x: Tensor, y: Tensor) -> None:
        grads, per_exit = self.gater_gradients(model, x, y)
        self._apply_gater(model, grads, per_exit)

    def lookahead(
        self, model: MultiExitModel, x_t: Tensor, y_t: Tensor, sw_t: Tensor | None, x_m: Tensor, y_m: Tensor
    ) -> tuple[bilevel.LookAheadResult, Callable[[Tensor, Any], Tensor]]:
        """The one-step bi-level pass (`gater_update="lookahead"`): a `bilevel.LookAheadResult`.

        The inner loss is written as `sum(coefficients * terms)` for the look-ahead core:
        `terms = [CE, features]` per sample, with coefficients `(A + 1) sw / N` for the
        cross-entropies and, for the features (unless detached), the vector-Jacobian
        product of A with `(CE + lambda Cost) sw / N`, i.e. exactly Eq. 11's two parts.
        """
        k1, f = self.num_exits - 1, len(self.features)

        def terms_fn(logits: list[Tensor], y: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            ce = core.per_exit_cross_entropy(y, logits)
            features = self.gate_inputs(logits)
            if self.detach_features:
                return ce, (ce, features)
            flat = ops.reshape(ops.cast(features, ce.dtype), (-1, k1 * f))
            return ops.concatenate([ce, flat], axis=1), (ce, features)

        def coefficients_fn(terms: Tensor, aux: Any) -> Tensor:
            ce, features = (ops.stop_gradient(t) for t in aux)
            n = ops.cast(ops.shape(ce)[0], ce.dtype)
            sw = ops.ones_like(ce[:, :1]) if sw_t is None else ops.reshape(ops.cast(sw_t, ce.dtype), (-1, 1))
            if self.detach_features:
                _, a = self.distribution(features)
                return (ops.cast(a, ce.dtype) + 1.0) * sw / n
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(features)
                _, a = self.distribution(features)
                a = ops.cast(a, ce.dtype)
            priced = (ce + self.cost_weight * self._costs(ce.dtype)[None, :]) * sw / n
            feature_coefficients = tape.gradient(a, features, output_gradients=priced)
            return ops.concatenate(
                [(a + 1.0) * sw / n, ops.reshape(ops.cast(feature_coefficients, ce.dtype), (-1, k1 * f))], axis=1
            )

        def outer_fn(logits_meta: list[Tensor], y_meta: Tensor) -> tuple[Tensor, Tensor]:
            ce_m = core.per_exit_cross_entropy(y_meta, logits_meta)
            _, a_m = self.distribution(self.gate_inputs(logits_meta))
            per_exit = ops.mean(
                outer_loss_terms(ce_m, ops.cast(a_m, ce_m.dtype), self._costs(ce_m.dtype), self.cost_weight), axis=0
            )
            return ops.sum(per_exit), per_exit

        la = bilevel.LookAhead(model.backbone, model.optimizer, self.gater.weights, terms_fn, coefficients_fn, outer_fn)
        return la.run(x_t, y_t, x_m, y_m), coefficients_fn

    def _lookahead_step(
        self, model: MultiExitModel, x_t: Tensor, y_t: Tensor, sw_t: Tensor | None, x_m: Tensor, y_m: Tensor
    ) -> None:
        result, coefficients_fn = self.lookahead(model, x_t, y_t, sw_t, x_m, y_m)
        ce, features = result.aux
        model.record_nonfinite(ops.mean(ce, axis=0), phase=0)
        self._apply_gater(model, result.outer_gradients, result.outer_aux, lookahead=result)
        # The real step on the first half with the updated gater, reusing the inner forward.
        coefficients = ops.stop_gradient(coefficients_fn(result.terms, result.aux))
        grads = result.real_gradients(model.scale_loss(coefficients))
        core.assign_values(model.backbone.non_trainable_variables, result.non_trainable)
        _, a = self.distribution(ops.stop_gradient(features))
        a = ops.cast(a, ce.dtype)
        per_exit = core.sample_weighted_exit_losses(
            inner_loss_terms(ce, a, self._costs(ce.dtype), self.cost_weight), sw_t
        )
        model.apply_step(grads, per_exit, finite=result.finite)
        model.update_step_metrics(ops.sum(per_exit), y_t, result.logits, ce)
        self._record(a)

    # --- inference scores --------------------------------------------------------

    def exit_scores(self, logits: np.ndarray) -> np.ndarray:
        """The gater's confidence per exit, `(K, N)` float32 numpy, for `--confidence gater`.

        Exit k < K scores the gater's pre-sigmoid `z_k` (`P_k = sigmoid(z_k)`: the same
        order, without float32's saturation of P at 1 for confident samples); the last exit,
        which takes every remaining sample, scores 0.

        Args:
            logits: `(K, N, C)` array of every exit's logits (a dump's).
        """
        out = []
        for start in range(0, logits.shape[1], 4096):
            chunk = [
                ops.convert_to_tensor(np.asarray(logits[k, start : start + 4096], np.float32))
                for k in range(logits.shape[0])
            ]
            z = self.gater(ops.cast(self.gate_inputs(chunk), self.gater.compute_dtype))
            out.append(np.asarray(ops.convert_to_numpy(z), np.float32))
        z = np.concatenate(out, axis=0).T if out else np.zeros((logits.shape[0] - 1, 0), np.float32)
        return np.concatenate([z, np.zeros((1, z.shape[1]), np.float32)], axis=0)

    def save_artifacts(self, model: MultiExitModel, splits: DatasetSplits, folder: RunFolder) -> None:
        """`scores/gater.npz`: the gater's confidence on the run's validation and test dump."""
        from keras_ee import dumps
        from keras_ee.atomic import atomic_path

        dump = dumps.load_dump(folder.dump_dir)
        folder.scores_dir.mkdir(exist_ok=True)
        with atomic_path(folder.scores_dir / "gater.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, val=self.exit_scores(dump.val_logits), test=self.exit_scores(dump.test_logits))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            cost_weight=self.cost_weight,
            temperature=self.temperature,
            features=list(self.features),
            gater_width=self.gater_width,
            gater_depth=self.gater_depth,
            gater_activation=self.gater_activation,
            detach_features=self.detach_features,
            gater_interval=self.gater_interval,
            gater_update=self.gater_update,
            gater_optimizer=self.gater_optimizer_name,
            gater_learning_rate=self.gater_learning_rate,
            gater_final_learning_rate=self.gater_final_learning_rate,
            gater_weight_decay=self.gater_weight_decay,
            log_epsilon=self.log_epsilon,
        )
        return config


class EpochBatchReset(keras.callbacks.Callback):
    """Restarts `BudgetAwareGating.epoch_batch` at every epoch (the code counts its gater
    interval within the epoch). `keras-ee train` adds it (`Method.callbacks`); with plain
    `model.fit`, pass `callbacks=method.callbacks()`, or the index runs over the whole fit."""

    def __init__(self, method: BudgetAwareGating) -> None:
        super().__init__()
        self.method = method

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.method.epoch_batch.assign(0)
