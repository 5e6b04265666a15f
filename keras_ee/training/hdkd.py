"""HDKD: harmonized dense knowledge distillation, and the paper's named variants.

Implements "Harmonized Dense Knowledge Distillation Training for Multi-Exit Architectures"
(Xinglu Wang and Yingming Li, AAAI 2021; the paper's text names no arXiv id) on
`MultiExitModel`, with the paper's settings as defaults and every choice it leaves open as
an option. No public code exists.

The loss (Eq. 5). With K exits, per sample:

    L_train = sum_k gamma_k CE_k + sum_{i > j} gamma_ij KD_{i->j},
    KD_{i->j} = T_i^2 KL(softmax(z_i / T_i) || softmax(z_j / T_i)),

the teacher i detached (`stop_gradient`): Eq. 2 writes a soft cross-entropy, which has the
same gradient for the student as the KL once the teacher is a constant; the KL is 0 for
equal predictions, which keeps the logged loss readable. KL is summed over the classes
(PyTorch's `batchmean` after the batch mean). `teachers="dense"` has all K(K-1)/2 pairs
(every later exit teaches every earlier one), `"last"` only the last exit's K-1 (DBT),
`"none"` none (HMSDNet). Terms are ordered `CE_1..CE_K`, then the pairs by teacher, then
student: (2->1), (3->1), (3->2), ... (`kd_pairs`).

Temperature. `temperature_rule="fixed"` (default): `T = temperature`, default 3. The paper
gives no T; 3 is the temperature of IMTA's one-for-all distillation on CIFAR (the paper's
"Impr" baseline, run "with the same hyper-parameter setup"), so the distillation baselines
and HDKD share it. `"adaptive"`: the rule of DBT (Phuong and Lampert, ICCV 2019, the base
of the paper's distillation): each teacher's T starts at `temperature` (set it to 1 for
DBT's start) and is multiplied by 1.05 after every training step on which the teacher's
mean max probability `mean_n max_c softmax(z_i / T_i)` on the batch was above 0.5; it
never decreases. One T per teacher exit (DBT has one teacher); saved and resumed.

Loss weights gamma (K + number of pairs). Non-negative by the parametrisation
`gamma_parametrization`:

- `"softplus"` (default): `gamma = softplus(w)` with w the learned variable. Any finite w,
  however large a step moved it, gives a gamma >= 0 (and > 0 unless the softplus
  underflows, which leaves exactly 0), and the map is smooth, so the meta-gradient needs
  no special case. A DBT-like zero cannot be represented: it starts at 1e-3 instead.
- `"clip"`: gamma is the variable itself, projected onto gamma >= 0 after each step
  (projected gradient descent): the paper's plain step `gamma - eps grad` whenever it
  stays non-negative, and exact zeros.

Initialisation (`init`; the paper's Table 3): `"ds"` (default: the Table 3 column that
equals the paper's HDKD results; "each exit equally learns from all later exits": every
CE weight 1, the KD weights of student j are 1 / (its number of teachers), so each
student's distillation weights sum to 1), `"uniform"` (every weight 1: Eq. 4 with
lambda = 1, NaiveDKD), `"dbt"` (CE 1, the last exit's KD 1, every other KD 0: "the last
exit teaches all the other exits"), `"random"` (U(0, 1), seeded by `init_seed`).

The bilevel update (Algorithm 1, Eq. 8; every `meta_interval` loaded batches, default 1:
"validation is performed at every training iteration"):

1. look-ahead `theta' = theta - xi grad_theta L_train(theta, gamma)` on the training
   batch, with the real optimizer's exact next step (`keras_ee.training.bilevel.LookAhead`:
   xi is its current learning rate, with its momentum, Nesterov and weight decay);
2. a gamma step on a batch of the held-out meta stream (`uses_meta_stream`; by default the
   calibration hold-out, as the paper's 5,000 images; `TrainConfig.meta_split_size` holds
   out a split of its own) with the balanced validation loss (Eq. 10)

       L_val = alpha sum_k CE_k(theta') + (1 - alpha) sum_k softplus(CE_k(theta') / E_k - 1),

   CE_k the meta batch's mean cross-entropy of exit k, `alpha = 0.5`, and E_k an
   exponential moving average (momentum `ema_momentum` 0.9, Eq. 9) of exit k's
   cross-entropy, a constant of the gradient. Which losses feed E the paper does not say:
   `ema_source="meta"` (default: the same quantity the ratio divides, the meta batches'
   CE_k(theta'), so the ratio compares like with like) or `"train"` (the training
   batches' CE_k(theta) of every step). The step uses E from the previous batches and
   then adds the current one; the first batch starts E at its own value (ratio 1);
3. the real step on the same training batch with the new gamma (the look-ahead's forward
   is reused: one more backward pass).

gamma's optimizer (the paper's eps is not given): `gamma_optimizer="adam"` (default) with
`gamma_learning_rate` 1e-3 following the main schedule's shape (`bilevel.
follow_main_schedule`). The meta-gradient is proportional to xi times inner products of
gradients, so its scale changes by orders of magnitude over a run and between datasets;
Adam's normalised step makes 1e-3 mean "w moves by about 1e-3 per step" everywhere, where
plain SGD (`"sgd"`, the paper's literal update) needs its eps tuned to the gradient scale.

Variants (`keras-ee methods`), all this class with other option defaults: `hdkd` (dense,
learned), `naive_dkd` (dense, uniform weights, not learned), `dbt` (last exit teaches,
uniform, not learned: Eq. 3 with lambda = 1), `hmsdnet` (no KD, learned CE weights),
`hdbt` (last exit teaches, learned). Variants that do not learn take no meta stream and
one forward-backward per step. The temperature default is the same for all (the paper
compares them "with the same hyper-parameter setup"); `temperature_rule="adaptive"
temperature=1` gives DBT its own rule.

Logs per epoch (the values after its last step): `gamma_ce_k`, `gamma_kd_i_j` (teacher i
-> student j, 1-based), `ema_ce_k`, `temperature_i` of each teacher (adaptive rule only),
and `balanced_loss` (mean over the epoch's gamma steps). The run folder gets `hdkd.json`
(the final gamma, E and T, and `meta_source`: which split fed the meta batches,
`"calibration"` or `"split"`, or null when the variant takes none) and `hdkd_gamma.png`
(a heat map of the final KD weights i -> j).
"""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_ee import validation as v
from keras_ee._typing import StrPath, Tensor
from keras_ee.plots import pyplot
from keras_ee.training import bilevel, core
from keras_ee.training.methods import Method
from keras_ee.training.registry import SearchRange, register_method

