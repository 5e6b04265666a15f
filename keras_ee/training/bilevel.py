"""The bilevel core: what every meta-learning method of keras-ee is built from.

L2W (learning to weight samples), budget-aware gating (a gater trained on a held-out half)
and HDKD (loss weights trained on a meta stream) share one pattern: an *inner* step of the
backbone on training data and an *outer* step of a small auxiliary network on other data,
coupled through a look-ahead of the real optimizer. The pieces live here, once:

- `half_batch_exchange`: split each loaded batch into halves A and B; A trains while B is
  the meta batch, then the roles swap (batches of fewer than 2 samples are recorded for the
  guard).
- `every`: run the meta step every `interval` loaded batches, the plain step otherwise.
- `replica_cond`: a condition whose branches hold synchronisation points (optimizer
  steps), taken in the cross-replica context under `tf.distribute`.
- `global_mean_gradients`, `global_mean`, `global_sum`, `all_reduced_gradients`: what is
  global under `tf.distribute` (identities on one device).
- `LookAhead` / `LookAheadResult`: the one-step bilevel pass. It returns its results (outer
  gradients, outer loss and auxiliary values, the reusable inner forward) instead of
  keeping them on itself. Under loss scaling (mixed precision) it scales and unscales its
  own backward passes and says whether they overflowed; `unless_overflow` then skips the
  auxiliary update.
- `follow_main_schedule`: the learning rate of an auxiliary optimizer that follows the
  main optimizer's schedule shape, `base * lr(t) / lr(0)`, from public Keras API only.
- `PerExitStats`: mean/min/max of a per-sample, per-exit quantity over an epoch, logged as
  `exit_k_<name>_mean/min/max`.
- `MLP`: the small network of the outer problem (L2W's WPN, the budget-aware gater).
- `FollowsMainOptimizer`: the methods' one `check_optimizer` (the look-ahead's optimizers) and
  their link to the main optimizer.

These use the TensorFlow backend (nested `tf.GradientTape`s).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_ee import validation as v
from keras_ee._typing import Tensor
from keras_ee.training import core

if TYPE_CHECKING:
    from keras_ee.training.model import MultiExitModel


def replica_context() -> Any:
    """The replica context of a `tf.distribute` strategy, or None (no strategy, or cross-replica).

    None means "no strategy": the code paths of one device stay exactly as they are.
    """
    if not tf.distribute.has_strategy():
        return None
    return tf.distribute.get_replica_context()


def num_replicas() -> int:
    """`num_replicas_in_sync` of the current strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def global_mean_gradients(grads: Sequence[Tensor | None]) -> Sequence[Tensor | None]:
    """The share of an auxiliary optimizer's gradients this replica hands to `apply`.

    Keras' TensorFlow optimizers sum the replicas' gradients in `apply`, so each replica
    divides its gradient (weight decay added to it included) by the number of replicas in
    sync: the auxiliary network (L2W's WPN, the gater, HDKD's gamma) then takes the step
    of the replicas' mean gradient, identical on every replica, as `MultiExitModel.
    scale_loss` does for the backbone. Identity (the very same list) on one device.
    """
    replicas = num_replicas()
    if replicas == 1:
        return grads
    return [None if g is None else g * ops.cast(1.0 / replicas, g.dtype) for g in grads]


def global_mean(value: Tensor) -> Tensor:
    """The mean of `value` over the replicas in sync (differentiable); `value` itself on one device.

    Its gradient (Keras' all-reduce convention) is that of the sum of every replica's loss,
    so with `global_mean_gradients` the auxiliary step is that of the replicas' mean loss.
    """
    ctx = replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, value)


def global_sum(value: Tensor) -> Tensor:
    """The sum of `value` over the replicas in sync (differentiable); `value` itself on one device."""
    ctx = replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return value
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)


def all_reduced_gradients(grads: Sequence[Tensor | None]) -> Sequence[Tensor | None]:
    """The gradient the real optimizer will apply: the sum over the replicas of each replica's share.

    Each replica's gradients come from `MultiExitModel.scale_loss`-scaled coefficients (its
    share, already divided by the replicas), and Keras' optimizer sums them: the look-ahead
    takes that same summed step, so `theta_hat` is identical on every replica and equals the
    one-device look-ahead on the global batch. Differentiable: the outer gradient flows back
    through the all-reduce to every replica's inner batch. Identity on one device.
    """
    ctx = replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    reduced = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [grads[i] for i in present])
    out = list(grads)
    for i, g in zip(present, reduced):
        out[i] = g
    return out


