"""Budget-aware gating: the exit distribution, both losses, gradients, schedule, saving, CLI, tuning."""

import itertools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tiny_models import SMALL_CNN, TWO_EXIT_CNN, StopAt, tiny_backbone, tiny_data  # noqa: E402

from keras_ee import cli, experiment, runs  # noqa: E402
from keras_ee import training as T  # noqa: E402
from keras_ee.config import TrainConfig  # noqa: E402
from keras_ee.training import gating  # noqa: E402

_data = tiny_data


def _model(seed=0, optimizer=None, **options):
    options.setdefault("gater_width", 7)
    model = T.MultiExitModel(tiny_backbone(seed=seed), method=T.BudgetAwareGating(**options))
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1, momentum=0.9))
    return model


# --- the exit distribution ------------------------------------------------------------


def _numpy_pr(p):
    n, g = p.shape
    pr = np.zeros((n, g + 1))
    alive = np.ones(n)
    for k in range(g):
        pr[:, k] = p[:, k] * alive
        alive = alive * (1 - p[:, k])
    pr[:, g] = alive
    return pr


@pytest.mark.parametrize("temperature", [0.5, 1.0, 0.05])
def test_exit_distribution_sums_to_one_without_nan_for_extreme_gates(temperature):
    values = [0.0, 1.0, 1e-30, 1 - 1e-7, 0.3]
    p = np.array(list(itertools.product(values, repeat=3)), np.float64)  # every combination, K = 4
    pr, a = (np.asarray(t) for t in gating.exit_distribution_from_probabilities(p, temperature))
    assert np.all(np.isfinite(pr)) and np.all(np.isfinite(a))
    np.testing.assert_allclose(pr.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(pr, _numpy_pr(p), atol=1e-12)
    sharpened = _numpy_pr(p) ** (1 / temperature)
    np.testing.assert_allclose(a, sharpened / sharpened.sum(axis=1, keepdims=True), atol=1e-9)
    # From the gater's logits, also extreme ones, in float32.
    z = np.array([[-200.0, 0.0, 200.0], [50.0, -50.0, 3.0], [-1e4, -1e4, -1e4]], np.float32)
    pr, a = (np.asarray(t) for t in gating.exit_distribution_from_logits(z, temperature))
    assert np.all(np.isfinite(pr)) and np.all(np.isfinite(a))
    np.testing.assert_allclose(pr.sum(axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-6)


def test_temperature_one_gives_pr_and_a_tiny_temperature_picks_the_likeliest_exit():
    p = np.random.default_rng(0).uniform(size=(20, 4))
    pr, a = gating.exit_distribution_from_probabilities(p, 1.0)
    np.testing.assert_allclose(np.asarray(a), np.asarray(pr), rtol=1e-12)
    _, hard = gating.exit_distribution_from_probabilities(p, 1e-3)
    np.testing.assert_array_equal(np.asarray(hard).argmax(axis=1), _numpy_pr(p).argmax(axis=1))
    assert np.asarray(hard).max(axis=1).min() > 0.99


# --- the losses against numpy -----------------------------------------------------------


def _np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_features(z, names):
    p = _np_softmax(z)
    s = np.sort(p, axis=1)[:, ::-1]
    cols = {"max_prob": s[:, 0], "margin": s[:, 0] - s[:, 1], "entropy": -(p * np.log(p)).sum(axis=1)}
    return np.stack([cols[n] for n in names], axis=1)


def _np_gater(method, features):
    """The gater's z per early exit, by hand from its weights (relu hidden layer)."""
    z = []
    for k, gate in enumerate(method.gater.gates):
        h = features[:, k]
        for layer in gate.hidden:
            h = np.maximum(h @ layer.kernel.numpy() + layer.bias.numpy(), 0)
        z.append(h @ gate.head.kernel.numpy() + gate.head.bias.numpy())
    return np.concatenate(z, axis=1)


@pytest.mark.parametrize("features", [("max_prob", "entropy"), ("max_prob", "margin", "entropy"), ("margin",)])
def test_both_losses_equal_a_numpy_computation(features):
    model = _model(features=list(features), cost_weight=2.0, temperature=0.5)
    method = model.method
    rng = np.random.default_rng(4)
    logits = [rng.normal(size=(9, 4)).astype("float32") * 3 for _ in range(3)]
    y = rng.integers(0, 4, size=9)
    sw = rng.uniform(0.5, 2.0, size=9).astype("float32")
    feats = np.stack([_np_features(z.astype(np.float64), features) for z in logits[:-1]], axis=1)
    p = 1 / (1 + np.exp(-_np_gater(method, feats)))
    pr = _numpy_pr(p)
    a = pr**2 / (pr**2).sum(axis=1, keepdims=True)  # T = 0.5
    ce = np.stack([-np.log(_np_softmax(z.astype(np.float64))[np.arange(9), y]) for z in logits], axis=1)
    cost = np.asarray(method.relative_costs)
    assert cost[-1] == 1.0 and np.all(np.diff(cost) > 0)
    inner = (((a + 1) * (ce + 2.0 * cost)) * sw[:, None]).mean(axis=0)
    outer = ((ce + 2.0 * cost) * a).mean(axis=0)
    loss, per_exit, _, a_out = method.inner_loss(y, [tf.constant(z) for z in logits], sw)
    np.testing.assert_allclose(np.asarray(a_out), a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(per_exit), inner, rtol=1e-4)
    np.testing.assert_allclose(float(loss), inner.sum(), rtol=1e-4)
    loss_o, per_exit_o = method.outer_loss(y, [tf.constant(z) for z in logits])
    np.testing.assert_allclose(np.asarray(per_exit_o), outer, rtol=1e-4)
    np.testing.assert_allclose(float(loss_o), outer.sum(), rtol=1e-4)
    # lambda = 0: the same losses without the cost terms.
    model.method.cost_weight = 0.0
    loss0, _, _, _ = method.inner_loss(y, [tf.constant(z) for z in logits], sw)
    np.testing.assert_allclose(float(loss0), (((a + 1) * ce) * sw[:, None]).mean(axis=0).sum(), rtol=1e-4)


# --- gradients ---------------------------------------------------------------------------


def _inner_loss_value(model, x, y):
    loss, _, _, _ = model.method.inner_loss(y, model(x, training=True))
    return float(loss)


def _inner_gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss, _, _, _ = model.method.inner_loss(y, model(x, training=True))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def test_inner_gradient_matches_finite_differences_with_lambda_through_the_features(float64):
    model = _model(cost_weight=5.0, gater_width=6)
    x, y = _data(n=12, dtype="float64")
    grads = _inner_gradients(model, x, y)
    rng = np.random.default_rng(2)
    eps, checked = 1e-6, 0
    for var, g in zip(model.trainable_variables, grads):
        for fi in rng.choice(int(np.prod(var.shape)), size=min(2, int(np.prod(var.shape))), replace=False):
            idx = np.unravel_index(fi, var.shape)
            base = var.numpy().copy()
            for sign in (1, -1):
                moved = base.copy()
                moved[idx] += sign * eps
                var.assign(moved)
                if sign == 1:
                    plus = _inner_loss_value(model, x, y)
                else:
                    minus = _inner_loss_value(model, x, y)
            var.assign(base)
            np.testing.assert_allclose(g[idx], (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-9)
            checked += 1
    assert checked >= 10
    # lambda reaches the backbone (through dA/dtheta): another lambda, another gradient.
    model.method.cost_weight = 0.0
    assert max(np.abs(a - b).max() for a, b in zip(grads, _inner_gradients(model, x, y))) > 1e-6


def test_detached_features_make_the_backbone_gradient_independent_of_lambda():
    model = _model(cost_weight=5.0, detach_features=True)
    x, y = _data()
    g5 = _inner_gradients(model, x, y)
    model.method.cost_weight = 0.0
    for a, b in zip(g5, _inner_gradients(model, x, y)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("detach", [False, True])
def test_lookahead_real_step_gradient_is_the_inner_loss_gradient(detach):
    # The look-ahead writes the inner loss as sum(coefficients * [CE, features]) (Eq. 11's two parts).
    model = _model(cost_weight=3.0, gater_update="lookahead", detach_features=detach)
    x, y = _data(n=10)
    result, coefficients_fn = model.method.lookahead(model, x, y, None, x, y)
    grads = result.real_gradients(coefficients_fn(result.terms, result.aux))
    for a, b in zip(grads, _inner_gradients(model, x, y)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-4, atol=1e-6)


def _fd_lookahead_outer(model, x_t, y_t, x_m, y_m):
    """Independent outer loss: a REAL backbone step on the inner loss, the outer loss, then restore."""
    saved = [v.numpy().copy() for v in model.variables]
    saved_opt = [v.numpy().copy() for v in model.optimizer.variables]
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss, _, _, _ = model.method.inner_loss(y_t, model(x_t, training=True))
    model.optimizer.apply(tape.gradient(loss, variables), variables)
    logits_m = model(x_m, training=True)
    outer, _ = model.method.outer_loss(y_m, logits_m)
    for v, s in zip(model.variables, saved):
        v.assign(s)
    for v, s in zip(model.optimizer.variables, saved_opt):
        v.assign(s)
    return float(outer)


def test_lookahead_gater_gradient_matches_finite_differences(float64):
    model = _model(
        cost_weight=2.0,
        gater_update="lookahead",
        gater_width=5,
        optimizer=keras.optimizers.SGD(0.5, momentum=0.9, nesterov=True),
    )
    x, y = _data(n=24, dtype="float64")
    x_t, y_t, x_m, y_m = x[:12], y[:12], x[12:], y[12:]
    result, _ = model.method.lookahead(model, x_t, y_t, None, x_m, y_m)
    rng = np.random.default_rng(5)
    eps, checked = 1e-6, 0
    for var, g in zip(model.method.gater.weights, result.outer_gradients):
        g = np.asarray(g)
        for fi in rng.choice(int(np.prod(var.shape)), size=min(2, int(np.prod(var.shape))), replace=False):
            idx = np.unravel_index(fi, var.shape)
            base = var.numpy().copy()
            moved = base.copy()
            moved[idx] += eps
            var.assign(moved)
            plus = _fd_lookahead_outer(model, x_t, y_t, x_m, y_m)
            moved[idx] -= 2 * eps
            var.assign(moved)
            minus = _fd_lookahead_outer(model, x_t, y_t, x_m, y_m)
            var.assign(base)
            np.testing.assert_allclose(g[idx], (plus - minus) / (2 * eps), rtol=1e-4, atol=1e-10)
            checked += 1
    assert checked >= 4


def test_the_outer_step_changes_the_gater_only():
    model = _model()
    x, y = _data(n=20)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0)  # optimizer and gater built, BN statistics moved
    backbone = [v.numpy().copy() for v in model.backbone.variables]
    optimizer = [v.numpy().copy() for v in model.optimizer.variables]
    gater = [v.numpy().copy() for v in model.method.gater.weights]
    model.method._gater_step(model, x, y)
    for v, before in zip(model.backbone.variables, backbone):  # BatchNorm statistics included
        np.testing.assert_array_equal(v.numpy(), before)
    for v, before in zip(model.optimizer.variables, optimizer):
        np.testing.assert_array_equal(v.numpy(), before)
    assert max(np.abs(v.numpy() - b).max() for v, b in zip(model.method.gater.weights, gater)) > 0


def test_gater_steps_follow_the_interval_and_the_gater_schedule_ends_at_its_final_rate():
    model = _model(
        gater_interval=3,
        gater_learning_rate=1e-3,
        gater_final_learning_rate=1e-5,
        optimizer=keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, 8), momentum=0.9),
    )
    x, y = _data(n=80)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, shuffle=False)  # 8 batches: gater at 0, 3, 6
    assert int(model.method.gater_optimizer.iterations.numpy()) == 3
    assert int(model.optimizer.iterations.numpy()) == 8
    np.testing.assert_allclose(float(model.method.gater_optimizer.learning_rate), 1e-5, rtol=1e-4)