if TYPE_CHECKING:
    from keras_ee.data import DatasetSplits
    from keras_ee.run_folder import RunFolder
    from keras_ee.training.model import MultiExitModel

_TEACHERS = ("dense", "last", "none")
_INITS = ("ds", "uniform", "dbt", "random")
_TEMPERATURE_RULES = ("fixed", "adaptive")
_PARAMETRIZATIONS = ("softplus", "clip")
_OPTIMIZERS = ("adam", "sgd")
_EMA_SOURCES = ("meta", "train")
# A DBT-like zero under the softplus parametrisation (softplus cannot reach 0).
SOFTPLUS_FLOOR = 1e-3
# DBT's adaptive temperature: x1.05 while the teacher's mean max probability is above 0.5.
ADAPTIVE_FACTOR = 1.05
ADAPTIVE_CONFIDENCE = 0.5
ARTIFACT = "hdkd.json"
HEATMAP = "hdkd_gamma.png"

PAPER = (
    "Harmonized Dense Knowledge Distillation Training for Multi-Exit Architectures (Wang and Li, AAAI 2021; "
    "no arXiv id in the paper)"
)


def kd_pairs(num_exits: int, teachers: str = "dense") -> list[tuple[int, int]]:
    """The distillation pairs `(teacher, student)`, 0-based, teacher > student, in term order.

    `dense`: every later exit teaches every earlier one, `(1, 0), (2, 0), (2, 1), ...`
    (teacher-major, as Eq. 5's double sum); `last`: `(K-1, j)` for j < K-1; `none`: [].
    """
    v.check_choice("teachers", teachers, _TEACHERS)
    if teachers == "dense":
        return [(i, j) for i in range(1, num_exits) for j in range(i)]
    if teachers == "last":
        return [(num_exits - 1, j) for j in range(num_exits - 1)]
    return []


