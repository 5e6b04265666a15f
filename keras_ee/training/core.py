"""Reusable pieces for training multi-exit networks.

Every training method in `keras_ee.training` is built from the functions in
this module, so that the delicate parts exist exactly once:

- `per_exit_cross_entropy` and `exit_confidence`: per-sample, per-exit
  quantities as `(batch, num_exits)` tensors.
- `stateless_forward`: a forward pass with substituted (possibly
  differentiable) parameter values that leaves the real model untouched,
  BatchNorm moving statistics included.
- `lookahead_step`: the exact parameter update the real optimizer would apply
  now (learning rate from its schedule at the current iteration, momentum
  buffers, Nesterov flag, weight decay as the optimizer applies it: coupled as
  PyTorch's for `keras_ee.optimizers`, decoupled for Keras', gradient
  clipping, variable constraints), as a differentiable function of the
  gradients and without changing any optimizer state.
- `split_halves`: the two halves of a loaded batch (the half-batch exchange of
  `keras_ee.training.bilevel` trains on one while the other is the meta batch).
- `first_nonfinite`: which of a list of tensors first holds NaN/inf.
- Mixed precision: `float32_logits` (the exits' logits as float32 under a
  `mixed_float16` / `mixed_bfloat16` policy), `inner_optimizer` (the optimizer
  whose step a `LossScaleOptimizer` takes), `loss_scale` and
  `straight_through_scale` (loss scaling through the look-ahead).

The bilevel machinery (look-ahead pass, exchange driver, auxiliary optimizer
schedule, per-exit statistics, the outer MLP) is in `keras_ee.training.bilevel`.

These functions use the TensorFlow backend (nested `tf.GradientTape`s).
"""

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from keras_ee._typing import Tensor


def _as_float32(x: Tensor) -> Tensor:
    return ops.cast(x, "float32") if x.dtype != "float64" else x


def float32_logits(outputs: Sequence[Tensor]) -> list[Tensor]:
    """`outputs` with float16/bfloat16 tensors cast to float32 (float32 and float64 unchanged).

    Under a mixed dtype policy the exits compute in half precision; their logits are
    cast to float32 before any softmax or loss, as Keras' mixed-precision guide asks of a
    model's outputs.
    """
    return [
        ops.cast(z, "float32") if keras.backend.standardize_dtype(z.dtype) in ("float16", "bfloat16") else z
        for z in outputs
    ]


def labels_are_one_hot(y: Tensor, logits: Tensor) -> bool:
    """Whether `y` holds one-hot (or soft) labels for `logits`.

    Sparse labels have shape `(batch,)` or `(batch, 1)`; one-hot labels have
    the logits' shape `(batch, num_classes)`.
    """
    y_shape = tuple(y.shape)
    logits_shape = tuple(logits.shape)
    if len(y_shape) == len(logits_shape) and len(y_shape) >= 2:
        if y_shape[-1] == logits_shape[-1] and y_shape[-1] != 1:
            return True
    return False


def per_exit_cross_entropy(y: Tensor, logits: Sequence[Tensor]) -> Tensor:
    """Per-sample cross-entropy of every exit.

    Args:
        y: integer labels of shape `(batch,)` / `(batch, 1)`, or one-hot
            labels of shape `(batch, num_classes)`.
        logits: list of `num_exits` tensors of shape `(batch, num_classes)`,
            in exit order.

    Returns:
        A `(batch, num_exits)` tensor (float32, or float64 when the logits
        are float64) of cross-entropies.

    Example:
    >>> ce = per_exit_cross_entropy(labels, model(x, training=True))
    """
    if not isinstance(logits, (list, tuple)) or not logits:
        raise TypeError(
            f"`logits` must be a non-empty list of per-exit logit tensors; received {type(logits).__name__}."
        )
    one_hot = labels_are_one_hot(y, logits[0])
    columns = []
    for z in logits:
        z = _as_float32(z)
        if one_hot:
            ce = ops.categorical_crossentropy(ops.cast(y, z.dtype), z, from_logits=True)
        else:
            labels = ops.reshape(ops.cast(y, "int32"), (-1,))
            ce = ops.sparse_categorical_crossentropy(labels, z, from_logits=True)
        columns.append(ce)
    return ops.stack(columns, axis=1)


