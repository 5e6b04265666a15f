"""keras_ee.optimizers against torch.optim's steps (tests/data/optimizers/torch_optim_steps.npz)."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops
from tiny_models import TWO_EXIT_CNN

from keras_ee import optimizers as ee_optimizers

FIXTURE = Path(__file__).parent / "data" / "optimizers" / "torch_optim_steps.npz"

# fixture case -> (keras_ee optimizer, its arguments); Keras' nearest equivalent (which must fail)
CASES = {
    "sgd_wd1e-4": (ee_optimizers.SGD, {"momentum": 0.9, "weight_decay": 1e-4}),
    "sgd_wd5e-4": (ee_optimizers.SGD, {"momentum": 0.9, "weight_decay": 5e-4}),
    "sgd_nesterov_wd5e-4": (ee_optimizers.SGD, {"momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
    "sgd_plain_wd1e-4": (ee_optimizers.SGD, {"momentum": 0.0, "weight_decay": 1e-4}),
    "adam_wd1e-4": (ee_optimizers.Adam, {"weight_decay": 1e-4}),
    "adam_amsgrad_wd1e-4": (ee_optimizers.Adam, {"weight_decay": 1e-4, "amsgrad": True}),
    "adamw_wd0.05": (ee_optimizers.AdamW, {"weight_decay": 0.05}),
}
KERAS_CASES = {
    "sgd_wd5e-4": lambda lr: keras.optimizers.SGD(lr, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov_wd5e-4": lambda lr: keras.optimizers.SGD(lr, momentum=0.9, weight_decay=5e-4, nesterov=True),
    "adam_wd1e-4": lambda lr: keras.optimizers.Adam(lr, weight_decay=1e-4, epsilon=1e-8),
    "adamw_wd0.05": lambda lr: keras.optimizers.AdamW(lr, weight_decay=0.05, epsilon=1e-8),
}


@pytest.fixture(scope="module")
def torch_steps():
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


class StepRates(keras.optimizers.schedules.LearningRateSchedule):
    """The fixture's learning rate of each step (it changes every step)."""

    def __init__(self, rates):
        self.rates = [float(r) for r in rates]

    def __call__(self, step):
        return ops.take(ops.convert_to_tensor(self.rates, "float64"), ops.cast(step, "int32"))

    def get_config(self):
        return {"rates": self.rates}


def run_steps(data, make_optimizer, dtype):
    """Apply the fixture's gradients with `make_optimizer(schedule)`; the parameters after each step."""
    n, steps = int(data["num_params"]), int(data["steps"])
    variables = [keras.Variable(data[f"param{i}"], dtype=dtype, name=f"p{i}") for i in range(n)]
    optimizer = make_optimizer(StepRates(data["lrs"]))
    optimizer.build(variables)
    out = []
    for t in range(steps):
        optimizer.apply([ops.convert_to_tensor(data[f"grad{i}_step{t}"], dtype) for i in range(n)], variables)
        out.append([np.asarray(v.numpy(), "float64") for v in variables])
    return out


def max_relative_error(data, case, results):
    """The largest error of a parameter tensor after any step, relative to its largest entry."""
    worst = 0.0
    for t, values in enumerate(results):
        for i, value in enumerate(values):
            want = data[f"{case}/param{i}_step{t}"]
            worst = max(worst, float(np.max(np.abs(value - want)) / np.max(np.abs(want))))
    return worst


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype, tolerance", [("float64", 1e-12), ("float32", 2e-6)])
def test_steps_equal_torch(torch_steps, case, dtype, tolerance):
    cls, kwargs = CASES[case]
    results = run_steps(torch_steps, lambda lr: cls(learning_rate=lr, **kwargs), dtype)
    assert max_relative_error(torch_steps, case, results) < tolerance


@pytest.mark.parametrize("case", sorted(KERAS_CASES))
def test_keras_optimizers_fail_the_oracle(torch_steps, case):
    """The fixture tells the semantics apart: Keras' own optimizers miss it by far."""
    results = run_steps(torch_steps, KERAS_CASES[case], "float64")
    assert max_relative_error(torch_steps, case, results) > 1e-4


def test_weight_decay_is_not_applied_twice():
    """Keras' base decoupled decay stays off: a zero gradient moves `p` by exactly `lr * wd * p`."""
    v = keras.Variable(np.ones(3), dtype="float64")
    opt = ee_optimizers.SGD(0.1, momentum=0.9, weight_decay=0.5)
    opt.apply([ops.zeros(3, "float64")], [v])
    np.testing.assert_allclose(v.numpy(), 1 - 0.1 * 0.5)


