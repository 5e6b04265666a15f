"""BatchNorm's moving variance as PyTorch updates it (unbiased, n / (n - 1)), Keras' as an option.

After one training-mode call the moving variance is `momentum * old + (1 - momentum) * v`, with
v the batch variance times n / (n - 1) (n = values per channel: batch x height x width) by
default, Keras' biased variance with `moving_variance_update="biased"`; the normalisation uses the
biased variance either way. Models saved before the option existed load with the biased update.
"""

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ee import experiment, models, run_folder, runs
from keras_ee.config import TrainConfig
from keras_ee.models import blocks
from keras_ee.models.layers import BatchNormalization, ConvBNReLU

FIXTURE = Path(__file__).parent / "data" / "batchnorm_before_unbiased.keras"  # written by keras-ee 2026-12-05, before
OLD_VARIANCE = 2.0


def expected_moving_variance(batch_values, update, momentum=0.9, old=OLD_VARIANCE):
    """NumPy: the moving variance after one step; `batch_values` (n, channels)."""
    v = batch_values.astype(np.float64).var(axis=0)  # biased
    n = batch_values.shape[0]
    if update == "unbiased":
        v = v * n / (n - 1)
    return momentum * old + (1 - momentum) * v


def conv_unit_step(x, update, **kwargs):
    unit = ConvBNReLU(4, 3, moving_variance_update=update, **kwargs)
    unit(x[:1], training=False)  # build
    unit.moving_variance.assign(np.full(4, OLD_VARIANCE, unit.moving_variance.dtype))
    y = unit(x, training=True)
    pre = keras.ops.convert_to_numpy(unit._conv(keras.ops.convert_to_tensor(x), unit.kernel))
    return unit, y, pre.reshape(-1, 4)


X = np.random.RandomState(0).randn(3, 5, 5, 2).astype("float32")


# The fused TensorFlow kernel (float32) and the moments path (synchronized, one replica; float64).
@pytest.mark.parametrize("path", ["fused", "moments", "float64"])
@pytest.mark.parametrize("update", ["unbiased", "biased"])
def test_conv_unit_updates_the_moving_variance_as_chosen(update, path):
    x = X.astype("float64") if path == "float64" else X
    kwargs = {"synchronized": True} if path == "moments" else {}
    if path == "float64":
        kwargs["dtype"] = "float64"
    unit, y, pre = conv_unit_step(x, update, **kwargs)
    np.testing.assert_allclose(unit.moving_variance.numpy(), expected_moving_variance(pre, update), rtol=2e-6)
    # The normalisation uses the biased variance in both.
    normalised = (pre - pre.mean(0)) / np.sqrt(pre.var(0) + 1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y).reshape(-1, 4), np.maximum(normalised, 0), atol=2e-5)


@pytest.mark.parametrize("update", ["unbiased", "biased"])
def test_blocks_batch_normalization_updates_the_moving_variance_as_chosen(update):
    z = np.random.RandomState(1).randn(6, 3).astype("float32")
    bn = blocks.batch_normalization("bn", blocks.UnitOptions(moving_variance_update=update))
    assert isinstance(bn, BatchNormalization) and bn.moving_variance_update == update
    bn(z[:1], training=False)
    bn.moving_variance.assign(np.full(3, OLD_VARIANCE, "float32"))
    y = bn(z, training=True)
    np.testing.assert_allclose(bn.moving_variance.numpy(), expected_moving_variance(z, update), rtol=1e-6)
    keras_bn = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)
    keras_bn(z[:1], training=False)
    keras_bn.moving_variance.assign(np.full(3, OLD_VARIANCE, "float32"))
    np.testing.assert_allclose(y, keras_bn(z, training=True), atol=1e-6)  # the same normalisation
    if update == "biased":  # exactly Keras' layer
        np.testing.assert_array_equal(bn.moving_variance.numpy(), keras_bn.moving_variance.numpy())


