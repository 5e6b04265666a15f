"""L2W-DEN: learning to weight samples for dynamic early-exiting networks.

Implements Algorithm 1 of "Learning to Weight Samples for Dynamic
Early-exiting Networks" (Han et al., ECCV 2022, arXiv:2209.08310) and its
supplementary material, with the paper's CIFAR settings as defaults.

Design notes (why it is built this way):

- Half-batch exchange: every loaded batch is split into halves A and B; A
  trains while B is the meta batch, then the roles swap. Each loaded batch
  therefore gives two real optimizer steps on half batches: the per-step
  batch is half the loaded batch, and the number of optimizer steps per
  epoch is twice the number of batches (the same number of samples per
  step and steps per epoch as a baseline fed batches of half the size).
- The pseudo-update uses `core.lookahead_step`: the exact step the real
  optimizer would take now (schedule, momentum buffers, Nesterov, weight
  decay: coupled for the papers' `keras_ee.optimizers`, decoupled for
  Keras'), without touching the optimizer's state.
- Forward passes are reused: the pseudo-update's forward on the training
  half at the current parameters is the real step's forward too (same
  parameters, same batch statistics); the real gradient is a second
  backward pass of that forward with the updated WPN's weights, and the
  BatchNorm statistics it computed are the ones assigned. The meta forward
  (through the look-ahead parameters) runs in training mode and its
  BatchNorm statistics are discarded.
- WPN optimizer: `torch.optim.Adam(weight_decay=...)`'s step as the reference
  code (`keras_ee.optimizers.Adam`: L2 weight decay added to the gradient,
  `g + wd * theta`, epsilon 1e-8 after the bias correction);
  `wpn_optimizer="keras_adam"` is Keras' Adam (epsilon 1e-7 before the bias
  correction) with the same L2 term, the optimizer before keras-ee took
  PyTorch's steps. Its learning rate follows the same schedule shape as the
  main optimizer: `lr_wpn(t) = wpn_learning_rate * lr(t) / lr(0)`, with
  `lr(t)` the main optimizer's current learning rate and `lr(0)` its value at
  iteration 0 (recorded when training starts if the learning rate is a plain
  value that callbacks may change).
- Under `tf.distribute` (R replicas): each replica splits its own part of the
  global batch into halves (the global half is the union of the replicas'
  halves); the meta step runs in the cross-replica context's condition
  (`bilevel.replica_cond`); the look-ahead takes the real optimizer's global
  step (all-reduced gradient); the q-allocation ranks the whole global meta
  batch (`allocate_by_confidence_across_replicas`) and each exit's meta loss is
  a mean over its global count; the WPN's gradient is shared by the replicas
  (`bilevel.global_mean_gradients`), so the WPN is one network, the same on
  every replica, taking the one-device step on the global halves. The
  `"selection"` ablation allocates each replica's training half on its own.
"""

import typing
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_ee import optimizers as ee_optimizers
from keras_ee import validation as v
from keras_ee._typing import StrPath, Tensor
from keras_ee.training import bilevel, core
from keras_ee.training.allocation import (
    allocate_by_confidence,
    allocate_by_confidence_across_replicas,
    allocate_by_confidence_numpy,
)
from keras_ee.training.methods import Method
from keras_ee.training.registry import SearchRange, register_method

if TYPE_CHECKING:
    from keras_ee.data import DatasetSplits
    from keras_ee.run_folder import RunFolder
    from keras_ee.training.model import MultiExitModel

_INPUTS = ("loss", "confidence", "both")
_CONSTRAINTS = ("col", "row", "mat")
_WEIGHTINGS = ("wpn", "frozen", "selection", "rising", "falling")
_OBJECTIVES = ("allocated", "vanilla")
_WPN_OPTIMIZERS = ("adam", "keras_adam")  # the papers' (torch.optim.Adam's step) or Keras' Adam