@pytest.mark.parametrize("name", sorted(ee_optimizers.OPTIMIZERS))
def test_config_round_trip(name):
    cls = ee_optimizers.OPTIMIZERS[name]
    extra = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {"beta_2": 0.99, "amsgrad": True}
    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=10)
    opt = cls(learning_rate=schedule, weight_decay=3e-4, use_ema=True, ema_momentum=0.9, **extra)
    config = opt.get_config()
    assert config["weight_decay"] == 3e-4 and all(config[k] == v for k, v in extra.items())
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert type(again) is cls and again.get_config() == config


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="momentum"):
        ee_optimizers.SGD(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="nesterov"):
        ee_optimizers.SGD(0.1, nesterov=True)
    with pytest.raises(ValueError, match="weight_decay"):
        ee_optimizers.Adam(0.1, weight_decay=-1.0)


def _tiny_model():
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    return keras.Model(inputs, keras.layers.Dense(2)(x))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_save_load_resumes_exactly(tmp_path, name):
    """A saved model with its optimizer resumes with the same next step."""
    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = np.arange(8) % 2
    model = _tiny_model()
    kwargs = {"momentum": 0.9, "weight_decay": 1e-3} if name == "sgd" else {"weight_decay": 0.05}
    model.compile(ee_optimizers.OPTIMIZERS[name](0.05, **kwargs), keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert type(loaded.optimizer) is ee_optimizers.OPTIMIZERS[name]
    for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for m in (model, loaded):
        m.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


def test_loss_scale_and_ema():
    """Inside a `LossScaleOptimizer` the step is the inner one's; `use_ema` averages after it."""
    grads = [np.array([0.5, -1.0, 2.0], "float32")]
    plain_var = keras.Variable(np.ones(3, "float32"))
    ee_optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-2).apply(grads, [plain_var])
    scaled_var = keras.Variable(np.ones(3, "float32"))
    scaled = keras.optimizers.LossScaleOptimizer(ee_optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-2))
    scaled.build([scaled_var])
    scaled.apply([g * scaled.scale_loss(1.0) for g in grads], [scaled_var])
    np.testing.assert_allclose(scaled_var.numpy(), plain_var.numpy(), rtol=1e-6)
    assert ee_optimizers.optimizer_semantics(scaled) == "pytorch"
    assert ee_optimizers.optimizer_semantics(keras.optimizers.SGD()) == "keras"
    ema_var = keras.Variable(np.ones(3, "float32"))
    ema = ee_optimizers.AdamW(0.1, use_ema=True, ema_momentum=0.5)
    ema.apply(grads, [ema_var])
    ema.finalize_variable_values([ema_var])
    np.testing.assert_array_equal(ema_var.numpy(), ema._model_variables_moving_average[0].numpy())


# --- runs: which optimizer a run takes, and keeps on resume ------------------------------------

TINY_RUN = dict(
    dataset="digits",
    model="multiexit_cnn",
    model_options=TWO_EXIT_CNN,
    epochs=2,  # interrupted after the first, resumed for the second
    batch_size=128,
    val_size=50,
    evaluate=False,
    train_size=128,  # one batch an epoch
)


class OptimizerSeen(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.optimizer = self.model.optimizer


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sgd", ee_optimizers.SGD),
        ("adamw", ee_optimizers.AdamW),
        ("keras_sgd", keras.optimizers.SGD),
        ("keras_adamw", keras.optimizers.AdamW),
    ],
)
def test_make_optimizer_takes_the_papers_steps_by_name(name, expected):
    from keras_ee.config import TrainConfig

    variables = [keras.Variable(np.ones((2, 2))), keras.Variable(np.ones(2))]
    cfg = TrainConfig(optimizer=name, momentum=0.9, nesterov=True)
    opt = ee_optimizers.make_optimizer(cfg, steps=10, variables=variables)
    assert type(opt) is expected
    assert ee_optimizers.optimizer_semantics(opt) == ("keras" if name.startswith("keras_") else "pytorch")
    if "sgd" in name:
        assert opt.momentum == 0.9 and opt.nesterov and opt.weight_decay == 1e-4
    else:  # rank <= 1 variables excluded from the decay, as timm
        assert opt._use_weight_decay(variables[0]) and not opt._use_weight_decay(variables[1])


def test_a_run_from_before_resumes_with_keras_optimizer(tmp_path, eager_steps):
    """A run folder made before keras-ee took PyTorch's steps (its `sgd` was Keras' SGD, its
    backup records no semantics) resumes with Keras' SGD, whose state the backup holds."""
    from tiny_models import StopAt

    from keras_ee import experiment, runs
    from keras_ee.config import TrainConfig

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(TrainConfig(**TINY_RUN, optimizer="keras_sgd"), run, verbose=0, callbacks=[StopAt(1)])
    (meta,) = (run / "backup").glob("*.json")
    info = json.loads(meta.read_text())
    assert info.pop("optimizer_semantics") == "keras"
    meta.write_text(json.dumps(info))  # as the old version wrote it
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "optimizer": "sgd"}, indent=2, sort_keys=True) + "\n")
    assert runs.RunBackup(run / "backup").optimizer_semantics() == "keras"

    seen = OptimizerSeen()
    experiment.train(TrainConfig(**TINY_RUN, optimizer="sgd"), run, verbose=0, callbacks=[seen])
    assert type(seen.optimizer) is keras.optimizers.SGD
    assert json.loads((run / "state.json").read_text())["optimizer_semantics"] == "keras"
    assert json.loads((run / "config.json").read_text())["optimizer"] == "sgd"  # left as it was


