"""`MultiExitModel`: one training model for multi-exit networks."""

from collections.abc import Callable, Sequence
from typing import Any

import keras
import tensorflow as tf
from keras import ops

from keras_ee._typing import Tensor
from keras_ee.training import bilevel, core
from keras_ee.training.methods import Baseline, Method, Phase

# What a training step found wrong: the `kind` field of `StepFaults`.
_LOSS, _META, _BATCH, _GRADIENT, _WEIGHTS, _LABELS = range(6)
_PHASES = {_LOSS: "training loss", _META: "meta loss"}
_KIND_NAMES = {
    _LOSS: "loss",
    _META: "meta_loss",
    _BATCH: "batch_size",
    _GRADIENT: "gradient",
    _WEIGHTS: "weights",
    _LABELS: "labels",
}
_NON_INTEGER_LABEL = -(2**62)  # the record's value for a fractional label

# Whether `apply_step` checks gradients and updated weights for NaN/inf (read when a
# step is traced). Off only for measuring what the checks cost (bench/step_checks.py).
CHECK_STEP_VALUES = True


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss, a gradient or an updated weight becomes NaN or inf."""


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops `fit` (and `evaluate`) with a clear error when a step went wrong.

    `MultiExitModel.fit` and `evaluate` add it automatically. The steps record
    the first problem of a run in a variable (this works under XLA, where
    in-graph assertions are dropped): a NaN or inf loss (naming the exit), a
    non-finite gradient or updated weight (naming the variable), a batch too
    small for the half-batch exchange, or labels outside the exits' classes.
    The guard reads that record after every batch and raises
    `NonFiniteLossError` (non-finite values) or `ValueError` (bad input).
    """

    def __init__(self) -> None:
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._check(f"epoch {self._epoch + 1}, batch {batch + 1}")

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._check(f"evaluation batch {batch + 1}")

    def _check(self, where: str) -> None:
        model = self.model
        fault = model.faults.take()
        if fault is None:
            return
        step, value, phase = fault["step"], fault["value"], fault["kind"]
        model.stop_training = True
        if phase == _BATCH:
            raise ValueError(
                "Half-batch exchange needs batches of at least 2 samples; "
                f"received a batch of {value} at optimizer step {step} "
                f"({where}). Use another batch size or `drop_remainder=True`."
            )
        if phase == _LABELS:
            raise ValueError(
                f"labels must be integer class indices in 0..{model.num_classes - 1} "
                f"(the exits have {model.num_classes} classes); received "
                f"{'a non-integer label' if value == _NON_INTEGER_LABEL else f'label {value}'} "
                f"({where}). Check the dataset's labels."
            )
        if phase in (_GRADIENT, _WEIGHTS):
            variables = model.trainable_variables if phase == _GRADIENT else model.checked_variables()
            name = variables[value - 1].path if 0 < value <= len(variables) else f"#{value}"
            what = "gradient of" if phase == _GRADIENT else "updated value of"
            raise NonFiniteLossError(
                f"NaN or inf in the {what} {name} at optimizer step {step} "
                f"({where}), while every exit's loss was finite. Check the "
                "data for NaN/inf or extreme values, or lower the learning rate."
            )
        raise NonFiniteLossError(
            f"NaN or inf in the {_PHASES.get(phase, 'loss')} of exit_{value} "
            f"at optimizer step {step} ({where}). Lower the learning rate, "
            "check the data for NaN/inf, or clip gradients."
        )


