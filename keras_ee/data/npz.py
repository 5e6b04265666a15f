"""Bring-your-own data: a NumPy `.npz` archive.

Required keys: `x_train`, `y_train`, `x_test`, `y_test`. Optional:
`class_names` (a 1-D array of strings, one per class) and `num_classes` (an
integer >= 2, e.g. `np.savez(..., num_classes=10)`).

* The file must be a real `.npz`, i.e. a zip archive of `.npy` arrays as
  `np.savez` / `np.savez_compressed` write it, without pickled objects; an
  empty, truncated or non-zip file (a renamed text or pickle file) is refused.
* Images: (N, H, W) or (N, H, W, C). `uint8` pixels are scaled by 1/255;
  floating-point pixels are used as they are and must be finite and within
  [-255, 255] (this admits [0, 1], [-1, 1], standardized values and 0..255
  floats, and catches corrupted values such as 1e38); any other dtype is
  refused.
* Labels: integers (or integral floats) >= 0, shape (N,) or (N, 1).
* Number of classes: `num_classes`, else `len(class_names)`, else one more
  than the largest training label. When it is inferred from the labels, every
  class 0..max must have a training sample: sparse labels (say 0, 1 and
  100000) are refused rather than building a 100,001-class model; if such
  empty classes are real, store `num_classes` (or `class_names`), and the file
  is then accepted with a `UserWarning` naming how many classes have no
  training sample. `num_classes` must be >= max label + 1 and agree with
  `class_names` when both are given; every test label must be below it.
"""

import os
import warnings
import zipfile
from typing import Any

import numpy as np

from keras_ee._typing import StrPath

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL_KEYS = ("class_names", "num_classes")
# Float pixels beyond this magnitude are corrupt, not a pixel convention.
MAX_FLOAT_PIXEL = 255.0
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive


def _labels(y: object, key: str, path: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"{path}: `{key}` must have shape (N,) or (N, 1); received {y.shape}.")
    if y.size and np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{path}: `{key}` holds non-integer values; expected class indices.")
        y = y.astype(np.int64)
    elif y.size and not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{path}: `{key}` must hold integer class indices; received dtype {y.dtype}.")
    y = y.astype(np.int64)
    if y.size and y.min() < 0:
        raise ValueError(f"{path}: `{key}` holds the negative label {int(y.min())}; expected labels >= 0.")
    return y


def _images(x: object, key: str, path: str) -> tuple[np.ndarray, float]:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{path}: `{key}` must have shape (N, H, W) or (N, H, W, C); received {x.shape}.")
    if x.dtype == np.uint8:
        return x, 1.0 / 255.0
    if np.issubdtype(x.dtype, np.floating):
        if x.size:
            # min/max propagate NaN and inf, so two reductions check everything.
            lo, hi = float(x.min()), float(x.max())
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise ValueError(f"{path}: `{key}` holds NaN or infinite pixels; expected finite values.")
            peak = max(abs(lo), abs(hi))
            if peak > MAX_FLOAT_PIXEL:
                raise ValueError(
                    f"{path}: `{key}` holds float pixels of magnitude up to {peak:g}; expected values in "
                    f"[-{MAX_FLOAT_PIXEL:g}, {MAX_FLOAT_PIXEL:g}] ([0, 1], [-1, 1], standardized or 0..255)."
                )
        return x.astype(np.float32, copy=False), 1.0
    raise TypeError(f"{path}: `{key}` has dtype {x.dtype}; expected uint8 (0..255) or floating-point pixels.")


_DATASET_KEYS = f"keys {', '.join(REQUIRED_KEYS)}"
_DATASET_EXAMPLE = "np.savez(path, x_train=..., ...)"


