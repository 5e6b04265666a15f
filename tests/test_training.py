"""End-to-end checks of `MultiExitModel` with `fit`: every method learns,
save/load and BackupAndRestore resume exactly, non-finite losses stop
training with a clear error."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tiny_models  # noqa: E402

from keras_ee import training as T  # noqa: E402
from keras_ee.calibration import geometric_fractions  # noqa: E402

NUM_CLASSES = 3


def tiny_backbone(num_exits=3, dim=4, width=8, seed=0, nan_exit=None):
    return tiny_models.tiny_backbone(num_exits, NUM_CLASSES, dim, width, seed, nan_exit)


def blobs(n=96, dim=4, seed=0):
    """Three Gaussian clusters: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, size=n)
    centers = rng.normal(scale=2.0, size=(NUM_CLASSES, dim))
    x = centers[y] + rng.normal(size=(n, dim))
    return x.astype("float32"), y.astype("int32")


def sgd():
    return keras.optimizers.SGD(0.05, momentum=0.9, weight_decay=1e-4)


def make(method, seed=0, optimizer=None, **compile_kwargs):
    model = T.MultiExitModel(tiny_backbone(seed=seed), method=method)
    model.compile(optimizer=optimizer or sgd(), **compile_kwargs)
    return model


# --- every method lowers the loss ------------------------------------------


def _saved_wpn(tmp_path):
    donor = make(T.L2W(wpn_width=16), seed=5)
    path = str(tmp_path / "wpn.npz")
    donor.method.save_wpn(path)
    return path


METHODS = {
    "baseline": lambda p: T.Baseline(),
    "baseline_weighted": lambda p: T.Baseline(exit_weights=[0.5, 1.0, 2.0]),
    "l2w": lambda p: T.L2W(wpn_width=16),
    "l2w_selection": lambda p: T.L2W(weighting="selection"),
    "l2w_rising": lambda p: T.L2W(weighting="rising"),
    "l2w_falling": lambda p: T.L2W(weighting="falling"),
    "l2w_frozen": lambda p: T.L2W(wpn_width=16, weighting="frozen", wpn_weights_path=_saved_wpn(p)),
    "l2w_vanilla_objective": lambda p: T.L2W(wpn_width=16, meta_objective="vanilla"),
    "l2w_both_row_interval2": lambda p: T.L2W(wpn_width=16, wpn_input="both", constraint="row", meta_interval=2),
    "l2w_confidence_mat": lambda p: T.L2W(wpn_width=16, wpn_input="confidence", constraint="mat"),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fit_lowers_loss(name, tmp_path):
    x, y = blobs()
    model = make(METHODS[name](tmp_path))
    before = model.evaluate(x, y, verbose=0, return_dict=True)
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False)
    after = model.evaluate(x, y, verbose=0, return_dict=True)
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    for k in range(1, 4):
        assert f"exit_{k}_loss" in history.history
        assert f"exit_{k}_accuracy" in history.history
        if name.startswith("l2w"):
            stats = [history.history[f"exit_{k}_weight_{s}"][-1] for s in ("min", "mean", "max")]
            assert stats[0] <= stats[1] + 1e-5
            assert stats[1] <= stats[2] + 1e-5
            assert np.all(np.isfinite(stats))


def test_logs_and_predict_have_every_exit():
    x, y = blobs(n=32)
    model = make(T.L2W(wpn_width=8))
    hist = model.fit(x, y, batch_size=8, epochs=1, verbose=0, validation_data=(x, y))
    expected = {"loss", "val_loss"}
    for k in range(1, 4):
        expected |= {
            f"exit_{k}_loss",
            f"exit_{k}_accuracy",
            f"val_exit_{k}_loss",
            f"val_exit_{k}_accuracy",
            f"exit_{k}_weight_mean",
            f"exit_{k}_weight_min",
            f"exit_{k}_weight_max",
        }
    assert set(hist.history) == expected
    preds = model.predict(x, verbose=0)
    assert isinstance(preds, list) and len(preds) == 3
    assert all(p.shape == (32, NUM_CLASSES) for p in preds)
    # Validation metrics equal an independent computation.
    logs = model.evaluate(x, y, verbose=0, return_dict=True)
    for k, p in enumerate(preds):
        acc = np.mean(np.argmax(p, axis=1) == y)
        np.testing.assert_allclose(logs[f"exit_{k + 1}_accuracy"], acc, atol=1e-6)
        logp = p - np.log(np.exp(p - p.max(1, keepdims=True)).sum(1, keepdims=True)) - p.max(1, keepdims=True)
        ce = -logp[np.arange(len(y)), y].mean()
        np.testing.assert_allclose(logs[f"exit_{k + 1}_loss"], ce, rtol=1e-4)