class StepFaults:
    """The first fault a training step recorded, as named fields (read by the guard).

    Fields (int64 scalar variables): `flag` (1 once something went wrong), `step` (the
    optimizer step, 1-based), `value` (the exit, 1-based; the variable index, 1-based;
    the batch size; or the bad label) and `kind` (0 loss, 1 meta loss, 2 batch size,
    3 gradient, 4 weights, 5 labels). Steps write them in-graph, which works under
    XLA where assertions are dropped. Not saved with the model: a plain object, so
    Keras does not track its variables.
    """

    FIELDS = ("flag", "step", "value", "kind")
    flag: keras.Variable
    step: keras.Variable
    value: keras.Variable
    kind: keras.Variable

    def __init__(self) -> None:
        for field in self.FIELDS:
            setattr(self, field, keras.Variable(0, dtype="int64", trainable=False, name=f"fault_{field}"))

    def record(self, bad: Tensor, step: Tensor, value: Tensor, kind: int) -> None:
        """Keep (step, value, kind) if `bad` and nothing was recorded before."""
        take = ops.logical_and(bad, self.flag == 0)
        new = {"flag": 1, "step": step, "value": value, "kind": kind}
        for field in self.FIELDS:
            var = getattr(self, field)
            var.assign(ops.where(take, ops.cast(new[field], "int64"), var))

    def take(self) -> dict[str, Any] | None:
        """The recorded fault as a dict (and clear it), or None."""
        if not int(self.flag.numpy()):
            return None
        fault: dict[str, Any] = {field: int(getattr(self, field).numpy()) for field in self.FIELDS}
        fault["kind_name"] = _KIND_NAMES.get(fault["kind"], "loss")
        for field in self.FIELDS:
            getattr(self, field).assign(0)
        return fault


