"""Each paper's learning-rate schedule as its code computes it, at every optimizer step of a run.

The authors' formulas are written here in NumPy from their code:
- MSDNet-PyTorch `main.py` / IMTA `main_GE.py`, `main_IMTA.py`: `adjust_learning_rate(...,
  method='multistep')` on CIFAR, set once per loaded batch from the epoch;
- L2W-DEN `tools/utils.py` `adjust_learning_rate` (and MSDNet-PyTorch's `method='cosine'`): a cosine
  over `T_cur = epoch * nBatch + batch`, set once per loaded batch, before its two half-batch steps;
- gphi_MSDNet `utils.cosine_scheduler`: per-iteration arrays, linspace warm-up then a cosine to
  `min_lr`, indexed by the loaded batch.
"""

import math

import keras
import numpy as np
import pytest
from tiny_models import SMALL_CNN

from keras_ee import data, experiment, schedules
from keras_ee.config import TrainConfig, recipe_values


# ------------------------------------------------------------------ the authors' code, in NumPy
def msdnet_multistep(lr, epoch, epochs):
    """MSDNet-PyTorch / IMTA `adjust_learning_rate(method='multistep')`, `args.data` CIFAR."""
    decay_rate = 0.1
    if epoch >= epochs * 0.75:
        lr *= decay_rate**2
    elif epoch >= epochs * 0.5:
        lr *= decay_rate
    return lr


def l2w_cosine(lr, epoch, batch, epochs, n_batch):
    """L2W-DEN `adjust_learning_rate` (= MSDNet-PyTorch `method='cosine'`)."""
    t_total = epochs * n_batch
    t_cur = (epoch % epochs) * n_batch + batch
    return 0.5 * lr * (1 + math.cos(math.pi * t_cur / t_total))


def gphi_cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0):
    """gphi_MSDNet `utils.cosine_scheduler` (warmup_steps=-1, start_warmup_value=0)."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(0, base_value, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = np.array(
        [final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * i / (len(iters)))) for i in iters]
    )
    schedule = np.concatenate((warmup_schedule, schedule))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def authors_rates(kind, lr, epochs, n_batch, per_batch, **kw):
    """Their rate at every optimizer step: each loaded batch's rate, once per step of the batch."""
    if kind == "gphi":
        per_loaded = gphi_cosine_scheduler(lr, kw["final"], epochs, n_batch, kw.get("warmup_epochs", 0))
    else:
        per_loaded = [
            msdnet_multistep(lr, e, epochs) if kind == "multistep" else l2w_cosine(lr, e, b, epochs, n_batch)
            for e in range(epochs)
            for b in range(n_batch)
        ]
    return np.repeat(np.asarray(per_loaded, dtype=np.float64), per_batch)


def rates(schedule, steps):
    return np.array([float(schedule(s)) for s in range(steps)])


# ------------------------------------------------------------------ the schedules alone
@pytest.mark.parametrize("epochs", [1, 2, 3, 4, 5, 7, 10])
@pytest.mark.parametrize("per_batch", [1, 2])
def test_step_decay_per_epoch_is_msdnets_multistep(epochs, per_batch):
    n_batch = 3
    got = rates(schedules.StepDecayPerEpoch(0.1, n_batch * per_batch, epochs), epochs * n_batch * per_batch)
    np.testing.assert_allclose(got, authors_rates("multistep", 0.1, epochs, n_batch, per_batch), rtol=1e-7)


@pytest.mark.parametrize("epochs, n_batch", [(1, 5), (3, 4), (6, 7)])
@pytest.mark.parametrize("per_batch", [1, 2])
def test_cosine_per_batch_is_l2w_dens_cosine(epochs, n_batch, per_batch):
    schedule = schedules.CosinePerBatch(0.1, epochs * n_batch, steps_per_batch=per_batch)
    got = rates(schedule, epochs * n_batch * per_batch)
    np.testing.assert_allclose(got, authors_rates("cosine", 0.1, epochs, n_batch, per_batch), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("warmup_epochs", [0, 1, 2])
def test_cosine_per_batch_with_warmup_is_the_budget_aware_codes_arrays(warmup_epochs):
    epochs, n_batch, lr, final = 5, 4, 4e-3, 1e-6
    schedule = schedules.CosinePerBatch(
        lr, epochs * n_batch, warmup_batches=warmup_epochs * n_batch, final_learning_rate=final
    )
    want = authors_rates("gphi", lr, epochs, n_batch, 1, final=final, warmup_epochs=warmup_epochs)
    np.testing.assert_allclose(rates(schedule, epochs * n_batch), want, rtol=1e-6, atol=1e-12)


def test_schedules_are_saved_with_their_settings():
    for schedule in (
        schedules.StepDecayPerEpoch(0.1, 7, 4),
        schedules.CosinePerBatch(0.1, 20, steps_per_batch=2, warmup_batches=3, final_learning_rate=1e-6),
    ):
        clone = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
        assert type(clone) is type(schedule) and clone.get_config() == schedule.get_config()
        np.testing.assert_array_equal(rates(clone, 30), rates(schedule, 30))
    with pytest.raises(ValueError, match="warmup_batches"):
        schedules.CosinePerBatch(0.1, 4, warmup_batches=4)


def test_old_names_keep_their_exact_schedules():
    # `cosine`, `step` and `constant` as before (recorded runs resume identically): the code they had.
    total, lr = 40, 0.2
    old_step = keras.optimizers.schedules.PiecewiseConstantDecay([20, 30], [lr, lr * 0.1, lr * 0.01])
    step = schedules.make_schedule(TrainConfig(schedule="step"), total, lr)
    np.testing.assert_array_equal(rates(step, total + 2), rates(old_step, total + 2))
    cosine = schedules.make_schedule(TrainConfig(schedule="cosine"), total, lr)
    old_cosine = keras.optimizers.schedules.CosineDecay(lr, decay_steps=total)
    np.testing.assert_array_equal(rates(cosine, total + 2), rates(old_cosine, total + 2))
    warm = schedules.make_schedule(TrainConfig(schedule="cosine", warmup_epochs=1), total, lr, warmup_steps=8)
    old_warm = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=32, warmup_target=lr, warmup_steps=8)
    np.testing.assert_array_equal(rates(warm, total + 2), rates(old_warm, total + 2))
    assert schedules.make_schedule(TrainConfig(schedule="constant"), total, lr) == lr


