"""`MultiExitModel`: one training model for multi-exit networks."""

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_ee.training import core
from keras_ee.training.methods import Baseline
from keras_ee.training.methods import Method

_PHASES = {
    0: "training loss",
    1: "meta loss",
    2: "batch size",
}


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss becomes NaN or inf."""


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops `fit` with a clear error when a loss becomes NaN or inf.

    `MultiExitModel.fit` adds it automatically. The training step records
    the first optimizer step and exit whose loss was not finite (this works
    under XLA, where in-graph assertions are dropped); the guard reads that
    record after every batch and raises `NonFiniteLossError`.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        flag, step, exit_k, phase = (
            int(v) for v in np.asarray(self.model._nonfinite.numpy())
        )
        if not flag:
            return
        self.model._nonfinite.assign(np.zeros(4, dtype="int64"))
        self.model.stop_training = True
        if phase == 2:
            raise ValueError(
                "Half-batch exchange needs batches of at least 2 samples; "
                f"received a batch of {exit_k} at optimizer step {step} "
                f"(epoch {self._epoch + 1}, batch {batch + 1}). Use another "
                "batch size or `drop_remainder=True`."
            )
        raise NonFiniteLossError(
            f"NaN or inf in the {_PHASES.get(phase, 'loss')} of exit_{exit_k} "
            f"at optimizer step {step} (epoch {self._epoch + 1}, "
            f"batch {batch + 1}). Lower the learning rate, check the data "
            "for NaN/inf, or clip gradients."
        )


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
        **kwargs: standard `keras.Model` arguments (e.g. `name`).

    Example:
    >>> model = keras_ee.training.MultiExitModel(
    ...     backbone, method=keras_ee.training.L2W(q=0.75, delta=0.8))
    >>> model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    >>> model.fit(train_ds, validation_data=val_ds, epochs=10)
    >>> exit_logits = model.predict(test_x)   # list of K arrays
    """

    def __init__(self, backbone, method=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(backbone, keras.Model):
            raise TypeError(
                "`backbone` must be a keras.Model with one output per exit; "
                f"received {type(backbone).__name__}."
            )
        if not backbone.built:
            raise ValueError(
                "`backbone` must be built (a functional model, or call it on "
                "a batch first)."
            )
        outputs = getattr(backbone, "outputs", None)
        if outputs is None:
            raise ValueError(
                "`backbone` must be a functional model (its `outputs` define "
                "the exits); received a model without `outputs`."
            )
        method = Baseline() if method is None else method
        if not isinstance(method, Method):
            raise TypeError(
                "`method` must be a keras_ee.training.Method (e.g. Baseline() "
                f"or L2W()); received {type(method).__name__}."
            )
        self.backbone = backbone
        self.num_exits = len(outputs)
        self.exit_names = [f"exit_{k + 1}" for k in range(self.num_exits)]
        self.exit_loss_trackers = [
            keras.metrics.Mean(name=f"{n}_loss") for n in self.exit_names
        ]
        self.exit_accuracy_trackers = [
            keras.metrics.Mean(name=f"{n}_accuracy") for n in self.exit_names
        ]
        # [flag, optimizer step, exit (1-based) or batch size, phase].
        self._nonfinite = keras.Variable(
            np.zeros(4, dtype="int64"),
            dtype="int64",
            trainable=False,
            name="nonfinite_record",
        )
        # The method's variables (e.g. the WPN) are saved with the model but
        # are not the model's trainable variables: the real optimizer only
        # sees the backbone.
        method.trainable = False
        self.method = method
        method.setup(self)
        self.built = True

    def call(self, inputs, training=None):
        outputs = self.backbone(inputs, training=training)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return list(outputs)

    # --- compile / fit -------------------------------------------------------

    def compile(self, optimizer="sgd", loss=None, metrics=None, **kwargs):
        """Configures training; the loss and metrics are the method's.

        Args:
            optimizer: a Keras optimizer (instance or name).
            loss: must be None (the method defines the loss).
            metrics: must be None (per-exit loss and accuracy are built in).
            **kwargs: other `keras.Model.compile` arguments (`jit_compile`,
                `steps_per_execution`, `run_eagerly`, ...).
        """
        if loss is not None:
            raise ValueError(
                "MultiExitModel's loss is defined by its method; received "
                f"loss={loss!r}, expected None."
            )
        if metrics is not None or kwargs.get("weighted_metrics") is not None:
            raise ValueError(
                "MultiExitModel logs per-exit loss and accuracy itself; "
                f"received metrics={metrics!r}, expected None."
            )
        if kwargs.get("loss_weights") is not None:
            raise ValueError(
                "Use `Baseline(exit_weights=...)` instead of `loss_weights`; "
                f"received loss_weights={kwargs['loss_weights']!r}."
            )
        super().compile(optimizer=optimizer, **kwargs)
        self.method.check_optimizer(self.optimizer)
        if not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        for key in ("loss", "metrics", "weighted_metrics", "loss_weights"):
            config.pop(key, None)
        self.compile(**config)

    def fit(self, *args, callbacks=None, **kwargs):
        """`keras.Model.fit`, with a guard against non-finite losses."""
        if callbacks is None:
            callbacks = []
        elif isinstance(callbacks, keras.callbacks.Callback):
            callbacks = [callbacks]
        elif isinstance(callbacks, (list, tuple)):
            callbacks = list(callbacks)
        else:
            raise TypeError(
                "`callbacks` must be a list of keras.callbacks.Callback; "
                f"received {type(callbacks).__name__}."
            )
        if not any(isinstance(c, NonFiniteLossGuard) for c in callbacks):
            callbacks.append(NonFiniteLossGuard())
        return super().fit(*args, callbacks=callbacks, **kwargs)

    # --- steps ---------------------------------------------------------------

    def train_step(self, data):
        return self.method.train_step(self, data)

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        logits = self(x, training=False)
        ce = core.per_exit_cross_entropy(y, logits)
        loss = self.method.test_loss(self, y, logits, ce)
        self.update_step_metrics(loss, y, logits, ce)
        return self.model_logs()

    # --- helpers for methods -------------------------------------------------

    def update_step_metrics(self, loss, y, logits, ce):
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

    def model_logs(self):
        logs = {"loss": self._loss_tracker.result()}
        for k in range(self.num_exits):
            logs[self.exit_loss_trackers[k].name] = self.exit_loss_trackers[
                k
            ].result()
            logs[self.exit_accuracy_trackers[k].name] = (
                self.exit_accuracy_trackers[k].result()
            )
        return logs

    def record_nonfinite(self, per_exit_losses, phase=0):
        """Record the first exit whose loss is NaN/inf (read by the guard).

        Args:
            per_exit_losses: `(K,)` tensor of the exits' losses.
            phase: 0 for the training loss, 1 for a meta loss.
        """
        bad = ops.logical_not(ops.isfinite(per_exit_losses))
        any_bad = ops.any(bad)
        first = ops.cast(ops.argmax(ops.cast(bad, "int32")), "int64") + 1
        step = ops.cast(self.optimizer.iterations, "int64") + 1
        record = ops.stack(
            [ops.ones((), "int64"), step, first, ops.cast(phase, "int64")]
        )
        keep_old = ops.logical_or(
            ops.logical_not(any_bad), self._nonfinite[0] > 0
        )
        self._nonfinite.assign(ops.where(keep_old, self._nonfinite, record))

    def record_small_batch(self, batch_size):
        """Record that a batch was too small for the half-batch exchange."""
        step = ops.cast(self.optimizer.iterations, "int64") + 1
        record = ops.stack(
            [
                ops.ones((), "int64"),
                step,
                ops.cast(batch_size, "int64"),
                ops.convert_to_tensor(2, "int64"),
            ]
        )
        self._nonfinite.assign(
            ops.where(self._nonfinite[0] > 0, self._nonfinite, record)
        )

    # --- serialization -------------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "method": keras.saving.serialize_keras_object(self.method),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(
            config.pop("backbone"), custom_objects=custom_objects
        )
        method = keras.saving.deserialize_keras_object(
            config.pop("method"), custom_objects=custom_objects
        )
        return cls(backbone=backbone, method=method, **config)