@keras.saving.register_keras_serializable(package="keras_ee")
class MultiExitModel(keras.Model):
    """Trains a multi-exit backbone with a pluggable training method.

    The backbone is a built Keras model with one input and K outputs, the
    exits' logits in exit order (exit k's logits layer named `exit_k`).
    The loss is the method's; per-exit metrics are built in. `predict`
    returns a list of K arrays (every exit's logits) and `evaluate` logs
    `loss`, `exit_k_loss` and `exit_k_accuracy` for every exit.

    Logs of `fit` per epoch: `loss`, `exit_k_loss` (mean unweighted
    cross-entropy of exit k on the samples it trained on), `exit_k_accuracy`,
    plus the method's own (L2W: `exit_k_weight_mean/min/max`), and the same
    with a `val_` prefix for the validation data (loss and accuracy only).

    A NaN or inf loss stops `fit` with `NonFiniteLossError` naming the
    optimizer step and the exit.

    Args:
        backbone: a built `keras.Model` with K >= 1 outputs (logits).
        method: a `keras_ee.training.Method` (default `Baseline()`).
        transform_backbone: apply `method.transform_backbone` to `backbone`
            first (default; False when loading, the saved backbone is the
            transformed one).
        **kwargs: standard `keras.Model` arguments (e.g. `name`).

    Example:
    >>> model = keras_ee.training.MultiExitModel(
    ...     backbone, method=keras_ee.training.L2W(q=0.75, delta=0.8))
    >>> model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    >>> model.fit(train_ds, validation_data=val_ds, epochs=10)
    >>> exit_logits = model.predict(test_x)   # list of K arrays
    """

    def __init__(
        self, backbone: keras.Model, method: Method | None = None, transform_backbone: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        method = Baseline() if method is None else method
        if not isinstance(method, Method):
            raise TypeError(
                "`method` must be a keras_ee.training.Method (e.g. Baseline() "
                f"or L2W()); received {type(method).__name__}."
            )
        if transform_backbone and isinstance(backbone, keras.Model):
            backbone = method.transform_backbone(backbone)
        if not isinstance(backbone, keras.Model):
            raise TypeError(
                f"`backbone` must be a keras.Model with one output per exit; received {type(backbone).__name__}."
            )
        if not backbone.built:
            raise ValueError("`backbone` must be built (a functional model, or call it on a batch first).")
        outputs = getattr(backbone, "outputs", None)
        if outputs is None:
            raise ValueError(
                "`backbone` must be a functional model (its `outputs` define "
                "the exits); received a model without `outputs`."
            )
        self.num_classes = _check_exits(backbone)
        self.backbone = backbone
        self.num_exits = len(outputs)
        self.exit_names = [f"exit_{k + 1}" for k in range(self.num_exits)]
        self.exit_loss_trackers = [keras.metrics.Mean(name=f"{n}_loss") for n in self.exit_names]
        self.exit_accuracy_trackers = [keras.metrics.Mean(name=f"{n}_accuracy") for n in self.exit_names]
        # The first fault of a step, read by NonFiniteLossGuard (not saved).
        self.faults = StepFaults()
        # The method's variables (e.g. the WPN) are saved with the model but
        # are not the model's trainable variables: the real optimizer only
        # sees the backbone.
        method.trainable = False
        self.method = method
        method.setup(self)
        self.built = True

    def call(self, inputs: Tensor, training: bool | None = None) -> list[Tensor]:
        outputs = self.backbone(inputs, training=training)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        # Under a mixed dtype policy every loss, softmax and dump works on float32 logits.
        return core.float32_logits(outputs)

    # --- compile / fit -------------------------------------------------------

    def compile(self, optimizer: Any = "sgd", loss: Any = None, metrics: Any = None, **kwargs: Any) -> None:
        """Configures training; the loss and metrics are the method's.

        Args:
            optimizer: a Keras optimizer (instance or name).
            loss: must be None (the method defines the loss).
            metrics: must be None (per-exit loss and accuracy are built in).
            **kwargs: other `keras.Model.compile` arguments (`jit_compile`,
                `steps_per_execution`, `run_eagerly`, ...).
        """
        if loss is not None:
            raise ValueError(f"MultiExitModel's loss is defined by its method; received loss={loss!r}, expected None.")
        if metrics is not None or kwargs.get("weighted_metrics") is not None:
            raise ValueError(
                f"MultiExitModel logs per-exit loss and accuracy itself; received metrics={metrics!r}, expected None."
            )
        if kwargs.get("loss_weights") is not None:
            raise ValueError(
                "Use `Baseline(exit_weights=...)` instead of `loss_weights`; "
                f"received loss_weights={kwargs['loss_weights']!r}."
            )
        super().compile(optimizer=optimizer, **kwargs)
        self._phase_compiled = True
        self.method.check_optimizer(self.optimizer)
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    def compile_from_config(self, config: dict[str, Any]) -> None:
        config = keras.saving.deserialize_keras_object(config)
        for key in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            config.pop(key, None)
        self.compile(**config)

    def enter_phase(self, index: int, fresh: bool = True) -> None:
        """Configure the model for phase `index` of its method (`method.phases`).

        Compile afterwards with a new optimizer (the trainable variables may have
        changed); `keras_ee.training.fit_phases` does both for every phase.
        """
        self.method.enter_phase(self, int(index), fresh=fresh)
        # Traced steps hold the previous phase's graph (trainable set, BatchNorm mode).
        self.train_function = self.test_function = self.predict_function = None
        self._phase_compiled = False

    def fit(self, *args: Any, callbacks: Any = None, **kwargs: Any) -> keras.callbacks.History:
        """`keras.Model.fit`, with a guard against non-finite values and bad labels."""
        if not getattr(self, "_phase_compiled", True):
            raise ValueError(
                f"the model entered phase {self.method.current_phase + 1} of {type(self.method).__name__} "
                "but was not compiled since: call model.compile(optimizer=...) with a new optimizer "
                "(the trainable variables changed), or use keras_ee.training.fit_phases."
            )
        check_collective_strategy(self.distribute_strategy)
        return super().fit(*args, callbacks=_with_guard(callbacks), **kwargs)

    def evaluate(self, *args: Any, callbacks: Any = None, **kwargs: Any) -> Any:
        """`keras.Model.evaluate`, with a guard against bad labels."""
        return super().evaluate(*args, callbacks=_with_guard(callbacks), **kwargs)

    # --- steps ---------------------------------------------------------------

    def train_step(self, data: Any) -> dict[str, Tensor]:
        if not self.method.uses_meta_stream:
            return self.method.train_step(self, self.checked_labels(data))
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], (tuple, list))):
            raise ValueError(
                f"{type(self.method).__name__} needs a meta stream: feed `fit` batches "
                "((x, y), (x_meta, y_meta)), e.g. keras_ee.experiment.training_data(...)."
            )
        train, meta = data
        # A method with a meta stream overrides train_step with a `meta_batch` parameter.
        return self.method.train_step(  # type: ignore[call-arg]
            self, self.checked_labels(tuple(train)), meta_batch=self.checked_labels(tuple(meta))
        )

    def test_step(self, data: Any) -> dict[str, Tensor]:
        x, y, _ = keras.utils.unpack_x_y_sample_weight(self.checked_labels(data))
        logits = self(x, training=False)
        ce = core.per_exit_cross_entropy(y, logits)
        loss = self.method.test_loss(self, y, logits, ce)
        self.update_step_metrics(loss, y, logits, ce)
        return self.model_logs()

    def checked_labels(self, data: Any) -> Any:
        """`data` with sparse labels outside `0..num_classes-1` (or non-integer) recorded.

        A bad label is recorded for the guard, which stops `fit`/`evaluate` after the
        batch with a `ValueError`; the batch itself runs on labels clipped into range
        (TensorFlow's sparse cross-entropy would otherwise fail with an opaque
        graph error, and under XLA silently give NaN).
        """
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            return data
        y = ops.convert_to_tensor(y)
        if len(y.shape) >= 2 and y.shape[-1] not in (None, 1):
            return data  # one-hot or soft labels
        if "int" in keras.backend.standardize_dtype(y.dtype):
            integral = ops.convert_to_tensor(True)
            labels = ops.cast(y, "int64")
        else:
            as_float = ops.cast(y, "float32")
            integral = ops.all(ops.equal(as_float, ops.round(as_float)))
            labels = ops.cast(ops.round(as_float), "int64")
        top = self.num_classes - 1
        in_range = ops.logical_and(ops.all(labels >= 0), ops.all(labels <= top))
        worst = ops.where(ops.any(labels > top), ops.max(labels), ops.min(labels))
        value = ops.where(integral, worst, _NON_INTEGER_LABEL)
        self._record(ops.logical_not(ops.logical_and(integral, in_range)), value, _LABELS)
        y = ops.cast(ops.clip(labels, 0, top), "int32")
        return keras.utils.pack_x_y_sample_weight(x, y, sw)

    def scale_loss(self, loss: Tensor) -> Tensor:
        """The loss whose gradients every method hands to `apply_step`.

        Divided by the number of replicas in sync, then multiplied by the
        optimizer's loss scale (mixed precision), as Keras' own `compute_loss`
        and `train_step` do: under `tf.distribute` each replica's loss is the
        mean over its own part of the global batch and the optimizer sums the
        replicas' gradients, so without the division R replicas would take R
        times the step of one device on the same global batch. Identity on
        one device without loss scaling. Linear, so a method may scale
        per-sample coefficients instead of a loss.
        """
        replicas = bilevel.num_replicas()
        if replicas > 1:
            loss = loss * ops.cast(1.0 / replicas, loss.dtype)
        return self.optimizer.scale_loss(loss)

    def apply_step(self, grads: Sequence[Tensor], per_exit_loss: Tensor, finite: Tensor | None = None) -> None:
        """The real optimizer step of every method, with the non-finite checks.

        Records (for the guard) a non-finite per-exit loss, then a non-finite
        gradient, then a non-finite weight after the update (BatchNorm moving
        statistics included), and applies `grads` to the trainable variables.
        Under a `LossScaleOptimizer` a non-finite gradient is that optimizer's
        business (it skips the step, halves the scale and does not advance its
        `iterations`), so only the loss and the weights are checked.

        One loss-scaling convention for every method: `grads` are gradients of
        `self.scale_loss(loss)` (as in Keras' own `train_step`); `apply`
        unscales them and, under `tf.distribute`, sums them over the replicas.

        Args:
            grads: one gradient per `self.trainable_variables` (None allowed).
            per_exit_loss: `(K,)` tensor of the exits' (unscaled) losses.
            finite: optional boolean scalar (`bilevel.LookAheadResult.finite`):
                False when the step's other gradients (a look-ahead's) overflowed
                under loss scaling. `grads` then reach the `LossScaleOptimizer` as
                non-finite, so it skips this step and lowers the scale exactly as
                on an overflow of its own.
        """
        variables = self.trainable_variables
        opt = self.optimizer
        self.record_nonfinite(per_exit_loss, phase=_LOSS)
        if finite is not None and isinstance(opt, keras.optimizers.LossScaleOptimizer):
            grads = list(grads)
            i = next((i for i, g in enumerate(grads) if g is not None), None)
            if i is not None:
                # One NaN suffices: the optimizer checks every gradient before applying any.
                grads[i] = grads[i] + ops.where(
                    finite, ops.zeros((), grads[i].dtype), ops.full((), float("nan"), grads[i].dtype)
                )
        checks = CHECK_STEP_VALUES
        if checks and not isinstance(opt, keras.optimizers.LossScaleOptimizer):
            bad, first = core.first_nonfinite([ops.zeros((), "float32") if g is None else g for g in grads])
            self._record(bad, first, _GRADIENT)
        opt.apply(grads, variables)
        if checks:
            bad, first = core.first_nonfinite(self.checked_variables())
            self._record(bad, first, _WEIGHTS)

    def skippable_step(self, fn: Callable[..., Any], args: tuple = ()) -> None:
        """`fn(*args)`: one real step (one `apply_step`) with everything that belongs to it.

        A `LossScaleOptimizer` skips a step whose gradients overflowed, leaving the weights
        and its own buffers alone; the rest of the step has happened by then: the BatchNorm
        moving statistics of its forward pass, the method's auxiliary step taken before the
        real one (L2W's WPN, the gater, HDKD's gamma), that step's optimizer state, the
        method's statistics. Where the optimizer skipped the step (it lowered its scale
        without counting an iteration) all of these (`step_state`) are restored, so a
        skipped step changes nothing. Without loss scaling this is `fn(*args)`.

        Every method runs each real step in one (`Method.train_step`'s default, L2W's half
        steps, gating's and HDKD's batches). `fn` must not take more than one real step;
        what the method counts per loaded batch (e.g. `batch_counter`) belongs outside it.
        Under `tf.distribute` the optimizer's decision is the same on every replica.
        """
        optimizer = self.optimizer
        if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            fn(*args)
            return
        state = self.step_state()
        # Reads (copies), not the variables themselves: `ops.convert_to_tensor` would alias them.
        saved = [tf.convert_to_tensor(v) for v in state]
        iterations = tf.convert_to_tensor(optimizer.iterations)
        scale = tf.convert_to_tensor(optimizer.dynamic_scale)
        fn(*args)
        skipped = ops.logical_and(ops.equal(optimizer.iterations, iterations), ops.less(optimizer.dynamic_scale, scale))

        def restore(saved: list[Tensor]) -> None:
            for variable, value in zip(state, saved):
                variable.assign(value)

        # Some of these assignments synchronise the replicas: a condition that allows it.
        bilevel.replica_cond(skipped, restore, lambda saved: None, args=(saved,))

    def step_state(self) -> list[keras.Variable]:
        """What a step skipped for overflow restores (`skippable_step`): the backbone's
        non-trainable variables (BatchNorm moving statistics), the method's variables and its
        own optimizers' (`Method.auxiliary_optimizers`). Reading the unchanged ones is free."""
        state = list(self.backbone.non_trainable_variables) + list(self.method.variables)
        for optimizer in self.method.auxiliary_optimizers():
            state += list(optimizer.variables)
        return state

    def checked_variables(self) -> list[keras.Variable]:
        """The backbone's variables whose values `apply_step` checks after an update."""
        return list(self.backbone.trainable_variables) + list(self.backbone.non_trainable_variables)

    # --- helpers for methods -------------------------------------------------

    def update_step_metrics(self, loss: Tensor, y: Tensor, logits: list[Tensor], ce: Tensor) -> None:
        """Update `loss`, `exit_k_loss` and `exit_k_accuracy` trackers."""
        self._loss_tracker.update_state(loss)
        labels = core.sparse_labels(y, logits)
        for k in range(self.num_exits):
            self.exit_loss_trackers[k].update_state(ce[:, k])
            correct = ops.cast(
                ops.equal(
                    ops.cast(ops.argmax(logits[k], axis=-1), "int32"),
                    ops.cast(labels, "int32"),
                ),
                "float32",
            )
            self.exit_accuracy_trackers[k].update_state(correct)

    def model_logs(self) -> dict[str, Tensor]:
        logs = {"loss": self._loss_tracker.result()}
        for k in range(self.num_exits):
            logs[self.exit_loss_trackers[k].name] = self.exit_loss_trackers[k].result()
            logs[self.exit_accuracy_trackers[k].name] = self.exit_accuracy_trackers[k].result()
        return logs

    def record_nonfinite(self, per_exit_losses: Tensor, phase: int = _LOSS, when: Tensor | None = None) -> None:
        """Record the first exit whose loss is NaN/inf (read by the guard).

        Args:
            per_exit_losses: `(K,)` tensor of the exits' losses.
            phase: 0 for the training loss, 1 for a meta loss.
            when: optional boolean scalar; record only where it holds (a meta
                loss through a pseudo-step whose gradient overflowed under loss
                scaling, `bilevel.LookAheadResult.inner_finite`, is a skipped
                step, not a fault).
        """
        bad, first = core.first_nonfinite([per_exit_losses[k] for k in range(self.num_exits)])
        if when is not None:
            bad = ops.logical_and(bad, when)
        self._record(bad, first, phase)

    def record_small_batch(self, batch_size: Tensor) -> None:
        """Record that a batch was too small for the half-batch exchange."""
        self._record(ops.convert_to_tensor(True), batch_size, _BATCH)

    def _record(self, bad: Tensor, value: Tensor, phase: int) -> None:
        """Record a fault of kind `phase` with `value` if `bad` and none is recorded yet."""
        self.faults.record(bad, ops.cast(self.optimizer.iterations, "int64") + 1, value, phase)

    def load_own_variables(self, store: Any) -> None:
        # Files written before the fault record became `StepFaults` hold its packed
        # int64 vector as the model's one own variable: nothing to restore.
        if len(store.keys()) == 1 and not (self._trainable_variables + self._non_trainable_variables):
            return
        super().load_own_variables(store)

    # --- serialization -------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "method": keras.saving.serialize_keras_object(self.method),
            # The saved backbone is already the method's transform of the original.
            "transform_backbone": False,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> "MultiExitModel":
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(config.pop("backbone"), custom_objects=custom_objects)
        method = keras.saving.deserialize_keras_object(config.pop("method"), custom_objects=custom_objects)
        return cls(backbone=backbone, method=method, **config)