def test_epoch_logs_hold_the_exit_shares_the_expected_cost_and_the_gater_loss():
    model = _model(gater_interval=2)
    x, y = _data(n=40)
    logs = {k: v[-1] for k, v in model.fit(x, y, batch_size=10, epochs=1, verbose=0).history.items()}
    shares = [logs[f"exit_{k}_A_mean"] for k in (1, 2, 3)]
    np.testing.assert_allclose(sum(shares), 1.0, rtol=1e-5)
    costs = np.asarray(model.method.relative_costs)
    assert costs[0] <= logs["expected_cost"] <= 1.0 and logs["gater_loss"] > 0


# --- options, registry, saving, runs ------------------------------------------------------


def test_bad_options_are_clear_errors():
    for options, match in [
        ({"temperature": 0}, "temperature"),
        ({"features": ["max_prob", "spread"]}, "features"),
        ({"gater_update": "bilevel"}, "gater_update"),
        ({"lambda": -1}, "cost_weight"),
        ({"gater_activation": "nope"}, "gater_activation"),
        ({"gater_final_learning_rate": 1.0}, "gater_final_learning_rate"),
    ]:
        with pytest.raises(ValueError, match=match):
            experiment.make_method("gating", options)
    method = experiment.make_method("gating", {"lambda": 0.1, "features": "max_prob,margin"})
    assert method.cost_weight == 0.1 and method.features == ("max_prob", "margin")
    with pytest.raises(ValueError, match="at least 2 exits"):
        T.MultiExitModel(tiny_backbone(num_exits=1), method=T.BudgetAwareGating())
    spec = T.get_method("gating")
    assert spec.aliases == {"lambda": "cost_weight"} and set(spec.search_space) == {"lambda", "temperature"}
    assert "lambda = cost_weight" in T.methods_table()