def dense_kd_terms(logits: Sequence[Tensor], pairs: Sequence[tuple[int, int]], temperatures: Tensor) -> Tensor:
    """Per-sample distillation terms `T_i^2 KL(soft_i || soft_j)`, `(batch, len(pairs))`.

    Args:
        logits: list of the K exits' `(batch, C)` logits.
        pairs: `(teacher, student)` 0-based pairs (`kd_pairs`).
        temperatures: K temperatures (a sequence or a `(K,)` tensor), indexed by the teacher.

    The teacher is detached; the KL is summed over classes. With no pairs, `(batch, 0)`.
    """
    first = core._as_float32(logits[0])
    if not pairs:
        return ops.zeros((ops.shape(first)[0], 0), first.dtype)
    temperatures = ops.cast(ops.convert_to_tensor(temperatures), first.dtype)
    columns = []
    teacher_cache: dict[int, tuple[Tensor, Tensor]] = {}
    for i, j in pairs:
        t = temperatures[i]
        if i not in teacher_cache:
            zi = ops.stop_gradient(ops.cast(logits[i], first.dtype))
            log_pt = ops.log_softmax(zi / t, axis=-1)
            teacher_cache[i] = (log_pt, ops.exp(log_pt))
        log_pt, pt = teacher_cache[i]
        log_ps = ops.log_softmax(ops.cast(logits[j], first.dtype) / t, axis=-1)
        columns.append(t * t * ops.sum(pt * (log_pt - log_ps), axis=-1))
    return ops.stack(columns, axis=1)


def balanced_loss(ce_means: Tensor, ema: Tensor, alpha: float = 0.5) -> Tensor:
    """Eq. 10: `alpha sum_k CE_k + (1 - alpha) sum_k softplus(CE_k / E_k - 1)` (E a constant)."""
    ema = ops.stop_gradient(ops.cast(ema, ce_means.dtype))
    return alpha * ops.sum(ce_means) + (1.0 - alpha) * ops.sum(ops.softplus(ce_means / ema - 1.0))


def initial_gamma(num_exits: int, pairs: Sequence[tuple[int, int]], init: str = "ds", seed: int = 0) -> np.ndarray:
    """The initial loss weights `[gamma_1..gamma_K, gamma_pairs...]` (float64), before the parametrisation."""
    k = num_exits
    ce = np.ones(k)
    if init == "uniform":
        kd = np.ones(len(pairs))
    elif init == "ds":
        teachers_of = np.bincount([j for _, j in pairs], minlength=k) if pairs else np.zeros(k, int)
        kd = np.array([1.0 / teachers_of[j] for _, j in pairs])
    elif init == "dbt":
        kd = np.array([1.0 if i == k - 1 else 0.0 for i, _ in pairs])
    elif init == "random":
        rng = np.random.default_rng(seed)
        ce, kd = rng.uniform(0.0, 1.0, size=k), rng.uniform(0.0, 1.0, size=len(pairs))
    else:
        raise ValueError(f"`init` must be one of {_INITS}; received {init!r}.")
    return np.concatenate([ce, np.asarray(kd, np.float64).reshape(-1)])


def _softplus_inverse(gamma: np.ndarray) -> np.ndarray:
    gamma = np.maximum(np.asarray(gamma, np.float64), SOFTPLUS_FLOOR)
    return gamma + np.log(-np.expm1(-gamma))  # log(exp(g) - 1), stable for large g


_OPTION_TYPES = {
    "teachers": typing.Literal["dense", "last", "none"],
    "init": typing.Literal["ds", "uniform", "dbt", "random"],
    "temperature_rule": typing.Literal["fixed", "adaptive"],
    "gamma_parametrization": typing.Literal["softplus", "clip"],
    "gamma_optimizer": typing.Literal["adam", "sgd"],
    "ema_source": typing.Literal["meta", "train"],
}


