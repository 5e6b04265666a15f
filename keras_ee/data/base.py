"""The `DatasetSplits` object that every loader returns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from keras_ee import validation as v
from keras_ee.data import splits as splits_lib

if TYPE_CHECKING:
    import tensorflow as tf

    from keras_ee.config import RecipeConfig


class DatasetSplits:
    """Train / validation / test splits of an image classification dataset.

    The common interface of every loader (see `keras_ee.data.load`). The
    validation split is held out from the training set, is never augmented
    and is meant for threshold calibration; the test split is the dataset's
    own. Images come out of the pipelines as float32 NHWC, normalized with
    the per-channel `mean` and `std` of the training split (pixels scaled to
    [0, 1] first), labels as int32.

    Attributes:
        name: str. Dataset name, e.g. `"cifar100"` or `"cifar100-lt100"`.
        num_classes: int.
        class_names: list of str, index = label.
        input_shape: tuple (H, W, C) of the images the pipelines produce.
        pixel_scale: float. The factor that brings the stored pixels to [0, 1]
            (1/255 for uint8 images), before `mean` and `std` apply.
        mean: float32 array (C,). Per-channel mean of the training split.
        std: float32 array (C,). Per-channel standard deviation.
        num_train, num_val, num_test: int. Split sizes.
        imbalance_factor: float or None. Long-tail factor of the training
            split (`None` for the dataset as published).
        pixel_range: `(min, max)` floats of the training split's stored pixels
            (before `pixel_scale`), or None where unknown; a run records it for
            `keras-ee predict`, which refuses raw images far outside it.
    """

    # Set by every loader (declared here for the type checker).
    name: str
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, ...]
    pixel_scale: float
    mean: np.ndarray
    std: np.ndarray
    num_train: int
    num_val: int
    num_test: int
    imbalance_factor: float | None = None
    pixel_range: tuple[float, float] | None = None

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
        """Training pipeline: shuffled and augmented (by default) batches.

        With `first_epoch` and `epochs`, the batches of those epochs back to back,
        each epoch's order and augmentation a function of (seed, epoch) only: what
        an exactly resumable run needs (fit with `steps_per_epoch=train_batches`).
        `recipe` (a `keras_ee.config.RecipeConfig`) adds the budget-aware paper's
        augmentations; its labels are then float32 (B, num_classes) soft targets
        when it smooths or mixes them.
        """
        raise NotImplementedError

    def train_batches(self, batch_size: int, drop_remainder: bool = False) -> int:
        """Batches per epoch of `train_dataset(batch_size, drop_remainder=...)`."""
        from keras_ee.data.pipeline import epoch_batches

        return epoch_batches(self.num_train, batch_size, drop_remainder)

    def val_dataset(self, batch_size: int) -> tf.data.Dataset:
        """Validation pipeline: not augmented, not shuffled."""
        raise NotImplementedError

    # Where the meta stream comes from: "calibration" (the validation split, as the HDKD
    # paper does) or "split" (a separate hold-out of its own, `meta_size` in `load`).
    meta_source = "calibration"
    num_meta: int | None = None

    def meta_dataset(
        self, batch_size: int, batches_per_epoch: int, seed: int = 0, first_epoch: int = 0, epochs: int = 1
    ) -> tf.data.Dataset:
        """Held-out batches for a method's outer step (e.g. HDKD's loss weights).

        `batches_per_epoch` batches for each of epochs `first_epoch .. epochs - 1`, from
        the meta split (`meta_source`): by default the calibration hold-out, so the
        thresholds are then calibrated on data the method also fitted its weights on,
        which makes them optimistic; `keras_ee.data.load(..., meta_size=N)` holds out a
        separate split instead. Each epoch's stream depends on (seed, epoch) only.
        """
        raise NotImplementedError

    def test_dataset(self, batch_size: int) -> tf.data.Dataset:
        """Test pipeline: not augmented, not shuffled."""
        raise NotImplementedError

    def val_labels(self) -> np.ndarray:
        """Validation labels (int64), in the order of `val_dataset`."""
        raise NotImplementedError

    def test_labels(self) -> np.ndarray:
        """Test labels (int64), in the order of `test_dataset`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name}: {self.num_classes} classes, "
            f"input {self.input_shape}, train/val/test = "
            f"{self.num_train}/{self.num_val}/{self.num_test}>"
        )


