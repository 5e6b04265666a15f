"""Fixes found by the type checker (mypy over keras_ee/, see pyproject.toml [tool.mypy])."""

import sys

import tomllib

from keras_ee.config import TrainConfig


def test_toml_config_reads_on_python_3_10(tmp_path, monkeypatch):
    # Python 3.10 (supported: requires-python >= 3.10) has no tomllib; the `tomli` package
    # (a dependency there) is the same parser. Simulate 3.10: no tomllib, tomli present.
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    monkeypatch.setitem(sys.modules, "tomllib", None)
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    f = tmp_path / "c.toml"
    f.write_text("epochs = 3\n")
    assert TrainConfig.from_file(f).epochs == 3


def test_imagenet_epoch_stream_takes_seed_none():
    # `seed` is "int or None" for every loader's train_dataset (DatasetSplits); the
    # ImageNet epoch stream (first_epoch/epochs, what exact resume uses) did int(None).
    import tensorflow as tf

    from keras_ee.data.imagenet import ImageNetSplits

    splits = ImageNetSplits.__new__(ImageNetSplits)  # no prepared ImageNet here: a stand-in split
    splits.image_size, splits.input_shape, splits.num_classes = 8, (8, 8, 3), 2
    jpeg = tf.io.encode_jpeg(tf.zeros((10, 12, 3), tf.uint8))
    example = {"image": jpeg, "label": tf.constant(1, tf.int64)}
    splits._raw = lambda part, shuffle=False, seed=None: tf.data.Dataset.from_tensors(example).repeat(4)
    x, y = next(iter(splits.train_dataset(2, seed=None, first_epoch=0, epochs=1)))
    assert x.shape == (2, 8, 8, 3) and y.numpy().tolist() == [1, 1]