def test_baseline_step_matches_manual_step():
    x, y = blobs(n=16)
    model = make(T.Baseline(exit_weights=[1.0, 0.5, 2.0]), optimizer=keras.optimizers.SGD(0.1))
    ref = tiny_backbone(seed=0)
    ref.set_weights(model.backbone.get_weights())
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    with tf.GradientTape() as tape:
        logits = ref(x, training=True)
        loss = sum(
            c * tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, z, from_logits=True))
            for c, z in zip([1.0, 0.5, 2.0], logits)
        )
    grads = tape.gradient(loss, ref.trainable_variables)
    for v, g in zip(ref.trainable_variables, grads):
        v.assign(v - 0.1 * g)
    for a, b in zip(model.backbone.weights, ref.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


# --- serialization and resume ----------------------------------------------


def _state(model):
    """Every piece of training state, as numpy arrays."""
    arrays = [v.numpy() for v in model.backbone.weights]
    arrays += [v.numpy() for v in model.optimizer.variables]
    method = model.method
    if hasattr(method, "wpn"):
        arrays += [v.numpy() for v in method.wpn.weights]
    if hasattr(method, "wpn_optimizer"):
        arrays += [v.numpy() for v in method.wpn_optimizer.variables]
    arrays += [v.numpy() for v in method.weights]
    return arrays


def test_save_load_identical(tmp_path):
    x, y = blobs(n=32)
    model = make(T.L2W(wpn_width=8, q=0.5, delta=0.6, constraint="mat"))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, T.MultiExitModel)
    assert isinstance(loaded.method, T.L2W)
    assert loaded.method.get_config() == model.method.get_config()
    for a, b in zip(model.predict(x, verbose=0), loaded.predict(x, verbose=0)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_state(model), _state(loaded)):
        np.testing.assert_array_equal(a, b)
    # The WPN optimizer really has state (it trained).
    assert int(loaded.method.wpn_optimizer.iterations.numpy()) > 0


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("method", ["l2w", "baseline"])
def test_backup_and_restore_resumes_identically(method, tmp_path):
    x, y = blobs(n=32)
    factory = {"l2w": lambda: T.L2W(wpn_width=8), "baseline": lambda: T.Baseline()}[method]
    schedule = keras.optimizers.schedules.CosineDecay(0.05, 16)

    def fresh(seed):
        return make(factory(), seed=seed, optimizer=keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=1e-4))

    full = fresh(0)
    full.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False)

    backup = str(tmp_path / "backup")
    first = fresh(0)
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(
            x,
            y,
            batch_size=8,
            epochs=2,
            verbose=0,
            shuffle=False,
            callbacks=[keras.callbacks.BackupAndRestore(backup), _Interrupt()],
        )
    resumed = fresh(1)  # different initialisation: all must come from backup
    resumed.fit(
        x, y, batch_size=8, epochs=2, verbose=0, shuffle=False, callbacks=[keras.callbacks.BackupAndRestore(backup)]
    )
    full_state, resumed_state = _state(full), _state(resumed)
    assert len(full_state) == len(resumed_state)
    for a, b in zip(full_state, resumed_state):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # And it did not just restart from scratch: the interrupted run differs.
    assert int(resumed.optimizer.iterations.numpy()) == int(full.optimizer.iterations.numpy())


# --- non-finite losses -------------------------------------------------------


@pytest.mark.parametrize("method", ["baseline", "l2w"])
def test_nonfinite_loss_names_step_and_exit(method):
    x, y = blobs(n=32)
    x[:, 0] = -1.0
    # Batch 2 (samples 8..15); for L2W its first half (8..11) is step 3.
    x[9, 0] = 1.0
    m = {"baseline": T.Baseline(), "l2w": T.L2W(wpn_width=8)}[method]
    model = T.MultiExitModel(tiny_backbone(nan_exit=2), method=m)
    model.compile(optimizer=sgd())
    step = {"baseline": 2, "l2w": 3}[method]
    with pytest.raises(
        T.NonFiniteLossError,
        match=rf"training loss of exit_2 at optimizer step "
        rf"{step} \(epoch 1, batch 2\)",
    ):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)