def _check_images(x: object, what: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"Expected `{what}` of shape (N, H, W) or (N, H, W, C). Received shape {x.shape}.")
    bad = v.non_finite_images(x)
    if bad.size:
        raise ValueError(
            f"`{what}` holds NaN or infinite pixels (image {int(bad[0])} first, "
            f"{len(bad)} image(s) in all); expected finite pixel values."
        )
    return x


class ArraySplits(DatasetSplits):
    """`DatasetSplits` over in-memory NumPy arrays.

    Images are kept in their stored dtype (uint8 for the image datasets, so
    CIFAR's 50,000 training images take 150 MB, not 600 MB) and scaled with
    `pixel_scale` inside the pipeline.

    Args:
        name: str. Dataset name.
        x_train, y_train: training images (N, H, W[, C]) and labels (N,).
        x_val, y_val: validation images and labels.
        x_test, y_test: test images and labels.
        class_names: list of str, one per class.
        pixel_scale: float. Multiplies the stored pixels to bring them to
            [0, 1] (1/255 for uint8 images, 1 for float images).
        augment_pad: int. Zero padding before the random crop (0: no crop).
        augment_flip: bool. Random horizontal flips.
        imbalance_factor: float or None. Recorded long-tail factor.
        mean, std: float arrays (C,), optional. Normalization statistics;
            computed on `x_train` when not given.

    Example:

    ```python
    splits = ArraySplits("toy", x_tr, y_tr, x_va, y_va, x_te, y_te,
                         class_names=["a", "b"], pixel_scale=1 / 255,
                         augment_pad=4, augment_flip=True)
    ds = splits.train_dataset(batch_size=128)
    ```
    """

    def __init__(
        self,
        name: str,
        x_train: npt.ArrayLike,
        y_train: npt.ArrayLike,
        x_val: npt.ArrayLike,
        y_val: npt.ArrayLike,
        x_test: npt.ArrayLike,
        y_test: npt.ArrayLike,
        class_names: Sequence[object],
        pixel_scale: float = 1.0 / 255.0,
        augment_pad: int = 0,
        augment_flip: bool = False,
        imbalance_factor: float | None = None,
        mean: npt.ArrayLike | None = None,
        std: npt.ArrayLike | None = None,
        x_meta: npt.ArrayLike | None = None,
        y_meta: npt.ArrayLike | None = None,
    ) -> None:
        self.name = name
        self.class_names = [str(c) for c in class_names]
        self.num_classes = len(self.class_names)
        if self.num_classes < 2:
            raise ValueError(f"Expected at least 2 classes. Received class names {class_names!r}.")
        arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for part, x, y in (
            ("train", x_train, y_train),
            ("val", x_val, y_val),
            ("test", x_test, y_test),
        ) + ((("meta", x_meta, y_meta),) if x_meta is not None else ()):
            x = _check_images(x, f"x_{part}")
            y = v.check_labels(y, self.num_classes, f"y_{part}")
            if len(x) != len(y):
                raise ValueError(
                    f"Expected as many labels as images in the {part} split. "
                    f"Received {len(x)} images and {len(y)} labels."
                )
            arrays[part] = (x, y)
        shapes = {part: xy[0].shape[1:] for part, xy in arrays.items() if len(xy[0])}
        if len(set(shapes.values())) > 1:
            raise ValueError(f"Expected one image shape for all splits. Received {shapes}.")
        if len(arrays["train"][0]) == 0:
            raise ValueError("Expected a non-empty training split.")
        self._x_train, self._y_train = arrays["train"]
        self._x_val, self._y_val = arrays["val"]
        self._x_test, self._y_test = arrays["test"]
        if "meta" in arrays:
            self._x_meta, self._y_meta = arrays["meta"]
            self.meta_source = "split"
        self.input_shape = tuple(int(d) for d in self._x_train.shape[1:])
        self.pixel_scale = float(pixel_scale)
        self.augment_pad = int(augment_pad)
        self.augment_flip = bool(augment_flip)
        self.imbalance_factor = imbalance_factor
        if mean is None or std is None:
            mean, std = splits_lib.channel_stats(self._x_train, self.pixel_scale)
        self.mean = np.asarray(mean, np.float32).reshape(-1)
        self.std = np.asarray(std, np.float32).reshape(-1)
        if self.mean.shape != (self.input_shape[-1],) or self.std.shape != self.mean.shape:
            raise ValueError(
                f"Expected `mean` and `std` of shape ({self.input_shape[-1]},). "
                f"Received {self.mean.shape} and {self.std.shape}."
            )
        # A constant channel (std 0) would divide by zero; leave it unscaled.
        self.std = np.where(self.std > 0, self.std, np.float32(1.0)).astype(np.float32)
        self.num_train = len(self._x_train)
        self.num_val = len(self._x_val)
        self.num_test = len(self._x_test)
        self.num_meta = len(self._x_meta) if self.meta_source == "split" else self.num_val
        self._tensors: dict[str, tuple[tf.Tensor, tf.Tensor]] = {}
        self._pixel_range: tuple[float, float] | None = None

    @property
    def pixel_range(self) -> tuple[float, float]:
        """`(min, max)` of the training images' stored pixels, computed on first use."""
        if self._pixel_range is None:
            self._pixel_range = v.pixel_range(self._x_train)
        return self._pixel_range

    @pixel_range.setter
    def pixel_range(self, value: tuple[float, float] | None) -> None:
        # Writable as the base class's attribute is (None: computed again on next use).
        self._pixel_range = value

    def _pipeline(self, part: str, batch_size: int, **kwargs: Any) -> tf.data.Dataset:
        from keras_ee.data import pipeline

        x, y = getattr(self, f"_x_{part}"), getattr(self, f"_y_{part}")
        if part not in self._tensors:
            import tensorflow as tf

            # Converted once: later pipelines reuse the same tensors.
            self._tensors[part] = (
                tf.convert_to_tensor(x),
                tf.convert_to_tensor(y.astype(np.int32)),
            )
        tx, ty = self._tensors[part]
        return pipeline.array_dataset(
            tx,
            ty,
            batch_size,
            self.pixel_scale,
            self.mean,
            self.std,
            pad=self.augment_pad,
            flip=self.augment_flip,
            **kwargs,
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
        """Training pipeline.

        Args:
            batch_size: int > 0.
            seed: int or None. Seed of the shuffle and of the augmentation
                (reproducible for a given seed, different at every epoch).
            augment: bool. Random crop (`augment_pad`) and flip
                (`augment_flip`), applied to raw pixels before normalization.
            shuffle: bool. Reshuffle at every epoch.
            drop_remainder: bool. Drop the last incomplete batch.
            first_epoch, epochs: ints or None. The batches of epochs
                `first_epoch .. epochs - 1` in one dataset, epoch e's order and
                augmentation seeded by (seed, e) only (exact resume).
            recipe: a `keras_ee.config.RecipeConfig` or None (see
                `keras_ee.data.pipeline`), applied when `augment`.

        Returns:
            `tf.data.Dataset` of (x float32 (B, H, W, C), y int32 (B,)); y is
            float32 (B, num_classes) when the recipe smooths or mixes labels.
        """
        if recipe is not None:
            from keras_ee.data.recipe import check_recipe

            check_recipe(recipe, self.input_shape)
        return self._pipeline(
            "train",
            batch_size,
            shuffle=shuffle,
            seed=seed,
            augment=augment,
            drop_remainder=drop_remainder,
            first_epoch=first_epoch,
            epochs=epochs,
            recipe=recipe,
            num_classes=self.num_classes,
        )

    def val_dataset(self, batch_size: int) -> tf.data.Dataset:
        """Validation pipeline: normalized, never augmented, fixed order."""
        return self._pipeline("val", batch_size)

    def meta_dataset(
        self, batch_size: int, batches_per_epoch: int, seed: int = 0, first_epoch: int = 0, epochs: int = 1
    ) -> tf.data.Dataset:
        from keras_ee.data import pipeline

        part = "meta" if self.meta_source == "split" else "val"
        return pipeline.meta_stream(
            getattr(self, f"_x_{part}"),
            getattr(self, f"_y_{part}").astype(np.int32),
            batch_size,
            self.pixel_scale,
            self.mean,
            self.std,
            batches_per_epoch,
            seed=seed,
            first_epoch=first_epoch,
            epochs=epochs,
        )

    meta_dataset.__doc__ = DatasetSplits.meta_dataset.__doc__

    def test_dataset(self, batch_size: int) -> tf.data.Dataset:
        """Test pipeline: normalized, never augmented, fixed order."""
        return self._pipeline("test", batch_size)

    def train_labels(self) -> np.ndarray:
        """Training labels (int64), in stored order (before shuffling)."""
        return self._y_train.copy()

    def val_labels(self) -> np.ndarray:
        return self._y_val.copy()

    def test_labels(self) -> np.ndarray:
        return self._y_test.copy()

    def train_class_counts(self) -> np.ndarray:
        """Number of training samples per class, int64 array (num_classes,)."""
        return np.bincount(self._y_train, minlength=self.num_classes)


def build_array_splits(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_names: Sequence[object],
    val_size: float,
    seed: int = 0,
    imbalance_factor: float | None = None,
    pixel_scale: float = 1.0 / 255.0,
    augment_pad: int = 0,
    augment_flip: bool = False,
    train_size: float | None = None,
    meta_size: float | None = None,
    samples_per_class: int | None = None,
) -> ArraySplits:
    """Long-tail (optional), hold out validation, and wrap into `ArraySplits`.

    Order of operations, following the L2W-DEN paper: the long-tailed
    training set is built from the full official training set (Cui et al.),
    and the validation set is then held out from it ("an extra validation set
    from the training data"), stratified, so it is long-tailed too; the test
    set stays balanced. The long-tailed subset itself is a fixed, seeded
    (seed 0) choice, i.e. the same dataset for every run; `seed` only moves
    the validation split.

    Args:
        name: str. Base dataset name (a `-lt<factor>` suffix is added when
            `imbalance_factor` is set).
        x_train, y_train, x_test, y_test: arrays of the official splits.
        class_names: list of str.
        val_size: int or float. Validation size (count or fraction of the
            training set after the long-tail subsampling).
        seed: int. Seed of the validation split.
        imbalance_factor: float >= 1 or None.
        pixel_scale, augment_pad, augment_flip: see `ArraySplits`.
        train_size: int, float in (0, 1) or None. Keep only a stratified, seeded
            subset of this size of the training split (after validation is held
            out), for runs at a smaller scale; None keeps everything.
        meta_size: int, float in (0, 1) or None. Hold out a separate stratified
            split of this size from the training split for a method's meta stream
            (`meta_dataset`); None uses the calibration (validation) split.
        samples_per_class: int >= 1 or None. Keep exactly this many training images
            of every class (`splits.per_class_subset`, seeded), after the validation
            and meta hold-outs; not together with `train_size`.

    Returns:
        `ArraySplits`.
    """
    num_classes = len(class_names)
    x_train = _check_images(x_train, "x_train")
    y_train = v.check_labels(y_train, num_classes, "y_train")
    if len(x_train) != len(y_train):
        raise ValueError(
            f"Expected as many training labels as images. Received {len(x_train)} images and {len(y_train)} labels."
        )
    if imbalance_factor is not None:
        keep = splits_lib.long_tail_indices(y_train, imbalance_factor, num_classes, seed=0)
        x_train, y_train = x_train[keep], y_train[keep]
        factor = float(imbalance_factor)
        name = f"{name}-lt{int(factor) if factor.is_integer() else factor:g}"
    train_idx, val_idx = splits_lib.stratified_split(
        y_train, val_size, seed=seed, num_classes=num_classes, what="val_size"
    )
    meta_idx = None
    if meta_size is not None:
        rest, held = splits_lib.stratified_split(
            y_train[train_idx], meta_size, seed=seed + 1, num_classes=num_classes, what="meta_size"
        )
        train_idx, meta_idx = train_idx[rest], train_idx[held]
    if train_size is not None and samples_per_class is not None:
        raise ValueError(
            f"`samples_per_class` ({samples_per_class!r}) and `train_size` ({train_size!r}) both "
            "choose the training subset; expected one of them."
        )
    if train_size is not None:
        _, keep = splits_lib.stratified_split(
            y_train[train_idx], train_size, seed=seed, num_classes=num_classes, what="train_size"
        )
        train_idx = train_idx[keep]
    if samples_per_class is not None:
        keep = splits_lib.per_class_subset(y_train[train_idx], samples_per_class, seed=seed, num_classes=num_classes)
        train_idx = train_idx[keep]
    return ArraySplits(
        name,
        x_train[train_idx],
        y_train[train_idx],
        x_train[val_idx],
        y_train[val_idx],
        x_test,
        y_test,
        class_names,
        pixel_scale=pixel_scale,
        augment_pad=augment_pad,
        augment_flip=augment_flip,
        imbalance_factor=None if imbalance_factor is None else float(imbalance_factor),
        x_meta=None if meta_idx is None else x_train[meta_idx],
        y_meta=None if meta_idx is None else y_train[meta_idx],
    )
