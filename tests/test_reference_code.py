"""`reference="code"`: every method's option for its authors' code, and budget-aware gating's code loop.

The option sets the options listed in each method's registration (`reference_code`) to the
authors' code's values; explicit options win; `keras-ee methods` lists the changes. Gating's
code loop (`gater_update="exchange"`, gphi_MSDNet's `engine.train_one_epoch`): two backbone
steps per loaded batch, one per half, and on every `gater_interval`-th batch of the epoch a gater
step on the opposite half after each, with the backbone in inference mode and unchanged by it.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tiny_models import StopAt, mlp_backbone, tiny_backbone, tiny_data  # noqa: E402

from keras_ee import cli, experiment, runs  # noqa: E402
from keras_ee import training as T  # noqa: E402
from keras_ee.training import gating  # noqa: E402

# What `reference="code"` sets, read off the authors' code (see each method's `reference_note`).
IMTA_CODE = {
    "kl_reduction": "mean",
    "detach_transfer": False,
    "frozen_batchnorm": "batch",
    "nesterov": False,
    "phase2_init": "random",
}
GATING_CODE = {
    "cost_weight": 0.1,
    "features": ["max_prob", "margin"],
    "gater_width": 100,
    "gater_activation": "gelu",
    "gater_update": "exchange",
    "gater_final_learning_rate": 1e-6,
    "log_epsilon": 1e-5,
}
CODE = {"imta": IMTA_CODE, "l2w_imta": IMTA_CODE, "gating": GATING_CODE, "l2w": {}, "baseline": {}}


# --- the option ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(CODE))
def test_code_resolves_every_listed_option_and_nothing_else(method):
    spec = T.get_method(method)
    paper, code = spec.resolved({}), spec.resolved({"reference": "code"})
    assert paper["reference"] == "paper" and code["reference"] == "code"
    changed = {k: v for k, v in code.items() if k != "reference" and paper[k] != v}
    assert changed == CODE[method]
    built = spec.create({"reference": "code"})
    assert built.reference == "code"
    for option, value in CODE[method].items():
        got = getattr(built, "gater_optimizer_name" if option == "gater_optimizer" else option)
        assert list(got) == value if isinstance(value, list) else got == value, option


def test_explicit_options_win_and_the_run_records_the_resolved_values():
    spec = T.get_method("gating")
    options = {"reference": "code", "lambda": 2.0, "gater_width": 64, "gater_update": "alternate"}
    resolved = spec.resolved(options)
    assert (resolved["cost_weight"], resolved["gater_width"], resolved["gater_update"]) == (2.0, 64, "alternate")
    assert resolved["gater_activation"] == "gelu" and resolved["log_epsilon"] == 1e-5
    # config.json: the options as given, and the code's values of the others written out.
    stored = spec.canonical(options)
    assert stored == {
        "reference": "code",
        "cost_weight": 2.0,
        "gater_width": 64,
        "gater_update": "alternate",
        **{k: v for k, v in GATING_CODE.items() if k not in ("cost_weight", "gater_width", "gater_update")},
    }
    assert spec.resolved(stored) == resolved
    # The constructor takes it too, for every registered method with a code reference.
    method = T.BudgetAwareGating(reference="code", gater_width=50)
    assert (method.gater_width, method.gater_activation, method.optimizer_steps_per_batch) == (50, "gelu", 2)
    imta = T.IMTA(reference="code", nesterov=True)
    assert (imta.nesterov, imta.kl_reduction, imta.reference) == (True, "mean", "code")
    assert T.BudgetAwareGating().optimizer_steps_per_batch == 1 and T.IMTA().reference == "paper"


def test_a_bad_reference_is_a_one_line_error_naming_the_accepted_values(tmp_path, capsys):
    for value in ("Code", "authors", 1, None):
        with pytest.raises(ValueError, match="reference=.*expected 'paper' .* or 'code'") as info:
            experiment.make_method("imta", {"reference": value})
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="expected 'paper'"):
        T.L2WIMTA(reference="paper_")
    with pytest.raises(ValueError, match="no `reference` option .*no public code"):
        experiment.make_method("hdkd", {"reference": "code"})
    argv = ["train", "--dataset", "digits", "--method", "gating", "--method-option", "reference=papers"]
    assert cli.main([*argv, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "reference='papers'" in err and "'code'" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_keras_ee_methods_lists_what_code_changes(capsys):
    assert cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def section(name):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}: "))
        end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
        return "\n".join(lines[start:end])

    assert "reference=code: kl_reduction: 'batchmean' -> 'mean', detach_transfer: True -> False" in section("imta")
    assert "nesterov: True -> False" in section("imta") and "phase2_init: 'phase1' -> 'random'" in section("imta")
    gate = section("gating")
    for piece in (
        "gater_width: 500 -> 100",
        "gater_activation: 'relu' -> 'gelu'",
        "gater_update: 'alternate' -> 'exchange'",
        "gater_final_learning_rate: 1e-05 -> 1e-06",
        "log_epsilon: 0.0 -> 1e-05",
        "features: ('max_prob', 'entropy') -> ['max_prob', 'margin']",
        "YouvaADDAD/gphi_MSDNet",
    ):
        assert piece in gate, piece
    assert "reference=code: changes no option" in section("l2w") and "L2W-DEN" in section("l2w")
    assert "reference=code: changes no option" in section("baseline")
    assert "reference=code" not in section("hdkd") and "no public code" in section("hdkd")
    assert "mean" in section("l2w_imta").split("reference=code:")[1]


# --- gating: the code's loss ------------------------------------------------------------------


def test_log_epsilon_gives_the_codes_exit_distribution():
    """gphi_MSDNet's `compute_compulative_probs`: `exp((log(P + 1e-5) + cumsum log1p(-P + 1e-5)) / 0.5)`,
    normalised; P_K = 1."""
    method = T.BudgetAwareGating(reference="code", gater_width=5)
    T.MultiExitModel(tiny_backbone(), method=method)
    rng = np.random.default_rng(0)
    features = rng.uniform(size=(6, 2, 2)).astype("float32")
    z = method.gater(features).numpy().astype(np.float64)
    p = 1 / (1 + np.exp(-z))
    log_p = np.concatenate([np.log(p + 1e-5), np.zeros((6, 1))], axis=1)
    log_not = np.cumsum(np.concatenate([np.zeros((6, 1)), np.log1p(-p + 1e-5)], axis=1), axis=1)
    g = np.exp((log_p + log_not) / 0.5)
    _, a = method.distribution(tf.constant(features))
    np.testing.assert_allclose(a.numpy(), g / g.sum(axis=1, keepdims=True), rtol=1e-5)


# --- gating: the code's loop --------------------------------------------------------------------


def _exchange_model(backbone, eager=False, **options):
    options = {"reference": "code", "gater_width": 7, **options}
    model = T.MultiExitModel(backbone, method=T.BudgetAwareGating(**options))
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), run_eagerly=eager)
    return model


def test_each_batch_takes_two_backbone_steps_and_every_tenth_of_an_epoch_a_gater_step_per_half():
    model = _exchange_model(tiny_backbone())
    x, y = tiny_data(n=48)  # 12 batches of 4 per epoch: gater batches 0 and 10 of each epoch
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False, callbacks=model.method.callbacks())
    assert int(model.optimizer.iterations.numpy()) == 2 * 24
    # Counted within the epoch (batches 0, 10 | 0, 10), not over the run (0, 10, 20): 4 batches.
    assert int(model.method.gater_optimizer.iterations.numpy()) == 2 * 4
    assert int(model.method.epoch_batch.numpy()) == 12


def test_the_gater_step_follows_each_half_on_the_other_half_and_leaves_the_backbone_alone():
    model = _exchange_model(tiny_backbone(), eager=True, gater_interval=2)  # eager: the steps are seen
    method = model.method
    calls = []
    backbone_step, gater_step = method._backbone_step, method._gater_step

    def snapshot():
        return [v.numpy().copy() for v in model.backbone.variables]  # BatchNorm statistics included

    def record_backbone(model_, x, y, sw):
        calls.append(("backbone", x.numpy().copy()))
        backbone_step(model_, x, y, sw)

    def record_gater(model_, x, y):
        before = snapshot(), [v.numpy().copy() for v in model.optimizer.variables]
        gater_before = [v.numpy().copy() for v in method.gater.weights]
        calls.append(("gater", x.numpy().copy()))
        gater_step(model_, x, y)
        for v, b in zip(model.backbone.variables, before[0]):
            np.testing.assert_array_equal(v.numpy(), b)
        for v, b in zip(model.optimizer.variables, before[1]):
            np.testing.assert_array_equal(v.numpy(), b)
        assert max(np.abs(v.numpy() - b).max() for v, b in zip(method.gater.weights, gater_before)) > 0

    method._backbone_step, method._gater_step = record_backbone, record_gater
    x, y = tiny_data(n=14)
    model.fit(x[:14], y[:14], batch_size=7, epochs=1, verbose=0, shuffle=False)  # odd batches: chunk's halves
    first, second = x[:4], x[4:7]  # torch.chunk(2): the first half takes the odd sample
    later_first, later_second = x[7:11], x[11:14]
    expected = [
        ("backbone", first),
        ("gater", second),
        ("backbone", second),
        ("gater", first),
        ("backbone", later_first),  # batch 1: no gater step
        ("backbone", later_second),
    ]
    assert [kind for kind, _ in calls] == [kind for kind, _ in expected]
    for (_, got), (_, want) in zip(calls, expected):
        np.testing.assert_array_equal(got, want)
    assert int(model.optimizer.iterations.numpy()) == 4 and int(method.gater_optimizer.iterations.numpy()) == 2


def test_both_gater_steps_of_a_batch_take_the_codes_meta_rate_of_that_batch():
    """gphi_MSDNet sets the rates once per loaded batch (`meta_lr_schedule_values[it]`, a cosine from
    1e-3 to 1e-6 over the run's batches): here the gater follows a main cosine over 2 steps a batch."""
    batches = 4
    model = T.MultiExitModel(
        tiny_backbone(), method=T.BudgetAwareGating(reference="code", gater_width=7, gater_interval=1)
    )
    main = keras.optimizers.SGD(keras.optimizers.schedules.CosineDecay(0.1, 2 * batches), momentum=0.9)
    model.compile(optimizer=main, run_eagerly=True)
    method, rates = model.method, []
    gater_step = method._gater_step

    def record(model_, x, y):
        rates.append(float(method.gater_optimizer.learning_rate))
        gater_step(model_, x, y)

    method._gater_step = record
    x, y = tiny_data(n=4 * batches)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    meta = [1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + np.cos(np.pi * b / batches)) for b in range(batches)]
    np.testing.assert_allclose(rates, np.repeat(meta, 2), rtol=1e-5)