def replica_cond(
    pred: Tensor, true_fn: Callable[..., object], false_fn: Callable[..., object], args: Sequence[Any] = ()
) -> None:
    """`true_fn(*args)` if `pred`, else `false_fn(*args)`, also when the branches hold sync points.

    Without a strategy (and in a cross-replica context) this is the plain `tf.cond`. Under a
    `tf.distribute` strategy a `tf.cond` in a replica context may not contain a
    synchronisation point (`optimizer.apply`'s `merge_call`, an all-reduce), so, as Keras'
    `LossScaleOptimizer` does, the condition is taken in the cross-replica context: a
    `merge_call` receives `pred` and `args` from every replica (as per-replica values), takes
    the branch of "`pred` on every replica" and runs it on each replica with its own `args`
    (`call_for_each_replica`). Every replica thus takes the same branch, as the collectives
    inside it require: a `pred` that differs between replicas (e.g. a batch size) selects
    `true_fn` only if it holds on all of them. Strategies that run without `merge_call`
    (`strategy_supports_no_merge_call`) get a `tf.cond` on the all-reduced condition.

    The branches must take every per-replica tensor they use through `args` (a captured
    tensor would be the first replica's); variables, layers and Python values may be
    captured. Their return values are discarded.
    """

    def branch(fn: Callable[..., object]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            fn(*args)
            return ops.zeros((), "int32")

        return run

    ctx = replica_context()
    if ctx is None:
        tf.cond(pred, branch(true_fn), branch(false_fn))
        return
    pred = tf.convert_to_tensor(pred)
    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        votes = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(pred, tf.int32))
        tf.cond(ops.equal(votes, ctx.num_replicas_in_sync), branch(true_fn), branch(false_fn))
        return

    def cross_replica(distribution: Any, pred: Tensor, *args: Any) -> None:
        together = tf.reduce_all(tf.stack([tf.identity(p) for p in distribution.experimental_local_results(pred)]))

        def on_each_replica(fn: Callable[..., object]) -> Callable[[], Tensor]:
            def run() -> Tensor:
                distribution.extended.call_for_each_replica(fn, args=args)
                return ops.zeros((), "int32")

            return run

        # In the cross-replica context: a cond whose branches hold merge_calls is allowed here.
        tf.cond(together, on_each_replica(true_fn), on_each_replica(false_fn))

    ctx.merge_call(cross_replica, args=(pred, *args))


def half_batch_exchange(
    model: MultiExitModel, x: Tensor, y: Tensor, half_step: Callable[[Tensor, Tensor, Tensor, Tensor], object]
) -> None:
    """Two half steps on one loaded batch: `half_step(x_a, y_a, x_b, y_b)`, then with B and A swapped.

    The first half gets `batch // 2` samples, the second the rest. A batch of fewer than 2
    samples runs no step and is recorded for `NonFiniteLossGuard`, which stops `fit` with a
    clear error (a graph cannot raise mid-step under XLA).

    Under a `tf.distribute` strategy each replica splits its own part of the global batch
    into halves (the halves are per replica; the real steps' gradients are summed over the
    replicas by the optimizer, so each half step is one step on the global half batch), and
    the halves are exchanged only if every replica holds at least 2 samples (see
    `replica_cond`); otherwise every replica records its batch as too small.

    Args:
        model: the `MultiExitModel`.
        x, y: the loaded batch.
        half_step: `fn(x_train, y_train, x_meta, y_meta)`, building one real step (run in
            `model.skippable_step`); it must not capture per-replica tensors other than its
            arguments.
    """
    n = tf.shape(x)[0]

    def body(x: Tensor, y: Tensor) -> None:
        (x_a, y_a), (x_b, y_b) = core.split_halves(x, y)
        model.skippable_step(half_step, args=(x_a, y_a, x_b, y_b))
        model.skippable_step(half_step, args=(x_b, y_b, x_a, y_a))

    def too_small(x: Tensor, y: Tensor) -> None:
        model.record_small_batch(tf.shape(x)[0])

    replica_cond(n >= 2, body, too_small, args=(x, y))