def fit_phases(
    model: MultiExitModel,
    x: Any,
    epochs: int,
    make_optimizer: Callable[[Phase, int], keras.optimizers.Optimizer],
    steps_per_epoch: int | None = None,
    callbacks: Any = None,
    **fit_kwargs: Any,
) -> list[keras.callbacks.History]:
    """Train every phase of `model.method` with plain `model.fit`, one after the other.

    Args:
        model: a `MultiExitModel` (compiled or not).
        x: the training data for `fit` (repeated every epoch, as `fit` does).
        epochs: the run's epochs, as given to `method.phases(epochs)`.
        make_optimizer: `fn(phase, index) -> keras optimizer`, called for each phase
            (a new optimizer: the trainable set changes between phases). A
            phase's own `make_optimizer`, if set, is used instead (it gets the
            phase's optimizer steps, 0 when `steps_per_epoch` is not given).
        steps_per_epoch, callbacks, **fit_kwargs: passed to every `fit`.

    Returns:
        The list of each phase's `History`.

    Example:
    >>> histories = fit_phases(model, train_ds, epochs=300,
    ...     make_optimizer=lambda phase, i: keras.optimizers.SGD(0.1, momentum=0.9))
    """
    if isinstance(x, tf.data.Dataset):
        # Keras cannot shuffle a tf.data pipeline (it warns on its default shuffle=True); the
        # pipeline shuffles itself, as `DatasetSplits.train_dataset` does.
        fit_kwargs.setdefault("shuffle", False)
    histories = []
    for i, phase in enumerate(model.method.phases(epochs)):
        model.enter_phase(i)
        if phase.make_optimizer is not None:
            steps = phase.epochs * (steps_per_epoch or 0) * model.method.optimizer_steps_per_batch
            optimizer = phase.make_optimizer(steps)
        else:
            optimizer = make_optimizer(phase, i)
        model.compile(optimizer=optimizer, **_compile_options(model))
        histories.append(
            model.fit(x, epochs=phase.epochs, steps_per_epoch=steps_per_epoch, callbacks=callbacks, **fit_kwargs)
        )
    return histories