@register_method(
    "hdkd",
    summary="harmonized dense KD: every later exit teaches every earlier one; the K CE and K(K-1)/2 KD "
    "weights are learned bilevel on a held-out meta stream (balanced validation loss)",
    paper=PAPER,
    search_space={"temperature": SearchRange(1.0, 5.0), "alpha": SearchRange(0.0, 1.0)},
    option_types=_OPTION_TYPES,
    reference_note="no public code (the paper's framework was TensorFlow): the paper's settings only, no `reference`",
)
@keras.saving.register_keras_serializable(package="keras_ee")
class HDKD(bilevel.FollowsMainOptimizer, Method):
    """Harmonized dense knowledge distillation (and, by its options, the paper's variants).

    See the module docstring for the losses, the bilevel update, the parametrisation of
    gamma and the defaults' justification.

    Args:
        teachers: `"dense"` (default), `"last"` (DBT, HDBT) or `"none"` (HMSDNet).
        learn_weights: learn gamma bilevel on the meta stream (default True); False
            keeps the initial weights (NaiveDKD, DBT) and needs no meta stream.
        init: initial gamma: `"ds"` (default), `"uniform"`, `"dbt"` or `"random"`.
        temperature: the fixed T (default 3), or the start of the adaptive rule.
        temperature_rule: `"fixed"` (default) or `"adaptive"` (DBT's x1.05 rule).
        alpha: weight of the absolute CE term of the balanced loss, in [0, 1] (0.5).
        ema_momentum: momentum m of E (0.9).
        ema_source: `"meta"` (default) or `"train"` batches feed E.
        meta_interval: a gamma step every this many loaded batches (1: every batch).
        gamma_parametrization: `"softplus"` (default) or `"clip"`.
        gamma_optimizer: `"adam"` (default) or `"sgd"` (plain gradient descent).
        gamma_learning_rate: gamma's learning rate at the main schedule's peak (1e-3).
        init_seed: seed of `init="random"` (0).
        **kwargs: standard layer arguments.

    Example:
    >>> model = MultiExitModel(backbone, method=HDKD())
    >>> model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-4))
    >>> model.fit(experiment.training_data(config, splits, model.method), epochs=300,
    ...           steps_per_epoch=splits.train_batches(64))
    """

    def __init__(
        self,
        teachers: str = "dense",
        learn_weights: bool = True,
        init: str = "ds",
        temperature: float = 3.0,
        temperature_rule: str = "fixed",
        alpha: float = 0.5,
        ema_momentum: float = 0.9,
        ema_source: str = "meta",
        meta_interval: int = 1,
        gamma_parametrization: str = "softplus",
        gamma_optimizer: str = "adam",
        gamma_learning_rate: float = 1e-3,
        init_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.teachers = v.check_choice("teachers", teachers, _TEACHERS)
        self.learn_weights = v.check_bool("learn_weights", learn_weights)
        self.init = v.check_choice("init", init, _INITS)
        self.temperature = v.check_number("temperature", temperature, low=0.0, low_open=True)
        self.temperature_rule = v.check_choice("temperature_rule", temperature_rule, _TEMPERATURE_RULES)
        self.alpha = v.check_number("alpha", alpha, low=0.0, high=1.0)
        self.ema_momentum = v.check_number("ema_momentum", ema_momentum, low=0.0, high=1.0)
        if self.ema_momentum == 1.0:
            raise ValueError("`ema_momentum` must be a finite number in [0, 1); received 1.0 (E would never move).")
        self.ema_source = v.check_choice("ema_source", ema_source, _EMA_SOURCES)
        v.check_counts(meta_interval=meta_interval)
        self.meta_interval = meta_interval
        self.gamma_parametrization = v.check_choice("gamma_parametrization", gamma_parametrization, _PARAMETRIZATIONS)
        self.gamma_optimizer_name = v.check_choice("gamma_optimizer", gamma_optimizer, _OPTIMIZERS)
        self.gamma_learning_rate = v.check_number("gamma_learning_rate", gamma_learning_rate, low=0.0, low_open=True)
        self.init_seed = v.check_int("init_seed", init_seed)

    @property
    def uses_meta_stream(self) -> bool:  # type: ignore[override]  # per instance, not per class
        """Only the variants that learn gamma take held-out batches."""
        return self.learn_weights

    # --- setup ---------------------------------------------------------------

    def setup(self, model: MultiExitModel) -> None:
        k = model.num_exits
        self.num_exits = k
        self.pairs = kd_pairs(k, self.teachers)
        m = k + len(self.pairs)
        dtype = (
            "float64"
            if model.backbone.trainable_variables and model.backbone.trainable_variables[0].dtype == "float64"
            else "float32"
        )
        gamma0 = initial_gamma(k, self.pairs, self.init, self.init_seed)
        raw0 = _softplus_inverse(gamma0) if self.gamma_parametrization == "softplus" else gamma0
        # Trained by its own optimizer; the method layer is not trainable, so the model's
        # optimizer never sees it.
        self.gamma_raw = self.add_weight(
            shape=(m,), dtype=dtype, initializer=keras.initializers.Constant(raw0), trainable=True, name="gamma_raw"
        )
        # Which exit each term's gradient trains (CE_k: k; KD i->j: the student j), for the per-exit logs.
        owner = np.zeros((m, k))
        owner[np.arange(k), np.arange(k)] = 1.0
        for p, (_, j) in enumerate(self.pairs):
            owner[k + p, j] = 1.0
        self._owner = owner
        self.ema_ce = self.add_weight(shape=(k,), dtype=dtype, initializer="zeros", trainable=False, name="ema_ce")
        self.ema_steps = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, name="ema_steps"
        )
        self.temperatures = self.add_weight(
            shape=(k,),
            dtype=dtype,
            initializer=keras.initializers.Constant(self.temperature),
            trainable=False,
            name="temperatures",
        )
        self.batch_counter = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, name="batch_counter"
        )
        self.initial_main_lr = self.add_weight(
            shape=(), dtype="float32", initializer="zeros", trainable=False, name="initial_main_lr"
        )
        if self.learn_weights:
            lr = bilevel.follow_main_schedule(self.gamma_learning_rate, self._main_optimizer, self.initial_main_lr)
            if self.gamma_optimizer_name == "adam":
                self.gamma_optimizer = keras.optimizers.Adam(learning_rate=lr, name="gamma_adam")
            else:
                self.gamma_optimizer = keras.optimizers.SGD(learning_rate=lr, name="gamma_sgd")
            self.gamma_optimizer.build([self.gamma_raw])
        self.balanced_loss_tracker = keras.metrics.Mean(name="balanced_loss")
        self.built = True

    @property
    def looks_ahead(self) -> bool:
        return self.learn_weights

    # --- the loss --------------------------------------------------------------

    def term_names(self) -> list[str]:
        """Log names of the weights, in term order: `gamma_ce_k`, then `gamma_kd_i_j` (teacher i -> student j)."""
        return [f"gamma_ce_{k + 1}" for k in range(self.num_exits)] + [
            f"gamma_kd_{i + 1}_{j + 1}" for i, j in self.pairs
        ]

    def gamma(self) -> Tensor:
        """The current loss weights `(K + pairs,)`, non-negative (differentiable in `gamma_raw`)."""
        if self.gamma_parametrization == "softplus":
            return ops.softplus(self.gamma_raw)
        return ops.convert_to_tensor(self.gamma_raw)  # kept >= 0 by the projection after each step

    def loss_terms(self, y: Tensor, logits: list[Tensor]) -> tuple[Tensor, Tensor]:
        """`(terms, ce)`: per-sample terms `[CE_1..CE_K, KD_pairs]` `(batch, M)` and the CE `(batch, K)`."""
        ce = core.per_exit_cross_entropy(y, logits)
        kd = dense_kd_terms(logits, self.pairs, self.temperatures)
        return ops.concatenate([ce, ops.cast(kd, ce.dtype)], axis=1), ce

    def _coefficients(self, terms: Tensor, sample_weight: Tensor | None, gamma: Tensor | None = None) -> Tensor:
        """`gamma * sw / N` broadcast to the terms' shape: the inner loss is `sum(coefficients * terms)`."""
        gamma = self.gamma() if gamma is None else gamma
        n = ops.cast(ops.shape(terms)[0], terms.dtype)
        sw = (
            ops.ones_like(terms[:, :1])
            if sample_weight is None
            else ops.reshape(ops.cast(sample_weight, terms.dtype), (-1, 1))
        )
        return ops.cast(gamma, terms.dtype)[None, :] * sw / n

    def per_exit_losses(
        self, terms: Tensor, sample_weight: Tensor | None = None, gamma: Tensor | None = None
    ) -> Tensor:
        """`(K,)`: each exit's weighted CE plus the weighted KD terms it is the student of (sum: the loss)."""
        gamma = ops.stop_gradient(self.gamma()) if gamma is None else gamma
        means = core.sample_weighted_exit_losses(terms, sample_weight) * ops.cast(gamma, terms.dtype)
        return ops.matmul(means[None, :], ops.convert_to_tensor(self._owner, terms.dtype))[0]

    def train_loss(self, y: Tensor, logits: list[Tensor], sample_weight: Tensor | None = None) -> Tensor:
        """The training loss (Eq. 5) at the current gamma, differentiable in the backbone only."""
        terms, _ = self.loss_terms(y, logits)
        return ops.sum(self.per_exit_losses(terms, sample_weight))

    def _ema_value(self, current: Tensor) -> Tensor:
        """E used now: the running average, or the current value on the very first update."""
        return ops.where(self.ema_steps > 0, ops.cast(self.ema_ce, current.dtype), ops.stop_gradient(current))

    def _update_ema(self, current: Tensor) -> None:
        current = ops.cast(ops.stop_gradient(current), self.ema_ce.dtype)
        m = self.ema_momentum
        self.ema_ce.assign(ops.where(self.ema_steps > 0, m * self.ema_ce + (1.0 - m) * current, current))
        self.ema_steps.assign_add(1)

    def _update_temperatures(self, logits: list[Tensor]) -> None:
        if self.temperature_rule != "adaptive" or not self.pairs:
            return
        teachers = sorted({i for i, _ in self.pairs})
        t = self.temperatures
        factors = []
        for k in range(self.num_exits):
            if k in teachers:
                z = ops.stop_gradient(ops.cast(logits[k], t.dtype))
                # (under tf.distribute over the global batch: the same temperatures on every replica)
                confidence = bilevel.global_mean(ops.mean(ops.max(ops.softmax(z / t[k], axis=-1), axis=-1)))
                factors.append(ops.where(confidence > ADAPTIVE_CONFIDENCE, ADAPTIVE_FACTOR, 1.0))
            else:
                factors.append(ops.ones((), t.dtype))
        t.assign(t * ops.cast(ops.stack(factors), t.dtype))

    # --- training --------------------------------------------------------------

    def metric_names(self) -> list[str]:
        names = self.term_names() + [f"ema_ce_{k + 1}" for k in range(self.num_exits)]
        if self.temperature_rule == "adaptive":
            names += [f"temperature_{i + 1}" for i in sorted({i for i, _ in self.pairs})]
        return names + (["balanced_loss"] if self.learn_weights else [])

    def step_logs(self, model: MultiExitModel) -> dict[str, Tensor]:
        logs = model.model_logs()
        gamma = self.gamma()
        for p, name in enumerate(self.term_names()):
            logs[name] = gamma[p]
        for k in range(self.num_exits):
            logs[f"ema_ce_{k + 1}"] = self.ema_ce[k]
        if self.temperature_rule == "adaptive":
            for i in sorted({i for i, _ in self.pairs}):
                logs[f"temperature_{i + 1}"] = self.temperatures[i]
        if self.learn_weights:
            logs["balanced_loss"] = self.balanced_loss_tracker.result()
        return logs

    def train_step(self, model: MultiExitModel, data: Any, meta_batch: Any = None) -> dict[str, Tensor]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        self.follow(model.optimizer)
        if not self.learn_weights:
            model.skippable_step(lambda x, y, sw: self._plain_step(model, x, y, sw), args=(x, y, sample_weight))
        else:
            if meta_batch is None:
                raise ValueError(
                    f"{type(self).__name__} with learn_weights=True needs a meta batch: "
                    "train_step(model, data, meta_batch=(x_meta, y_meta))."
                )
            x_m, y_m, _ = keras.utils.unpack_x_y_sample_weight(tuple(meta_batch))
            bilevel.record_initial_learning_rate(model.optimizer, self.initial_main_lr)
            # One real step either way (a skipped one also undoes the gamma step before it).
            model.skippable_step(
                lambda *args: bilevel.every(
                    self.batch_counter,
                    self.meta_interval,
                    lambda x, y, sw, x_m, y_m: self._meta_step(model, x, y, sw, x_m, y_m),
                    lambda x, y, sw, x_m, y_m: self._plain_step(model, x, y, sw),
                    args=args,
                ),
                args=(x, y, sample_weight, x_m, y_m),
            )
        self.batch_counter.assign_add(1)
        return self.step_logs(model)

    def _plain_step(self, model: MultiExitModel, x: Tensor, y: Tensor, sample_weight: Tensor | None) -> None:
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            terms, ce = self.loss_terms(y, logits)
            per_exit = self.per_exit_losses(terms, sample_weight)
            loss = ops.sum(per_exit)
            scaled = model.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        model.apply_step(grads, per_exit)
        model.update_step_metrics(loss, y, logits, ce)
        if self.ema_source == "train":
            self._update_ema(bilevel.global_mean(ops.mean(ce, axis=0)))  # global under tf.distribute
        self._update_temperatures(logits)

    def lookahead(
        self, model: MultiExitModel, x_t: Tensor, y_t: Tensor, sw_t: Tensor | None, x_m: Tensor, y_m: Tensor
    ) -> bilevel.LookAheadResult:
        """The one-step bilevel pass: a `bilevel.LookAheadResult` whose outer gradient is d L_val / d gamma_raw.

        `terms` are the per-sample `[CE, KD]` terms at theta (independent of gamma), `aux`
        the CE `(batch, K)`, `outer_aux` `(ce_means_meta, E)`: the meta batch's mean CE per
        exit through theta' and the E the balanced loss divided by.
        """
        stash: dict[str, Tensor] = {}

        def terms_fn(logits: list[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
            terms, ce = self.loss_terms(y, logits)
            stash["ce"] = ce
            return terms, ce

        def coefficients_fn(terms: Tensor, aux: Tensor) -> Tensor:
            return self._coefficients(terms, sw_t)

        def outer_fn(logits_meta: list[Tensor], y_meta: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            # Under tf.distribute: the global meta batch's means (equal parts), so the balanced
            # loss and the EMA are those of one device. One device: unchanged.
            ce_means = bilevel.global_mean(ops.mean(core.per_exit_cross_entropy(y_meta, logits_meta), axis=0))
            source = ce_means if self.ema_source == "meta" else bilevel.global_mean(ops.mean(stash["ce"], axis=0))
            ema = ops.stop_gradient(self._ema_value(ops.cast(source, ce_means.dtype)))
            return balanced_loss(ce_means, ema, self.alpha), (ce_means, ema)

        la = bilevel.LookAhead(model.backbone, model.optimizer, [self.gamma_raw], terms_fn, coefficients_fn, outer_fn)
        return la.run(x_t, y_t, x_m, y_m)

    def _apply_gamma(
        self,
        model: MultiExitModel,
        grads: Sequence[Tensor | None],
        ce_means_meta: Tensor,
        result: bilevel.LookAheadResult | None = None,
    ) -> None:
        grad = grads[0]
        grad = ops.zeros_like(self.gamma_raw) if grad is None else ops.cast(grad, self.gamma_raw.dtype)
        model.record_nonfinite(ce_means_meta, phase=1, when=None if result is None else result.inner_finite)

        def step(grad: Tensor) -> None:
            # Under tf.distribute: each replica's share of the mean gradient (the optimizer sums).
            self.gamma_optimizer.apply(bilevel.global_mean_gradients([grad]), [self.gamma_raw])
            if self.gamma_parametrization == "clip":
                self.gamma_raw.assign(ops.maximum(self.gamma_raw, 0.0))

        # Under loss scaling: no gamma step where the look-ahead overflowed.
        bilevel.unless_overflow(None if result is None else result.finite, step, args=(grad,))

    def _meta_step(
        self, model: MultiExitModel, x: Tensor, y: Tensor, sample_weight: Tensor | None, x_m: Tensor, y_m: Tensor
    ) -> None:
        result = self.lookahead(model, x, y, sample_weight, x_m, y_m)
        ce = result.aux
        model.record_nonfinite(ops.mean(ce, axis=0), phase=0)  # a bad training loss before the meta loss
        ce_means_meta, _ = result.outer_aux
        self._apply_gamma(model, result.outer_gradients, ce_means_meta, result)
        bilevel.unless_overflow(
            result.finite,
            lambda loss: self.balanced_loss_tracker.update_state(ops.cast(loss, "float32")),
            args=(result.outer_loss,),
        )
        # The real step with the new gamma, reusing the look-ahead's forward.
        gamma = ops.stop_gradient(self.gamma())
        coefficients = self._coefficients(result.terms, sample_weight, gamma)
        grads = result.real_gradients(model.scale_loss(coefficients))
        core.assign_values(model.backbone.non_trainable_variables, result.non_trainable)
        per_exit = self.per_exit_losses(result.terms, sample_weight, gamma)
        model.apply_step(grads, per_exit, finite=result.finite)
        model.update_step_metrics(ops.sum(per_exit), y, result.logits, ce)
        if self.ema_source == "meta":  # not the meta losses of an overflowed look-ahead
            bilevel.unless_overflow(result.finite, self._update_ema, args=(ce_means_meta,))
        else:
            self._update_ema(bilevel.global_mean(ops.mean(ce, axis=0)))
        self._update_temperatures(result.logits)

    # --- run-folder files --------------------------------------------------------

    def kd_matrix(self) -> np.ndarray:
        """`(K, K)` float64: entry [i, j] the weight of KD teacher i+1 -> student j+1, NaN where no pair."""
        gamma = np.asarray(ops.convert_to_numpy(self.gamma()), np.float64)
        out = np.full((self.num_exits, self.num_exits), np.nan)
        for p, (i, j) in enumerate(self.pairs):
            out[i, j] = gamma[self.num_exits + p]
        return out

    def summary(self, splits: DatasetSplits | None = None) -> dict:
        """What `hdkd.json` holds: the options that shape the loss, the final gamma, E, T and the meta source."""
        gamma = [float(v) for v in np.asarray(ops.convert_to_numpy(self.gamma()), np.float64)]
        k = self.num_exits
        return {
            "method": getattr(self, "method_name", type(self).__name__),
            "teachers": self.teachers,
            "learn_weights": self.learn_weights,
            "meta_source": (getattr(splits, "meta_source", None) if self.learn_weights else None),
            "num_meta": (getattr(splits, "num_meta", None) if self.learn_weights else None),
            "gamma_ce": gamma[:k],
            "gamma_kd": {f"{i + 1}->{j + 1}": gamma[k + p] for p, (i, j) in enumerate(self.pairs)},
            "ema_ce": [float(v) for v in self.ema_ce.numpy()],
            "temperatures": {
                str(i + 1): float(self.temperatures.numpy()[i]) for i in sorted({i for i, _ in self.pairs})
            },
            "gamma_steps": int(self.gamma_optimizer.iterations.numpy()) if self.learn_weights else 0,
        }

    def save_artifacts(self, model: MultiExitModel, splits: DatasetSplits, folder: RunFolder) -> None:
        """`hdkd.json` (final weights, E, T, which split fed the meta batches) and `hdkd_gamma.png`."""
        from keras_ee.atomic import atomic_path, atomic_write_text

        atomic_write_text(folder / ARTIFACT, json.dumps(self.summary(splits), indent=2) + "\n")
        if self.pairs:
            with atomic_path(folder / HEATMAP) as tmp:
                kd_heatmap(self.kd_matrix(), tmp, title=f"{getattr(self, 'method_name', 'hdkd')}: KD weights")

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            teachers=self.teachers,
            learn_weights=self.learn_weights,
            init=self.init,
            temperature=self.temperature,
            temperature_rule=self.temperature_rule,
            alpha=self.alpha,
            ema_momentum=self.ema_momentum,
            ema_source=self.ema_source,
            meta_interval=self.meta_interval,
            gamma_parametrization=self.gamma_parametrization,
            gamma_optimizer=self.gamma_optimizer_name,
            gamma_learning_rate=self.gamma_learning_rate,
            init_seed=self.init_seed,
        )
        return config


def kd_heatmap(matrix: np.ndarray, path: StrPath, title: str | None = None) -> Path:
    """A heat map of KD weights: rows the teacher exit i, columns the student exit j (blank: no pair)."""
    plt = pyplot()
    matrix = np.asarray(matrix, np.float64)
    k = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k), dpi=120)
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", origin="upper")
    ax.set_xticks(range(k), [str(j + 1) for j in range(k)])
    ax.set_yticks(range(k), [str(i + 1) for i in range(k)])
    ax.set_xlabel("student exit j")
    ax.set_ylabel("teacher exit i")
    if k <= 8:
        for i in range(k):
            for j in range(k):
                if np.isfinite(matrix[i, j]):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(image, ax=ax, label="gamma_ij")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


