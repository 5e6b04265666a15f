"""The budget-aware paper's training recipe as `keras-ee train` options: config keys and
flags, the seeded augmentation pipeline (determinism, soft targets, exact resume), EMA
weights for validation / the saved model / the dump, AdamW with warm-up, GELU models."""

import csv
import dataclasses
import json

import keras
import numpy as np
import pytest
from tiny_models import SMALL_MSDNET, SMALL_RANET, TWO_EXIT_CNN, StopAt

from keras_ee import cli, data, experiment, models, runs, schedules
from keras_ee.config import RECIPES, RecipeConfig, TrainConfig

TINY = dict(
    dataset="digits",
    model="multiexit_cnn",
    model_options=TWO_EXIT_CNN,
    epochs=2,
    batch_size=128,
    val_size=200,
    evaluate=False,
    train_size=400,
)
RECIPE = dict(mixup=0.8, cutmix=1.0, randaugment=9.0, random_erasing=0.25, color_jitter=0.4, label_smoothing=0.1)
FULL = RecipeConfig(**RECIPE)


def config(**values):
    """A TrainConfig from flat keys, the recipe's among them (as config.json holds them)."""
    return TrainConfig.from_dict(values)


# ------------------------------------------------------------------ config and command line


def test_recipe_keys_are_off_by_default_and_round_trip(tmp_path):
    cfg = TrainConfig()
    assert (
        cfg.optimizer,
        cfg.warmup_epochs,
        cfg.recipe.ema,
        cfg.recipe.mixup,
        cfg.recipe.cutmix,
        cfg.recipe.randaugment,
        cfg.recipe.random_erasing,
        cfg.recipe.color_jitter,
        cfg.recipe.label_smoothing,
    ) == ("sgd", 0, None, 0.0, 0.0, None, 0.0, 0.0, 0.0)
    assert experiment.training_recipe(cfg) is None
    assert cfg.weight_decay == 1e-4 and cfg.initial_learning_rate == 0.1  # unchanged defaults
    adamw = config(optimizer="adamw", batch_size=1024, warmup_epochs=20, ema=0.9999, **RECIPE)
    assert adamw.weight_decay == 0.05 and adamw.initial_learning_rate == pytest.approx(1e-3)  # DeiT's rule
    assert TrainConfig(optimizer="adamw", weight_decay=0.01).weight_decay == 0.01
    adamw.to_json(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["weight_decay"] == 0.05  # stored resolved
    assert TrainConfig.from_file(tmp_path / "c.json") == adamw


@pytest.mark.parametrize(
    "values, key",
    [
        (dict(mixup=-1), "mixup"),
        (dict(cutmix="x"), "cutmix"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(optimizer="rmsprop"), "optimizer"),
        (dict(ema=1.0), "ema"),
        (dict(randaugment=11), "randaugment"),
        (dict(random_erasing=1.5), "random_erasing"),
        (dict(color_jitter=-0.1), "color_jitter"),
        (dict(warmup_epochs=-1), "warmup_epochs"),
        (dict(warmup_epochs=2, schedule="step"), "warmup_epochs"),
        (dict(randaugment_ops=0), "randaugment_ops"),
    ],
)
def test_bad_recipe_values_are_one_line_errors_naming_the_key(values, key):
    with pytest.raises(ValueError) as e:
        config(**values)
    text = str(e.value)
    assert f"`{key}`" in text and "received" in text and "\n" not in text


def _cli_config(*argv):
    return cli._config_from_args(cli.build_parser().parse_args(["train", *argv]))


def test_recipe_flag_resolves_into_explicit_keys_and_flags_override_it(tmp_path):
    cfg = _cli_config("--recipe", "budget-aware")
    for key, value in dataclasses.asdict(RECIPES["budget-aware"]).items():
        assert cfg.to_dict()[key] == value
    assert cfg.optimizer == "sgd" and cfg.warmup_epochs == 0  # CIFAR-style: the papers' SGD
    cfg = _cli_config("--recipe", "budget-aware", "--mixup", "0", "--ema", "0.99")
    assert (cfg.recipe.mixup, cfg.recipe.ema, cfg.recipe.cutmix) == (0.0, 0.99, 1.0)
    # On ImageNet (here from a config file) the recipe adds the paper's AdamW.
    (tmp_path / "c.toml").write_text('dataset = "imagenet"\n')
    cfg = _cli_config("--config", str(tmp_path / "c.toml"), "--recipe", "budget-aware")
    assert (cfg.optimizer, cfg.weight_decay, cfg.warmup_epochs) == ("adamw", 0.05, 20)
    cfg = _cli_config("--optimizer", "adamw", "--weight-decay", "0.1")
    assert cfg.weight_decay == 0.1
    # A config file that leaves weight_decay out gets the optimizer's default.
    (tmp_path / "a.json").write_text('{"optimizer": "adamw"}')
    assert _cli_config("--config", str(tmp_path / "a.json")).weight_decay == 0.05


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--mixup", "-1"], "`mixup`"),
        (["--label-smoothing", "1.5"], "`label_smoothing`"),
        (["--optimizer", "rmsprop"], "`optimizer`"),
        (["--model-option", "activation=swish"], "activation"),
        (["--model-option", "nonlinearity=gelu"], "unknown override"),
    ],
)
def test_cli_refuses_bad_recipe_values_in_one_line(argv, expected, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", *[str(a) for a in (*TINY_ARGS, *argv)], "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("keras-ee train: error: ") and expected in err[0], err
    assert not run.exists()  # refused before the run started


TINY_ARGS = (
    "--dataset",
    "digits",
    "--epochs",
    "1",
    "--batch-size",
    "128",
    "--val-size",
    "200",
    "--train-size",
    "400",
    "--quiet",
    "--no-evaluate",
)


# ------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", val_size=200, train_size=400)


def _batches(ds):
    return [(x.numpy(), y.numpy()) for x, y in ds]


def test_augmented_batches_are_a_function_of_seed_and_epoch(digits):
    a = _batches(digits.train_dataset(64, seed=3, first_epoch=0, epochs=2, recipe=FULL))
    b = _batches(digits.train_dataset(64, seed=3, first_epoch=1, epochs=2, recipe=FULL))
    c = _batches(digits.train_dataset(64, seed=3, first_epoch=0, epochs=2, recipe=FULL))
    n = digits.train_batches(64)
    assert len(a) == 2 * n and len(b) == n
    for (xa, ya), (xb, yb) in zip(a[n:], b):  # epoch 1 alone = epoch 1 after epoch 0
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    for (xa, ya), (xc, yc) in zip(a, c):  # the same pipeline again (parallel map, any order)
        np.testing.assert_array_equal(xa, xc)
        np.testing.assert_array_equal(ya, yc)
    assert not np.array_equal(a[0][1], a[n][1])  # epochs differ
    other_seed = _batches(digits.train_dataset(64, seed=4, first_epoch=1, epochs=2, recipe=FULL))
    assert not np.array_equal(other_seed[0][0], b[0][0])


def test_soft_targets_and_untouched_evaluation_streams(digits):
    x, y = next(iter(digits.train_dataset(64, seed=0, first_epoch=0, epochs=1, recipe=FULL)))
    assert x.shape == (64, 8, 8, 1) and x.dtype == "float32"
    assert y.shape == (64, 10) and y.dtype == "float32"
    np.testing.assert_allclose(y.numpy().sum(axis=1), 1.0, atol=1e-5)
    assert y.numpy().min() >= 0.01 - 1e-6  # smoothed: eps / C everywhere
    # Smoothing alone: exactly (1 - eps) one-hot + eps / C, on the same images as no recipe.
    smooth = next(
        iter(digits.train_dataset(64, seed=0, first_epoch=0, epochs=1, recipe=RecipeConfig(label_smoothing=0.1)))
    )
    plain = next(iter(digits.train_dataset(64, seed=0, first_epoch=0, epochs=1)))
    np.testing.assert_array_equal(smooth[0].numpy(), plain[0].numpy())
    expected = np.full((64, 10), 0.01, np.float32)
    expected[np.arange(64), plain[1].numpy()] = 0.91
    np.testing.assert_allclose(smooth[1].numpy(), expected, rtol=1e-6)
    # Validation, test and the meta stream stay sparse and unaugmented whatever the config.
    cfg = config(**TINY, **RECIPE)
    for ds in (digits.val_dataset(64), digits.test_dataset(64)):
        _, yv = next(iter(ds))
        assert yv.dtype == "int32" and yv.shape.rank == 1
    method = experiment.make_method("baseline", {})
    method.uses_meta_stream = True  # as a method with a meta stream (outer steps on held-out batches)
    (train, meta) = next(iter(experiment.training_data(cfg, digits, method)))
    assert train[1].shape == (128, 10) and meta[1].dtype == "int32" and meta[1].shape == (128,)
    val_x = np.concatenate([x for x, _ in _batches(digits.val_dataset(64))])
    np.testing.assert_array_equal(val_x, np.concatenate([x for x, _ in _batches(digits.val_dataset(64))]))


def test_each_augmentation_changes_the_images(digits):
    plain = next(iter(digits.train_dataset(128, seed=0, first_epoch=0, epochs=1)))[0].numpy()
    for key, value in RECIPE.items():
        if key == "label_smoothing":
            continue
        x = next(iter(digits.train_dataset(128, seed=0, first_epoch=0, epochs=1, recipe=RecipeConfig(**{key: value}))))[
            0
        ]
        assert not np.array_equal(x.numpy(), plain), key


# ------------------------------------------------------------------ every method with soft targets and EMA


def _history(run):
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    "method, extra",
    [
        ("baseline", dict(ema=0.9, warmup_epochs=1)),
        ("l2w", dict(optimizer="adamw", ema=0.999)),
        ("imta", dict(ema=0.9, method_options={"phase2_epochs": 1})),
    ],
)
def test_methods_train_with_soft_targets_and_end_on_the_ema_weights(method, extra, tmp_path):
    cfg = config(**{**TINY, "epochs": 1}, **RECIPE, **extra, method=method)
    run = experiment.train(cfg, tmp_path / method, verbose=0)
    rows = _history(run)
    assert all(np.isfinite(float(r["loss"])) for r in rows)
    model = runs.load_run_model(run / "model.keras")
    opt = model.optimizer
    assert opt.use_ema and opt.ema_momentum == cfg.recipe.ema
    assert (opt.__class__.__name__ == "AdamW") == (cfg.optimizer == "adamw")
    for var, average in zip(model.trainable_variables, opt._model_variables_moving_average):
        np.testing.assert_array_equal(var.numpy(), average.numpy())  # the saved model is the average
    # Validation during the last epoch ran on the average too: the final model scores the same.
    splits = data.load_configured(cfg)
    logs = model.evaluate(splits.val_dataset(cfg.batch_size), verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(float(rows[-1]["val_loss"]), rel=1e-5)


def test_ema_validation_swap_is_exact(tmp_path):
    """Validation with the swap leaves the training trajectory bit-identical to no validation."""
    import tensorflow as tf  # noqa: F401

    cfg = config(**{**TINY, "epochs": 2}, ema=0.9)
    splits = data.load_configured(cfg)
    weights = []
    for validate in (False, True):
        keras.utils.set_random_seed(0)
        model = experiment.build_model(cfg, splits)
        cbs = [experiment.ema_validation_callback()] if validate else []
        experiment.fit_run(cfg, splits, model, cbs, validation_data=splits.val_dataset(128) if validate else None)
        weights.append([v.numpy() for v in model.variables + model.optimizer.variables])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ exact resume with the recipe on


def _all_weights(run):
    model = runs.load_run_model(run / "model.keras")
    return [v.numpy() for v in model.variables] + [v.numpy() for v in model.optimizer.variables]


@pytest.mark.parametrize(
    "method, stop, extra",
    [
        ("baseline", 1, dict(ema=0.9, optimizer="adamw", warmup_epochs=1)),
        # Killed after phase I's last epoch: the resume must start phase II from phase I's average.
        ("imta", 1, dict(ema=0.9, epochs=1, method_options={"phase2_epochs": 1})),
        # Killed with every epoch done: the resume must still end on the average.
        ("baseline", None, dict(ema=0.9)),
    ],
)
def test_a_run_with_the_recipe_resumes_bit_identical(method, stop, extra, tmp_path, monkeypatch, eager_steps):
    cfg = config(**{**TINY, **RECIPE, **extra, "method": method})
    straight = experiment.train(cfg, tmp_path / "straight", verbose=0)
    run = tmp_path / "run"
    if stop is not None:
        with pytest.raises(KeyboardInterrupt):
            experiment.train(cfg, run, verbose=0, callbacks=[StopAt(stop)])
    else:  # the backup of the last epoch written, then killed before model.keras
        real_save = keras.Model.save

        def killed(self, *args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(keras.Model, "save", killed)
        with pytest.raises(KeyboardInterrupt):
            experiment.train(cfg, run, verbose=0)
        monkeypatch.setattr(keras.Model, "save", real_save)
    assert runs.RunBackup(run / "backup").backups()
    experiment.train(cfg, run, verbose=0)
    a, b = _all_weights(run), _all_weights(straight)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert _history(run) == _history(straight)
    np.testing.assert_array_equal(
        np.load(run / "dump" / "test_logits.npy"), np.load(straight / "dump" / "test_logits.npy")
    )


# ------------------------------------------------------------------ optimizer and schedule


def test_warmup_then_schedule_in_optimizer_steps(digits):
    cfg = TrainConfig(**TINY, warmup_epochs=1, learning_rate=0.2)
    for method, per_batch in (("baseline", 1), ("l2w", 2)):
        model = experiment.build_model(config(**{**cfg.to_dict(), "method": method}), digits)
        schedule = model.optimizer._learning_rate
        warm = digits.train_batches(128) * per_batch
        total = cfg.epochs * warm
        assert float(schedule(0)) == 0.0
        assert float(schedule(warm // 2)) == pytest.approx(0.1)
        assert float(schedule(warm)) == pytest.approx(0.2)
        assert float(schedule(total)) == pytest.approx(0.0, abs=1e-7)
    constant = schedules.make_schedule(TrainConfig(schedule="constant", warmup_epochs=1), 100, 0.5, warmup_steps=10)
    assert float(constant(5)) == pytest.approx(0.25) and float(constant(60)) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["adamw", "keras_adamw"])
def test_adamw_excludes_biases_and_batchnorm_from_weight_decay(digits, name):
    from keras_ee import optimizers as ee_optimizers

    model = experiment.build_model(TrainConfig(**TINY, optimizer=name), digits)
    opt = model.optimizer
    expected = ee_optimizers.AdamW if name == "adamw" else keras.optimizers.AdamW  # PyTorch's step / Keras'
    assert isinstance(opt, expected) and opt.weight_decay == 0.05 and opt.epsilon == 1e-8
    decayed = {v.path for v in model.trainable_variables if opt._use_weight_decay(v)}
    assert decayed and all(len(v.shape) > 1 for v in model.trainable_variables if v.path in decayed)
    assert all(not opt._use_weight_decay(v) for v in model.trainable_variables if len(v.shape) <= 1)


# ------------------------------------------------------------------ GELU


# Each builder of the presets, on small settings: the activation goes through the same code.
GELU_BUILDERS = {
    "multiexit_cnn": lambda **kw: models.create("multiexit_cnn", input_shape=(16, 16, 3), **kw),
    "msdnet_cifar_5": lambda **kw: models.MSDNetBackbone(**SMALL_MSDNET, **kw),
    "ranet_cifar_c1": lambda **kw: models.RANetBackbone(**SMALL_RANET, **kw),
}


@pytest.mark.parametrize("preset", sorted(GELU_BUILDERS))
def test_gelu_models_keep_their_counts_and_differ_in_output(preset):
    from keras_ee import costs

    relu = GELU_BUILDERS[preset](num_classes=10)
    gelu = GELU_BUILDERS[preset](num_classes=10, activation="gelu")
    assert relu.count_params() == gelu.count_params()
    assert costs.exit_costs(relu) == costs.exit_costs(gelu)
    gelu.set_weights(relu.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    assert not np.allclose(relu(x, training=False)[-1], gelu(x, training=False)[-1])
    names = {getattr(layer, "nonlinearity", None) for layer in gelu.layers}
    assert "gelu" in names and "relu" not in names


def test_gelu_unit_matches_exact_gelu_and_serializes():
    from keras_ee.models.layers import ConvBNReLU

    layer = ConvBNReLU(4, 3, nonlinearity="gelu")
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    layer.build(x.shape)
    plain = ConvBNReLU(4, 3, activation=False)
    plain.build(x.shape)
    plain.set_weights(layer.get_weights())
    for training in (True, False):
        expected = keras.ops.gelu(plain(x, training=training), approximate=False)
        np.testing.assert_allclose(layer(x, training=training), expected, atol=1e-5)
    again = ConvBNReLU.from_config(layer.get_config())
    assert again.nonlinearity == "gelu"
    assert ConvBNReLU.from_config({**layer.get_config(), "nonlinearity": "relu"}).nonlinearity == "relu"
    old = {k: v for k, v in layer.get_config().items() if k != "nonlinearity"}  # saved before the option
    assert ConvBNReLU.from_config(old).nonlinearity == "relu"


def test_imagenet_training_pipeline_takes_the_recipe_seeded_by_epoch(monkeypatch):
    import tensorflow as tf

    from keras_ee.data import imagenet

    # A global seed of 0 (what earlier tests leave) once broke tf.data's shuffle on a tensor seed.
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    jpegs = [tf.io.encode_jpeg(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).numpy() for _ in range(12)]
    labels = np.arange(12) % 3
    splits = object.__new__(imagenet.ImageNetSplits)
    splits.image_size, splits.input_shape, splits.num_classes = 32, (32, 32, 3), 3
    splits.mean, splits.std = imagenet.MEAN, imagenet.STD
    monkeypatch.setattr(
        splits,
        "_raw",
        lambda part, shuffle=False, seed=None: tf.data.Dataset.from_tensor_slices({"image": jpegs, "label": labels}),
        raising=False,
    )

    def batches(first, end):
        return _batches(splits.train_dataset(4, seed=1, first_epoch=first, epochs=end, recipe=FULL))

    a, b = batches(0, 2), batches(1, 2)
    assert len(a) == 6 and a[0][0].shape == (4, 32, 32, 3) and a[0][1].shape == (4, 3)
    for (xa, ya), (xb, yb) in zip(a[3:], b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], a[3][0])
    plain = _batches(splits.train_dataset(4, seed=1, first_epoch=0, epochs=1))
    assert plain[0][1].dtype == np.int32 and not np.array_equal(plain[0][0], a[0][0])