def _compile_options(model: MultiExitModel) -> dict[str, Any]:
    """The compile settings (other than the optimizer) the model was compiled with, if any."""
    config = getattr(model, "_compile_config", None)
    options = dict(config.config) if config is not None else {}
    for key in ("optimizer", "loss", "metrics", "weighted_metrics", "loss_weights"):
        options.pop(key, None)
    return options


# The strategy with collectives that trained in this process, per collective key base.
_COLLECTIVE_STRATEGIES: dict[int, Any] = {}


def check_collective_strategy(strategy: Any) -> None:
    """Refuse to train under a second `MirroredStrategy` (or `MultiWorkerMirroredStrategy`) in a
    process when it shares the first one's collective keys.

    TensorFlow numbers the collective operations (all-reduces, all-gathers) of every new
    strategy of these kinds from the same group and instance keys (from the class attribute
    `_collective_key_base`, 0 unless changed) and keeps what the first one ran under each key
    for the rest of the process, so the second strategy's collectives collide with the first's
    and fail mid-training ("Collective instance 101 expected type 0 and data_type 1 but got
    type 2 and data_type 3"). One strategy per process, reused for every model, never
    collides: `keras_ee.distribute.make_strategy` returns the process's. A strategy made after
    moving the key base (as TensorFlow's own tests do) has keys of its own and is allowed.
    Strategies of one replica run no collectives and are not counted.
    """
    if strategy.num_replicas_in_sync < 2 or not isinstance(
        strategy, (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)
    ):
        return
    key_base = int(getattr(strategy.extended, "_collective_key_base", 0))
    first = _COLLECTIVE_STRATEGIES.setdefault(key_base, strategy)
    if first is not strategy:
        raise ValueError(
            f"this process already trained under another {type(first).__name__}, and "
            f"TensorFlow gives every new one the same collective keys, so this {type(strategy).__name__}'s "
            "collectives would collide with the first's mid-training ('Collective instance ... expected type'); "
            "build every model under one strategy per process (keras_ee.distribute.make_strategy returns it), "
            "or train in a new process."
        )