# ------------------------------------------------------------------ in a run
@pytest.fixture(scope="module")
def digits():
    return data.load("digits", val_size=200, train_size=400)


def tiny(**kw):
    values = dict(
        dataset="digits",
        model="multiexit_cnn",
        model_options=SMALL_CNN,
        epochs=4,
        batch_size=128,
        val_size=200,
        train_size=400,
        evaluate=False,
    )
    return TrainConfig(**{**values, **kw})


@pytest.mark.parametrize(
    "method, schedule, kind, extra",
    [
        ("baseline", "step_per_epoch", "multistep", {}),  # MSDNet-PyTorch
        ("l2w", "cosine_per_batch", "cosine", {}),  # L2W-DEN: two half-batch steps per batch
        ("l2w", "step_per_epoch", "multistep", {}),
        (
            "baseline",
            "cosine_per_batch",
            "gphi",
            dict(optimizer="adamw", learning_rate=4e-3, warmup_epochs=1, min_learning_rate=1e-6),
        ),  # gphi_MSDNet
    ],
)
def test_the_runs_optimizer_takes_the_authors_rate_at_every_step(digits, method, schedule, kind, extra):
    config = tiny(method=method, schedule=schedule, **extra)
    model = experiment.build_model(config, digits)
    per_batch = model.method.optimizer_steps_per_batch
    n_batch = experiment.training_batches(config, digits, model.method)
    assert n_batch >= 3 and per_batch == (2 if method == "l2w" else 1)
    want = authors_rates(
        kind,
        config.initial_learning_rate,
        config.epochs,
        n_batch,
        per_batch,
        final=config.min_learning_rate,
        **({"warmup_epochs": config.warmup_epochs} if kind == "gphi" else {}),
    )
    got = rates(model.optimizer._learning_rate, config.epochs * n_batch * per_batch)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


def test_imtas_second_phase_steps_per_epoch_over_its_own_epochs(digits):
    config = tiny(method="imta", schedule="step_per_epoch", method_options={"phase2_epochs": 3})
    model = experiment.build_model(config, digits)
    n_batch = experiment.training_batches(config, digits, model.method)
    experiment.compile_phase(model, config, digits, 1)
    got = rates(model.optimizer._learning_rate, 3 * n_batch)
    np.testing.assert_allclose(got, authors_rates("multistep", config.initial_learning_rate, 3, n_batch, 1), rtol=1e-7)


class RecordRate(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate))


def test_a_training_run_steps_at_the_epoch_boundaries(digits, tmp_path):
    # MSDNet-PyTorch's multistep over 4 epochs: 0.1 in epochs 0-1, 0.01 in 2, 0.001 in 3.
    config = tiny(method="baseline", schedule="step_per_epoch", learning_rate=0.1)
    record = RecordRate()
    experiment.train(config, tmp_path / "run", verbose=0, callbacks=[record])
    n_batch = experiment.training_batches(config, digits, experiment.make_method("baseline", {}))
    np.testing.assert_allclose(record.rates, authors_rates("multistep", 0.1, 4, n_batch, 1), rtol=1e-6)


def test_config_and_recipe():
    imagenet = recipe_values("budget-aware", "imagenet")
    assert imagenet["schedule"] == "cosine_per_batch" and imagenet["min_learning_rate"] == 1e-6
    assert imagenet["warmup_epochs"] == 20
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainConfig(schedule="step_per_epoch", warmup_epochs=1)
    with pytest.raises(ValueError, match="min_learning_rate"):
        TrainConfig(schedule="cosine", min_learning_rate=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="multistep")
    with pytest.raises(ValueError, match="warmup_epochs"):  # a warm-up as long as the phase
        schedules.make_schedule(
            TrainConfig(schedule="cosine_per_batch", warmup_epochs=2, epochs=2), 8, 0.1, 8, steps_per_epoch=4
        )