# --- the paper's named variants: the same class, other option defaults ------------------------


@register_method(
    "naive_dkd",
    summary="NaiveDKD: dense KD (every later exit teaches every earlier one), uniform "
    "fixed weights (Eq. 4, lambda = 1)",
    paper=PAPER,
    option_types=_OPTION_TYPES,
)
@keras.saving.register_keras_serializable(package="keras_ee")
class NaiveDKD(HDKD):
    """HDKD's dense KD with every weight fixed at 1 (`teachers="dense"`, `learn_weights=False`, `init="uniform"`)."""

    def __init__(
        self, teachers: str = "dense", learn_weights: bool = False, init: str = "uniform", **kwargs: Any
    ) -> None:
        super().__init__(teachers=teachers, learn_weights=learn_weights, init=init, **kwargs)


@register_method(
    "dbt",
    summary="DBT as compared in HDKD: the last exit teaches every earlier one, uniform fixed "
    "weights (Eq. 3, lambda = 1)",
    paper=PAPER,
    option_types=_OPTION_TYPES,
)
@keras.saving.register_keras_serializable(package="keras_ee")
class DBT(HDKD):
    """Distillation-based training (`teachers="last"`, `learn_weights=False`, `init="uniform"`).

    DBT's own adaptive temperature: `temperature_rule="adaptive" temperature=1`.
    """

    def __init__(
        self, teachers: str = "last", learn_weights: bool = False, init: str = "uniform", **kwargs: Any
    ) -> None:
        super().__init__(teachers=teachers, learn_weights=learn_weights, init=init, **kwargs)


@register_method(
    "hmsdnet",
    summary="HMSDNet: the exits' CE weights learned bilevel as HDKD, no distillation",
    paper=PAPER,
    option_types=_OPTION_TYPES,
)
@keras.saving.register_keras_serializable(package="keras_ee")
class HMSDNet(HDKD):
    """Learned CE weights only (`teachers="none"`, `learn_weights=True`)."""

    def __init__(self, teachers: str = "none", learn_weights: bool = True, **kwargs: Any) -> None:
        super().__init__(teachers=teachers, learn_weights=learn_weights, **kwargs)


@register_method(
    "hdbt",
    summary="HDBT: DBT's losses (the last exit teaches) with weights learned bilevel as HDKD",
    paper=PAPER,
    option_types=_OPTION_TYPES,
)
@keras.saving.register_keras_serializable(package="keras_ee")
class HDBT(HDKD):
    """Learned weights, the last exit teaches (`teachers="last"`, `learn_weights=True`)."""

    def __init__(self, teachers: str = "last", learn_weights: bool = True, **kwargs: Any) -> None:
        super().__init__(teachers=teachers, learn_weights=learn_weights, **kwargs)
