"""The budget-aware paper's batch augmentation with Keras' own layers, seeded per batch.

`keras_ee.config.RecipeConfig` holds the settings (`TrainConfig.recipe`: `label_smoothing`,
`mixup`, `cutmix`, `randaugment*`, `random_erasing`, `color_jitter`) and `BatchAugmentation`
applies them to one training batch inside the tf.data pipeline (`keras_ee.data.pipeline.array_dataset`):

    raw pixels in [0, 1], cropped and flipped
      -> keras.layers.RandAugment (value_range (0, 1), ops chosen per image)
      -> keras.layers.RandomColorJitter (value_range (0, 1))
      -> per-channel normalization
      -> keras.layers.RandomErasing (per image, N(0, 1) fill clipped to [-1, 1])
      -> labels one-hot, smoothed (timm's `mixup_target`)
      -> keras.layers.CutMix or keras.layers.MixUp (one per batch: probability 1/2 each
         when both are on, as timm's `switch_prob=0.5`), which mix the labels too.

Randomness. Keras' layers draw their random numbers from a `keras.random.SeedGenerator`
(a variable, advanced at every draw): in a tf.data map that runs several batches at once
its draws would depend on the order the batches ran. Here every draw of a batch comes from
that batch's stateless seed instead (`_BatchSeeds`: a `SeedGenerator` whose `next()`
folds the batch seed with a counter that advances while the map function is traced), passed
as `get_random_transformation(..., seed=...)` or, for the layers that draw from their own
generator (RandAugment, RandomColorJitter), set as the layer's generator while the map
function is traced. The augmentation of a batch is then a pure function of its seed,
whatever `num_parallel_calls` does, and the pipeline's (seed, epoch) -> data property (and
so exact resume) holds.

Keras' RandAugment picks its `num_ops` ops once per batch; timm picks them per image. Its
ops are rescaled to timm's strengths (`timm_scaled_randaugment`). The
transformation is Keras' own, with the op choice drawn per image (`layer_idxes` of shape
(num_ops, B, 1, 1, 1), which Keras' `transform_images` broadcasts). It computes every op
for every image (Keras' design), which is most of the recipe's cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt
import tensorflow as tf

if TYPE_CHECKING:
    import keras

    from keras_ee.config import RecipeConfig


def timm_scaled_randaugment(level: float, num_ops: int) -> keras.layers.Layer:
    """`keras.layers.RandAugment` on pixels in [0, 1] with its ops at timm's strengths for `level`.

    Keras' RandAugment hands one `factor` to every op, and each op reads it its own way: at
    0.9 a translation by up to 90% of the image, a rotation by up to 324 degrees, a
    brightness shift by up to 90% of the range, always in one direction. timm's RandAugment
    (the paper's `rand-m9-mstd0.5-inc1`) scales each op to its own maximum instead. So the
    ops whose Keras reading is far from timm's are replaced by the same Keras layers with
    timm's ranges at `level` (a fraction of the maximum; the paper's M = 9 of 10 with std
    0.5: 0.95), both signs: rotation +-30 degrees x level, translation +-45% x level,
    shear +-0.3 x level (gray fill, as timm), contrast 1 +- 0.9 x level, brightness +-0.45 x
    level of the range (timm multiplies by 1 +- 0.9 x level), colour towards gray by up to
    0.9 x level, sharpness 0.5 +- 0.45 x level (0.5 leaves the image unchanged).
    Posterization, solarization, auto-contrast and equalization keep Keras' own mapping of
    `factor=level`.
    """
    import keras

    layers = keras.layers
    lv = float(level)
    ra = layers.RandAugment(value_range=(0, 1), num_ops=int(num_ops), factor=lv)
    fill = dict(fill_mode="constant", fill_value=0.5)
    ra.random_rotation = layers.RandomRotation(factor=(-30 * lv / 360, 30 * lv / 360), **fill)
    ra.random_translation = layers.RandomTranslation((-0.45 * lv, 0.45 * lv), (-0.45 * lv, 0.45 * lv), **fill)
    ra.random_shear = layers.RandomShear(x_factor=(0.0, 0.3 * lv), y_factor=(0.0, 0.3 * lv), **fill)
    ra.random_contrast = layers.RandomContrast(factor=(0.9 * lv, 0.9 * lv), value_range=(0, 1))
    ra.random_brightness = layers.RandomBrightness(factor=(-0.45 * lv, 0.45 * lv), value_range=(0, 1))
    ra.random_color_degeneration = layers.RandomColorDegeneration(factor=(0.0, 0.9 * lv), value_range=(0, 1))
    ra.random_sharpness = layers.RandomSharpness(factor=(0.5 - 0.45 * lv, 0.5 + 0.45 * lv), value_range=(0, 1))
    return ra


class _BatchSeeds:
    """Stands in for a `keras.random.SeedGenerator`: draw i is the batch seed folded with i.

    Created while the map function is traced; `next()` is called (in Python) once per
    random op Keras builds, so each op of the graph gets its own stateless seed derived
    from the batch's seed tensor.
    """

    def __init__(self, seed: tf.Tensor, stream: int) -> None:
        self._seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), stream)
        self._count = 0

    def next(self, ordered: bool = True) -> tf.Tensor:
        self._count += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._count)


def _seed_generator_class() -> type:
    import keras

    # A subclass, so that Keras' `draw_seed` accepts it; no state of its own (no variable).
    return type("BatchSeedGenerator", (_BatchSeeds, keras.random.SeedGenerator), {})


class BatchAugmentation:
    """Applies a `RecipeConfig` to a training batch, every draw from the batch's stateless seed.

    Args:
        recipe: the `keras_ee.config.RecipeConfig` (its `ema` is the optimizer's, not used here).
        num_classes: classes of the soft targets.
        image_shape: (H, W, C) of the images.
        mean, std: per-channel normalization (applied here, between the pixel-level and
            the batch-level augmentations).

    Call it (inside a tf.data map) as `x, y = aug(x_raw, y_int, seed)` with `x_raw` float32
    pixels in [0, 1] and `seed` an int tensor of shape (2,); `y` comes back int32 (B,) when
    the recipe has no soft labels, else float32 (B, num_classes).
    """

    def __init__(
        self,
        recipe: RecipeConfig,
        num_classes: int,
        image_shape: Sequence[int],
        mean: npt.ArrayLike,
        std: npt.ArrayLike,
    ) -> None:
        import keras

        self.recipe = recipe
        self.num_classes = int(num_classes)
        self.channels = int(image_shape[-1])
        self.mean = tf.constant(np.asarray(mean, np.float32))
        self.inv_std = tf.constant(1.0 / np.asarray(std, np.float32))
        self._seeds = _seed_generator_class()
        shape = (None, *[int(d) for d in image_shape])
        r = recipe
        self.randaugment = self.color_jitter = self.erasing = self.mixup = self.cutmix = None
        if r.randaugment is not None:
            self.randaugment = timm_scaled_randaugment(r.randaugment_level, r.randaugment_ops)
        if r.color_jitter:
            s = float(r.color_jitter)
            saturation = ((1 - s) / (2 - s), (1 + s) / (2 + s)) if self.channels == 3 else None
            self.color_jitter = keras.layers.RandomColorJitter(
                value_range=(0, 1), brightness_factor=s, contrast_factor=s, saturation_factor=saturation
            )
        if r.random_erasing:
            p = float(r.random_erasing)
            self.erasing = keras.layers.RandomErasing(factor=(p, p), value_range=(-1, 1))
        if r.mixup:
            self.mixup = keras.layers.MixUp(alpha=float(r.mixup))
        if r.cutmix:
            self.cutmix = keras.layers.CutMix(factor=float(r.cutmix))
        for layer in (self.randaugment, self.color_jitter, self.erasing, self.mixup, self.cutmix):
            if layer is not None:
                layer.build(shape)

    def seeds(self, seed: tf.Tensor, stream: int) -> keras.random.SeedGenerator:
        """A seed generator for Keras' layers: stream `stream` of the batch seed."""
        return self._seeds(seed, stream)

    def pixels(self, x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """RandAugment and colour jitter of raw pixels in [0, 1] (before normalization)."""
        if self.randaugment is not None:
            layer = self.randaugment
            with _own_generator(layer, self.seeds(seed, 1)):
                transformation = layer.get_random_transformation(x, training=True)
            batch = tf.shape(x)[0]
            # One op choice per image (Keras: per batch); broadcast by Keras' transform_images.
            transformation["layer_idxes"] = tf.random.stateless_uniform(
                [layer.num_ops, batch, 1, 1, 1],
                self.seeds(seed, 2).next(),
                minval=0,
                maxval=len(layer._AUGMENT_LAYERS),
                dtype=tf.int32,
            )
            x = tf.clip_by_value(layer.transform_images(x, transformation), 0.0, 1.0)
        if self.color_jitter is not None:
            with _own_generator(self.color_jitter, self.seeds(seed, 3)):
                x = self.color_jitter.transform_images(x, None)
            x = tf.clip_by_value(x, 0.0, 1.0)
        return x

    def batch(self, x: tf.Tensor, y: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Random erasing of normalized images, soft labels, then CutMix or MixUp."""
        if self.erasing is not None:
            t = self.erasing.get_random_transformation(x, training=True, seed=self.seeds(seed, 4))
            x = self.erasing.transform_images(x, t)
        if not self.recipe.soft_labels:
            return x, y
        eps = float(self.recipe.label_smoothing)
        c = self.num_classes
        y = tf.one_hot(tf.cast(y, tf.int32), c, on_value=1.0 - eps + eps / c, off_value=eps / c)

        def mix(layer: keras.layers.Layer, stream: int) -> Callable[[], tuple[tf.Tensor, tf.Tensor]]:
            def run() -> tuple[tf.Tensor, tf.Tensor]:
                t = layer.get_random_transformation(x, training=True, seed=self.seeds(seed, stream))
                return layer.transform_images(x, t), tf.cast(layer.transform_labels(y, t), tf.float32)

            return run

        if self.mixup is not None and self.cutmix is not None:
            coin = tf.random.stateless_uniform([], self.seeds(seed, 5).next()) < 0.5
            x, y = tf.cond(coin, mix(self.cutmix, 6), mix(self.mixup, 7))
        elif self.cutmix is not None:
            x, y = mix(self.cutmix, 6)()
        elif self.mixup is not None:
            x, y = mix(self.mixup, 7)()
        return x, y

    def __call__(self, x: tf.Tensor, y: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = self.pixels(x, seed)
        x = (x - self.mean) * self.inv_std
        return self.batch(x, y, seed)


class _own_generator:
    """Set `layer.generator` (and its sub-layers') to `seeds` while a graph is built."""

    def __init__(self, layer: keras.layers.Layer, seeds: keras.random.SeedGenerator) -> None:
        self.layer, self.seeds = layer, seeds
        self.saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> None:
        for sub in self.layer._flatten_layers(include_self=True, recursive=True):
            if hasattr(sub, "generator"):
                self.saved.append((sub, sub.__dict__.get("generator")))
                # Past Keras' attribute tracking (a built layer refuses new state).
                object.__setattr__(sub, "generator", self.seeds)

    def __exit__(self, *exc: object) -> Literal[False]:
        for sub, generator in reversed(self.saved):
            object.__setattr__(sub, "generator", generator)
        return False


def check_recipe(recipe: RecipeConfig, image_shape: Sequence[int]) -> None:
    """Refuse a recipe the images cannot take, with a one-line reason."""
    h, w, c = (int(d) for d in image_shape)
    if recipe.randaugment is not None and c not in (1, 3):
        raise ValueError(f"randaugment needs images with 1 or 3 channels; received {c} channels.")
    if recipe.cutmix and min(h, w) < 2:
        raise ValueError(f"cutmix needs images of at least 2x2 pixels; received {h}x{w}.")
