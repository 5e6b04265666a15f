"""tf.data input pipelines: batched gathering, vectorized augmentation, normalization.

The pipelines batch *indices* first and then gather, augment and normalize a
whole batch in one map call: one vectorized op per batch instead of one small op
per image keeps the CPU busy with useful work (`num_parallel_calls=AUTOTUNE`
runs several batches at once, `prefetch` overlaps them with training).

Randomness is seeded and reproducible, yet differs from epoch to epoch. Two forms:

- `epochs=None` (one epoch per iteration, as `model.fit` iterates a finite dataset):
  the shuffle uses `reshuffle_each_iteration=True` and the augmentation draws its
  per-batch stateless seeds from `tf.data.Dataset.random(seed,
  rerandomize_each_iteration=True)`; the k-th iteration gets the k-th order.
- `first_epoch` / `epochs` given (what `keras-ee train` uses): the batches of epochs
  `first_epoch .. epochs - 1` back to back, where epoch e's order is a stateless
  permutation seeded by (seed, e) and batch b's augmentation seed is (seed, e) folded
  with b. The data of an epoch is a pure function of (seed, epoch), so a run resumed at
  epoch e sees exactly what an uninterrupted run sees from epoch e on.

A `recipe` (`keras_ee.config.RecipeConfig`: RandAugment, colour jitter, random erasing, label
smoothing, MixUp/CutMix) runs in the same map call, after the crop and flip, drawing all
its randomness from the batch's stateless seed (folded with `RECIPE_STREAM`), so the
property above holds with it too; its batches carry float32 (B, C) soft targets when it
smooths or mixes labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import tensorflow as tf

from keras_ee import validation as v

if TYPE_CHECKING:
    from keras_ee.config import RecipeConfig

# The recipe's seed of a batch: the batch seed folded with this (the crop and flip keep the
# batch seed itself, so their draws are those of a run without the recipe).
RECIPE_STREAM = 0x5EED


def random_crop_flip(images: tf.Tensor, pad: int, flip: bool, seed: tf.Tensor) -> tf.Tensor:
    """Zero-pad, randomly crop back and optionally flip a batch of images.

    The standard CIFAR augmentation (`pad=4`, `flip=True`): each image is
    padded with `pad` zero pixels on every side and a window of the original
    size is cut out at a uniformly random offset; with `flip`, each image is
    mirrored left-right with probability 1/2. Vectorized over the batch with
    two batched gathers, no per-image loop.

    Args:
        images: float tensor of shape (B, H, W, C), pixels before
            normalization (so the padding is black, as in torchvision's
            `RandomCrop(padding=pad)` on raw images).
        pad: int >= 0. Maximum shift in pixels.
        flip: bool. Whether to apply random horizontal flips.
        seed: int tensor of shape (2,). Stateless seed of the batch.

    Returns:
        A tensor with the shape and dtype of `images`.

    Example:

    ```python
    x = random_crop_flip(x, pad=4, flip=True, seed=tf.constant([1, 2]))
    ```
    """
    v.check_int("pad", pad, 0)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    batch = tf.shape(images)[0]
    height, width = images.shape[1], images.shape[2]
    if pad > 0:
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        dy = tf.random.stateless_uniform([batch], seeds[0], minval=0, maxval=2 * pad + 1, dtype=tf.int32)
        dx = tf.random.stateless_uniform([batch], seeds[1], minval=0, maxval=2 * pad + 1, dtype=tf.int32)
        rows = dy[:, None] + tf.range(height, dtype=tf.int32)[None, :]
        cols = dx[:, None] + tf.range(width, dtype=tf.int32)[None, :]
        images = tf.gather(padded, rows, axis=1, batch_dims=1)
        images = tf.gather(images, cols, axis=2, batch_dims=1)
    if flip:
        coin = tf.random.stateless_uniform([batch], seeds[2]) < 0.5
        images = tf.where(coin[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return images


def array_dataset(
    images: tf.Tensor | np.ndarray,
    labels: tf.Tensor | np.ndarray,
    batch_size: int,
    pixel_scale: float,
    mean: npt.ArrayLike,
    std: npt.ArrayLike,
    shuffle: bool = False,
    seed: int | None = 0,
    augment: bool = False,
    pad: int = 0,
    flip: bool = False,
    drop_remainder: bool = False,
    first_epoch: int | None = None,
    epochs: int | None = None,
    recipe: RecipeConfig | None = None,
    num_classes: int | None = None,
) -> tf.data.Dataset:
    """Batched, normalized `tf.data.Dataset` over in-memory NHWC arrays.

    Args:
        images: tensor or array (N, H, W, C), e.g. uint8.
        labels: tensor or array (N,), int32.
        batch_size: int > 0.
        pixel_scale: float. Pixels are multiplied by it before augmentation
            and normalization (1/255 for uint8 data).
        mean: float array (C,). Per-channel mean subtracted after scaling.
        std: float array (C,). Per-channel standard deviation divided by.
        shuffle: bool. Reshuffle the samples at every epoch.
        seed: int or None. Seed of the shuffle and of the augmentation.
        augment: bool. Apply `random_crop_flip(pad, flip)`.
        pad: int. Crop padding used when `augment`.
        flip: bool. Horizontal flips used when `augment`.
        drop_remainder: bool. Drop the last, smaller batch.
        first_epoch, epochs: ints or None. When given, the dataset holds the batches
            of epochs `first_epoch .. epochs - 1` in a row, each epoch's order and
            augmentation a function of (seed, epoch) only (see the module docstring);
            pass `steps_per_epoch=epoch_batches(n, batch_size, drop_remainder)` to `fit`.
        recipe: a `keras_ee.config.RecipeConfig` applied with `augment` (None: none).
        num_classes: int. Classes of the recipe's soft targets (needed with one).

    Returns:
        A `tf.data.Dataset` of `(x, y)`: x float32 (B, H, W, C), y int32 (B,), or float32
        (B, num_classes) soft targets when the recipe smooths or mixes labels.
    """
    v.check_int("batch_size", batch_size, 1)
    images = tf.convert_to_tensor(images)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    n = int(images.shape[0])
    mean_t = tf.constant(np.asarray(mean, np.float32))
    inv_std = tf.constant(1.0 / np.asarray(std, np.float32))
    scale = tf.constant(float(pixel_scale), tf.float32)

    def gather(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(tf.gather(images, indices), tf.float32) * scale
        return x, tf.gather(labels, indices)

    def normalize(x: tf.Tensor) -> tf.Tensor:
        return (x - mean_t) * inv_std

    batch_recipe = None
    if augment and recipe is not None and recipe.active:
        from keras_ee.data.recipe import BatchAugmentation

        if num_classes is None:
            raise ValueError("a recipe needs `num_classes` (the classes of its soft targets).")
        batch_recipe = BatchAugmentation(
            recipe, num_classes, tuple(images.shape[1:]), mean_t.numpy(), 1.0 / inv_std.numpy()
        )
    augmenting = augment and (pad > 0 or flip or batch_recipe is not None)

    def load_augmented(indices: tf.Tensor, batch_seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = gather(indices)
        x = random_crop_flip(x, pad, flip, batch_seed)
        if batch_recipe is not None:
            return batch_recipe(
                x, y, tf.random.experimental.stateless_fold_in(tf.cast(batch_seed, tf.int64), RECIPE_STREAM)
            )
        return normalize(x), y

    def load(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x, y = gather(indices)
        return normalize(x), y

    if (first_epoch is None) != (epochs is None):
        raise ValueError(f"Pass both `first_epoch` and `epochs`, or neither. Received {first_epoch!r} and {epochs!r}.")
    if first_epoch is not None and epochs is not None:
        for name, value in (("first_epoch", first_epoch), ("epochs", epochs)):
            v.check_int(name, value, 0)
        if first_epoch > epochs:
            raise ValueError(f"Expected `first_epoch` <= `epochs`. Received {first_epoch} > {epochs}.")
        base_seed = 0 if seed is None else int(seed)

        def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
            return _pass_batches(n, batch_size, drop_remainder, shuffle, augmenting, base_seed, epoch)

        ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
        ds = ds.map(load_augmented if augmenting else load, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    ds = tf.data.Dataset.range(n)
    if shuffle and n > 0:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    if augmenting:
        # Two int64 draws per batch form the stateless seed of its augmentation.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, seeds.batch(2)))

    ds = ds.map(load_augmented if augmenting else load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def _pass_batches(
    n: int,
    batch_size: int,
    drop_remainder: bool,
    shuffle: bool,
    augmenting: bool,
    base_seed: int,
    pass_index: tf.Tensor,
) -> tf.data.Dataset:
    """The index batches of one pass over n samples: order and augmentation seeded by (seed, pass)."""
    pass_seed = tf.stack([tf.constant(base_seed, tf.int64), tf.cast(pass_index, tf.int64)])
    order = tf.range(n, dtype=tf.int64)
    if shuffle and n > 0:
        order = tf.random.experimental.stateless_shuffle(order, seed=pass_seed)
    batches = tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=drop_remainder)
    if not augmenting:
        return batches
    return batches.enumerate().map(lambda b, indices: (indices, tf.random.experimental.stateless_fold_in(pass_seed, b)))


# Passes of the meta stream reserved per training epoch (more than any epoch can use).
_META_PASSES_PER_EPOCH = 1 << 20


def meta_stream(
    images: tf.Tensor | np.ndarray,
    labels: tf.Tensor | np.ndarray,
    batch_size: int,
    pixel_scale: float,
    mean: npt.ArrayLike,
    std: npt.ArrayLike,
    batches_per_epoch: int,
    seed: int | None = 0,
    first_epoch: int = 0,
    epochs: int = 1,
) -> tf.data.Dataset:
    """Held-out batches for a method's outer step, `batches_per_epoch` per training epoch.

    Each training epoch e reads its own endless sequence of shuffled passes over the
    held-out samples (pass p of epoch e seeded by (seed, e * 2**20 + p)), cut after
    `batches_per_epoch` batches: the stream of an epoch depends on (seed, epoch) only, so
    a resumed run reads what an uninterrupted one reads. Batches have exactly
    `batch_size` samples (the remainder of a pass is dropped; `batch_size` is capped at
    the number of samples), never augmented.

    Returns:
        A `tf.data.Dataset` of `(x, y)` to zip with the training batches.
    """
    images = tf.convert_to_tensor(images)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.int32)
    n = int(images.shape[0])
    if n == 0:
        raise ValueError("the meta split is empty; a method with a meta stream needs held-out images.")
    batch_size = min(int(batch_size), n)
    mean = tf.constant(np.asarray(mean, np.float32))
    inv_std = tf.constant(1.0 / np.asarray(std, np.float32))
    scale = tf.constant(float(pixel_scale), tf.float32)
    base_seed = 0 if seed is None else int(seed)

    def load(indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(tf.gather(images, indices), tf.float32) * scale
        return (x - mean) * inv_std, tf.gather(labels, indices)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        passes = tf.data.Dataset.range(epoch * _META_PASSES_PER_EPOCH, (epoch + 1) * _META_PASSES_PER_EPOCH)
        return passes.flat_map(lambda p: _pass_batches(n, batch_size, True, True, False, base_seed, p)).take(
            batches_per_epoch
        )

    ds = tf.data.Dataset.range(first_epoch, epochs).flat_map(one_epoch)
    return ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def epoch_batches(num_samples: int, batch_size: int, drop_remainder: bool = False) -> int:
    """Batches per epoch of a pipeline over `num_samples` samples."""
    return num_samples // batch_size if drop_remainder else -(-num_samples // batch_size)