def test_batch_of_one_is_a_clear_error():
    x, y = blobs(n=9)
    model = make(T.L2W(wpn_width=8))
    with pytest.raises(ValueError, match="at least 2 samples"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)


# --- argument validation -----------------------------------------------------


def test_options_by_position_are_the_constructors_and_win_over_reference():
    # The registry's `reference` option must not take the first positional option's place.
    assert T.Baseline([1.0, 2.0, 3.0]).exit_weights == [1.0, 2.0, 3.0]
    imta = T.IMTA(False, reference="code")
    assert imta.gradient_equilibrium is False and imta.kl_reduction == "mean"
    kl = T.IMTA(True, True, True, 3.0, 0.9, "batchmean", reference="code")
    assert kl.kl_reduction == "batchmean" and kl.detach_transfer is False  # given wins, the rest is the code's
    with pytest.raises(TypeError, match="two values for option 'exit_weights'"):
        T.Baseline([1.0], exit_weights=[2.0])


def test_bad_arguments():
    with pytest.raises(TypeError):
        T.MultiExitModel("not a model")
    with pytest.raises(TypeError):
        T.MultiExitModel(tiny_backbone(), method="l2w")
    with pytest.raises(ValueError, match="q"):
        T.L2W(q=0.0)
    with pytest.raises(ValueError, match="delta"):
        T.L2W(delta=1.5)
    with pytest.raises(ValueError, match="constraint"):
        T.L2W(constraint="diag")
    with pytest.raises(ValueError, match="wpn_weights_path"):
        T.L2W(weighting="frozen")
    with pytest.raises(ValueError, match="exit_weights"):
        T.MultiExitModel(tiny_backbone(), method=T.Baseline([1.0, 2.0]))
    model = T.MultiExitModel(tiny_backbone(), method=T.L2W(wpn_width=4))
    with pytest.raises(ValueError, match="loss"):
        model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="RMSprop"):
        model.compile(optimizer=keras.optimizers.RMSprop())
    # Methods without a look-ahead accept any optimizer.
    T.MultiExitModel(tiny_backbone(), method=T.L2W(weighting="rising")).compile(optimizer=keras.optimizers.RMSprop())


def test_sample_statistics():
    x, y = blobs(n=40)
    model = make(T.L2W(wpn_width=8, q=0.75))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(20)
    stats = model.method.sample_statistics(model, ds)
    assert stats["loss"].shape == (40, 3)
    assert stats["weight"].shape == (40, 3)
    np.testing.assert_allclose(stats["weight"].mean(axis=1), 1.0, atol=1e-5)
    # Per batch of 20 with q = 0.75: floor(20 * f_1) samples go to exit 1.
    n1 = int(np.floor(20 * geometric_fractions(0.75, 3)[0]))
    assert stats["selected_by_exit_1"].sum() == 2 * n1
    chosen = stats["confidence"][:20, 0][stats["selected_by_exit_1"][:20]]
    rest = stats["confidence"][:20, 0][~stats["selected_by_exit_1"][:20]]
    assert chosen.min() >= rest.max()


def test_optimizer_steps_per_batch_matches_the_iterations_taken():
    """LR schedules are built from this number (keras_ee.experiment), so it must be true."""
    import keras_ee.training as tr

    for method, expected in ((tr.Baseline(), 1), (tr.L2W(wpn_width=8), 2)):
        x = keras.Input((4,))
        h = keras.layers.Dense(8, activation="relu")(x)
        backbone = keras.Model(x, [keras.layers.Dense(3, name="exit_1")(h), keras.layers.Dense(3, name="exit_2")(h)])
        model = tr.MultiExitModel(backbone, method=method)
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        rng = np.random.default_rng(0)
        model.fit(rng.normal(size=(32, 4)).astype("float32"), rng.integers(0, 3, 32), batch_size=8, epochs=1, verbose=0)
        assert method.optimizer_steps_per_batch == expected
        assert int(model.optimizer.iterations.numpy()) == 4 * expected