@keras.saving.register_keras_serializable(package="keras_ee")
class WeightPredictionNetwork(bilevel.MLP):
    """The L2W weight prediction network (WPN): an MLP with K tanh outputs.

    `depth` hidden Dense layers of `width` units with ReLU, then a Dense layer with K
    outputs and tanh, initialised like PyTorch's `nn.Linear` (as in the reference code).

    Args:
        num_exits: K, the number of outputs.
        input_dim: number of input features (K for losses or confidences, 2K for both).
        depth: number of hidden layers (>= 1; paper 1).
        width: hidden width (paper CIFAR 500).
        **kwargs: standard layer arguments.

    Example:
    >>> wpn = WeightPredictionNetwork(num_exits=5, input_dim=5)
    >>> u = wpn(per_exit_losses)    # (batch, 5) in (-1, 1)
    """

    def __init__(self, num_exits: int, input_dim: int, depth: int = 1, width: int = 500, **kwargs: Any) -> None:
        v.check_int("num_exits", num_exits, 1)
        super().__init__(
            input_dim=input_dim,
            output_dim=num_exits,
            depth=depth,
            width=width,
            activation="relu",
            output_activation="tanh",
            **kwargs,
        )
        self.num_exits = num_exits

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        for key in ("output_dim", "activation", "output_activation"):
            config.pop(key)
        config["num_exits"] = self.num_exits
        return config


def zero_sum_weights(u: Tensor, delta: float, constraint: str = "col") -> Tensor:
    """`w = 1 + delta * (u - mean)` with the zero-sum constraint.

    Args:
        u: `(batch, K)` WPN outputs (tanh, in [-1, 1]).
        delta: perturbation scale in (0, 1].
        constraint: `"col"` subtracts each sample's mean over its exits,
            `"row"` each exit's mean over the batch, `"mat"` the global mean.

    Returns:
        `(batch, K)` weights; not clamped (as the reference).
    """
    if constraint == "col":
        centered = u - ops.mean(u, axis=1, keepdims=True)
    elif constraint == "row":
        centered = u - ops.mean(u, axis=0, keepdims=True)
    elif constraint == "mat":
        centered = u - ops.mean(u)
    else:
        raise ValueError(f"`constraint` must be one of {_CONSTRAINTS}; received {constraint!r}.")
    return 1.0 + float(delta) * centered


