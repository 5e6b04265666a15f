"""MSDNetBackbone / RANetBackbone: `.keras` files written before them still load and predict the same."""

import pathlib

import keras
import numpy as np
import pytest
from tiny_models import SMALL_MSDNET, SMALL_RANET

from keras_ee import models, training

LEGACY = pathlib.Path(__file__).parent / "data" / "legacy_models"


@pytest.fixture(scope="module")
def legacy_predictions():
    with np.load(LEGACY / "predictions.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def legacy_models():
    """family -> the legacy file loaded (once: loading RANet takes seconds)."""
    return {family: keras.saving.load_model(LEGACY / f"tiny_{family}.keras") for family in ("msdnet", "ranet")}


@pytest.mark.parametrize("family", ["msdnet", "ranet"])
def test_legacy_keras_files_load_and_predict_the_same(family, legacy_models, legacy_predictions):
    model = legacy_models[family]
    logits = model.predict(legacy_predictions["input"], verbose=0)
    expected = [legacy_predictions[k] for k in sorted(legacy_predictions) if k.startswith(f"{family}_exit_")]
    assert len(logits) == len(expected) > 1
    assert model.output_names == [f"exit_{k}" for k in range(1, len(expected) + 1)]
    for got, want in zip(logits, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The hooks training methods and the staged runtime read survive too.
    stages = models.split_stages(model)
    out = stages[0](legacy_predictions["input"])
    np.testing.assert_allclose(np.asarray(out[0]), expected[0], rtol=1e-5, atol=1e-5)


BACKBONES = {
    "msdnet": (models.MSDNetBackbone, SMALL_MSDNET),
    "ranet": (models.RANetBackbone, SMALL_RANET),
}


@pytest.mark.parametrize("family", ["msdnet", "ranet"])
def test_backbone_has_the_legacy_layers_and_weights_order(family, legacy_models, legacy_predictions):
    """The backbone builds the graph the builder functions built: same layer names, same weights
    in the same order, so the old file's weights give the old logits."""
    cls, options = BACKBONES[family]
    legacy = legacy_models[family]
    backbone = cls(num_classes=5, name=f"tiny_{family}", **options)
    assert [layer.name for layer in backbone.layers] == [layer.name for layer in legacy.layers]
    assert [w.path for w in backbone.weights] == [w.path for w in legacy.weights]
    backbone.set_weights(legacy.get_weights())
    for got, want in zip(
        backbone.predict(legacy_predictions["input"], verbose=0), legacy.predict(legacy_predictions["input"], verbose=0)
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["msdnet", "ranet"])
def test_backbone_config_round_trips_and_new_saves_load(family, tmp_path):
    cls, options = BACKBONES[family]
    backbone = cls(num_classes=5, gradient_equilibrium=True, moving_variance_update="biased", **options)
    config = backbone.get_config()
    assert config["name"] == family and config["trainable"] is True
    assert config["num_classes"] == 5 and config["input_shape"] == [16, 16, 3]
    assert config["moving_variance_update"] == "biased" and config["synchronized_batchnorm"] is False
    again = cls.from_config(config)
    assert again.get_config() == config and type(again) is cls
    path = tmp_path / f"{family}.keras"
    backbone.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is cls and loaded.get_config() == config
    x = np.random.default_rng(3).normal(size=(2, 16, 16, 3)).astype("float32")
    for got, want in zip(loaded.predict(x, verbose=0), backbone.predict(x, verbose=0)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    if family == "ranet":  # the wrapper's save is the same for both; RANet takes seconds per build
        return
    # A backbone inside a training model saves and loads as well.
    model = training.MultiExitModel(backbone)
    model.save(tmp_path / "wrapped.keras")
    wrapped = keras.saving.load_model(tmp_path / "wrapped.keras")
    assert type(wrapped.backbone) is cls
    np.testing.assert_allclose(np.asarray(wrapped.backbone(x)[-1]), np.asarray(backbone(x)[-1]), rtol=1e-6, atol=1e-6)


def test_backbone_unit_options_reach_every_unit():
    backbone = models.MSDNetBackbone(activation="gelu", synchronized_batchnorm=True, **SMALL_MSDNET)
    units = [layer for layer in backbone.layers if isinstance(layer, models.ConvBNReLU)]
    assert units and all(u.nonlinearity == "gelu" and u.synchronized for u in units)
    assert all(u.moving_variance_update == "unbiased" for u in units)
    assert models.UnitOptions.of(backbone) == models.UnitOptions("gelu", True, "unbiased")


@pytest.mark.parametrize(
    "cls, options, error, message",
    [
        (models.MSDNetBackbone, {"num_blocks": 0}, ValueError, "MSDNetBackbone: `num_blocks` must be >= 1, received 0"),
        (models.MSDNetBackbone, {"step_mode": "lg"}, ValueError, "`step_mode` must be one of .*received 'lg'"),
        (
            models.MSDNetBackbone,
            {"growth_factors": (1, 2), "bottleneck_factors": (1, 2, 4)},
            ValueError,
            "`bottleneck_factors` must have 2 entries, received 3",
        ),
        (models.MSDNetBackbone, {"activation": "tanh"}, ValueError, "MSDNetBackbone: `activation` .*received 'tanh'"),
        (
            models.MSDNetBackbone,
            {"moving_variance_update": "torch"},
            ValueError,
            "MSDNetBackbone: `moving_variance_update`",
        ),
        (
            models.RANetBackbone,
            {"scale_list": (2, 3, 4)},
            ValueError,
            "RANetBackbone: `scale_list` must start at 1.*received",
        ),
        (
            models.RANetBackbone,
            {"channels": "16"},
            TypeError,
            "RANetBackbone: `channels` must be an int, received '16'",
        ),
        (models.RANetBackbone, {"synchronized_batchnorm": 1}, TypeError, "`synchronized_batchnorm` must be a bool"),
    ],
)
def test_backbone_says_what_it_received(cls, options, error, message):
    with pytest.raises(error, match=message):
        cls(**options)


@pytest.mark.parametrize("switch, expected", [("1", True), ("0", False), (None, False)])
def test_onednn_query_falls_back_to_the_documented_switch(monkeypatch, switch, expected):
    """Without TensorFlow's private binding (gone from the package and `sys.modules`, so its
    import fails), `tensorflow_uses_onednn` reads `TF_ENABLE_ONEDNN_OPTS` instead of failing."""
    import sys

    from tensorflow.python import util

    from keras_ee.models import layers

    monkeypatch.delattr(util, "_pywrap_util_port", raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow.python.util._pywrap_util_port", None)
    monkeypatch.setattr(layers, "_ONEDNN", None)
    if switch is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", switch)
    assert layers.tensorflow_uses_onednn() is expected


def test_imta_builds_its_transfer_paths_batchnorm_as_the_backbones():
    backbone = models.create(
        "multiexit_cnn",
        input_shape=(8, 8, 1),
        widths=(4, 8),
        depth=1,
        synchronized_batchnorm=True,
        moving_variance_update="biased",
    )
    transformed = training.IMTA().transform_backbone(backbone)
    bn = transformed.get_layer("exit_2_collab_bn")
    assert bn.synchronized and bn.moving_variance_update == "biased"
    # The ImageNet stem's stand-alone BatchNorm comes first; the activation is the units'.
    stem = models.MSDNetBackbone(
        stem="imagenet", input_shape=(64, 64, 3), num_blocks=1, channels=4, growth_rate=2, activation="gelu"
    )
    assert models.UnitOptions.of(stem) == models.UnitOptions("gelu", False, "unbiased")
