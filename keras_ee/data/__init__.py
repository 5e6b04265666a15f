"""Datasets for keras-ee: loaders, held-out validation splits and tf.data pipelines.

`load(name)` returns a `DatasetSplits` with a training split, a validation
split held out from it (stratified, seeded, never augmented: used for threshold
calibration) and the test split, with tf.data pipelines that normalize with the
training split's per-channel statistics and augment the training split only.

Example:

```python
import keras_ee

splits = keras_ee.data.load("cifar100", data_dir="~/datasets")
model.fit(splits.train_dataset(64), validation_data=splits.val_dataset(256))
```
"""

import dataclasses
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from keras_ee import validation as v
from keras_ee._typing import StrPath
from keras_ee.data import builtin, cifar, idx, npz
from keras_ee.data.base import ArraySplits, DatasetSplits, build_array_splits
from keras_ee.data.splits import channel_stats, long_tail_counts, long_tail_indices, stratified_split
from keras_ee.registry import Registry

if TYPE_CHECKING:
    from keras_ee.config import TrainConfig

DEFAULT_DATASET = "digits"

# Fraction of the long-tailed training set held out for validation by default:
# the balanced default (5,000 images) would take half of CIFAR-100-LT.
LONG_TAIL_VAL_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What `load` knows of one dataset (see `register_dataset`).

    Attributes:
        name: the name `load` and `--dataset` take.
        description: one line for `keras-ee datasets`.
        read: `read(data_dir, download)` -> dict with `x_train` (N, H, W, C), `y_train`,
            `x_test`, `y_test`, `class_names` and optionally `pixel_scale` (default 1/255):
            a dataset held in memory. None for a streamed one.
        stream: `stream(data_dir, val_size)` -> `DatasetSplits`: a dataset streamed from
            disk (ImageNet), which builds its own splits. None for an in-memory one.
        val_size: the default size of the validation split held out from the training set.
        augment_pad: the random crop's padding (None: an eighth of the image height).
        augment_flip: whether the training images are flipped horizontally at random.
    """

    name: str
    description: str
    read: Callable[[StrPath | None, bool], dict[str, Any]] | None = None
    stream: Callable[[StrPath | None, float], DatasetSplits] | None = None
    val_size: float = 0.1
    augment_pad: int | None = None
    augment_flip: bool = False


# `npz:PATH`: any name with this prefix reads the file after it.
NPZ_PREFIX = "npz:"
_DATASETS: Registry[DatasetSpec] = Registry("dataset", hint="(descriptions: keras-ee datasets)")
_ALIASES: dict[str, str] = {}


def register_dataset(
    name: str,
    *,
    description: str,
    read: Callable[[StrPath | None, bool], dict[str, Any]] | None = None,
    stream: Callable[[StrPath | None, float], DatasetSplits] | None = None,
    val_size: float = 0.1,
    augment_pad: int | None = None,
    augment_flip: bool = False,
    aliases: tuple[str, ...] = (),
) -> DatasetSpec:
    """Adds a dataset that `load`, `--dataset` and `keras-ee datasets` know by `name`.

    Args:
        name: what `load` takes (lower case also matches it case-blind); `aliases` are
            other spellings (`cifar-100`), matched case-blind.
        description, read, stream, val_size, augment_pad, augment_flip: see `DatasetSpec`
            (exactly one of `read` and `stream`).

    Returns:
        the `DatasetSpec`.

    Example:

    ```python
    keras_ee.data.register_dataset(
        "my_digits", description="my digits, 8x8x1, 10 classes", read=lambda data_dir, download: arrays
    )
    splits = keras_ee.data.load("my_digits")
    ```
    """
    if (read is None) == (stream is None):
        raise ValueError(f"dataset {name!r}: give exactly one of `read` (in memory) and `stream`.")
    for alias in aliases:
        if alias.lower() in _ALIASES or alias in _DATASETS:
            raise ValueError(f"dataset {name!r}: the alias {alias!r} is already taken.")
    spec = _DATASETS.register(name, DatasetSpec(name, description, read, stream, val_size, augment_pad, augment_flip))
    _ALIASES.update({alias.lower(): name for alias in aliases})
    return spec


def list_datasets() -> list[str]:
    """The dataset names `load` accepts, in registration order (`npz:PATH` stands for any `.npz`)."""
    return _DATASETS.names()


def get_dataset(name: object) -> DatasetSpec:
    """The spec of dataset `name`: a registered name or alias (case-blind), or `npz:PATH`.

    Raises:
        ValueError: an unknown name (the error lists the names) or not a string.
    """
    if isinstance(name, str) and name.lower().startswith(NPZ_PREFIX):
        path = name[len(NPZ_PREFIX) :]
        spec = _DATASETS.get(NPZ_PREFIX + "PATH")
        return dataclasses.replace(
            spec, name=NPZ_PREFIX + os.path.basename(path), read=lambda data_dir, download: npz.read_npz(path)
        )
    if not isinstance(name, str) or name in _DATASETS:
        return _DATASETS.get(name)  # a name as registered, or a refusal (not a string)
    key = name.strip().lower()
    return _DATASETS.get(_ALIASES.get(key, key))


def datasets_table() -> str:
    """`keras-ee datasets`: one line per dataset, its name and description."""
    return "\n".join(f"{name:<14} {_DATASETS.get(name).description}" for name in list_datasets())


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


def _read_cifar(num_classes: int) -> Callable[[StrPath | None, bool], dict[str, Any]]:
    def read(data_dir: StrPath | None, download: bool) -> dict[str, Any]:
        return _local_or_tfds(
            f"cifar{num_classes}",
            data_dir,
            download,
            lambda dirs: cifar.find_cifar(num_classes, dirs),
            lambda found: cifar.read_cifar(found[0], num_classes, fmt=None),
            f"CIFAR-{num_classes} (cifar-{num_classes}-binary.tar.gz, cifar-{num_classes}-python.tar.gz "
            "or their extracted folders)",
        )

    return read


def _read_fashion_mnist(data_dir: StrPath | None, download: bool) -> dict[str, Any]:
    data = _local_or_tfds(
        "fashion_mnist",
        data_dir,
        download,
        idx.find_idx_dir,
        idx.read_fashion_mnist,
        "Fashion-MNIST (train-images-idx3-ubyte[.gz] and the three other IDX files)",
    )
    if data["x_train"].ndim == 3:
        data["x_train"], data["x_test"] = data["x_train"][..., None], data["x_test"][..., None]
    return data


def _read_digits(data_dir: StrPath | None, download: bool) -> dict[str, Any]:
    return {**builtin.load_digits_arrays(), "pixel_scale": 1.0 / builtin.PIXEL_MAX}


def _stream_imagenet(data_dir: StrPath | None, val_size: float) -> DatasetSplits:
    from keras_ee.data import imagenet

    return imagenet.ImageNetSplits(data_dir, val_size)  # type: ignore[arg-type]  # it refuses a non-int itself


register_dataset(
    "digits",
    description="built-in default: scikit-learn's 1,797 handwritten digits, 8x8x1, 10 classes, no download",
    read=_read_digits,
    val_size=builtin.VAL_SIZE,
    augment_pad=builtin.AUGMENT_PAD,
    aliases=("sklearn_digits",),
)
register_dataset(
    "cifar10",
    description="CIFAR-10, 32x32x3, 10 classes (local official files or tensorflow_datasets)",
    read=_read_cifar(10),
    val_size=5000,
    augment_pad=4,
    augment_flip=True,
    aliases=("cifar-10",),
)
register_dataset(
    "cifar100",
    description="CIFAR-100, 32x32x3, 100 fine classes (local official files or tensorflow_datasets)",
    read=_read_cifar(100),
    val_size=5000,
    augment_pad=4,
    augment_flip=True,
    aliases=("cifar-100",),
)
register_dataset(
    "fashion_mnist",
    description="Fashion-MNIST, 28x28x1, 10 classes (IDX files or tensorflow_datasets)",
    read=_read_fashion_mnist,
    val_size=5000,
    augment_pad=2,
    augment_flip=True,
    aliases=("fashion-mnist", "fashionmnist"),
)
register_dataset(
    "imagenet",
    description="ImageNet ILSVRC 2012, 224x224x3, 1000 classes (tensorflow_datasets, manual download in data_dir)",
    stream=_stream_imagenet,
    val_size=50000,
    aliases=("imagenet2012", "ilsvrc2012"),
)
register_dataset(
    NPZ_PREFIX + "PATH",
    description="your own .npz with x_train, y_train, x_test, y_test (optional class_names)",
    read=lambda data_dir, download: npz.read_npz(""),  # never read: `get_dataset` binds the path after `npz:`
    val_size=0.1,
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

    Sources, by name (see `list_datasets()`, `keras-ee datasets`):

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
    spec = get_dataset(name)
    v.check_int("seed", seed)
    if augment_pad is not None:
        v.check_int("augment_pad", augment_pad, 0)

    if spec.stream is not None:
        where = f"supported for the in-memory datasets, not {spec.name}"
        for option, value in (
            ("imbalance_factor", imbalance_factor),
            ("train_size", train_size),
            ("samples_per_class", samples_per_class),
        ):
            if value is not None:
                raise ValueError(f"`{option}` is {where}.")
        if meta_size is not None:
            raise ValueError(f"`meta_size` is {where} (its meta stream is the validation split).")
        if augment_pad is not None or augment_flip is not None:
            raise ValueError(f"{spec.name} uses random-resized crops; `augment_pad`/`augment_flip` do not apply.")
        return spec.stream(data_dir, spec.val_size if val_size is None else val_size)

    assert spec.read is not None  # a spec has exactly one of `read` and `stream`
    data = spec.read(data_dir, download)
    pad = spec.augment_pad
    if pad is None:
        pad = max(1, int(round(data["x_train"].shape[1] / 8)))
    if val_size is None:
        val_size = LONG_TAIL_VAL_FRACTION if imbalance_factor is not None else spec.val_size
    return build_array_splits(
        spec.name,
        data["x_train"],
        data["y_train"],
        data["x_test"],
        data["y_test"],
        data["class_names"],
        val_size,
        seed=seed,
        imbalance_factor=imbalance_factor,
        pixel_scale=data.get("pixel_scale", 1.0 / 255.0),
        augment_pad=pad if augment_pad is None else augment_pad,
        augment_flip=spec.augment_flip if augment_flip is None else bool(augment_flip),
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
    "DatasetSplits",
    "DatasetSpec",
    "build_array_splits",
    "channel_stats",
    "datasets_table",
    "default_search_dirs",
    "get_dataset",
    "list_datasets",
    "load",
    "load_configured",
    "long_tail_counts",
    "long_tail_indices",
    "register_dataset",
    "stratified_split",
]
