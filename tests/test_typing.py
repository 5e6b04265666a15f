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


def test_imagenet_splits_have_the_pixel_scale_a_run_records(monkeypatch):
    # Every run writes preprocessing.json from `splits.pixel_scale` (`keras_ee.run_folder.write_preprocessing`);
    # ImageNetSplits had none, so an ImageNet run failed after training, writing its artifacts.
    import types

    import numpy as np
    import tensorflow as tf

    from keras_ee.data import imagenet

    def split(n):
        return types.SimpleNamespace(num_examples=n)

    info = types.SimpleNamespace(
        splits={"train": split(100), "validation": split(10)},
        features={"label": types.SimpleNamespace(names=["a", "b"])},
    )
    monkeypatch.setattr(imagenet, "_prepared_builder", lambda data_dir: types.SimpleNamespace(info=info))
    splits = imagenet.ImageNetSplits(val_size=20, image_size=8)
    # The recorded (scale, mean, std) reproduce the pipeline's normalization of decoded pixels.
    jpeg = tf.io.encode_jpeg(tf.fill((8, 8, 3), tf.constant(200, tf.uint8)))
    x = imagenet.eval_preprocess(jpeg, image_size=8, resize_size=8).numpy()
    raw = tf.io.decode_jpeg(jpeg).numpy().astype(np.float32)
    np.testing.assert_allclose(x, (raw * splits.pixel_scale - splits.mean) / splits.std, rtol=1e-5, atol=1e-5)


def test_constructor_annotations_keep_the_methods_option_types():
    # The registry reads each method's constructor annotations (typing.get_type_hints) to
    # type its command-line options: annotating the constructors for the type checker must
    # not change what an option accepts, nor how `keras-ee methods` describes it.
    from keras_ee.training import registry

    described = {name: registry.get_method(name).describe_options() for name in registry.list_methods()}
    assert described["baseline"] == "exit_weights (any, default None), reference ('paper' | 'code', default 'paper')"
    assert "q (float, default 0.75)" in described["l2w"]
    assert "wpn_weights_path (str | None, default None)" in described["l2w"]
    assert "phase2_epochs (int | None, default None)" in described["imta"]
    assert "transfer_widths (list | None, default None)" in described["l2w_imta"]
    assert "init_seed (int, default 0)" in described["hdkd"]
    assert "learn_weights (bool, default False)" in described["dbt"]
    assert "features (str | list, default ('max_prob', 'entropy'))" in described["gating"]
    assert "gater_width (int, default 500)" in described["gating"]


def test_array_splits_pixel_range_is_computed_and_settable_as_declared():
    # DatasetSplits declares `pixel_range` (None: unknown) as a plain attribute; ArraySplits
    # overrides it with a property computed from its training images on first use, which
    # may be set as the declared attribute may (it had no setter: an AttributeError).
    import numpy as np

    from keras_ee.data.base import ArraySplits, DatasetSplits

    x = np.array([[[3, 7]], [[5, 9]]], np.uint8)
    y = np.array([0, 1])
    splits = ArraySplits("toy", x, y, x, y, x, y, class_names=["a", "b"])
    assert DatasetSplits().pixel_range is None
    assert splits.pixel_range == (3.0, 9.0)
    splits.pixel_range = (0.0, 255.0)
    assert splits.pixel_range == (0.0, 255.0)