def test_mixed_precision_conv_unit_takes_the_unbiased_update():
    unit, _, pre = conv_unit_step(X, "unbiased", dtype="mixed_float16")
    assert unit.moving_variance.dtype == "float32"
    np.testing.assert_allclose(unit.moving_variance.numpy(), expected_moving_variance(pre, "unbiased"), rtol=2e-3)


def test_frozen_layers_keep_their_statistics():
    for layer in (ConvBNReLU(4, 3), blocks.batch_normalization("frozen_bn")):
        x = X if isinstance(layer, ConvBNReLU) else X.reshape(-1, 2)
        layer(x[:1], training=False)
        layer.trainable = False
        before = [v.numpy().copy() for v in layer.non_trainable_weights]
        layer(x, training=True)
        for b, v in zip(before, layer.non_trainable_weights):
            np.testing.assert_array_equal(b, v.numpy())


def test_the_option_is_saved_and_a_model_saved_before_it_loads_biased(tmp_path):
    # Configs: written out, and missing (older keras-ee) means the biased update it trained with.
    unit = ConvBNReLU(4, 3)
    assert unit.get_config()["moving_variance_update"] == "unbiased"
    old = {k: v for k, v in unit.get_config().items() if k != "moving_variance_update"}
    assert ConvBNReLU.from_config(old).moving_variance_update == "biased"
    bn = BatchNormalization(moving_variance_update="biased")
    assert BatchNormalization.from_config(bn.get_config()).moving_variance_update == "biased"
    old = {k: v for k, v in BatchNormalization().get_config().items() if k != "moving_variance_update"}
    assert BatchNormalization.from_config(old).moving_variance_update == "biased"
    # The .keras written before the change: its units train with the biased update.
    model = keras.saving.load_model(FIXTURE)
    unit, bn = model.get_layer("unit"), model.get_layer("bn")
    assert unit.moving_variance_update == "biased"
    assert type(bn) is keras.layers.BatchNormalization  # Keras' own: biased
    unit.moving_variance.assign(np.full(4, OLD_VARIANCE, "float32"))
    x3 = np.concatenate([X, X[..., :1]], -1)
    unit(x3, training=True)
    pre = keras.ops.convert_to_numpy(unit._conv(keras.ops.convert_to_tensor(x3), unit.kernel)).reshape(-1, 4)
    np.testing.assert_allclose(unit.moving_variance.numpy(), expected_moving_variance(pre, "biased"), rtol=2e-6)
    # A model saved now keeps its choice.
    new = keras.Sequential([keras.Input((4, 4, 3)), ConvBNReLU(4, 3, name="u"), blocks.batch_normalization("b")])
    new.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.get_layer("u").moving_variance_update == "unbiased"
    assert loaded.get_layer("b").moving_variance_update == "unbiased"


def test_one_value_per_channel_is_refused_not_nan():
    # PyTorch: "Expected more than 1 value per channel when training".
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        conv_unit_step(X[:1, :1, :1], "unbiased")
    bn = blocks.batch_normalization("bn_n1")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.ones((1, 3), "float32"), training=True)
    # Unknown batch size: refused when the step runs.
    bn = blocks.batch_normalization("bn_dynamic")
    bn(np.ones((2, 3), "float32"), training=False)
    step = tf.function(lambda z: bn(z, training=True), input_signature=[tf.TensorSpec([None, 3])])
    step(np.random.RandomState(2).randn(4, 3).astype("float32"))  # n = 4: fine
    with pytest.raises(tf.errors.InvalidArgumentError, match="more than 1 value per channel"):
        step(np.ones((1, 3), "float32"))
    assert np.all(np.isfinite(bn.moving_variance.numpy()))
    # The biased update takes it (variance 0), as Keras.
    unit, _, _ = conv_unit_step(X[:1, :1, :1], "biased")
    assert np.all(np.isfinite(unit.moving_variance.numpy()))


def test_bad_option_is_a_clear_error():
    with pytest.raises(ValueError, match="moving_variance_update.*'unbiased', 'biased'"):
        ConvBNReLU(4, 3, moving_variance_update="torch")
    with pytest.raises(ValueError, match="moving_variance_update"):
        models.create("multiexit_cnn", moving_variance_update=True)