def open_archive(path: StrPath, expected: str = _DATASET_KEYS, example: str = _DATASET_EXAMPLE) -> Any:
    """np.load of an .npz, with the file checked to be a zip archive first (never unpickled).

    The one reader of user .npz files (a dataset, `keras-ee predict --images`): an empty,
    truncated or non-zip file, or a single .npy array, is a ValueError naming the file and
    `expected` (what it should hold, e.g. "keys x_train, ...") and `example` (how to write it).
    """
    size = os.path.getsize(path)
    if size == 0:
        raise ValueError(
            f"{path}: the file is empty (0 bytes); expected an .npz (zip) archive with {expected}, as "
            "np.savez writes it."
        )
    with open(path, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise ValueError(
            f"{path}: holds a single .npy array, not an .npz archive; expected an .npz with {expected} "
            f"(write it with {example})."
        )
    if head[:4] not in _ZIP_MAGICS:
        raise ValueError(
            f"{path}: not a readable .npz file: it is not an .npz (zip) archive (it starts with "
            f"{head[:4]!r}, a zip starts with b'PK\\x03\\x04'); expected {expected} as np.savez writes them."
        )
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path}: not a readable .npz archive ({_one_line(e)}); the zip file is truncated or corrupted."
        ) from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def read_member(
    archive: Any, key: str, path: StrPath, expected: str = "a numeric (or, for class_names, string) array"
) -> np.ndarray:
    """`archive[key]` of an `open_archive`: pickled objects (a TypeError) and torn members (a
    ValueError) name the file, the key and `expected`."""
    try:
        return archive[key]
    except ValueError as e:
        if "pickle" in str(e):
            raise TypeError(
                f"{path}: `{key}` holds Python objects (pickled data), which are never loaded; expected {expected}."
            ) from None
        raise ValueError(
            f"{path}: could not read `{key}` ({_one_line(e)}); the file is truncated or corrupted."
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(
            f"{path}: could not read `{key}` ({_one_line(e)}); the file is truncated or corrupted."
        ) from None


def _num_classes(value: object, path: str) -> int:
    v = np.asarray(value)
    if v.size != 1 or v.ndim > 1 or v.dtype == np.bool_ or not np.issubdtype(v.dtype, np.integer):
        raise TypeError(
            f"{path}: `num_classes` must be an integer >= 2 (e.g. np.savez(..., num_classes=10)); "
            f"received {v.dtype} {v.shape} {v.reshape(-1)[:3].tolist()}."
        )
    n = int(v.reshape(-1)[0])
    if n < 2:
        raise ValueError(f"{path}: `num_classes` is {n}; expected an integer >= 2.")
    return n


def read_npz(path: StrPath) -> dict[str, Any]:
    """Reads and validates a user `.npz` dataset.

    Args:
        path: str. The `.npz` file.

    Returns:
        dict with `x_train`, `y_train`, `x_test`, `y_test`, `class_names`,
        `pixel_scale` and `source`.

    Example:

    ```python
    np.savez("mine.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    data = read_npz("mine.npz")
    ```
    """
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such file: {path} (expected an .npz with keys {', '.join(REQUIRED_KEYS)}).")
    archive = open_archive(path)
    if not hasattr(archive, "files"):
        raise ValueError(
            f"{path}: holds a single array, expected an .npz archive with keys {', '.join(REQUIRED_KEYS)}."
        )
    with archive:
        missing = [k for k in REQUIRED_KEYS if k not in archive.files]
        if missing:
            found = ", ".join(archive.files) or "none"
            raise ValueError(f"{path}: missing key(s) {', '.join(missing)}; found {found}.")
        raw = {k: read_member(archive, k, path) for k in archive.files if k in REQUIRED_KEYS + OPTIONAL_KEYS}
    x_train, scale = _images(raw["x_train"], "x_train", path)
    x_test, test_scale = _images(raw["x_test"], "x_test", path)
    if scale != test_scale:
        raise TypeError(
            f"{path}: `x_train` is {raw['x_train'].dtype} but `x_test` is {raw['x_test'].dtype}; "
            "expected the same pixel type."
        )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"{path}: train images are {x_train.shape[1:]} but test images are {x_test.shape[1:]}.")
    if x_train.shape[0] == 0:
        raise ValueError(f"{path}: `x_train` is empty.")
    y_train = _labels(raw["y_train"], "y_train", path)
    y_test = _labels(raw["y_test"], "y_test", path)
    for part, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise ValueError(f"{path}: {len(x)} {part} images but {len(y)} {part} labels.")
    class_names = None
    if "class_names" in raw:
        names = np.asarray(raw["class_names"])
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise ValueError(
                f"{path}: `class_names` must be a 1-D array of strings; received {names.dtype} {names.shape}."
            )
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
    top = int(y_train.max())
    present = np.unique(y_train)  # sorted classes that have a training sample
    if "num_classes" in raw:
        num_classes = _num_classes(raw["num_classes"], path)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"{path}: `num_classes` is {num_classes} but `class_names` lists {len(class_names)} names; "
                "expected them to agree."
            )
        if top >= num_classes:
            raise ValueError(
                f"{path}: `y_train` holds label {top} but `num_classes` is {num_classes}; expected "
                f"num_classes >= max label + 1 = {top + 1}."
            )
        source = "`num_classes`"
    elif class_names is not None:
        num_classes = len(class_names)
        if top >= num_classes:
            raise ValueError(f"{path}: `y_train` holds label {top} but `class_names` lists {num_classes} classes.")
        source = "`class_names`"
    else:
        num_classes = top + 1
        if len(present) < num_classes:
            gaps = np.flatnonzero(present != np.arange(len(present)))
            first_empty = int(gaps[0]) if gaps.size else len(present)
            raise ValueError(
                f"{path}: the class count is inferred as max label + 1 = {num_classes} (`y_train` holds label "
                f"{top}), but only {len(present)} of those classes have a training sample "
                f"({num_classes - len(present)} "
                f"have no training sample, the first is class {first_empty}); relabel the classes 0..K-1, or, if "
                "the empty classes are real, store `num_classes` (np.savez(..., num_classes=N)) or `class_names`."
            )
        source = None
    if num_classes < 2:
        raise ValueError(f"{path}: found {num_classes} class; expected at least 2.")
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    if y_test.size and y_test.max() >= num_classes:
        covered = "the training labels only cover" if source is None else f"{source} only allows"
        raise ValueError(
            f"{path}: `y_test` holds label {int(y_test.max())}, but {covered} classes 0..{num_classes - 1}."
        )
    if source is not None:
        empty = num_classes - len(present)
        if empty:
            warnings.warn(
                f"{path}: {empty} of the {num_classes} classes (from {source}) have no training sample; "
                "the model gets an output for each of them, but cannot learn them.",
                UserWarning,
                stacklevel=2,
            )
    return {
        "x_train": x_train,
        "y_train": y_train,
        "x_test": x_test,
        "y_test": y_test,
        "class_names": class_names,
        "pixel_scale": scale,
        "source": path,
    }