def test_the_gater_step_runs_the_backbone_in_inference_mode():
    model = _exchange_model(tiny_backbone(), eager=True)
    x, y = tiny_data(n=8)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # moving statistics away from their start
    grads, _ = model.method.gater_gradients(model, x[:4], y[:4])

    def gradients(training):
        with tf.GradientTape() as tape:
            loss, _ = model.method.outer_loss(y[:4], model(x[:4], training=training))
        return tape.gradient(loss, model.method.gater.weights)

    for g, w in zip(grads, gradients(False)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-8)
    assert any(not np.allclose(np.asarray(g), np.asarray(w)) for g, w in zip(grads, gradients(True)))


def test_the_run_schedule_spans_two_steps_per_batch_and_resumes_inside_the_code_loop(tmp_path, eager_steps):
    """What the run does with the loop (its schedule, counts, backups), not its trace: the steps run
    eagerly (the traced loop's counts: the test above with `fit`)."""
    from tiny_models import TWO_EXIT_CNN

    from keras_ee.config import TrainConfig

    cfg = TrainConfig(
        dataset="digits",
        model="multiexit_cnn",
        model_options=TWO_EXIT_CNN,
        epochs=2,
        batch_size=32,
        val_size=50,
        train_size=128,  # 4 batches per epoch
        method="gating",
        method_options={"reference": "code", "gater_width": 8, "gater_interval": 3},
        evaluate=False,
    )
    straight, run = tmp_path / "straight", tmp_path / "run"
    experiment.train(cfg, straight, verbose=0)
    model = runs.load_run_model(straight / "model.keras")
    assert int(model.optimizer.iterations.numpy()) == 2 * 2 * 4
    assert model.optimizer._learning_rate.get_config()["decay_steps"] == 2 * 2 * 4  # the schedule spans them
    assert int(model.method.gater_optimizer.iterations.numpy()) == 2 * 2 * 2  # batches 0 and 3 of each epoch
    stored = TrainConfig.from_file(straight / "config.json").method_options
    assert stored["gater_update"] == "exchange" and stored["log_epsilon"] == 1e-5  # the resolved values
    with pytest.raises(KeyboardInterrupt):
        experiment.train(cfg, run, verbose=0, callbacks=[StopAt(1)])
    experiment.train(cfg, run, verbose=0)
    resumed = runs.load_run_model(run / "model.keras")
    for a, b in zip(
        model.variables + model.method.gater_optimizer.variables,
        resumed.variables + resumed.method.gater_optimizer.variables,
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_the_code_loop_under_mirrored_strategy_takes_the_one_device_steps():
    import distributed_check

    out = distributed_check.method_check("gating", {"reference": "code", "gater_interval": 2, "gater_width": 16})
    assert out["replicas"] == 2 and out["aux_replicas"] == 2
    assert out["moved"] > 0.05 and out["aux_moved"] > 0
    assert out["aux_replica_spread"] == 0.0, out
    assert out["difference_over_moved"] < 1e-4, out
    assert out["aux_difference_over_moved"] < 1e-3, out


def test_a_loss_scale_overflow_skips_both_halves_and_their_gater_steps():
    keras.config.set_dtype_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = T.MultiExitModel(
            mlp_backbone(), method=T.BudgetAwareGating(reference="code", gater_width=16, gater_interval=1)
        )
    finally:
        keras.config.set_dtype_policy("float32")
    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), initial_scale=2.0**100)
    model.compile(optimizer=opt)
    method = model.method
    x, y = tiny_data(16)
    data = tf.data.Dataset.from_tensors((x, y))

    def flat(variables):
        return np.concatenate([np.ravel(v.numpy()) for v in variables])

    weights, gater, gater_state = flat(model.backbone.trainable_variables), flat(method.gater.weights), None
    model.fit(data, epochs=1, verbose=0, shuffle=False)
    gater_state = flat(method.gater_optimizer.variables)
    np.testing.assert_array_equal(flat(model.backbone.trainable_variables), weights)
    np.testing.assert_array_equal(flat(method.gater.weights), gater)
    assert int(opt.iterations.numpy()) == 0 and opt.dynamic_scale.numpy() == 2.0**98  # halved per skipped step
    assert int(method.gater_optimizer.iterations.numpy()) == 0
    opt.dynamic_scale.assign(2.0**8)
    model.fit(data, epochs=1, verbose=0, shuffle=False)
    assert int(opt.iterations.numpy()) == 2 and int(method.gater_optimizer.iterations.numpy()) == 2
    assert not np.array_equal(flat(method.gater_optimizer.variables), gater_state)
    assert np.all(np.isfinite(flat(model.backbone.trainable_variables)))


def test_gating_exports():
    assert gating.EpochBatchReset in {type(c) for c in T.BudgetAwareGating(gater_update="exchange").callbacks()}
    assert T.BudgetAwareGating().callbacks() == []


def test_the_tuner_searches_over_a_code_reference_config_and_its_values_win():
    import keras_tuner as kt

    from keras_ee.config import TrainConfig
    from tuning import search

    # As a run with reference=code writes it (config.json): the code's cost_weight written out.
    options = T.get_method("gating").canonical({"reference": "code"})
    assert options["cost_weight"] == 0.1
    config = TrainConfig(dataset="digits", method="gating", method_options=options)
    hp = kt.HyperParameters()
    trial = search.make_hypermodel(config, None).trial_config(hp)
    method = experiment.make_method(trial.method, trial.method_options)
    assert method.cost_weight == hp.get("lambda") and method.temperature == hp.get("temperature")
    assert method.gater_update == "exchange" and method.gater_width == 100
