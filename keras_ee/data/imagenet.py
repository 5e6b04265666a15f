"""ImageNet (ILSVRC 2012) through tensorflow_datasets with a manual download.

ImageNet cannot be downloaded automatically: get `ILSVRC2012_img_train.tar`
and `ILSVRC2012_img_val.tar` from image-net.org and pass their folder as
`data_dir`. The first `load("imagenet", data_dir=...)` then runs the
tensorflow_datasets preparation (hours, ~150 GB) into the tensorflow_datasets
data directory (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`); a `data_dir`
that already holds a prepared `imagenet2012/` is used directly.

Choices, documented:

* Validation: the first `val_size` (default 50,000, as MSDNet) images of
  tensorflow_datasets' training split, which is stored in a fixed
  pseudo-random order; `seed` does not move this split (re-sharding 1.2 M
  images per seed would be wasteful). Test: the official 50,000-image
  validation set.
* Normalization: the usual ImageNet channel statistics (`MEAN`, `STD`),
  not recomputed over 1.2 M images.
* Augmentation (training): random-resized crop (area 8%-100%, aspect
  3/4-4/3) to 224x224 and a horizontal flip; evaluation: resize the shorter
  side to 256 and take the central 224x224 crop.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from keras_ee import validation as v
from keras_ee._typing import StrPath
from keras_ee.data.base import DatasetSplits

if TYPE_CHECKING:
    import tensorflow as tf

    from keras_ee.config import RecipeConfig

TFDS_NAME = "imagenet2012"
MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGE_SIZE = 224
RESIZE_SIZE = 256


def _normalize(image: tf.Tensor) -> tf.Tensor:
    import tensorflow as tf

    return (tf.cast(image, tf.float32) / 255.0 - MEAN) / STD


def train_preprocess(
    jpeg_bytes: tf.Tensor, seed: tf.Tensor, image_size: int = IMAGE_SIZE, normalize: bool = True
) -> tf.Tensor:
    """Random-resized crop and flip of one encoded JPEG, normalized.

    Args:
        jpeg_bytes: scalar string tensor, an encoded JPEG.
        seed: int tensor of shape (2,), stateless seed.
        image_size: int. Output height and width.
        normalize: bool. False returns the pixels in [0, 1] (for a recipe's
            pixel augmentations, which normalize afterwards).

    Returns:
        float32 tensor (image_size, image_size, 3).
    """
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    shape = tf.io.extract_jpeg_shape(jpeg_bytes)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
        seed=seeds[0],
        min_object_covered=0.0,
        aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.image.decode_and_crop_jpeg(jpeg_bytes, window, channels=3)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
    if not normalize:
        return tf.clip_by_value(image / 255.0, 0.0, 1.0)
    return _normalize(image)


def eval_preprocess(jpeg_bytes: tf.Tensor, image_size: int = IMAGE_SIZE, resize_size: int = RESIZE_SIZE) -> tf.Tensor:
    """Resize (shorter side `resize_size`) and central crop, normalized.

    Args:
        jpeg_bytes: scalar string tensor, an encoded JPEG.
        image_size: int. Output height and width.
        resize_size: int. Shorter side after resizing.

    Returns:
        float32 tensor (image_size, image_size, 3).
    """
    import tensorflow as tf

    image = tf.io.decode_jpeg(jpeg_bytes, channels=3)
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    ratio = resize_size / tf.reduce_min(hw)
    new_hw = tf.cast(tf.round(hw * ratio), tf.int32)
    image = tf.image.resize(image, new_hw, method="bilinear")
    top = (new_hw[0] - image_size) // 2
    left = (new_hw[1] - image_size) // 2
    image = image[top : top + image_size, left : left + image_size, :]
    image = tf.ensure_shape(image, [image_size, image_size, 3])
    return _normalize(image)


def _prepared_builder(data_dir: StrPath | None) -> Any:
    """A prepared imagenet2012 builder, preparing it from manual files if needed."""
    import tensorflow_datasets as tfds

    searched = []
    for tfds_dir in ([data_dir] if data_dir else []) + [None]:
        builder = tfds.builder(TFDS_NAME, data_dir=tfds_dir)
        searched.append(str(builder.data_dir))
        if builder.is_prepared():
            return builder
    manual = os.path.expanduser(str(data_dir)) if data_dir else None
    if manual and all(os.path.isfile(os.path.join(manual, f)) for f in MANUAL_FILES):
        builder = tfds.builder(TFDS_NAME)
        print(f"keras_ee.data: preparing ImageNet from {manual} into {builder.data_dir} (one-time; this takes hours).")
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
        return builder
    present = [f for f in MANUAL_FILES if os.path.isfile(os.path.join(manual, f))] if manual else []
    raise FileNotFoundError(
        "ImageNet needs a manual download: put "
        + " and ".join(MANUAL_FILES)
        + " (from image-net.org) in a folder and pass it as `data_dir`. "
        + (
            f"`data_dir`={manual} holds {', '.join(present) or 'neither file'}. "
            if manual
            else "No `data_dir` was given. "
        )
        + f"No prepared {TFDS_NAME} was found in {', '.join(searched)}."
    )


class ImageNetSplits(DatasetSplits):
    """ImageNet splits streamed from tensorflow_datasets (see module docs).

    Args:
        data_dir: str or None. Folder with the manual-download tar files, or a
            tensorflow_datasets data directory holding a prepared copy.
        val_size: int. Images held out from the training split (default
            50,000).
        image_size: int. Side of the square crops (default 224).
    """

    def __init__(self, data_dir: StrPath | None = None, val_size: int = 50000, image_size: int = IMAGE_SIZE) -> None:
        import tensorflow_datasets as tfds

        self._tfds = tfds
        self._builder = _prepared_builder(data_dir)
        total = self._builder.info.splits["train"].num_examples
        v.check_int("val_size", val_size, where="ImageNet: ")
        if not 1 <= val_size < total:
            raise ValueError(
                f"Expected `val_size` in [1, {total - 1}] (of the {total} training images). Received {val_size}."
            )
        self.name = "imagenet"
        self.class_names = list(self._builder.info.features["label"].names)
        self.num_classes = len(self.class_names)
        self.input_shape = (image_size, image_size, 3)
        self.pixel_scale = 1.0 / 255.0  # decoded JPEG bytes, as `_normalize` scales them
        self.image_size = image_size
        self.mean, self.std = MEAN.copy(), STD.copy()
        self._val_size = int(val_size)
        self.num_train = total - self._val_size
        self.num_val = self._val_size
        self.num_test = self._builder.info.splits["validation"].num_examples
        self._splits = {
            "train": f"train[{self._val_size}:]",
            "val": f"train[:{self._val_size}]",
            "test": "validation",
        }
        self._labels: dict[str, np.ndarray] = {}

    def _raw(self, part: str, shuffle: bool = False, seed: int | None = None) -> tf.data.Dataset:
        tfds = self._tfds
        return self._builder.as_dataset(
            split=self._splits[part],
            shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=seed),
            decoders={"image": tfds.decode.SkipDecoding()},
        )

    def train_dataset(
        self,
        batch_size: int,
        seed: int | None = 0,
        augment: bool = True,
        shuffle: bool = True,
        drop_remainder: bool = False,
        first_epoch: int | None = None,
        epochs: int | None = None,
        recipe: RecipeConfig | None = None,
    ) -> tf.data.Dataset:
        """Training pipeline (see `DatasetSplits.train_dataset`).

        With a `recipe` (`keras_ee.config.RecipeConfig`), each image is cropped and flipped
        as without one but not normalized, and the recipe runs on the batch (normalizing
        between its pixel and batch steps), seeded by (seed, epoch, batch) with
        `first_epoch` given.
        """
        import tensorflow as tf

        from keras_ee.data.pipeline import RECIPE_STREAM

        size = self.image_size
        batch_recipe = None
        if augment and recipe is not None and recipe.active:
            from keras_ee.data.recipe import BatchAugmentation, check_recipe

            check_recipe(recipe, self.input_shape)
            batch_recipe = BatchAugmentation(recipe, self.num_classes, self.input_shape, MEAN, STD)

        def prepare(ds: tf.data.Dataset, shuffle_seed: Any, aug_seeds: tf.data.Dataset) -> tf.data.Dataset:
            if shuffle and isinstance(shuffle_seed, (int, type(None))):
                ds = ds.shuffle(16 * batch_size, seed=shuffle_seed, reshuffle_each_iteration=True)
            elif shuffle:
                # A tensor seed (epoch e's): tf.data's shuffle reads it through the global seed
                # logic, which fails on a tensor once a global seed is set; shuffle stateless
                # blocks of the same size instead.
                ds = _stateless_block_shuffle(ds, 16 * batch_size, shuffle_seed)
            if augment:
                ds = tf.data.Dataset.zip((ds, aug_seeds))
                normalize = batch_recipe is None
                return ds.map(
                    lambda e, s: (train_preprocess(e["image"], s, size, normalize), tf.cast(e["label"], tf.int32)),
                    num_parallel_calls=tf.data.AUTOTUNE,
                )
            return ds.map(
                lambda e: (eval_preprocess(e["image"], size), tf.cast(e["label"], tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE,
            )

        def with_recipe(batches: tf.data.Dataset, batch_seeds: tf.data.Dataset) -> tf.data.Dataset:
            # The recipe of batch b: its own stateless seed (see keras_ee.data.pipeline).
            if batch_recipe is None:
                return batches
            return tf.data.Dataset.zip((batches, batch_seeds)).map(
                lambda xy, s: batch_recipe(xy[0], xy[1], s), num_parallel_calls=tf.data.AUTOTUNE
            )

        if first_epoch is None:
            seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
            ds = prepare(self._raw("train", shuffle=shuffle, seed=seed), seed, seeds)
            recipe_seeds = tf.data.Dataset.random(
                seed=(seed or 0) + RECIPE_STREAM, rerandomize_each_iteration=True
            ).batch(2)
            ds = with_recipe(ds.batch(batch_size, drop_remainder=drop_remainder), recipe_seeds)
            return ds.prefetch(tf.data.AUTOTUNE)
        else:
            # Epoch e: files in their stored order, the shuffle buffer and the crops seeded
            # by (seed, e) only, so a resumed run reads what an uninterrupted one reads.
            def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
                epoch_seed = tf.stack([tf.constant(0 if seed is None else int(seed), tf.int64), epoch])
                seeds = tf.data.Dataset.range(1 << 40).map(
                    lambda i: tf.random.experimental.stateless_fold_in(epoch_seed, i)
                )
                shuffle_seed = tf.random.experimental.stateless_fold_in(epoch_seed, 1 << 41)
                batches = prepare(self._raw("train", shuffle=False, seed=seed), shuffle_seed, seeds).batch(
                    batch_size, drop_remainder=drop_remainder
                )
                recipe_seed = tf.random.experimental.stateless_fold_in(epoch_seed, RECIPE_STREAM)
                return with_recipe(
                    batches,
                    tf.data.Dataset.range(1 << 40).map(
                        lambda b: tf.random.experimental.stateless_fold_in(recipe_seed, b)
                    ),
                )

            ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
            return ds.prefetch(tf.data.AUTOTUNE)

    def _eval_dataset(self, part: str, batch_size: int) -> tf.data.Dataset:
        import tensorflow as tf

        size = self.image_size
        ds = self._raw(part).map(
            lambda e: (eval_preprocess(e["image"], size), tf.cast(e["label"], tf.int32)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    def val_dataset(self, batch_size: int) -> tf.data.Dataset:
        return self._eval_dataset("val", batch_size)

    def meta_dataset(
        self, batch_size: int, batches_per_epoch: int, seed: int = 0, first_epoch: int = 0, epochs: int = 1
    ) -> tf.data.Dataset:
        """The validation split, shuffled and repeated, `batches_per_epoch` per epoch.

        Epoch e's stream is seeded by (seed, e) only (see `DatasetSplits.meta_dataset`).
        """
        import tensorflow as tf

        size = self.image_size

        def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
            shuffle_seed = tf.random.stateless_uniform(
                [], tf.stack([tf.constant(int(seed), tf.int64), epoch]), minval=0, maxval=1 << 31, dtype=tf.int64
            )
            ds = self._raw("val").shuffle(16 * batch_size, seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
            ds = ds.map(
                lambda e: (eval_preprocess(e["image"], size), tf.cast(e["label"], tf.int32)),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
            return ds.batch(batch_size, drop_remainder=True).take(batches_per_epoch)

        return tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch).prefetch(tf.data.AUTOTUNE)

    def test_dataset(self, batch_size: int) -> tf.data.Dataset:
        return self._eval_dataset("test", batch_size)

    def _part_labels(self, part: str) -> np.ndarray:
        if part not in self._labels:
            ds = self._raw(part).map(lambda e: e["label"]).batch(4096)
            self._labels[part] = np.concatenate(
                [np.asarray(b, np.int64) for b in self._tfds.as_numpy(ds)] or [np.zeros(0, np.int64)]
            )
        return self._labels[part].copy()

    def val_labels(self) -> np.ndarray:
        return self._part_labels("val")

    def test_labels(self) -> np.ndarray:
        return self._part_labels("test")


def _stateless_block_shuffle(ds: tf.data.Dataset, block: int, seed: tf.Tensor) -> tf.data.Dataset:
    """`ds` with each run of `block` elements in a random order drawn from `seed` (shape (2,)) and the block index."""
    import tensorflow as tf

    def shuffle_block(index: tf.Tensor, elements: Any) -> Any:
        n = tf.shape(tf.nest.flatten(elements)[0])[0]
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n), seed=tf.random.experimental.stateless_fold_in(seed, index)
        )
        return tf.nest.map_structure(lambda t: tf.gather(t, order), elements)

    return ds.batch(block).enumerate().map(shuffle_block).unbatch()