def exit_confidence(logits: Sequence[Tensor]) -> Tensor:
    """Max softmax probability of every exit, `(batch, num_exits)`."""
    return ops.stack(
        [ops.max(ops.softmax(_as_float32(z), axis=-1), axis=-1) for z in logits],
        axis=1,
    )


def sparse_labels(y: Tensor, logits: Sequence[Tensor]) -> Tensor:
    """Integer class labels `(batch,)` from sparse or one-hot `y`."""
    if labels_are_one_hot(y, logits[0]):
        return ops.argmax(y, axis=-1)
    return ops.reshape(ops.cast(y, "int32"), (-1,))


def stateless_forward(
    model: keras.Model,
    trainable_values: Sequence[Tensor],
    x: Tensor,
    training: bool = True,
    return_tensors: Sequence[str] | None = None,
) -> tuple[Any, ...]:
    """Run `model` with substituted trainable values, leaving it untouched.

    Gradients flow through `trainable_values` to whatever produced them, which
    is what the look-ahead (pseudo-update) of bilevel methods needs.

    Args:
        model: a built Keras model whose outputs are the exits' logits.
        trainable_values: tensors, one per `model.trainable_variables`.
        x: the input batch.
        training: forward mode; `True` uses batch statistics in BatchNorm.
        return_tensors: optional names of layers of a functional `model` whose
            outputs are wanted too (an exit's pooled feature such as
            `exit_2_features`, an intermediate map), computed in the same
            pass with the same substituted values.

    Returns:
        `(outputs, non_trainable_values)`: the exits' logits as a list (float32
        under a mixed dtype policy, see `float32_logits`), and
        the non-trainable values the forward pass would have written (e.g.
        updated BatchNorm moving statistics). They are NOT assigned: the
        caller decides whether a real step should keep them (assign with
        `assign_values`) or whether they are discarded (meta passes). With
        `return_tensors`, a third item: `{name: tensor}`.

    Example:
    >>> logits, stats, named = stateless_forward(
    ...     backbone, theta_hat, x, return_tensors=["exit_1_features"])
    """
    if not return_tensors:
        outputs, non_trainable = model.stateless_call(
            list(trainable_values),
            [tf.convert_to_tensor(v) for v in model.non_trainable_variables],
            x,
            training=training,
        )
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return float32_logits(outputs), non_trainable
    names = tuple(return_tensors)
    probe = probe_model(model, names)
    # The probe shares the model's variables, possibly in another order.
    trainable_at = {id(v): i for i, v in enumerate(model.trainable_variables)}
    values = [trainable_values[trainable_at[id(v)]] for v in probe.trainable_variables]
    non_trainable_at = {id(v): i for i, v in enumerate(probe.non_trainable_variables)}
    outputs, probe_non_trainable = probe.stateless_call(
        values, [tf.convert_to_tensor(v) for v in probe.non_trainable_variables], x, training=training
    )
    outputs = list(outputs)
    k = len(outputs) - len(names)
    non_trainable = [probe_non_trainable[non_trainable_at[id(v)]] for v in model.non_trainable_variables]
    return float32_logits(outputs[:k]), non_trainable, dict(zip(names, outputs[k:]))


def model_inputs(model: keras.Model) -> Any:
    """`model`'s input as it was given: one tensor for a one-input model, for a new model on it.

    Keras' `model.inputs` is always a list; a model built on a list of one expects a list and
    warns when called on an image batch.
    """
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


_PROBES: weakref.WeakKeyDictionary[keras.Model, dict[tuple[str, ...], keras.Model]] = weakref.WeakKeyDictionary()


def probe_model(model: keras.Model, names: tuple[str, ...]) -> keras.Model:
    """A functional model with `model`'s outputs plus the named layers' outputs (cached).

    It shares `model`'s layers and variables; calling it computes the named tensors in
    the same forward pass as the exits' logits (e.g. `("exit_5_features",)`).
    """
    cache = _PROBES.setdefault(model, {})
    if names not in cache:
        if not hasattr(model, "outputs") or model.outputs is None:
            raise ValueError("`return_tensors` needs a functional model (with `inputs` and `outputs`).")
        extra = []
        for name in names:
            try:
                layer = model.get_layer(name)
            except ValueError:
                raise ValueError(f"`return_tensors`: the model has no layer named {name!r}.") from None
            extra.append(layer.output)
        outputs = list(model.outputs) if isinstance(model.outputs, (list, tuple)) else [model.outputs]
        cache[names] = keras.Model(model_inputs(model), outputs + extra, name=f"{model.name}_probe")
    return cache[names]