@pytest.mark.parametrize("update", ["alternate", "lookahead"])
def test_save_and_load_restore_the_gater_and_its_optimizer(tmp_path, update):
    model = _model(gater_interval=2, gater_update=update)
    x, y = _data(n=40)
    model.fit(x, y, batch_size=10, epochs=1, verbose=0, shuffle=False)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    for a, b in zip(model.method.gater_optimizer.variables, loaded.method.gater_optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(loaded.method.gater_optimizer.iterations.numpy()) == 2
    # Continuing both gives the same gater: weights and optimizer state came back exactly.
    for m in (model, loaded):
        m.fit(x, y, batch_size=10, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.method.gater.weights, loaded.method.gater.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


TINY = dict(
    dataset="digits",
    model="multiexit_cnn",
    model_options=SMALL_CNN,
    epochs=2,
    batch_size=128,
    val_size=200,
    train_size=300,
    method="gating",
    method_options={"gater_interval": 2, "gater_width": 16},
)


def test_a_resumed_run_equals_an_uninterrupted_one_and_the_gater_curve_is_reported(tmp_path, capsys, eager_steps):
    cfg = TrainConfig(**TINY)
    straight = tmp_path / "straight"
    assert cli.main(["train", "--config", _write(tmp_path / "cfg.json", cfg), "--out", str(straight), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "thresholds calibrated on validation, gater" in printed and "max_softmax" in printed
    assert (straight / "eval" / "gater" / "budget.csv").is_file() and (straight / "eval" / "confidence.png").is_file()
    scores = np.load(straight / "scores" / "gater.npz")
    assert scores["val"].shape == (3, 200) and np.all(scores["val"][-1] == 0)  # SMALL_CNN: 3 exits
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(TrainConfig(**{**TINY, "evaluate": False}), run, verbose=0, callbacks=[StopAt(1)])
    assert runs.RunBackup(run / "backup").backups() == [1]
    experiment.train(TrainConfig(**{**TINY, "evaluate": False}), run, verbose=0)
    a = runs.load_run_model(straight / "model.keras")
    b = runs.load_run_model(run / "model.keras")
    for m in (a, b):
        assert m.method.gater.weights[0].path in {v.path for v in m.variables}
    for x, y in zip(a.variables + a.method.gater_optimizer.variables, b.variables + b.method.gater_optimizer.variables):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    # Evaluating the gater's scores again from the command line; refused for a run without them.
    assert cli.main(["evaluate", str(run), "--confidence", "gater"]) == 0
    assert (run / "eval" / "gater" / "budget.csv").is_file()
    capsys.readouterr()
    (run / "scores" / "gater.npz").unlink()
    assert cli.main(["evaluate", str(run), "--confidence", "gater"]) == 2
    assert "no scores/gater.npz" in capsys.readouterr().err


def _write(path, cfg):
    cfg.to_json(path)
    return str(path)


def test_tuning_searches_lambda_and_the_temperature(tmp_path):
    from tuning import search

    config = tmp_path / "base.json"  # a two-exit multiexit_cnn on 400 digits: the trial traces and trains once
    TrainConfig(dataset="digits", model_options=TWO_EXIT_CNN, train_size=400, val_size=200).to_json(config)
    argv = [
        "--config",
        str(config),
        "--dataset",
        "digits",
        "--method",
        "gating",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--trials",
        "1",  # the ranking of several trials is tests/test_tuning.py's
        "--tuner",
        "random",
        "--out",
        str(tmp_path / "search"),  # not tmp_path: base.json there is not keras-ee's
    ]
    assert search.main(argv) == 0
    best = TrainConfig.from_file(tmp_path / "search" / "best.json")
    assert best.method == "gating"
    assert 0.01 <= best.method_options["lambda"] <= 10.0 and 0.1 <= best.method_options["temperature"] <= 2.0
    assert experiment.make_method(best.method, best.method_options).cost_weight == best.method_options["lambda"]