def _with_guard(callbacks: Any) -> Any:
    if isinstance(callbacks, keras.callbacks.CallbackList):
        # `fit` passes its own list to `evaluate` for validation: it holds the guard already,
        # and wrapping it would add a second progress bar and call its test hooks twice.
        return callbacks
    if callbacks is None:
        callbacks = []
    elif isinstance(callbacks, keras.callbacks.Callback):
        callbacks = [callbacks]
    elif isinstance(callbacks, (list, tuple)):
        callbacks = list(callbacks)
    else:
        raise TypeError(f"`callbacks` must be a list of keras.callbacks.Callback; received {type(callbacks).__name__}.")
    if not any(isinstance(c, NonFiniteLossGuard) for c in callbacks):
        callbacks.append(NonFiniteLossGuard())
    return callbacks


_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid", "log_softmax")


def _check_exits(backbone: keras.Model) -> int:
    """The exits' common class count; a clear error for outputs that cannot be logits."""
    counts = []
    for k, out in enumerate(backbone.outputs):
        name = f"exit_{k + 1}"
        shape = tuple(out.shape)
        if len(shape) != 2 or shape[-1] is None:
            raise ValueError(
                f"{name} of the backbone must output logits of shape (batch, num_classes); received shape {shape}."
            )
        if shape[-1] < 2:
            raise ValueError(
                f"{name} of the backbone has {shape[-1]} output unit; expected logits over "
                ">= 2 classes (a 1-unit exit has a cross-entropy of 0 and learns nothing)."
            )
        layer: keras.Operation = getattr(getattr(out, "_keras_history", None), "operation", None)  # or None
        activation = getattr(layer, "activation", None)
        act_name = getattr(activation, "__name__", None) if activation is not None else None
        if isinstance(layer, keras.layers.Softmax) or act_name in _PROBABILITY_ACTIVATIONS:
            raise ValueError(
                f"{name} of the backbone ends in a {act_name or 'softmax'} layer "
                f"({layer.name!r}); MultiExitModel expects logits: remove the activation "
                "(use activation=None)."
            )
        counts.append(shape[-1])
    if len(set(counts)) > 1:
        listing = ", ".join(f"exit_{k + 1}: {c}" for k, c in enumerate(counts))
        raise ValueError(
            f"the exits have different class counts ({listing}); every exit must classify the same classes."
        )
    return counts[0]