@register_method(
    "l2w",
    summary="learning to weight samples: a meta-learned network weights each sample at each exit",
    paper="Learning to Weight Samples for Dynamic Early-exiting Networks (Han et al., ECCV 2022, arXiv:2209.08310)",
    search_space={"q": SearchRange(0.5, 1.0), "delta": SearchRange(0.1, 1.0)},
    option_types={
        "wpn_input": typing.Literal["loss", "confidence", "both"],
        "constraint": typing.Literal["col", "row", "mat"],
        "meta_objective": typing.Literal["allocated", "vanilla"],
        "weighting": typing.Literal["wpn", "frozen", "selection", "rising", "falling"],
        "wpn_weights_path": str | None,
        "wpn_optimizer": typing.Literal["adam", "keras_adam"],
    },
    reference_code={},
    reference_note="LeapLabTHU/L2W-DEN: its CIFAR command (README: WPN width 500, constraint col, delta 0.8, "
    "q 0.75, WPN Adam lr 1e-4, weight decay 1e-4, meta_interval 1) is the paper's setting, the defaults here; "
    "its parser defaults (width 100, WPN lr 1e-5, no weight decay) are not what it ran",
)
@keras.saving.register_keras_serializable(package="keras_ee")
class L2W(bilevel.FollowsMainOptimizer, Method):
    """Learning to weight samples (L2W-DEN) with meta-learning.

    Trains the backbone with per-sample, per-exit weights
    `w = 1 + delta * zero_sum(WPN(losses))` and the WPN on a meta objective
    that mimics early exiting: after a look-ahead step of the backbone on one
    half of the batch, each exit's cross-entropy on the meta samples it would
    take under the budget controller `q` (other half of the batch). See the
    module docstring for the half-batch exchange and the WPN schedule.

    Args:
        q: budget controller of the meta-data allocation (> 0; CIFAR 0.75).
        delta: weight perturbation scale, in (0, 1] (CIFAR 0.8).
        wpn_depth: hidden layers of the WPN (1).
        wpn_width: hidden width of the WPN (CIFAR 500).
        wpn_input: `"loss"` (default), `"confidence"` or `"both"`.
        constraint: zero-sum constraint `"col"` (default), `"row"`, `"mat"`.
        meta_interval: I, update the WPN every I loaded batches (1).
        wpn_learning_rate: Adam's base learning rate (1e-4).
        wpn_weight_decay: Adam's L2 weight decay (1e-4).
        wpn_optimizer: `"adam"` (default: `torch.optim.Adam`'s step, the code's) or
            `"keras_adam"` (Keras' Adam with the L2 term in the gradient).
        meta_objective: `"allocated"` (each exit on its allocated meta
            samples; the paper) or `"vanilla"` (every exit on the whole meta
            batch; ablation).
        weighting: `"wpn"` (meta-learned; the paper), or an ablation:
            `"frozen"` (WPN loaded from `wpn_weights_path`, never updated),
            `"selection"` (vanilla selection: each exit trains only on the
            samples of the training half allocated to it by `q`),
            `"rising"` / `"falling"` (fixed weights 0.6 -> 1.4 over exits, or
            the reverse).
        wpn_weights_path: `.npz` file written by `L2W.save_wpn` (required for
            `weighting="frozen"`, optional initial WPN for `"wpn"`).
        **kwargs: standard layer arguments.

    Example:
    >>> model = MultiExitModel(backbone, method=L2W(q=0.75, delta=0.8))
    >>> model.compile(optimizer=keras.optimizers.SGD(
    ...     0.1, momentum=0.9, weight_decay=1e-4))
    >>> model.fit(train_ds, epochs=300)
    """

    # Half-batch exchange: two real backbone steps (on halves) per loaded batch.
    optimizer_steps_per_batch = 2
    min_batch_per_replica = 2  # two halves of at least one sample

    def __init__(
        self,
        q: float = 0.75,
        delta: float = 0.8,
        wpn_depth: int = 1,
        wpn_width: int = 500,
        wpn_input: str = "loss",
        constraint: str = "col",
        meta_interval: int = 1,
        wpn_learning_rate: float = 1e-4,
        wpn_weight_decay: float = 1e-4,
        meta_objective: str = "allocated",
        weighting: str = "wpn",
        wpn_weights_path: str | None = None,
        wpn_optimizer: str = "adam",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        v.check_number("q", q, low=0.0, low_open=True)
        v.check_number("delta", delta, low=0.0, high=1.0, low_open=True)
        v.check_number("wpn_learning_rate", wpn_learning_rate, low=0.0)
        v.check_number("wpn_weight_decay", wpn_weight_decay, low=0.0)
        v.check_counts(wpn_depth=wpn_depth, wpn_width=wpn_width, meta_interval=meta_interval)
        for name, value, allowed in (
            ("wpn_input", wpn_input, _INPUTS),
            ("constraint", constraint, _CONSTRAINTS),
            ("weighting", weighting, _WEIGHTINGS),
            ("meta_objective", meta_objective, _OBJECTIVES),
            ("wpn_optimizer", wpn_optimizer, _WPN_OPTIMIZERS),
        ):
            v.check_choice(name, value, allowed)
        if weighting == "frozen" and wpn_weights_path is None:
            raise ValueError(
                "`weighting='frozen'` needs `wpn_weights_path` (a file written by `L2W.save_wpn`); received None."
            )
        if wpn_weights_path is not None and weighting not in ("wpn", "frozen"):
            raise ValueError(
                f"`wpn_weights_path` is only used with weighting 'wpn' or 'frozen'; received weighting={weighting!r}."
            )
        self.q = float(q)
        self.delta = float(delta)
        self.wpn_depth = wpn_depth
        self.wpn_width = wpn_width
        self.wpn_input = wpn_input
        self.constraint = constraint
        self.meta_interval = meta_interval
        self.wpn_learning_rate = float(wpn_learning_rate)
        self.wpn_weight_decay = float(wpn_weight_decay)
        self.meta_objective = meta_objective
        self.weighting = weighting
        self.wpn_weights_path = wpn_weights_path
        self.wpn_optimizer_name = wpn_optimizer

    # --- setup ---------------------------------------------------------------

    @property
    def meta_learns(self) -> bool:
        """Whether the WPN is trained (the meta step runs)."""
        return self.weighting == "wpn"

    @property
    def uses_wpn(self) -> bool:
        return self.weighting in ("wpn", "frozen")

    def setup(self, model: "MultiExitModel") -> None:
        k = model.num_exits
        if k < 2 and self.meta_objective == "allocated":
            # One exit: the allocation is trivial; allowed, nothing to check.
            pass
        self.num_exits = k
        if self.uses_wpn:
            input_dim = 2 * k if self.wpn_input == "both" else k
            self.wpn = WeightPredictionNetwork(
                num_exits=k,
                input_dim=input_dim,
                depth=self.wpn_depth,
                width=self.wpn_width,
                name="wpn",
                # The policy's variable dtype: float32 also under a mixed policy (a small
                # network whose optimizer scales no loss would lose its small gradients).
                dtype=keras.config.dtype_policy().variable_dtype,
            )
            self.wpn.build((None, input_dim))
            self.wpn.trainable = False
            if self.wpn_weights_path is not None:
                self.load_wpn(self.wpn_weights_path)
        stats = bilevel.PerExitStats(k, "weight")
        self.weight_stats = stats
        # Attributes, so that Keras tracks and resets the metrics with the model's.
        self.weight_mean_trackers = stats.means
        self.weight_min_trackers = stats.mins
        self.weight_max_trackers = stats.maxs
        # Loaded batches seen (drives the meta interval).
        self.batch_counter = self.add_weight(
            shape=(),
            dtype="int64",
            initializer="zeros",
            trainable=False,
            name="batch_counter",
        )
        # Main optimizer's learning rate at iteration 0 (WPN schedule shape).
        self.initial_main_lr = self.add_weight(
            shape=(),
            dtype="float32",
            initializer="zeros",
            trainable=False,
            name="initial_main_lr",
        )
        if self.meta_learns:
            learning_rate = bilevel.follow_main_schedule(
                self.wpn_learning_rate, self._main_optimizer, self.initial_main_lr
            )
            if self.wpn_optimizer_name == "adam":
                self.wpn_optimizer = ee_optimizers.Adam(
                    learning_rate=learning_rate, weight_decay=self.wpn_weight_decay, name="wpn_adam"
                )
            else:
                self.wpn_optimizer = keras.optimizers.Adam(learning_rate=learning_rate, name="wpn_adam")
            self.wpn_optimizer.build(self.wpn.weights)
        self.built = True

    @property
    def looks_ahead(self) -> bool:
        return self.meta_learns

    # --- weights -------------------------------------------------------------

    def wpn_features(self, ce: Tensor, confidence: Tensor) -> Tensor:
        """WPN input from detached losses and/or confidences."""
        ce = ops.stop_gradient(ce)
        confidence = ops.stop_gradient(ops.cast(confidence, ce.dtype))
        if self.wpn_input == "loss":
            return ce
        if self.wpn_input == "confidence":
            return confidence
        return ops.concatenate([ce, confidence], axis=1)

    def sample_weights(self, ce: Tensor, confidence: Tensor, training_selection: Any = None) -> Tensor:
        """Per-sample, per-exit weights `(batch, K)` of the current method.

        Differentiable w.r.t. the WPN for `weighting="wpn"`.
        """
        dtype = ce.dtype
        n = ops.shape(ce)[0]
        if self.uses_wpn:
            u = self.wpn(self.wpn_features(ce, confidence))
            return zero_sum_weights(ops.cast(u, dtype), self.delta, self.constraint)
        if self.weighting in ("rising", "falling"):
            w = np.linspace(0.6, 1.4, self.num_exits)
            if self.weighting == "falling":
                w = w[::-1]
            return ops.broadcast_to(
                ops.convert_to_tensor(w.copy(), dtype=dtype)[None, :],
                (n, self.num_exits),
            )
        # Vanilla selection: mean over each exit's allocated subset.
        mask = allocate_by_confidence(ops.cast(confidence, dtype), self.q)
        counts = ops.sum(mask, axis=0, keepdims=True)
        scale = ops.cast(n, dtype) / ops.maximum(counts, 1.0)
        return mask * scale

    def meta_loss(self, ce_meta: Tensor, confidence_meta: Tensor) -> tuple[Tensor, Tensor]:
        """Meta objective and its per-exit terms on the meta batch."""
        if self.meta_objective == "vanilla":
            per_exit = ops.mean(ce_meta, axis=0)
        else:
            # Under tf.distribute: allocated over the global meta batch, each exit's mean
            # taken over its global count (times the replicas, as the replicas' mean loss
            # is what the WPN steps on; see `bilevel.LookAhead`). One device: unchanged.
            mask = allocate_by_confidence_across_replicas(confidence_meta, self.q)
            mask = ops.cast(mask, ce_meta.dtype)
            counts = ops.sum(mask, axis=0)
            replicas = bilevel.num_replicas()
            if replicas > 1 and bilevel.replica_context() is not None:
                counts = bilevel.global_sum(counts) * ops.cast(1.0 / replicas, counts.dtype)
            # Empty subsets contribute nothing (skipped).
            per_exit = ops.sum(mask * ce_meta, axis=0) / ops.maximum(counts, 1.0)
        return ops.sum(per_exit), per_exit

    # --- training ------------------------------------------------------------

    def metric_names(self) -> list[str]:
        return self.weight_stats.names()

    def step_logs(self, model: "MultiExitModel") -> dict[str, Tensor]:
        return {**model.model_logs(), **self.weight_stats.logs()}

    def train_step(self, model: "MultiExitModel", data: Any) -> dict[str, Tensor]:
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError(
                "L2W learns its own sample weights; received `sample_weight` in the data, expected (x, y)."
            )
        self.follow(model.optimizer)
        bilevel.record_initial_learning_rate(model.optimizer, self.initial_main_lr)
        bilevel.half_batch_exchange(model, x, y, lambda x_t, y_t, x_m, y_m: self._half_step(model, x_t, y_t, x_m, y_m))
        self.batch_counter.assign_add(1)
        return self.step_logs(model)

    def _half_step(self, model: "MultiExitModel", x_t: Tensor, y_t: Tensor, x_m: Tensor, y_m: Tensor) -> None:
        if not self.meta_learns:
            self._plain_step(model, x_t, y_t)
            return
        bilevel.every(
            self.batch_counter,
            self.meta_interval,
            lambda x_t, y_t, x_m, y_m: self._meta_step(model, x_t, y_t, x_m, y_m),
            lambda x_t, y_t, x_m, y_m: self._plain_step(model, x_t, y_t),
            args=(x_t, y_t, x_m, y_m),
        )

    def _apply_real(
        self,
        model: "MultiExitModel",
        grads: list[Tensor],
        per_exit: Tensor,
        loss: Tensor,
        y: Tensor,
        logits: list[Tensor],
        ce: Tensor,
        w: Tensor,
        finite: Tensor | None = None,
    ) -> None:
        model.apply_step(grads, per_exit, finite=finite)
        model.update_step_metrics(loss, y, logits, ce)
        self.weight_stats.update(w)

    def loss_terms(self, model: "MultiExitModel", x: Tensor) -> Callable[[Tensor, list[Tensor]], Tensor] | None:
        """`fn(ce, logits) -> (batch, K)` terms that the sample weights multiply, for batch `x`.

        Default: the cross-entropies themselves. A method built on L2W can weight other
        per-exit terms (L2W + IMTA's phase II: each exit's CE + distillation term); the
        WPN's inputs stay the cross-entropies and confidences.
        """
        return None

    def _plain_step(self, model: "MultiExitModel", x: Tensor, y: Tensor) -> None:
        variables = model.trainable_variables
        terms_of = self.loss_terms(model, x)
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            ce = core.per_exit_cross_entropy(y, logits)
            conf = core.exit_confidence(logits)
            w = ops.stop_gradient(self.sample_weights(ce, conf))
            terms = ce if terms_of is None else terms_of(ce, logits)
            per_exit = core.weighted_exit_losses(terms, w)
            loss = ops.sum(per_exit)
            scaled = model.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        self._apply_real(model, grads, per_exit, loss, y, logits, ce, w)

    def meta_gradients(
        self, model: "MultiExitModel", x_t: Tensor, y_t: Tensor, x_m: Tensor, y_m: Tensor
    ) -> tuple[list[Tensor], bilevel.LookAheadResult]:
        """Meta-gradient of the WPN (steps 2-3 of Algorithm 1).

        Pseudo-updates the backbone on the training half `(x_t, y_t)` with
        the exact step the real optimizer would take now and returns the
        gradient of the meta loss on `(x_m, y_m)` w.r.t. the WPN's weights.
        Nothing is assigned (backbone, BatchNorm statistics, optimizers).

        Returns:
            `(wpn_grads, result)`: the gradients (one per
            `self.wpn.weights`) and the `bilevel.LookAheadResult` holding the
            reusable training-half forward pass (`terms` = the weighted
            per-exit terms, the CE unless `loss_terms` says otherwise; `aux` =
            `(ce, logits)`; `logits`, `non_trainable` BN statistics, `outer_loss`, and
            `outer_aux` = the meta loss's per-exit terms).
        """
        terms_of = self.loss_terms(model, x_t)

        def terms_fn(logits: list[Tensor], y: Tensor) -> tuple[Tensor, tuple[Tensor, list[Tensor]]]:
            ce = core.per_exit_cross_entropy(y, logits)
            return (ce if terms_of is None else terms_of(ce, logits)), (ce, logits)

        def coefficients_fn(terms: Tensor, aux: tuple[Tensor, list[Tensor]]) -> Tensor:
            ce, logits = aux
            w = self.sample_weights(ce, core.exit_confidence(logits))
            return w / ops.cast(ops.shape(ce)[0], w.dtype)

        def outer_fn(logits_meta: list[Tensor], y_meta: Tensor) -> tuple[Tensor, Tensor]:
            ce_m = core.per_exit_cross_entropy(y_meta, logits_meta)
            return self.meta_loss(ce_m, core.exit_confidence(logits_meta))  # (loss, per-exit terms)

        lookahead = bilevel.LookAhead(
            model.backbone, model.optimizer, self.wpn.weights, terms_fn, coefficients_fn, outer_fn
        )
        result = lookahead.run(x_t, y_t, x_m, y_m)
        return result.outer_gradients, result

    def _meta_step(self, model: "MultiExitModel", x_t: Tensor, y_t: Tensor, x_m: Tensor, y_m: Tensor) -> None:
        wpn_vars = self.wpn.weights
        wpn_grads, result = self.meta_gradients(model, x_t, y_t, x_m, y_m)
        ce, _ = result.aux
        # Report a non-finite training loss before the meta loss it causes.
        model.record_nonfinite(ops.mean(ce, axis=0), phase=0)
        model.record_nonfinite(result.outer_aux, phase=1, when=result.inner_finite)
        wpn_grads = [ops.zeros_like(v) if g is None else g for g, v in zip(wpn_grads, wpn_vars)]
        if self.wpn_optimizer_name == "keras_adam":  # L2 decay in the gradient (the papers' Adam has it inside)
            wpn_grads = [g + self.wpn_weight_decay * v for g, v in zip(wpn_grads, wpn_vars)]
        # Under tf.distribute: each replica's share of the mean gradient (the optimizer sums).
        # Under loss scaling: no WPN step where the look-ahead overflowed (the real step is skipped too).
        bilevel.unless_overflow(
            result.finite,
            lambda g: self.wpn_optimizer.apply(bilevel.global_mean_gradients(g), wpn_vars),
            args=(wpn_grads,),
        )

        # Real step on the training half, reusing the look-ahead's forward.
        logits = result.logits
        n = ops.cast(ops.shape(ce)[0], ce.dtype)
        w = ops.stop_gradient(self.sample_weights(ce, core.exit_confidence(logits)))
        # Gradients of the scaled loss, as `apply_step` expects (mixed precision).
        grads = result.real_gradients(model.scale_loss(w / n))
        core.assign_values(model.backbone.non_trainable_variables, result.non_trainable)
        per_exit = core.weighted_exit_losses(result.terms, w)
        self._apply_real(model, grads, per_exit, ops.sum(per_exit), y_t, logits, ce, w, finite=result.finite)

    # --- WPN files and statistics ---------------------------------------------

    def save_artifacts(self, model: "MultiExitModel", splits: "DatasetSplits", folder: "RunFolder") -> None:
        """`wpn.npz` (for the frozen-WPN ablation) and `l2w_samples.npz` (Figure 8)."""
        from keras_ee.atomic import atomic_path

        if self.uses_wpn:
            with atomic_path(folder / "wpn.npz") as tmp:
                self.save_wpn(tmp)
        stats: dict[str, Any] = self.sample_statistics(model, splits.train_dataset(256, augment=False, shuffle=False))
        with atomic_path(folder / "l2w_samples.npz") as tmp:
            np.savez_compressed(tmp, **stats)

    def save_wpn(self, path: StrPath) -> None:
        """Save the WPN's weights and shape to an `.npz` file."""
        if not self.uses_wpn:
            raise ValueError(f"weighting={self.weighting!r} has no WPN to save.")
        arrays: dict[str, Any] = {f"w{i}": np.asarray(v.numpy()) for i, v in enumerate(self.wpn.weights)}
        np.savez(
            path,
            config=np.array([self.wpn.num_exits, self.wpn.input_dim, self.wpn.depth, self.wpn.width]),
            **arrays,
        )

    def load_wpn(self, path: StrPath) -> None:
        """Load WPN weights written by `save_wpn` (checks the shapes)."""
        with np.load(path) as data:
            config = data["config"].tolist()
            expected = [self.wpn.num_exits, self.wpn.input_dim, self.wpn.depth, self.wpn.width]
            if config != expected:
                raise ValueError(
                    f"WPN file {path!r} holds a WPN with (num_exits, "
                    f"input_dim, depth, width) = {tuple(config)}; this L2W "
                    f"expects {tuple(expected)}."
                )
            for i, weight in enumerate(self.wpn.weights):
                weight.assign(data[f"w{i}"])

    def sample_statistics(self, model: "MultiExitModel", dataset: Iterable[Any]) -> dict[str, np.ndarray]:
        """Per-sample loss, confidence, weight and allocation (Fig. 8).

        Runs the backbone in inference mode on every batch of `dataset`
        (yielding `(x, y)`), computes the per-exit losses and confidences,
        the weights this method would give (WPN weights use the batch for the
        `row`/`mat` constraints, as in training), and the meta-data
        allocation by `q` within each batch (as a meta batch).

        Args:
            model: the `MultiExitModel` trained with this method.
            dataset: iterable of `(x, y)` batches (e.g. a `tf.data.Dataset`).

        Returns:
            A dict of numpy arrays: `loss` `(N, K)`, `confidence` `(N, K)`,
            `weight` `(N, K)`, `exit` `(N,)` (0-based allocated exit),
            `selected_by_exit_1` `(N,)` bool, `correct` `(N, K)` bool.
        """
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("loss", "confidence", "weight", "exit", "correct")}
        for batch in dataset:
            x, y, _ = keras.utils.unpack_x_y_sample_weight(batch)
            logits = model(x, training=False)
            ce = core.per_exit_cross_entropy(y, logits)
            conf = core.exit_confidence(logits)
            w = self.sample_weights(ce, conf)
            labels = core.sparse_labels(y, logits)
            correct = ops.stack(
                [ops.equal(ops.cast(ops.argmax(z, axis=-1), "int32"), ops.cast(labels, "int32")) for z in logits],
                axis=1,
            )
            conf_np = np.asarray(ops.convert_to_numpy(conf))
            out["loss"].append(np.asarray(ops.convert_to_numpy(ce)))
            out["confidence"].append(conf_np)
            out["weight"].append(np.asarray(ops.convert_to_numpy(w)))
            out["exit"].append(allocate_by_confidence_numpy(conf_np, self.q))
            out["correct"].append(np.asarray(ops.convert_to_numpy(correct)))
        if not out["loss"]:
            raise ValueError("`dataset` yielded no batches.")
        result = {k: np.concatenate(v, axis=0) for k, v in out.items()}
        result["selected_by_exit_1"] = result["exit"] == 0
        return result

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            q=self.q,
            delta=self.delta,
            wpn_depth=self.wpn_depth,
            wpn_width=self.wpn_width,
            wpn_input=self.wpn_input,
            constraint=self.constraint,
            meta_interval=self.meta_interval,
            wpn_learning_rate=self.wpn_learning_rate,
            wpn_weight_decay=self.wpn_weight_decay,
            meta_objective=self.meta_objective,
            weighting=self.weighting,
            wpn_weights_path=self.wpn_weights_path,
            wpn_optimizer=self.wpn_optimizer_name,
        )
        return config