def bn_updates(model):
    return {
        layer.moving_variance_update
        for layer in model.layers
        if isinstance(layer, (ConvBNReLU, keras.layers.BatchNormalization))
    }


def test_model_option_builds_every_batchnorm_with_it():
    assert bn_updates(models.create("multiexit_cnn", input_shape=(8, 8, 1))) == {"unbiased"}
    biased = models.create("multiexit_cnn", input_shape=(8, 8, 1), moving_variance_update="biased")
    assert bn_updates(biased) == {"biased"}
    # The ImageNet stem's BatchNorm (a small MSDNet on 32x32 inputs).
    stem = models.create(
        "msdnet_imagenet_s4",
        num_classes=3,
        input_shape=(64, 64, 3),
        num_blocks=1,
        channels=4,
        growth_rate=2,
        head_channels=None,
        moving_variance_update="biased",
    )
    assert isinstance(stem.get_layer("stem_s0_bn"), BatchNormalization)
    assert bn_updates(stem) == {"biased"}


def test_runs_record_the_option_and_runs_recorded_before_it_resume_biased(tmp_path):
    config = experiment.canonical_config(TrainConfig(model="multiexit_cnn", method="baseline", epochs=1))
    assert config.model_options == {"moving_variance_update": "unbiased"}  # written into config.json
    # A run folder from before the option: config.json without it, a started run (history).
    old = TrainConfig(model="multiexit_cnn", method="baseline", epochs=1)
    folder = tmp_path / "old_run"
    experiment.prepare_workdir(old, folder)
    (folder / "history.csv").write_text("epoch\n")
    resumed = experiment.canonical_config(run_folder.resume_settings(old, folder))
    assert resumed.model_options == {"moving_variance_update": "biased"}
    experiment.prepare_workdir(resumed, folder, write=False)  # the same run: it resumes
    asked = dataclass_replace(old, model_options={"moving_variance_update": "unbiased"})
    with pytest.raises(ValueError, match="other settings.*moving_variance_update"):
        experiment.prepare_workdir(experiment.canonical_config(run_folder.resume_settings(asked, folder)), folder)
    # A new run in a new folder: unbiased.
    assert run_folder.resume_settings(old, tmp_path / "new").model_options == {}


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_imported_authors_models_take_the_unbiased_update(tmp_path):
    # The authors' models are PyTorch's: an imported IMTA MSDNet (backbone and transfer paths)
    # trains on with PyTorch's update, and its run folder records it.
    import json

    from keras_ee import cli

    out = tmp_path / "imported"
    checkpoint = Path(__file__).parent / "data" / "torch_checkpoints" / "imta_cifar_legacy.pth"
    assert cli.main(["import", str(checkpoint), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_options"]["moving_variance_update"] == "unbiased"
    backbone = runs.load_run_model(out / "model.keras").backbone
    assert bn_updates(backbone) == {"unbiased"}
    assert any(isinstance(layer, BatchNormalization) for layer in backbone.layers)  # the transfer paths
    # ... and Keras' update when asked for, on the transfer paths too.
    out = tmp_path / "imported_biased"
    argv = ["import", str(checkpoint), "--out", str(out), "--model-option", "moving_variance_update=biased"]
    assert cli.main(argv) == 0
    assert bn_updates(runs.load_run_model(out / "model.keras").backbone) == {"biased"}


def test_a_runs_model_option_reaches_the_methods_batchnorm():
    # IMTA's transfer paths are built by the method, outside `models.create`.
    from tiny_models import SMALL_CNN

    from keras_ee import data

    splits = data.load("digits", val_size=200, train_size=400)
    for update in ("biased", "unbiased"):
        config = TrainConfig(
            dataset="digits",
            model="multiexit_cnn",
            model_options={**SMALL_CNN, "moving_variance_update": update},
            method="imta",
        )
        backbone = experiment.build_model(config, splits).backbone
        assert any(isinstance(layer, BatchNormalization) for layer in backbone.layers)
        assert bn_updates(backbone) == {update}