def every(
    counter: keras.Variable,
    interval: int,
    step: Callable[..., object],
    otherwise: Callable[..., object],
    args: Sequence[Any] = (),
) -> None:
    """`step(*args)` when `counter % interval == 0`, else `otherwise(*args)` (one graph, no retracing).

    With `interval == 1` only `step` is built. `counter` (a variable, the same on every
    replica) and the branches follow `replica_cond`: pass the per-replica tensors the
    branches use as `args`.
    """
    if interval == 1:
        step(*args)
        return
    replica_cond(ops.equal(counter % interval, 0), step, otherwise, args=args)


@dataclasses.dataclass
class LookAheadResult:
    """What one `LookAhead.run` computed.

    Attributes:
        outer_gradients: one per outer variable.
        outer_loss: the outer (meta) loss through the look-ahead parameters.
        outer_aux: whatever the outer loss function returned besides the loss (or None).
        terms: the inner per-sample loss terms at the current parameters.
        aux: the inner terms function's auxiliary value (e.g. the logits).
        logits: the inner forward's outputs (the exits' logits).
        non_trainable: the non-trainable values the inner forward computed (BatchNorm
            statistics): assign them if the real step keeps this forward.
        logits_meta: the meta batch's outputs through the look-ahead parameters.
        finite: None unless the real optimizer skips non-finite steps (a
            `LossScaleOptimizer`); then a boolean scalar, the same on every replica:
            whether the look-ahead's inner and outer gradients were all finite. Where it
            is False the loss scale overflowed: skip the auxiliary update
            (`unless_overflow`) and hand `finite` to `MultiExitModel.apply_step`, which
            makes the optimizer skip the real step and lower the scale.
        inner_finite: likewise, whether the pseudo-step's gradient was finite. Where it
            is not, `theta_hat` and so the outer loss are not finite because of the
            overflow, which is not a fault: record the outer loss with
            `when=inner_finite`.
    """

    outer_gradients: list
    outer_loss: Any
    outer_aux: Any
    terms: Any
    aux: Any
    logits: list
    non_trainable: list
    logits_meta: list
    finite: Any = None
    inner_finite: Any = None
    _tape: Any = dataclasses.field(repr=False, default=None)
    _theta: list | None = dataclasses.field(repr=False, default=None)

    def real_gradients(self, coefficients: Tensor) -> list[Tensor | None]:
        """Gradient of `sum(coefficients * terms)` w.r.t. the parameters (one backward pass).

        Valid once per result: the inner tape is released afterwards.
        """
        if self._tape is None:
            raise RuntimeError("real_gradients was already called on this look-ahead result.")
        grads = self._tape.gradient(self.terms, self._theta, output_gradients=ops.cast(coefficients, self.terms.dtype))
        self._tape = None
        return grads


