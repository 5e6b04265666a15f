"""The distribution and precision settings of a run: `--strategy`, `--precision`, `--sync-batchnorm`.

In-process and fast: what needs several devices or workers is in tests/test_distribute.py and
tests/test_distribute_multiworker.py (fresh processes).
"""

import json

import keras
import numpy as np
import pytest

from keras_ee import cli, distribute, experiment, models, runs
from keras_ee.config import TrainConfig


def test_cli_flags_set_the_config_fields():
    args = cli.build_parser().parse_args(
        ["train", "--strategy", "mirrored", "--precision", "mixed_bfloat16", "--sync-batchnorm"]
    )
    config = cli._config_from_args(args)
    assert (config.strategy, config.precision, config.sync_batchnorm) == ("mirrored", "mixed_bfloat16", True)
    default = cli._config_from_args(cli.build_parser().parse_args(["train"]))
    assert (default.strategy, default.precision, default.sync_batchnorm) == ("none", "float32", False)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("strategy", "gpu", "strategy` must be one of"),
        ("precision", "float16", "precision` must be one of"),
        ("sync_batchnorm", "yes", "sync_batchnorm` must be true or false"),
    ],
)
def test_config_refuses_bad_distribution_settings(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(
    "text, match",
    [
        (None, "TF_CONFIG environment variable, which is not set"),
        ("{cluster", "not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', "no cluster with workers"),
        ('{"cluster": {"worker": ["localhost"]}, "task": {"type": "worker", "index": 0}}', "lists of 'host:port'"),
        ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "an index in it"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", "index": 0}}', "name a type of the cluster"),
    ],
)
def test_multi_worker_refuses_a_missing_or_malformed_tf_config(text, match):
    with pytest.raises(ValueError, match=match) as e:
        distribute.check_tf_config(text)
    assert "\n" not in str(e.value)


def test_check_tf_config_accepts_a_cluster():
    text = json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}})
    assert distribute.check_tf_config(text)["task"]["index"] == 1


def test_tpu_strategy_without_a_tpu_is_a_one_line_error():
    with pytest.raises(ValueError, match="--strategy tpu: no TPU found") as e:
        distribute.make_strategy("tpu")
    assert "\n" not in str(e.value)


def test_no_strategy_is_one_device():
    assert distribute.make_strategy("none") is None
    assert distribute.is_chief(None) and not distribute.needs_multi_worker_fit_workaround(None)


def test_synchronized_batchnorm_option_builds_synchronized_batchnorm_and_nothing_else_changes():
    synced = models.create(
        "multiexit_cnn", num_classes=3, input_shape=(8, 8, 1), widths=(4, 8), depth=1, synchronized_batchnorm=True
    )
    plain = models.create("multiexit_cnn", num_classes=3, input_shape=(8, 8, 1), widths=(4, 8), depth=1)
    units = [layer for layer in synced.layers if isinstance(layer, models.ConvBNReLU)]
    assert units and all(layer.synchronized for layer in units)
    assert not any(layer.synchronized for layer in plain.layers if isinstance(layer, models.ConvBNReLU))
    assert units[0].get_config()["synchronized"] is True  # saved and loaded with the model
    plain.set_weights(synced.get_weights())
    x = np.random.default_rng(0).normal(size=(6, 8, 8, 1)).astype("float32")
    # One device: the all-reduce is over one replica, the moments those of the batch.
    for a, b in zip(synced(x, training=True), plain(x, training=True)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    with pytest.raises(TypeError, match="`synchronized_batchnorm` must be a bool"):
        models.create("multiexit_cnn", synchronized_batchnorm="yes")


def test_train_records_precision_and_strategy_and_restores_the_dtype_policy(tmp_path):
    config = TrainConfig(
        model="multiexit_cnn",
        model_options={"widths": [4, 8], "depth": 1},
        method="baseline",
        epochs=1,
        train_size=32,
        batch_size=16,
        precision="mixed_bfloat16",
        evaluate=False,
    )
    experiment.train(config, tmp_path / "run", verbose=0)
    assert keras.config.dtype_policy().name == "float32"  # restored: nothing leaks into other tests
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert (state["strategy"], state["replicas"]) == ("none", 1)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == "mixed_bfloat16"
    model = runs.load_run_model(tmp_path / "run" / "model.keras")
    assert model.backbone.get_layer("s1_u1").dtype_policy.name == "mixed_bfloat16"
