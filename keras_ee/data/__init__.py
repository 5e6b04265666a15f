"""Datasets for keras-ee: loaders, held-out validation splits and tf.data pipelines.

`load(name)` returns a `DatasetSplits` with a training split, a validation
split held out from it (stratified, seeded, never augmented: used for threshold
calibration) and the test split, with tf.data pipelines that normalize with the
training split's per-channel statistics and augment the training split only.

Example:

```python
import keras_ee

splits = keras_ee.data.load("cifar100", data_dir="../shared/data")
model.fit(splits.train_dataset(64), validation_data=splits.val_dataset(256))
```
"""

import numbers
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keras_ee._typing import StrPath
from keras_ee.data import builtin, cifar, idx, npz
from keras_ee.data.base import ArraySplits, DatasetSplits, build_array_splits
from keras_ee.data.splits import channel_stats, long_tail_counts, long_tail_indices, stratified_split

if TYPE_CHECKING:
    from keras_ee.config import TrainConfig

DEFAULT_DATASET = "digits"

# name -> (description, default validation size, crop padding, horizontal flip)
_DATASETS: dict[str, tuple[str, float, int | None, bool | None]] = {
    "digits": (
        "built-in default: scikit-learn's 1,797 handwritten digits, 8x8x1, 10 classes, no download",
        builtin.VAL_SIZE,
        builtin.AUGMENT_PAD,
        False,
    ),
    "cifar10": (
        "CIFAR-10, 32x32x3, 10 classes (local official files or tensorflow_datasets)",
        5000,
        4,
        True,
    ),
    "cifar100": (
        "CIFAR-100, 32x32x3, 100 fine classes (local official files or tensorflow_datasets)",
        5000,
        4,
        True,
    ),
    "fashion_mnist": (
        "Fashion-MNIST, 28x28x1, 10 classes (IDX files or tensorflow_datasets)",
        5000,
        2,
        True,
    ),
    "imagenet": (
        "ImageNet ILSVRC 2012, 224x224x3, 1000 classes (tensorflow_datasets, manual download in data_dir)",
        50000,
        None,
        None,
    ),
    "npz:PATH": (
        "your own .npz with x_train, y_train, x_test, y_test (optional class_names)",
        0.1,
        None,
        False,
    ),
}

_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "imagenet2012": "imagenet",
    "ilsvrc2012": "imagenet",
    "sklearn_digits": "digits",
}

# Fraction of the long-tailed training set held out for validation by default:
# the balanced default (5,000 images) would take half of CIFAR-100-LT.
LONG_TAIL_VAL_FRACTION = 0.1


class DatasetInfo(str):
    """One line of `available()`: `"name  description"`, with both as attributes."""

    name: str
    description: str

    def __new__(cls, name: str, description: str) -> "DatasetInfo":
        line = super().__new__(cls, f"{name:<14} {description}")
        line.name = name
        line.description = description
        return line


def available() -> list[DatasetInfo]:
    """The dataset names `load` accepts, with one-line descriptions.

    Returns:
        list of `DatasetInfo`: strings `"name  description"` (ready to print)
        that also carry `.name` and `.description`.

    Example:

    ```python
    for line in keras_ee.data.available():
        print(line)            # "cifar100       CIFAR-100, 32x32x3, ..."
    names = [d.name for d in keras_ee.data.available()]
    ```
    """
    return [DatasetInfo(name, spec[0]) for name, spec in _DATASETS.items()]


def default_search_dirs() -> list[str]:
    """Folders searched for local dataset files when `data_dir` is not given.

    `$KERAS_EE_DATA_DIR` (several folders separated by `os.pathsep`), then
    Keras' download cache `~/.keras/datasets` and `~/.cache/keras_ee`.
    """
    dirs = [d for d in os.environ.get("KERAS_EE_DATA_DIR", "").split(os.pathsep) if d]
    dirs += [
        os.path.join(os.path.expanduser("~"), ".keras", "datasets"),
        os.path.join(os.path.expanduser("~"), ".cache", "keras_ee"),
    ]
    return dirs


def _resolve_name(name: object) -> tuple[str, str | None]:
    if not isinstance(name, str):
        raise TypeError(f"Expected the dataset `name` to be a string. Received {name!r}.")
    if name.lower().startswith("npz:"):
        return "npz", name[4:]
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _DATASETS or key == "npz:PATH":
        listing = ", ".join(d.name for d in available())
        raise ValueError(f"Unknown dataset {name!r}. Available: {listing} (descriptions: keras_ee.data.available()).")
    return key, None