def test_a_new_run_records_and_resumes_the_papers_optimizer(tmp_path, eager_steps):
    from tiny_models import StopAt

    from keras_ee import experiment, runs
    from keras_ee.config import TrainConfig

    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(TrainConfig(**TINY_RUN), run, verbose=0, callbacks=[StopAt(1)])
    assert runs.RunBackup(run / "backup").optimizer_semantics() == "pytorch"
    seen = OptimizerSeen()
    experiment.train(TrainConfig(**TINY_RUN), run, verbose=0, callbacks=[seen])
    assert type(seen.optimizer) is ee_optimizers.SGD
    assert json.loads((run / "state.json").read_text())["optimizer_semantics"] == "pytorch"


@pytest.mark.parametrize("recorded", [None, "pytorch"])
def test_resumed_optimizer_maps_every_optimizer_of_a_run_from_before(tmp_path, recorded):
    """A backup that records no semantics (made before) resumes the main optimizer and the
    methods' auxiliary ones (L2W's WPN Adam, the gater's) as Keras'; a recorded one as it is."""
    from keras_ee import experiment
    from keras_ee.config import TrainConfig

    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "epoch-0001.weights.h5").write_bytes(b"")
    meta = {"epoch": 1, **({"optimizer_semantics": recorded} if recorded else {})}
    (tmp_path / "backup" / "epoch-0001.json").write_text(json.dumps(meta))
    cases = [
        (TrainConfig(method="l2w"), "keras_sgd", {"wpn_optimizer": "keras_adam"}),
        (TrainConfig(method="l2w_imta", optimizer="adamw"), "keras_adamw", {"wpn_optimizer": "keras_adam"}),
        (
            TrainConfig(method="gating", method_options={"gater_optimizer": "sgd"}),
            "keras_sgd",
            {"gater_optimizer": "keras_sgd"},
        ),
        (TrainConfig(method="gating"), "keras_sgd", {"gater_optimizer": "keras_adamw"}),
        (TrainConfig(method="baseline", optimizer="keras_sgd"), "keras_sgd", {}),
    ]
    for config, optimizer, options in cases:
        resumed = experiment.resumed_optimizer(config, tmp_path, quiet=True)
        if recorded:
            assert resumed == config
        else:
            assert resumed.optimizer == optimizer and resumed.method_options == options
            experiment.make_method(resumed.method, resumed.method_options)  # options the method takes


@pytest.mark.parametrize("name", sorted(ee_optimizers.OPTIMIZERS))
def test_lookahead_of_a_loss_scaled_papers_optimizer_is_its_next_step(name):
    """Wrapped in a `LossScaleOptimizer` (mixed precision), the look-ahead is the inner step, and
    `apply` then takes exactly that step."""
    from keras_ee.training import core

    variables = [keras.Variable(np.array([[1.0, -2.0], [0.5, 3.0]], "float32")), keras.Variable(np.ones(2, "float32"))]
    inner = ee_optimizers.OPTIMIZERS[name](0.1, weight_decay=0.01, **({"momentum": 0.9} if name == "sgd" else {}))
    wrapped = keras.optimizers.LossScaleOptimizer(inner)
    wrapped.build(variables)
    rng = np.random.default_rng(0)
    for _ in range(2):  # non-zero buffers
        wrapped.apply([ops.convert_to_tensor(rng.normal(size=v.shape), "float32") for v in variables], variables)
    grads = [ops.convert_to_tensor(rng.normal(size=v.shape), "float32") for v in variables]
    assert core.check_lookahead_support(wrapped) == "pytorch"
    predicted = core.lookahead_step(wrapped, variables, [ops.convert_to_tensor(v) for v in variables], grads)
    wrapped.apply([g * wrapped.scale_loss(1.0) for g in grads], variables)
    for v, p in zip(variables, predicted):
        np.testing.assert_allclose(v.numpy(), p.numpy(), rtol=1e-6, atol=1e-7)


def test_config_refuses_nesterov_without_momentum_for_the_papers_sgd():
    from keras_ee.config import TrainConfig

    with pytest.raises(ValueError, match="nesterov"):
        TrainConfig(optimizer="sgd", nesterov=True, momentum=0.0)
    TrainConfig(optimizer="keras_sgd", nesterov=True, momentum=0.0)  # Keras' SGD allows it
