"""The hooks the next methods need: a backbone transform before wrapping, stateless forward
passes that return named intermediate tensors, the bilevel core's pieces, and the fault record
as named fields."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops
from tiny_models import SMALL_CNN

from keras_ee import runs, training
from keras_ee.training import bilevel, core


def _backbone(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((5,))
    h = keras.layers.Dense(8, activation="relu", name="trunk")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    f1 = keras.layers.Dense(6, activation="relu", name="exit_1_features")(h)
    e1 = keras.layers.Dense(3, name="exit_1")(f1)
    f2 = keras.layers.Dense(6, activation="relu", name="exit_2_features")(keras.layers.Dense(8, name="deep")(h))
    e2 = keras.layers.Dense(3, name="exit_2")(f2)
    return keras.Model(inp, [e1, e2])


@keras.saving.register_keras_serializable(package="keras_ee_test_hooks")
class ChainedHeads(training.Baseline):
    """Adds a third exit that classifies exit 2's features with exit 1's logits (IMTA-like)."""

    def transform_backbone(self, backbone):
        f2 = backbone.get_layer("exit_2_features").output
        chained = keras.layers.Concatenate()([f2, keras.layers.Dense(4, name="transfer")(backbone.outputs[0])])
        e3 = keras.layers.Dense(3, name="exit_3")(chained)
        return keras.Model(backbone.inputs, list(backbone.outputs) + [e3])


def test_a_method_transforms_the_backbone_once_and_it_survives_saving(tmp_path):
    model = training.MultiExitModel(_backbone(), method=ChainedHeads())
    assert model.num_exits == 3 and model.backbone.get_layer("transfer") is not None
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    x = np.random.default_rng(0).normal(size=(16, 5)).astype("float32")
    model.fit(x, np.arange(16) % 3, batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.num_exits == 3  # not transformed a second time
    for a, b in zip(model.predict(x, verbose=0), loaded.predict(x, verbose=0)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_stateless_forward_returns_named_tensors_with_substituted_values():
    backbone = _backbone()
    x = tf.constant(np.random.default_rng(1).normal(size=(8, 5)).astype("float32"))
    theta = [v.value * 0.5 for v in backbone.trainable_variables]  # other values than the model's
    logits, stats = core.stateless_forward(backbone, theta, x)
    logits2, stats2, named = core.stateless_forward(
        backbone, theta, x, return_tensors=["exit_1_features", "exit_2_features"]
    )
    for a, b in zip(logits + stats, logits2 + stats2):  # same pass, same order of the model's variables
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    features = keras.Model(backbone.inputs, backbone.get_layer("exit_1_features").output)
    want, _ = features.stateless_call(
        [theta[[id(v) for v in backbone.trainable_variables].index(id(w))] for w in features.trainable_variables],
        [w.value for w in features.non_trainable_variables],
        x,
        training=True,
    )
    np.testing.assert_allclose(np.asarray(named["exit_1_features"]), np.asarray(want), rtol=1e-6)
    assert not np.allclose(np.asarray(named["exit_1_features"]), np.asarray(features(x, training=True)))
    # Gradients flow through the substituted values to the named tensor.
    with tf.GradientTape() as tape:
        tape.watch(theta)
        _, _, named = core.stateless_forward(backbone, theta, x, return_tensors=["exit_2_features"])
        loss = tf.reduce_sum(named["exit_2_features"])
    grads = tape.gradient(loss, theta)
    assert sum(g is not None for g in grads) >= 4
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        core.stateless_forward(backbone, theta, x, return_tensors=["nope"])


def test_lookahead_returns_its_results():
    backbone = _backbone()
    opt = keras.optimizers.SGD(0.1, momentum=0.9)
    opt.build(backbone.trainable_variables)
    outer = keras.Variable(np.ones(2, "float32"))
    x = tf.constant(np.random.default_rng(2).normal(size=(8, 5)).astype("float32"))
    y = tf.constant(np.arange(8) % 3)

    def terms_fn(logits, labels):
        return core.per_exit_cross_entropy(labels, logits), None

    def coefficients_fn(terms, aux):
        return ops.broadcast_to(outer.value[None, :], ops.shape(terms)) / 8.0

    def outer_fn(logits_meta, labels):
        ce = ops.mean(core.per_exit_cross_entropy(labels, logits_meta), axis=0)
        return ops.sum(ce), ce

    result = bilevel.LookAhead(backbone, opt, [outer], terms_fn, coefficients_fn, outer_fn).run(x, y, x, y)
    assert isinstance(result, bilevel.LookAheadResult)
    assert result.outer_gradients[0].shape == (2,) and np.all(np.isfinite(result.outer_gradients[0]))
    np.testing.assert_allclose(float(result.outer_loss), float(ops.sum(result.outer_aux)), rtol=1e-6)
    grads = result.real_gradients(ops.ones_like(result.terms))
    assert len(grads) == len(backbone.trainable_variables)
    with pytest.raises(RuntimeError, match="already called"):
        result.real_gradients(ops.ones_like(result.terms))


def test_the_auxiliary_learning_rate_follows_the_main_schedule():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([2], [0.1, 0.01])
    main = keras.optimizers.SGD(schedule)
    main.build([keras.Variable(np.zeros(1, "float32"))])
    lr0 = keras.Variable(0.0, dtype="float32")
    lr = bilevel.follow_main_schedule(1e-3, lambda: main, lr0)
    np.testing.assert_allclose(float(lr()), 1e-3)  # before the first step: the base rate
    bilevel.record_initial_learning_rate(main, lr0)
    main.iterations.assign(5)
    bilevel.record_initial_learning_rate(main, lr0)  # recorded once, at the first step
    np.testing.assert_allclose(float(lr0.numpy()), 0.1, rtol=1e-6)
    np.testing.assert_allclose(float(lr()), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(bilevel.follow_main_schedule(1e-3, lambda: None, lr0)()), 1e-3)


def test_per_exit_stats_and_the_mlp():
    stats = bilevel.PerExitStats(2, "gate")
    stats.update(tf.constant([[0.2, 1.0], [0.6, -1.0]]))
    logs = {k: float(v) for k, v in stats.logs().items()}
    assert logs == pytest.approx(
        {
            "exit_1_gate_mean": 0.4,
            "exit_1_gate_min": 0.2,
            "exit_1_gate_max": 0.6,
            "exit_2_gate_mean": 0.0,
            "exit_2_gate_min": -1.0,
            "exit_2_gate_max": 1.0,
        }
    )
    mlp = bilevel.MLP(input_dim=2, output_dim=1, depth=2, width=7, output_activation="sigmoid")
    out = mlp(tf.zeros((3, 2)))
    assert out.shape == (3, 1) and np.all((np.asarray(out) > 0) & (np.asarray(out) < 1))
    assert bilevel.MLP.from_config(mlp.get_config()).get_config() == mlp.get_config()
    with pytest.raises(ValueError, match="`depth` must be >= 1"):
        bilevel.MLP(2, 1, depth=0)


def test_the_fault_record_has_named_fields():
    faults = training.model.StepFaults()
    assert faults.take() is None
    faults.record(tf.constant(True), 7, 2, 3)
    faults.record(tf.constant(True), 9, 1, 0)  # only the first is kept
    assert faults.take() == {"flag": 1, "step": 7, "value": 2, "kind": 3, "kind_name": "gradient"}
    assert faults.take() is None
    model = training.MultiExitModel(_backbone())
    assert not any("fault" in v.path for v in model.weights)  # bookkeeping, not saved
    model.load_own_variables({"0": np.zeros(4, "int64")})  # a file with the old packed record loads


@keras.saving.register_keras_serializable(package="keras_ee_test_hooks")
class CountsMetaSamples(training.Baseline):
    """A Baseline step on the training batch; counts the held-out samples it was given."""

    uses_meta_stream = True

    def setup(self, model):
        super().setup(model)
        self.meta_seen = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, name="meta_seen"
        )
        self.meta_label_sum = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, name="meta_label_sum"
        )

    def train_step(self, model, data, meta_batch=None):
        x_meta, y_meta = meta_batch
        self.meta_seen.assign_add(ops.cast(ops.shape(x_meta)[0], "int64"))
        self.meta_label_sum.assign_add(ops.sum(ops.cast(y_meta, "int64")))
        return super().train_step(model, data)


def test_the_meta_stream_comes_from_the_calibration_hold_out_or_its_own_split():
    from keras_ee import data

    splits = data.load("digits", val_size=200)
    assert splits.meta_source == "calibration" and splits.num_meta == 200
    val = {x.tobytes() for x in np.concatenate([b[0].numpy() for b in splits.val_dataset(64)])}
    stream = list(splits.meta_dataset(64, batches_per_epoch=5, seed=1, first_epoch=0, epochs=2))
    assert len(stream) == 10 and all(b[0].shape[0] == 64 for b in stream)
    assert all(x.tobytes() in val for b in stream for x in b[0].numpy())
    again = list(splits.meta_dataset(64, batches_per_epoch=5, seed=1, first_epoch=1, epochs=2))
    for a, b in zip(stream[5:], again):  # epoch 1's stream alone = epoch 1's after epoch 0
        np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    own = data.load("digits", val_size=200, meta_size=100)
    assert own.meta_source == "split" and own.num_meta == 100 and own.num_train == splits.num_train - 100
    train = {x.tobytes() for x in own._x_train}
    assert not any(x.tobytes() in train for x in own._x_meta)
    assert not any(x.tobytes() in {v.tobytes() for v in own._x_val} for x in own._x_meta)


def test_a_meta_stream_method_trains_through_experiment_train(tmp_path):
    from keras_ee import experiment
    from keras_ee.config import TrainConfig

    cfg = TrainConfig(
        dataset="digits",
        model="multiexit_cnn",
        model_options=SMALL_CNN,
        epochs=2,
        batch_size=128,
        val_size=200,
        train_size=300,
        evaluate=False,
        method=f"{__name__}:CountsMetaSamples",
        meta_split_size=60,
    )
    run = experiment.train(cfg, tmp_path / "r", verbose=0)
    assert json.loads((run / "config.json").read_text())["meta_split_size"] == 60  # the choice is recorded
    model = runs.load_run_model(run / "model.keras")
    batches = 2 * -(-300 // 128)
    assert int(model.method.meta_seen.numpy()) == batches * 60  # batch capped at the 60 held-out images
    model = training.MultiExitModel(_backbone(), method=CountsMetaSamples())
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"needs a meta stream: feed `fit` batches \(\(x, y\), \(x_meta, y_meta\)\)"):
        model.fit(np.zeros((8, 5), "float32"), np.zeros(8), verbose=0)


@keras.saving.register_keras_serializable(package="keras_ee_test_hooks")
class TwoPhases(training.Baseline):
    """Phase 1 trains everything with the run's SGD; phase 2 only exit 2's head, with Adam."""

    def phases(self, epochs):
        return [
            training.Phase("all", epochs),
            training.Phase("head", 1, make_optimizer=lambda steps: keras.optimizers.Adam(1e-3)),
        ]

    def enter_phase(self, model, index, fresh=True):
        for layer in model.backbone.layers:
            layer.trainable = index == 0 or layer.name == "exit_2"
        self.current_phase = index


def test_a_method_declares_phases_and_keras_ee_train_runs_them(tmp_path, capsys):
    from keras_ee import experiment
    from keras_ee.config import TrainConfig

    cfg = TrainConfig(
        dataset="digits",
        model="multiexit_cnn",
        model_options=SMALL_CNN,
        method="tests.test_method_hooks:TwoPhases",
        epochs=1,
        batch_size=128,
        train_size=300,
        val_size=200,
        evaluate=False,
    )
    experiment.train(cfg, tmp_path / "run", verbose="progress")
    out = capsys.readouterr().out
    assert "all (1/2) epoch 1/1" in out and "head (2/2) epoch 2/2" in out  # the progress shows the phase
    model = runs.load_run_model(tmp_path / "run" / "model.keras")
    assert isinstance(model.optimizer, keras.optimizers.Adam)  # phase 2's own optimizer
    assert [v.path for v in model.trainable_variables] == ["exit_2/kernel", "exit_2/bias"]
    with open(tmp_path / "run" / "history.csv") as f:
        assert len(f.read().splitlines()) == 3  # header + one row per epoch of both phases


def test_a_damaged_backup_of_a_later_phase_starts_the_run_over_in_phase_one(tmp_path, eager_steps):
    from keras_ee import experiment, runs
    from keras_ee.config import TrainConfig

    class Stop(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise KeyboardInterrupt

    cfg = TrainConfig(
        dataset="digits",
        model="multiexit_cnn",
        model_options=SMALL_CNN,
        method="imta",
        method_options={"phase2_epochs": 2},
        epochs=1,
        batch_size=128,
        train_size=300,
        val_size=200,
        evaluate=False,
    )
    experiment.train(cfg, tmp_path / "straight", verbose=0)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(cfg, run, verbose=0, callbacks=[Stop()])
    backup = runs.RunBackup(run / "backup")
    assert backup.backups() == [2]
    (run / "backup" / "epoch-0002.weights.h5").write_bytes(b"torn")
    experiment.train(cfg, run, verbose=0)
    a = runs.load_run_model(tmp_path / "straight" / "model.keras")
    b = runs.load_run_model(run / "model.keras")
    for x, y in zip(a.variables + a.optimizer.variables, b.variables + b.optimizer.variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