class LookAhead:
    """A look-ahead (one-step bilevel) pass that reuses the inner forward.

    Runs the inner forward on a training batch at the current parameters, differentiates
    an inner loss that depends on outer ("meta") variables with the graph kept, forms
    `theta_hat = lookahead_step(...)` (the real optimizer's exact next step), runs the
    meta batch through `theta_hat` and differentiates the outer loss w.r.t. the outer
    variables. The inner forward is kept, so that the real step on the same training
    batch needs only one more backward pass (`LookAheadResult.real_gradients`), valid
    whenever the real loss is `sum(coefficients * terms)` for the inner `terms`.

    Under `tf.distribute` (R replicas in sync) the inner and meta batches are the replica's
    own parts of the global batches, and the look-ahead takes the real optimizer's global
    step: the inner gradients (of the replica's coefficients, a mean over its part) are
    divided by R and summed over the replicas (`all_reduced_gradients`), so `theta_hat` is
    the same on every replica. The outer gradient of a replica is then that of the sum of
    all replicas' outer losses through its own inner batch (the all-reduce's gradient is
    an all-reduce); handed to the auxiliary optimizer through `global_mean_gradients`, the
    auxiliary step is that of the replicas' mean outer loss, identical on every replica.
    An outer loss that is a mean over the meta batch thus gives the one-device step on
    the global batches when the replicas' parts are equal (otherwise normalise it by
    global counts, e.g. `global_sum`, as L2W does). Per replica stay: the inner forward and
    its BatchNorm statistics (`BatchNormalization(synchronized=True)` for global ones), the real
    step's gradient before the optimizer's sum, and the meta forward.

    Under loss scaling (the real optimizer is a `LossScaleOptimizer`, as `compile` makes it
    under `mixed_float16`, or has a `loss_scale_factor`) with scale S: the inner coefficients
    are multiplied by S and the inner gradient divided by S before the pseudo-step, so the
    inner backward pass stays in float16's range and `theta_hat` uses the unscaled gradient;
    both rescalings pass gradients straight through (`core.straight_through_scale`), so the
    backward pass through the inner backward pass sees the cotangents of the outer loss
    scaled by S, which seeds the outer backward pass; the outer gradients are divided by S.
    `lookahead_step` mirrors the wrapped optimizer. With a `LossScaleOptimizer` the result's
    `finite` and `inner_finite` say whether these gradients overflowed.

    Args:
        model: the backbone (Keras model whose outputs are exit logits).
        optimizer: the real optimizer (the look-ahead mirrors its next step).
        outer_variables: variables of the outer problem (e.g. the WPN's).
        inner_terms_fn: `fn(logits, y) -> (terms, aux)`; `terms` is a tensor of per-sample
            loss terms that must not depend on the outer variables.
        inner_coefficients_fn: `fn(terms, aux) -> coefficients` (the shape of `terms`),
            differentiable in the outer variables; the inner loss is
            `sum(coefficients * terms)`.
        outer_loss_fn: `fn(logits_meta, y_meta) -> loss` or `-> (loss, aux)`.

    Example:
    >>> la = LookAhead(backbone, opt, wpn.weights, terms_fn, coef_fn, meta_fn)
    >>> result = la.run(x_train, y_train, x_meta, y_meta)
    >>> wpn_opt.apply(result.outer_gradients, wpn.weights)
    >>> grads = result.real_gradients(new_coefficients)
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        outer_variables: Sequence[keras.Variable],
        inner_terms_fn: Callable[[list[Tensor], Tensor], tuple[Tensor, Any]],
        inner_coefficients_fn: Callable[[Tensor, Any], Tensor],
        outer_loss_fn: Callable[[list[Tensor], Tensor], Any],
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.outer_variables = list(outer_variables)
        self.inner_terms_fn = inner_terms_fn
        self.inner_coefficients_fn = inner_coefficients_fn
        self.outer_loss_fn = outer_loss_fn

    def run(self, x_train: Tensor, y_train: Tensor, x_meta: Tensor, y_meta: Tensor) -> LookAheadResult:
        variables = self.model.trainable_variables
        theta = [tf.convert_to_tensor(v) for v in variables]
        outer_values = [v.value for v in self.outer_variables]  # Keras variables wrap tf.Variables
        outer_tape = tf.GradientTape(watch_accessed_variables=False)
        with outer_tape:
            outer_tape.watch(outer_values)
            inner_tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)
            with inner_tape:
                inner_tape.watch(theta)
                logits, non_trainable = core.stateless_forward(self.model, theta, x_train, training=True)
                terms, aux = self.inner_terms_fn(logits, y_train)
            # The coefficients depend on the outer variables only (the terms are detached
            # inside the coefficient function), so they stay out of the inner tape and the
            # second backward pass below is cheap.
            coefficients = ops.cast(self.inner_coefficients_fn(terms, aux), terms.dtype)
            scale = core.loss_scale(self.optimizer)
            if scale is not None:
                coefficients = core.straight_through_scale(coefficients, scale)
            grads = inner_tape.gradient(terms, theta, output_gradients=coefficients)
            if scale is not None:
                grads = [None if g is None else core.straight_through_scale(g, 1.0 / scale) for g in grads]
            if replica_context() is not None and num_replicas() > 1:
                # Under tf.distribute: the real step's global gradient (see `all_reduced_gradients`).
                grads = all_reduced_gradients([g * ops.cast(1.0 / num_replicas(), g.dtype) for g in grads])
            theta_hat = core.lookahead_step(self.optimizer, variables, theta, grads)
            logits_meta, _ = core.stateless_forward(self.model, theta_hat, x_meta, training=True)
            outer = self.outer_loss_fn(logits_meta, y_meta)
            outer_loss, outer_aux = outer if isinstance(outer, tuple) else (outer, None)
        if scale is None:
            outer_gradients = outer_tape.gradient(outer_loss, outer_values)
        else:
            outer_gradients = outer_tape.gradient(
                outer_loss, outer_values, output_gradients=ops.cast(scale, outer_loss.dtype)
            )
            outer_gradients = [None if g is None else g / ops.cast(scale, g.dtype) for g in outer_gradients]
        finite = inner_finite = None
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            inner_finite = _all_replicas(ops.logical_not(core.first_nonfinite(_present(grads))[0]))
            finite = ops.logical_and(
                inner_finite, _all_replicas(ops.logical_not(core.first_nonfinite(_present(outer_gradients))[0]))
            )
        return LookAheadResult(
            outer_gradients=outer_gradients,
            outer_loss=outer_loss,
            outer_aux=outer_aux,
            terms=terms,
            aux=aux,
            logits=logits,
            non_trainable=non_trainable,
            logits_meta=logits_meta,
            finite=finite,
            inner_finite=inner_finite,
            _tape=inner_tape,
            _theta=theta,
        )


def _present(tensors: Sequence[Tensor | None]) -> list[Tensor]:
    """The tensors that are not None (a scalar 0 if none is), for `core.first_nonfinite`."""
    return [t for t in tensors if t is not None] or [ops.zeros((), "float32")]


def _all_replicas(flag: Tensor) -> Tensor:
    """Whether the boolean scalar `flag` holds on every replica in sync (`flag` itself on one device)."""
    if replica_context() is None or num_replicas() == 1:
        return flag
    return ops.equal(global_sum(ops.cast(flag, "int32")), num_replicas())


def unless_overflow(finite: Tensor | None, fn: Callable[..., object], args: Sequence[Any] = ()) -> None:
    """`fn(*args)`, unless `finite` (a `LookAheadResult.finite`) says the loss scale overflowed.

    The auxiliary update (L2W's WPN, the gater, HDKD's gamma) of a step that Keras'
    `LossScaleOptimizer` skips: with `finite` None (no loss scaling) `fn` just runs; otherwise
    it runs only where `finite` holds, so an overflow leaves the auxiliary network, its
    optimizer's buffers and its iteration counter as they were. Under `tf.distribute` pass
    the per-replica tensors `fn` uses as `args` (see `replica_cond`).
    """
    if finite is None:
        fn(*args)
        return
    replica_cond(finite, fn, lambda *args: None, args=args)


def follow_main_schedule(
    base_learning_rate: float,
    main_optimizer: Callable[[], keras.optimizers.Optimizer | None],
    initial_main_lr: keras.Variable,
    final_learning_rate: float = 0.0,
    at_iteration: keras.Variable | None = None,
) -> Callable[[], Tensor]:
    """A learning-rate callable for an auxiliary optimizer that follows the main schedule's shape.

    `lr_aux(t) = final + (base - final) * lr(t) / lr_peak`, with `lr(t)` the main
    optimizer's current learning rate (`optimizer.learning_rate`, which Keras evaluates
    from its schedule at the current iteration) and `lr_peak` the largest main learning
    rate seen so far, which `record_initial_learning_rate` keeps in `initial_main_lr`
    (the rate at iteration 0 for a decaying schedule; the end of a warm-up otherwise).
    Before the first step (still 0) the ratio is 1. So the auxiliary optimizer (L2W's
    WPN Adam, the gater's optimizer, HDKD's loss-weight optimizer) decays exactly as the
    main schedule does, also when callbacks lower a plain learning rate: with the main
    cosine decay to 0, `final=1e-5` gives a cosine from `base` to 1e-5 (budget-aware
    gating's gater schedule). During a main warm-up the ratio stays 1.

    Args:
        base_learning_rate: the auxiliary optimizer's learning rate at the main peak.
        main_optimizer: a callable returning the main optimizer (or None before compile),
            e.g. a `weakref.ref`: the optimizer belongs to the model, not to the method.
        initial_main_lr: a float32 scalar variable (saved with the method).
        final_learning_rate: the auxiliary rate when the main rate reaches 0 (default 0).
        at_iteration: optional variable holding the main optimizer iteration at which to read
            its schedule instead of the current one (`main_learning_rate`): the authors' gating
            code sets every rate once per loaded batch, so its gater steps after either half
            use the rate of the batch's first iteration.
    """
    base = float(base_learning_rate)
    final = float(final_learning_rate)

    def learning_rate() -> Tensor:
        opt = main_optimizer()
        if opt is None:
            return ops.convert_to_tensor(base, "float32")
        lr = ops.cast(main_learning_rate(opt, at_iteration), "float32")
        lr0 = initial_main_lr
        ratio = ops.where(lr0 > 0, lr / ops.where(lr0 > 0, lr0, 1.0), 1.0)
        return final + (base - final) * ops.minimum(ratio, 1.0)

    return learning_rate


def main_learning_rate(optimizer: keras.optimizers.Optimizer, iteration: Any = None) -> Tensor:
    """`optimizer.learning_rate`, or its schedule's value at `iteration` (a plain rate: the rate)."""
    if iteration is None:
        return optimizer.learning_rate
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # a LossScaleOptimizer's schedule is its inner's
    schedule = getattr(inner, "_learning_rate", None)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return schedule(iteration)
    return optimizer.learning_rate


def record_initial_learning_rate(optimizer: keras.optimizers.Optimizer, initial_main_lr: keras.Variable) -> None:
    """Keep the largest main learning rate seen so far in `initial_main_lr` (`lr_peak`).

    Called at the start of every train step. For a schedule that only decays (cosine,
    step, constant) this is the rate at iteration 0, recorded at the first step; after a
    warm-up it is the warm-up's target. A resumed run restores the variable from its
    backup.
    """
    lr = ops.cast(optimizer.learning_rate, "float32")
    initial_main_lr.assign(ops.maximum(initial_main_lr, lr))


class FollowsMainOptimizer:
    """The one `check_optimizer` of the methods with an outer step (L2W, HDKD, budget-aware gating).

    A mixin, listed before `Method`. Their auxiliary optimizer follows the main optimizer's
    schedule (`follow_main_schedule(..., self._main_optimizer, ...)`), and while their outer
    step looks ahead through the main optimizer's next step (`looks_ahead`), the main
    optimizer must be one that `core.lookahead_step` mirrors exactly.
    """

    # A weak reference: the optimizer belongs to the model (and is saved there), not to the method.
    _main_optimizer_ref: weakref.ref[keras.optimizers.Optimizer] | None = None

    @property
    def looks_ahead(self) -> bool:
        """Whether the outer step runs a look-ahead of the main optimizer's step."""
        raise NotImplementedError

    def check_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Refuse an optimizer the look-ahead cannot mirror (when it runs), then follow it."""
        if self.looks_ahead:
            core.check_lookahead_support(optimizer)
        self.follow(optimizer)

    def follow(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Take `optimizer` as the main optimizer whose schedule the auxiliary one follows."""
        self._main_optimizer_ref = weakref.ref(optimizer)

    def _main_optimizer(self) -> keras.optimizers.Optimizer | None:
        return None if self._main_optimizer_ref is None else self._main_optimizer_ref()


class RunningExtreme(keras.metrics.Metric):
    """Running min or max over an epoch."""

    def __init__(self, mode: str, name: str | None = None, dtype: Any = "float32") -> None:
        super().__init__(name=name, dtype=dtype)
        if mode not in ("min", "max"):
            raise ValueError(f"`mode` must be 'min' or 'max'; received {mode!r}.")
        self.mode = mode
        init = np.inf if mode == "min" else -np.inf
        self.value = self.add_variable(shape=(), initializer=keras.initializers.Constant(init), name="value")

    def update_state(self, values: Tensor, sample_weight: Tensor | None = None) -> None:
        values = ops.cast(values, self.dtype)
        if self.mode == "min":
            self.value.assign(ops.minimum(self.value, ops.min(values)))
        else:
            self.value.assign(ops.maximum(self.value, ops.max(values)))

    def result(self) -> Tensor:
        # A snapshot, not the variable (logs must not change on reset).
        return tf.identity(self.value)

    def reset_state(self) -> None:
        self.value.assign(np.inf if self.mode == "min" else -np.inf)

    def get_config(self) -> dict[str, Any]:
        return {"mode": self.mode, "name": self.name, "dtype": self.dtype}


class PerExitStats:
    """Mean, min and max over an epoch of a `(batch, K)` quantity, per exit.

    Logged as `exit_k_<name>_mean`, `exit_k_<name>_min`, `exit_k_<name>_max`. Assign the
    three lists to attributes of the method (`means`, `mins`, `maxs` here) so that Keras
    tracks and resets them with the model's metrics.

    Args:
        num_exits: K.
        name: the quantity's name in the logs (e.g. `weight`).
    """

    def __init__(self, num_exits: int, name: str) -> None:
        self.means = [keras.metrics.Mean(name=f"exit_{k + 1}_{name}_mean") for k in range(num_exits)]
        self.mins = [RunningExtreme("min", name=f"exit_{k + 1}_{name}_min") for k in range(num_exits)]
        self.maxs = [RunningExtreme("max", name=f"exit_{k + 1}_{name}_max") for k in range(num_exits)]

    def _trackers(self) -> Iterator[tuple[Any, Any, Any]]:
        return zip(self.means, self.mins, self.maxs)

    def names(self) -> list[str]:
        return [m.name for trio in self._trackers() for m in trio]

    def update(self, values: Tensor) -> None:
        for k, trio in enumerate(self._trackers()):
            column = ops.cast(values[:, k], "float32")
            for tracker in trio:
                tracker.update_state(column)

    def logs(self) -> dict:
        return {m.name: m.result() for trio in self._trackers() for m in trio}


def torch_linear_init(fan_in: int) -> keras.initializers.Initializer:
    """PyTorch `nn.Linear`'s default init, U(+-1/sqrt(fan_in)), for kernel and bias.

    (kaiming_uniform with a=sqrt(5) for the kernel gives the same bound.)
    """
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


@keras.saving.register_keras_serializable(package="keras_ee")
class MLP(keras.layers.Layer):
    """A small MLP for the outer problem: `depth` hidden Dense layers, then an output layer.

    Layers are initialised like PyTorch's `nn.Linear` (as the papers' reference code
    does), so hidden widths and learning rates carry over from the papers.

    Args:
        input_dim: number of input features.
        output_dim: number of outputs.
        depth: hidden layers (>= 1).
        width: hidden width.
        activation: hidden activation (default `relu`).
        output_activation: output activation (e.g. `tanh` for L2W's WPN, `sigmoid` for a
            gater; default None).
        **kwargs: standard layer arguments.

    Example:
    >>> gater = MLP(input_dim=2, output_dim=1, depth=1, width=500, output_activation="sigmoid")
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        depth: int = 1,
        width: int = 500,
        activation: str = "relu",
        output_activation: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        v.check_counts(input_dim=input_dim, output_dim=output_dim, depth=depth, width=width)
        self.input_dim = input_dim
        self.output_dim = output_dim
        self.depth = depth
        self.width = width
        self.activation = activation
        self.output_activation = output_activation
        self.hidden: list[keras.layers.Dense] = []
        fan_in = input_dim
        # Keras does not hand a layer's dtype policy down to the layers it creates.
        policy = self.dtype_policy
        for i in range(depth):
            init = torch_linear_init(fan_in)
            self.hidden.append(
                keras.layers.Dense(
                    width,
                    activation=activation,
                    kernel_initializer=init,
                    bias_initializer=init,
                    name=f"hidden_{i + 1}",
                    dtype=policy,
                )
            )
            fan_in = width
        init = torch_linear_init(fan_in)
        self.head = keras.layers.Dense(
            output_dim,
            activation=output_activation,
            kernel_initializer=init,
            bias_initializer=init,
            name="out",
            dtype=policy,
        )

    def build(self, input_shape: Any = None) -> None:
        shape: tuple[int | None, ...] = (None, self.input_dim)
        for layer in self.hidden:
            layer.build(shape)
            shape = (None, self.width)
        self.head.build(shape)
        self.built = True

    def call(self, inputs: Tensor) -> Tensor:
        h = inputs
        for layer in self.hidden:
            h = layer(h)
        return self.head(h)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], self.output_dim)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            input_dim=self.input_dim,
            output_dim=self.output_dim,
            depth=self.depth,
            width=self.width,
            activation=self.activation,
            output_activation=self.output_activation,
        )
        return config