def assign_values(variables: Sequence[keras.Variable], values: Sequence[Tensor]) -> None:
    """Assign `values` to `variables` (e.g. BN statistics from a forward)."""
    for v, value in zip(variables, values):
        v.assign(value)


_SUPPORTED_LOOKAHEAD = (
    "keras_ee.optimizers.SGD",
    "keras_ee.optimizers.Adam",
    "keras_ee.optimizers.AdamW",
    "keras.optimizers.SGD",
    "keras.optimizers.Adam",
    "keras.optimizers.AdamW",
)


def inner_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer whose update `optimizer.apply` takes: a `LossScaleOptimizer`'s wrapped one.

    Keras' `LossScaleOptimizer` (which `compile` adds under `mixed_float16`) unscales the
    gradients, skips the step when they are not finite, and otherwise applies its
    `inner_optimizer`, whose iterations, learning rate and buffers are the real ones.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer


def loss_scale(optimizer: keras.optimizers.Optimizer) -> Tensor | None:
    """The float32 factor `optimizer.scale_loss` multiplies a loss by, or None if it scales nothing.

    A `LossScaleOptimizer`'s current dynamic scale, or a static `loss_scale_factor`;
    `optimizer.apply` divides the gradients by the same factor.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or optimizer.loss_scale_factor is not None:
        return ops.cast(optimizer.scale_loss(ops.ones((), "float32")), "float32")
    return None


@tf.custom_gradient
def straight_through_scale(x: Tensor, factor: Tensor) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, Tensor]]]:
    """`x * factor`, whose gradient is the upstream one unchanged (as if the factor were 1).

    The look-ahead scales its inner coefficients by the loss scale (so that the inner
    backward pass stays in float16's range) and unscales the resulting gradient; with
    both rescalings straight through, the outer gradient is exactly that of the
    unscaled pseudo-step, while the backward pass through the inner backward pass
    receives cotangents of the loss-scaled outer loss (in float16's range too).
    """

    def grad(upstream: Tensor) -> tuple[Tensor, Tensor]:
        return upstream, tf.zeros_like(factor)

    return x * ops.cast(factor, x.dtype), grad


def check_lookahead_support(optimizer: keras.optimizers.Optimizer) -> str:
    """Raise a clear error if `lookahead_step` cannot mirror `optimizer`; return its kind.

    Supported: the papers' (PyTorch-semantics) `keras_ee.optimizers.SGD`, `Adam` and `AdamW`
    (kind `"pytorch"`: their own `next_values` is the step), and Keras'
    `keras.optimizers.SGD` (momentum, nesterov, weight_decay), `keras.optimizers.Adam` and
    `keras.optimizers.AdamW` (amsgrad included), each with any learning-rate schedule,
    gradient clipping and `loss_scale_factor`, also wrapped in a
    `keras.optimizers.LossScaleOptimizer` (mixed precision; the wrapped optimizer is checked
    and mirrored). Subclasses that override `update_step` (or `next_values`), gradient
    accumulation and EMA weight overwriting are rejected: their next step is not the one
    this function computes.
    """
    from keras_ee import optimizers as ee_optimizers

    optimizer = inner_optimizer(optimizer)
    cls = type(optimizer)
    base = None
    if isinstance(optimizer, ee_optimizers.PyTorchOptimizer):
        if cls.update_step is ee_optimizers.PyTorchOptimizer.update_step and cls in ee_optimizers.OPTIMIZERS.values():
            base = "pytorch"
    else:
        known = {
            "SGD": keras.optimizers.SGD,
            "Adam": keras.optimizers.Adam,
            "AdamW": keras.optimizers.AdamW,
        }
        for name, klass in known.items():
            if isinstance(optimizer, klass) and (cls.update_step is klass.update_step):
                base = name
    if base is None:
        raise ValueError(
            "The look-ahead (pseudo-update) step mirrors only "
            f"{', '.join(_SUPPORTED_LOOKAHEAD)} exactly; received optimizer "
            f"{cls.__name__}. Compile the model with one of those."
        )
    if optimizer.gradient_accumulation_steps:
        raise ValueError(
            "The look-ahead step does not support "
            "`gradient_accumulation_steps` (received "
            f"{optimizer.gradient_accumulation_steps}); expected None."
        )
    if optimizer.use_ema and optimizer.ema_overwrite_frequency:
        raise ValueError(
            "The look-ahead step does not support EMA weight overwriting "
            "(received ema_overwrite_frequency="
            f"{optimizer.ema_overwrite_frequency}); expected None."
        )
    return base


def lookahead_step(
    optimizer: keras.optimizers.Optimizer,
    variables: Sequence[keras.Variable],
    values: Sequence[Tensor],
    grads: Sequence[Tensor | None],
) -> list[Tensor]:
    """The exact update `optimizer` would apply now, without applying it.

    Computes `theta_hat`, the parameter values after one step of
    `optimizer.apply(grads, variables)` from the current optimizer state
    (iteration counter, learning rate from its schedule, momentum / Adam
    buffers), as differentiable functions of `values` and `grads`. Nothing is
    assigned: neither the variables nor the optimizer's buffers or iteration
    counter change. A `keras_ee.optimizers` optimizer (PyTorch's step: coupled L2
    weight decay, gradient momentum buffer, PyTorch's Adam epsilon) computes it with
    its own `next_values`, the function its `update_step` assigns; for Keras'
    optimizers this function mirrors their step (decoupled weight decay
    `theta <- theta - lr * wd * theta` before the update).

    Args:
        optimizer: a built `keras_ee.optimizers.SGD`, `Adam` or `AdamW`, a
            `keras.optimizers.SGD`, `Adam` or `AdamW`, or a
            `LossScaleOptimizer` wrapping one (the wrapped optimizer's step is
            mirrored: its iterations, learning rate and buffers; the step that
            `apply` skips on non-finite gradients is not this function's
            business).
        variables: the model variables the optimizer was built on (used to
            find their buffers, weight-decay exclusions and constraints).
        values: current values of `variables` (tensors; gradients may flow
            through them).
        grads: gradients of the unscaled loss w.r.t. `values` (divide
            gradients of a loss-scaled loss by `loss_scale(optimizer)` first).

    Returns:
        A list of tensors: the look-ahead values, one per variable.

    Example:
    >>> theta = [v.value for v in model.trainable_variables]
    >>> theta_hat = lookahead_step(model.optimizer,
    ...                            model.trainable_variables, theta, grads)
    """
    kind = check_lookahead_support(optimizer)
    optimizer = inner_optimizer(optimizer)
    if not optimizer.built:
        raise ValueError("The optimizer must be built (e.g. `optimizer.build(variables)`) before a look-ahead step.")
    if len(variables) != len(values) or len(values) != len(grads):
        raise ValueError(
            "`variables`, `values` and `grads` must have the same length; "
            f"received {len(variables)}, {len(values)} and {len(grads)}."
        )
    grads = [ops.zeros_like(v) if g is None else ops.cast(g, v.dtype) for g, v in zip(grads, values)]
    grads = optimizer._clip_gradients(grads)
    lr_now = optimizer.learning_rate
    if kind == "pytorch":
        new_values = []
        for var, value, g in zip(variables, values, grads):
            slots = [ops.cast(slot, value.dtype) for slot in optimizer.slots(var)]
            theta, _ = optimizer.next_values(var, value, g, lr_now, slots, sqrt=_safe_sqrt)
            if getattr(var, "constraint", None) is not None:
                theta = var.constraint(theta)
            new_values.append(theta)
        return new_values
    new_values = []
    for var, value, g in zip(variables, values, grads):
        dtype = value.dtype
        lr = ops.cast(lr_now, dtype)
        theta = value
        # Keras applies decoupled weight decay before the update step.
        if optimizer.weight_decay is not None and optimizer._use_weight_decay(var):
            wd = ops.cast(optimizer.weight_decay, dtype)
            theta = theta - theta * wd * lr
        index = optimizer._get_variable_index(var)
        if kind == "SGD":
            if optimizer.momentum != 0:
                m = ops.cast(optimizer.momentums[index], dtype)
                mom = ops.cast(optimizer.momentum, dtype)
                m_new = m * mom - g * lr
                if optimizer.nesterov:
                    theta = theta + (m_new * mom - g * lr)
                else:
                    theta = theta + m_new
            else:
                theta = theta - g * lr
        else:  # Adam / AdamW (AdamW only differs by its weight decay above)
            step = ops.cast(optimizer.iterations + 1, dtype)
            b1 = ops.cast(optimizer.beta_1, dtype)
            b2 = ops.cast(optimizer.beta_2, dtype)
            alpha = lr * ops.sqrt(1 - ops.power(b2, step)) / (1 - ops.power(b1, step))
            m = ops.cast(optimizer._momentums[index], dtype)
            v = ops.cast(optimizer._velocities[index], dtype)
            m_new = m + (g - m) * (1 - b1)
            v_new = v + (ops.square(g) - v) * (1 - b2)
            if optimizer.amsgrad:
                v_hat = ops.cast(optimizer._velocity_hats[index], dtype)
                v_new = ops.maximum(v_hat, v_new)
            theta = theta - (m_new * alpha) / (_safe_sqrt(v_new) + ops.cast(optimizer.epsilon, dtype))
        if getattr(var, "constraint", None) is not None:
            theta = var.constraint(theta)
        new_values.append(theta)
    return new_values


@tf.custom_gradient
def _safe_sqrt(v: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """sqrt whose derivative is 0 (not inf) where v == 0.

    Adam's `sqrt(v)` has an infinite derivative at `v = 0` (parameters that
    received no gradient yet); those entries do not move, so their true
    contribution to a meta-gradient is 0.
    """
    s = tf.sqrt(v)

    def grad(upstream: Tensor) -> Tensor:
        return tf.where(s > 0, upstream * 0.5 / tf.where(s > 0, s, 1), 0)

    return s, grad


def split_halves(
    *tensors: Tensor | None, larger_first: bool = False
) -> tuple[tuple[Tensor | None, ...], tuple[Tensor | None, ...]]:
    """Split every tensor of a batch into a first and a second half.

    The first half gets `batch // 2` samples, the second the rest; with `larger_first`, the
    first gets `ceil(batch / 2)` (as `torch.chunk(2)`, the authors' code).

    Returns:
        `(first, second)`: two tuples with the halves of each tensor.
    """
    n = tf.shape(tensors[0])[0]
    h = (n + 1) // 2 if larger_first else n // 2
    first = tuple(None if t is None else t[:h] for t in tensors)
    second = tuple(None if t is None else t[h:] for t in tensors)
    return first, second


def first_nonfinite(tensors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Whether any of `tensors` holds NaN/inf, and the 1-based index of the first that does.

    Returns:
        `(any_bad, first)`: a boolean scalar and an int64 scalar (0 when none).
    """

    def finite(t: Tensor) -> Tensor:
        if "float" not in keras.backend.standardize_dtype(t.dtype):
            return ops.convert_to_tensor(True)  # integer counters, seeds: always finite
        return ops.all(ops.isfinite(t))

    bad = ops.logical_not(ops.stack([finite(t) for t in tensors]))
    first = ops.cast(ops.argmax(ops.cast(bad, "int32")), "int64") + 1
    any_bad = ops.any(bad)
    return any_bad, ops.where(any_bad, first, ops.zeros((), "int64"))


def weighted_exit_losses(ce: Tensor, weights: Tensor) -> Tensor:
    """`mean_i(w[i, k] * l[i, k])` per exit, `(num_exits,)`."""
    return ops.mean(ops.cast(weights, ce.dtype) * ce, axis=0)


def sample_weighted_exit_losses(terms: Tensor, sample_weight: Tensor | None = None) -> Tensor:
    """`mean_i(sw_i * l[i, k])` per exit, `(num_exits,)`; plain means without sample weights.

    Keras' "sum over batch size" convention for optional `(batch,)` sample weights.
    """
    if sample_weight is None:
        return ops.mean(terms, axis=0)
    return ops.mean(terms * ops.reshape(ops.cast(sample_weight, terms.dtype), (-1, 1)), axis=0)