def _local_or_tfds(
    key: str,
    data_dir: StrPath | None,
    download: bool,
    find: Callable[[list[str]], Any],
    read: Callable[[Any], dict[str, Any]],
    what: str,
) -> dict[str, Any]:
    """Reads a local copy when one is found, else tries tensorflow_datasets."""
    if data_dir is not None:
        data_dir = os.path.expanduser(str(data_dir))
        if not os.path.exists(data_dir):
            raise FileNotFoundError(f"`data_dir` {data_dir} does not exist (looking for {what}).")
        dirs = [data_dir]
    else:
        dirs = default_search_dirs()
        if key == "fashion_mnist":
            dirs += idx.SYSTEM_DIRS
    found = find(dirs)
    if found is not None:
        return read(found)
    try:
        return cifar.load_tfds_arrays(key, data_dir=data_dir, download=download)
    except FileNotFoundError as e:
        tfds_reason = str(e)
    except Exception as e:  # tfds failures come in many types; report them.
        tfds_reason = f"{type(e).__name__}: {e}"
    raise FileNotFoundError(
        f"{what} not found. Looked in {', '.join(dirs)}. tensorflow_datasets: "
        f"{tfds_reason} Pass `data_dir` pointing at a local copy."
    )


def load(
    name: str = DEFAULT_DATASET,
    data_dir: StrPath | None = None,
    val_size: float | None = None,
    seed: int = 0,
    imbalance_factor: float | None = None,
    download: bool = True,
    augment_pad: int | None = None,
    augment_flip: bool | None = None,
    train_size: float | None = None,
    meta_size: float | None = None,
    samples_per_class: int | None = None,
) -> DatasetSplits:
    """Loads a dataset as train / validation / test splits.

    Sources, by name (see `available()`):

    * `"digits"` (default): scikit-learn's bundled digits, 8x8x1, kept at 8x8;
      fixed 360-image test split, validation 300; augmentation: shift <= 1
      pixel, no flip.
    * `"cifar10"`, `"cifar100"`: the official binary or python-pickle files
      (archive or extracted folder) in `data_dir`, else in
      `default_search_dirs()`, else tensorflow_datasets (prepared copy, or a
      download when the host is reachable). Validation 5,000; augmentation:
      pad 4 + random 32x32 crop + horizontal flip.
    * `"fashion_mnist"`: the four IDX files (gz or plain) in `data_dir`, the
      search folders or `/usr/share/datasets/fashion-mnist`, else
      tensorflow_datasets. Validation 5,000; augmentation: pad 2 + random
      28x28 crop + horizontal flip.
    * `"imagenet"`: tensorflow_datasets with the manual download in
      `data_dir` (see `keras_ee.data.imagenet`).
    * `"npz:PATH"`: your own arrays (see `keras_ee.data.npz`). Validation
      10% of the training set; augmentation: pad H/8 + random crop, no flip.

    With `imbalance_factor`, the training set is first made long-tailed
    (`N_c = N_max * mu^c`, class 0 largest, `N_max / N_{C-1}` equal to the
    factor; Cui et al. 2019 as in L2W-DEN), then the validation set is held
    out from it (stratified; default 10% of the long-tailed set). The test
    set stays balanced.

    Args:
        name: str. Dataset name or `"npz:PATH"`.
        data_dir: str or None. Folder (or archive) holding the files.
        val_size: int, float in (0, 1) or None (dataset default). Size of the
            validation split held out from the training set.
        seed: int. Seed of the validation split.
        imbalance_factor: float >= 1 or None. Long-tailed training set (the
            paper uses 200, 100, 50 and 20).
        download: bool. Allow tensorflow_datasets to download.
        augment_pad: int or None. Override the crop padding (0 disables).
        augment_flip: bool or None. Override the horizontal flip.
        train_size: int, float in (0, 1) or None. Train on a stratified,
            seeded subset of this size of the training split (validation and
            test are unchanged); None uses the whole training split.
        meta_size: int, float in (0, 1) or None. A separate stratified split of
            this size, held out from the training split, for methods with a meta
            stream (`DatasetSplits.meta_dataset`); None (default) gives them the
            validation split, as the HDKD paper does (thresholds calibrated on it are
            then optimistic).
        samples_per_class: int >= 1 or None. Train on this many images of every
            class (the HDKD paper's low-data CIFAR(X)): a seeded choice from the
            training split after the validation and meta hold-outs; a ValueError
            names the first class with fewer. Not together with `train_size`.

    Returns:
        `DatasetSplits`.

    Example:

    ```python
    splits = keras_ee.data.load()  # the built-in digits
    x, y = next(iter(splits.train_dataset(32)))  # (32, 8, 8, 1) float32, int32
    ```
    """
    key, path = _resolve_name(name)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"Expected an int `seed`. Received {seed!r}.")
    if augment_pad is not None and (
        isinstance(augment_pad, bool) or not isinstance(augment_pad, int) or augment_pad < 0
    ):
        raise ValueError(f"Expected `augment_pad` to be an int >= 0 or None. Received {augment_pad!r}.")
    if key == "npz":
        key = "npz:PATH"
    _, default_val, pad, flip = _DATASETS[key]

    if key == "imagenet":
        from keras_ee.data import imagenet

        if imbalance_factor is not None:
            raise ValueError("`imbalance_factor` is supported for the in-memory datasets, not ImageNet.")
        if train_size is not None:
            raise ValueError("`train_size` is supported for the in-memory datasets, not ImageNet.")
        if samples_per_class is not None:
            raise ValueError("`samples_per_class` is supported for the in-memory datasets, not ImageNet.")
        if meta_size is not None:
            raise ValueError(
                "`meta_size` is supported for the in-memory datasets, not ImageNet "
                "(its meta stream is the validation split)."
            )
        if augment_pad is not None or augment_flip is not None:
            raise ValueError("ImageNet uses random-resized crops; `augment_pad`/`augment_flip` do not apply.")
        return imagenet.ImageNetSplits(data_dir, default_val if val_size is None else val_size)

    scale = 1.0 / 255.0
    if key == "digits":
        data = builtin.load_digits_arrays()
        scale = 1.0 / builtin.PIXEL_MAX
    elif key in ("cifar10", "cifar100"):
        classes = 10 if key == "cifar10" else 100
        data = _local_or_tfds(
            key,
            data_dir,
            download,
            lambda dirs: cifar.find_cifar(classes, dirs),
            lambda found: cifar.read_cifar(found[0], classes, fmt=None),
            f"CIFAR-{classes} (cifar-{classes}-binary.tar.gz, cifar-{classes}-python.tar.gz "
            "or their extracted folders)",
        )
    elif key == "fashion_mnist":
        data = _local_or_tfds(
            key,
            data_dir,
            download,
            idx.find_idx_dir,
            idx.read_fashion_mnist,
            "Fashion-MNIST (train-images-idx3-ubyte[.gz] and the three other IDX files)",
        )
        if data["x_train"].ndim == 3:
            data["x_train"], data["x_test"] = data["x_train"][..., None], data["x_test"][..., None]
    else:  # npz
        data = npz.read_npz(path)
        scale = data["pixel_scale"]
        pad = max(1, int(round(data["x_train"].shape[1] / 8)))
    if val_size is None:
        val_size = LONG_TAIL_VAL_FRACTION if imbalance_factor is not None else default_val
    return build_array_splits(
        key if key != "npz:PATH" else f"npz:{os.path.basename(path)}",
        data["x_train"],
        data["y_train"],
        data["x_test"],
        data["y_test"],
        data["class_names"],
        val_size,
        seed=seed,
        imbalance_factor=imbalance_factor,
        pixel_scale=scale,
        augment_pad=pad if augment_pad is None else augment_pad,
        augment_flip=flip if augment_flip is None else bool(augment_flip),
        train_size=train_size,
        meta_size=meta_size,
        samples_per_class=samples_per_class,
    )


def load_configured(config: "TrainConfig") -> DatasetSplits:
    """The splits of the dataset that a run's `TrainConfig` names, as `keras-ee train` loads them."""
    return load(
        config.dataset,
        data_dir=config.data_dir,
        val_size=config.val_size,
        seed=config.seed,
        imbalance_factor=config.imbalance_factor,
        train_size=config.train_size,
        meta_size=config.meta_split_size,
        samples_per_class=config.samples_per_class,
    )


__all__ = [
    "ArraySplits",
    "DatasetInfo",
    "DatasetSplits",
    "available",
    "build_array_splits",
    "channel_stats",
    "default_search_dirs",
    "load",
    "load_configured",
    "long_tail_counts",
    "long_tail_indices",
    "stratified_split",
]
