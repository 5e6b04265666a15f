"""HDKD and its variants: dense KD against numpy, the gamma meta-gradient against finite differences,
non-negative gamma, the variants' losses, the meta stream's source, save/load/resume, logs and CLI."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tiny_models import SMALL_CNN, StopAt, tiny_backbone, tiny_data  # noqa: E402

from keras_ee import cli, data, experiment, runs  # noqa: E402
from keras_ee import training as T  # noqa: E402
from keras_ee.config import TrainConfig  # noqa: E402
from keras_ee.training import hdkd  # noqa: E402

VARIANTS = ("hdkd", "dbt", "naive_dkd", "hmsdnet", "hdbt")


def _model(name="hdkd", seed=0, optimizer=None, num_exits=3, **options):
    method = T.get_method(name).create(options)
    model = T.MultiExitModel(tiny_backbone(num_exits=num_exits, seed=seed), method=method)
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1, momentum=0.9))
    return model


def _stream(x, y, x_m, y_m, batch):
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)
    meta = tf.data.Dataset.from_tensor_slices((x_m, y_m)).batch(batch)
    return tf.data.Dataset.zip((train, meta))


def _fit(model, x, y, batch=10, epochs=1):
    if model.method.uses_meta_stream:
        x_m, y_m = tiny_data(n=len(x), seed=7, dtype=x.dtype.name)
        return model.fit(_stream(x, y, x_m, y_m, batch), epochs=epochs, verbose=0, shuffle=False)
    return model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False)


# --- dense KD ------------------------------------------------------------------------------


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _numpy_kd(logits, pairs, temperatures):
    cols = []
    for i, j in pairs:
        t = temperatures[i]
        lt, ls = _log_softmax(logits[i] / t), _log_softmax(logits[j] / t)
        cols.append(t * t * np.sum(np.exp(lt) * (lt - ls), axis=-1))
    return np.stack(cols, axis=1)


@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("teachers", ["dense", "last"])
def test_dense_kd_equals_numpy_and_no_gradient_reaches_the_teachers(k, teachers):
    rng = np.random.default_rng(k)
    logits = [rng.normal(scale=3.0, size=(6, 7)) for _ in range(k)]
    temperatures = rng.uniform(1.0, 4.0, size=k)
    pairs = hdkd.kd_pairs(k, teachers)
    assert len(pairs) == (k * (k - 1) // 2 if teachers == "dense" else k - 1)
    assert all(i > j for i, j in pairs)
    tensors = [tf.constant(z) for z in logits]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(tensors)
        terms = hdkd.dense_kd_terms(tensors, pairs, temperatures)
        columns = [terms[:, p] for p in range(len(pairs))]
    np.testing.assert_allclose(terms.numpy(), _numpy_kd(logits, pairs, temperatures), rtol=1e-10, atol=1e-12)
    for p, (i, j) in enumerate(pairs):
        to_teacher, to_student = tape.gradient(columns[p], [tensors[i], tensors[j]])
        assert to_teacher is None or np.all(to_teacher.numpy() == 0)  # the teacher is detached
        assert np.abs(to_student.numpy()).max() > 0
    # the last exit only teaches: the whole KD sum sends it nothing
    last = tape.gradient(tf.reduce_sum(terms), tensors[-1])
    assert last is None or np.all(last.numpy() == 0)


def test_kd_is_zero_for_equal_predictions_and_the_variants_have_their_pairs():
    z = tf.constant(np.random.default_rng(0).normal(size=(4, 5)))
    np.testing.assert_allclose(hdkd.dense_kd_terms([z, z], [(1, 0)], [3.0, 3.0]).numpy(), 0.0, atol=1e-12)
    assert hdkd.kd_pairs(4, "dense") == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    assert hdkd.kd_pairs(4, "last") == [(3, 0), (3, 1), (3, 2)] and hdkd.kd_pairs(4, "none") == []
    for name, teachers, learns in [
        ("hdkd", "dense", True),
        ("naive_dkd", "dense", False),
        ("dbt", "last", False),
        ("hmsdnet", "none", True),
        ("hdbt", "last", True),
    ]:
        method = T.get_method(name).create({})
        assert (method.teachers, method.learn_weights, method.uses_meta_stream) == (teachers, learns, learns)


# --- the variants' losses --------------------------------------------------------------------


def _ce(logits, y):
    return np.stack([-_log_softmax(z)[np.arange(len(y)), y] for z in logits], axis=1)


@pytest.mark.parametrize("name", VARIANTS)
def test_the_variants_reduce_to_their_documented_losses(name):
    model = _model(name, init="uniform")
    x, y = tiny_data(n=12)
    logits = model(x, training=True)
    np_logits = [np.asarray(z, np.float64) for z in logits]
    ce = _ce(np_logits, y).mean(axis=0).sum()
    teachers = {"hdkd": "dense", "naive_dkd": "dense", "dbt": "last", "hmsdnet": "none", "hdbt": "last"}[name]
    pairs = hdkd.kd_pairs(3, teachers)
    kd = _numpy_kd(np_logits, pairs, [3.0] * 3).mean(axis=0).sum() if pairs else 0.0
    np.testing.assert_allclose(float(model.method.train_loss(y, logits)), ce + kd, rtol=2e-5)
    if name == "hmsdnet":  # uniform gamma and no KD: the Baseline's loss
        baseline = T.Baseline()
        baseline.setup(model)
        base, _ = baseline.compute_loss(model, y, logits, T.per_exit_cross_entropy(y, logits))
        np.testing.assert_allclose(float(model.method.train_loss(y, logits)), float(base), rtol=1e-6)


def test_the_initialisations():
    k, pairs = 3, hdkd.kd_pairs(3, "dense")  # (2,1) (3,1) (3,2)
    np.testing.assert_allclose(hdkd.initial_gamma(k, pairs, "ds"), [1, 1, 1, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(hdkd.initial_gamma(k, pairs, "uniform"), np.ones(6))
    np.testing.assert_allclose(hdkd.initial_gamma(k, pairs, "dbt"), [1, 1, 1, 0, 1, 1])
    r = hdkd.initial_gamma(k, pairs, "random", seed=3)
    assert np.all((r >= 0) & (r <= 1)) and np.array_equal(r, hdkd.initial_gamma(k, pairs, "random", seed=3))
    # through the parametrisations: softplus cannot hold a zero (a small floor), clip holds it exactly
    soft = _model(init="dbt").method.gamma().numpy()
    np.testing.assert_allclose(soft, [1, 1, 1, hdkd.SOFTPLUS_FLOOR, 1, 1], rtol=1e-5)
    np.testing.assert_array_equal(
        _model(init="dbt", gamma_parametrization="clip").method.gamma().numpy(), np.float32([1, 1, 1, 0, 1, 1])
    )


@pytest.mark.parametrize("name", ["naive_dkd", "dbt"])
def test_fixed_weight_variants_train_without_a_meta_stream_and_keep_gamma(name):
    model = _model(name)
    x, y = tiny_data(n=30)
    before = model.method.gamma().numpy().copy()
    logs = {k: v[-1] for k, v in _fit(model, x, y).history.items()}
    np.testing.assert_array_equal(model.method.gamma().numpy(), before)
    assert "balanced_loss" not in logs and logs["gamma_ce_1"] == 1.0
    assert not hasattr(model.method, "gamma_optimizer")


@pytest.mark.parametrize("parametrization", ["softplus", "clip"])
def test_the_real_step_gradient_is_the_training_loss_gradient(parametrization):
    model = _model(init="random", gamma_parametrization=parametrization)
    x, y = tiny_data(n=10)
    sw = np.linspace(0.5, 1.5, 10).astype("float32")
    result = model.method.lookahead(model, x, y, sw, x, y)
    grads = result.real_gradients(model.method._coefficients(result.terms, sw))
    with tf.GradientTape() as tape:
        loss = model.method.train_loss(y, model(x, training=True), sw)
    for a, b in zip(grads, tape.gradient(loss, model.trainable_variables)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


# --- the gamma meta-gradient -------------------------------------------------------------------


def _fd_outer(model, x_t, y_t, x_m, y_m, ema):
    """Independent: a REAL backbone step on the training loss, the balanced loss on the meta batch, restore."""
    saved = [v.numpy().copy() for v in model.variables]
    saved_opt = [v.numpy().copy() for v in model.optimizer.variables]
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = model.method.train_loss(y_t, model(x_t, training=True))
    model.optimizer.apply(tape.gradient(loss, variables), variables)
    ce_m = T.per_exit_cross_entropy(y_m, model(x_m, training=True))
    outer = float(hdkd.balanced_loss(tf.reduce_mean(ce_m, axis=0), ema, model.method.alpha))
    for v, s in zip(model.variables, saved):
        v.assign(s)
    for v, s in zip(model.optimizer.variables, saved_opt):
        v.assign(s)
    return outer


@pytest.mark.parametrize("parametrization", ["softplus", "clip"])
def test_gamma_meta_gradient_matches_finite_differences(float64, parametrization):
    model = _model(
        init="random",
        gamma_parametrization=parametrization,
        alpha=0.3,
        optimizer=keras.optimizers.SGD(0.5, momentum=0.9, nesterov=True, weight_decay=1e-3),
    )
    x, y = tiny_data(n=24, dtype="float64")
    _fit(model, x, y, batch=12)  # momentum buffers, E and BatchNorm statistics are no longer trivial
    assert int(model.method.ema_steps.numpy()) == 2
    x_t, y_t, x_m, y_m = x[:12], y[:12], x[12:], y[12:]
    result = model.method.lookahead(model, x_t, y_t, None, x_m, y_m)
    ema = result.outer_aux[1].numpy()
    np.testing.assert_array_equal(ema, model.method.ema_ce.numpy())  # E from the previous batches
    grad = np.asarray(result.outer_gradients[0])
    raw = model.method.gamma_raw
    eps = 1e-6
    for idx in range(raw.shape[0]):
        base = raw.numpy().copy()
        moved = base.copy()
        moved[idx] += eps
        raw.assign(moved)
        plus = _fd_outer(model, x_t, y_t, x_m, y_m, ema)
        moved[idx] -= 2 * eps
        raw.assign(moved)
        minus = _fd_outer(model, x_t, y_t, x_m, y_m, ema)
        raw.assign(base)
        np.testing.assert_allclose(grad[idx], (plus - minus) / (2 * eps), rtol=1e-4, atol=1e-10)
    assert np.abs(grad).max() > 1e-6


@pytest.mark.parametrize("parametrization", ["softplus", "clip"])
def test_gamma_stays_non_negative_even_with_huge_steps(parametrization):
    model = _model(gamma_parametrization=parametrization, gamma_optimizer="sgd", gamma_learning_rate=1e6)
    method = model.method
    rng = np.random.default_rng(0)
    for _ in range(5):
        g = rng.choice([-1.0, 1.0], size=method.gamma_raw.shape[0]) * 10.0 ** rng.uniform(0, 12, size=6)
        method._apply_gamma(model, [tf.constant(g, "float32")], tf.ones(3))
        gamma = method.gamma().numpy()
        assert np.all(np.isfinite(gamma)) and np.all(gamma >= 0)
    assert np.any(gamma == 0) or parametrization == "softplus"
    # and through training: a run with a huge gamma step keeps every weight >= 0
    model = _model(gamma_parametrization=parametrization, gamma_optimizer="sgd", gamma_learning_rate=1e3)
    x, y = tiny_data(n=30)
    _fit(model, x, y)
    assert np.all(model.method.gamma().numpy() >= 0)


def test_the_outer_step_changes_gamma_and_e_and_the_real_step_uses_the_new_gamma():
    model = _model()
    x, y = tiny_data(n=20)
    x_m, y_m = tiny_data(n=20, seed=4)
    _fit(model, x, y)
    method = model.method
    raw0, ema0 = method.gamma_raw.numpy().copy(), method.ema_ce.numpy().copy()
    backbone0 = [v.numpy().copy() for v in model.trainable_variables]
    method._meta_step(model, x[:10], y[:10], None, x_m[:10], y_m[:10])
    assert np.abs(method.gamma_raw.numpy() - raw0).max() > 0 and np.abs(method.ema_ce.numpy() - ema0).max() > 0
    assert max(np.abs(v.numpy() - b).max() for v, b in zip(model.trainable_variables, backbone0)) > 0


# --- schedule, logs, temperature -----------------------------------------------------------------


def test_gamma_steps_follow_the_interval_and_the_main_schedule():
    model = _model(
        meta_interval=3,
        gamma_learning_rate=1e-2,
        optimizer=keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, 8), momentum=0.9),
    )
    x, y = tiny_data(n=80)
    _fit(model, x, y)  # 8 batches: gamma steps at 0, 3, 6
    assert int(model.method.gamma_optimizer.iterations.numpy()) == 3
    assert int(model.optimizer.iterations.numpy()) == 8
    assert int(model.method.ema_steps.numpy()) == 3  # fed by the meta batches of the gamma steps
    np.testing.assert_allclose(float(model.method.gamma_optimizer.learning_rate), 0.0, atol=1e-9)
    train_fed = _model(meta_interval=3, ema_source="train")
    _fit(train_fed, x, y)
    assert int(train_fed.method.ema_steps.numpy()) == 8  # every training batch


def test_epoch_logs_hold_every_gamma_the_balanced_loss_and_the_moving_averages():
    model = _model(temperature_rule="adaptive", temperature=1.0)
    x, y = tiny_data(n=40)
    logs = {k: v[-1] for k, v in _fit(model, x, y).history.items()}
    names = ["gamma_ce_1", "gamma_ce_2", "gamma_ce_3", "gamma_kd_2_1", "gamma_kd_3_1", "gamma_kd_3_2"]
    np.testing.assert_allclose([logs[n] for n in names], model.method.gamma().numpy(), rtol=1e-6)
    np.testing.assert_allclose([logs[f"ema_ce_{k}"] for k in (1, 2, 3)], model.method.ema_ce.numpy(), rtol=1e-6)
    assert logs["balanced_loss"] > 0 and {"temperature_2", "temperature_3"} <= set(logs)
    assert "temperature_1" not in logs  # exit 1 teaches no one


def test_the_adaptive_temperature_grows_while_the_teacher_is_confident():
    method = _model("dbt", temperature_rule="adaptive", temperature=1.0).method
    confident = [tf.constant(np.eye(4, dtype="float32")[[0, 1, 2, 3]] * 20.0)] * 3
    method._update_temperatures(confident)
    np.testing.assert_allclose(method.temperatures.numpy(), [1.0, 1.0, 1.05], rtol=1e-6)  # only exit 3 teaches
    method._update_temperatures([tf.zeros((4, 4))] * 3)  # max probability 1/4: unchanged
    np.testing.assert_allclose(method.temperatures.numpy(), [1.0, 1.0, 1.05], rtol=1e-6)
    fixed = _model("dbt").method
    fixed._update_temperatures(confident)
    np.testing.assert_array_equal(fixed.temperatures.numpy(), np.float32([3, 3, 3]))


def test_bad_options_are_clear_errors():
    for options, match in [
        ({"teachers": "all"}, "teachers"),
        ({"alpha": 1.5}, "alpha"),
        ({"temperature": 0}, "temperature"),
        ({"ema_momentum": 1.0}, "ema_momentum"),
        ({"meta_interval": 0}, "meta_interval"),
        ({"gamma_parametrization": "exp"}, "gamma_parametrization"),
        ({"init": "zeros"}, "init"),
        ({"gamma_learning_rate": -1}, "gamma_learning_rate"),
        ({"ema_source": "val"}, "ema_source"),
    ]:
        with pytest.raises(ValueError, match=match) as e:
            experiment.make_method("hdkd", options)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="look-ahead"):
        _model(optimizer=keras.optimizers.RMSprop(0.1))
    _model("naive_dkd", optimizer=keras.optimizers.RMSprop(0.1))  # no look-ahead: any optimizer
    table = T.methods_table()
    for name in VARIANTS:
        assert f"\n{name}: " in "\n" + table


# --- saving, the run folder, resume ---------------------------------------------------------------


def test_save_and_load_restore_gamma_its_optimizer_the_moving_averages_and_the_temperatures(tmp_path):
    model = _model(temperature_rule="adaptive", temperature=1.0, gamma_learning_rate=1e-2)
    x, y = tiny_data(n=40)
    _fit(model, x, y)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    a, b = model.method, loaded.method
    for va, vb in zip(
        [
            a.gamma_raw,
            a.ema_ce,
            a.ema_steps,
            a.temperatures,
            a.batch_counter,
            a.initial_main_lr,
            *a.gamma_optimizer.variables,
        ],
        [
            b.gamma_raw,
            b.ema_ce,
            b.ema_steps,
            b.temperatures,
            b.batch_counter,
            b.initial_main_lr,
            *b.gamma_optimizer.variables,
        ],
    ):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert int(b.gamma_optimizer.iterations.numpy()) == 4 and b.get_config() == a.get_config()
    for m in (model, loaded):  # continuing both gives the same gamma
        _fit(m, x, y)
    np.testing.assert_allclose(a.gamma().numpy(), b.gamma().numpy(), rtol=1e-5, atol=1e-7)


TINY = dict(
    dataset="digits",
    model="multiexit_cnn",
    model_options=SMALL_CNN,
    epochs=2,
    batch_size=128,
    val_size=200,
    train_size=300,
    method="hdkd",
    method_options={"gamma_learning_rate": 0.01},
    evaluate=False,
)


def _images(dataset):
    return {np.round(np.asarray(x), 4).tobytes() for batch in dataset for x in batch[0]}


def test_meta_batches_never_come_from_the_training_split_and_the_run_records_their_source(tmp_path):
    for extra, source in (({}, "calibration"), ({"meta_split_size": 100}, "split")):
        cfg = TrainConfig(**{**TINY, **extra})
        splits = data.load_configured(cfg)
        method = experiment.make_method(cfg.method, cfg.method_options)
        stream = experiment.training_data(cfg, splits, method, end_epoch=1)
        meta = {np.round(x, 4).tobytes() for (_, (xm, _)) in stream for x in np.asarray(xm)}
        train = _images(splits.train_dataset(256, augment=False, shuffle=False))
        val = _images(splits.val_dataset(256))
        assert meta and not meta & train
        assert (meta <= val) == (source == "calibration") and splits.meta_source == source
    run = experiment.train(TrainConfig(**TINY), tmp_path / "run", verbose=0)
    record = json.loads((run / hdkd.ARTIFACT).read_text())
    assert record["meta_source"] == "calibration" and record["num_meta"] == 200
    assert record["gamma_steps"] == 2 * 3 and len(record["gamma_kd"]) == 3  # SMALL_CNN: 3 exits, 3 pairs
    assert (run / hdkd.HEATMAP).stat().st_size > 0
    fixed = experiment.train(
        TrainConfig(**{**TINY, "method": "naive_dkd", "method_options": {}}), tmp_path / "naive", verbose=0
    )
    assert json.loads((fixed / hdkd.ARTIFACT).read_text())["meta_source"] is None  # takes no meta batches
    loaded = runs.load_run_model(fixed / "model.keras").method
    assert isinstance(loaded, T.NaiveDKD) and (loaded.teachers, loaded.learn_weights) == ("dense", False)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, eager_steps):
    cfg = TrainConfig(
        **{**TINY, "method_options": {"gamma_learning_rate": 0.01, "temperature_rule": "adaptive", "temperature": 1.0}}
    )
    straight = tmp_path / "straight"
    assert cli.main(["train", "--config", _write(tmp_path / "cfg.json", cfg), "--out", str(straight), "--quiet"]) == 0
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(cfg, run, verbose=0, callbacks=[StopAt(1)])
    assert runs.RunBackup(run / "backup").backups() == [1]
    experiment.train(cfg, run, verbose=0)
    a = runs.load_run_model(straight / "model.keras")
    b = runs.load_run_model(run / "model.keras")
    assert a.method.gamma_raw.path in {v.path for v in a.variables}
    for x, y in zip(a.variables + a.method.gamma_optimizer.variables, b.variables + b.method.gamma_optimizer.variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    history = (run / "history.csv").read_text().splitlines()
    assert len(history) == 3 and "gamma_kd_3_1" in history[0] and "balanced_loss" in history[0]


def _write(path, cfg):
    cfg.to_json(path)
    return str(path)
