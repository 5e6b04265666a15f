"""Bring-your-own data: a NumPy `.npz` archive.

Required keys: `x_train`, `y_train`, `x_test`, `y_test`. Optional:
`class_names` (a 1-D array of strings, one per class).

* Images: (N, H, W) or (N, H, W, C). `uint8` pixels are scaled by 1/255;
  floating-point pixels are used as they are (expected in [0, 1], must be
  finite); any other dtype is refused.
* Labels: integers (or integral floats) >= 0, shape (N,) or (N, 1). The number
  of classes is one more than the largest label (or `len(class_names)`), and
  every test label must be a training class.
"""

import os
import zipfile

import numpy as np

REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _labels(y, key, path):
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


def _images(x, key, path):
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"{path}: `{key}` must have shape (N, H, W) or (N, H, W, C); received {x.shape}.")
    if x.dtype == np.uint8:
        return x, 1.0 / 255.0
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{path}: `{key}` holds NaN or infinite pixels.")
        return x.astype(np.float32, copy=False), 1.0
    raise TypeError(
        f"{path}: `{key}` has dtype {x.dtype}; expected uint8 (0..255) or floating-point pixels."
    )


def read_npz(path):
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
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz archive ({e}).") from e
    if not hasattr(archive, "files"):
        raise ValueError(
            f"{path}: holds a single array, expected an .npz archive with keys {', '.join(REQUIRED_KEYS)}."
        )
    with archive:
        missing = [k for k in REQUIRED_KEYS if k not in archive.files]
        if missing:
            found = ", ".join(archive.files) or "none"
            raise ValueError(f"{path}: missing key(s) {', '.join(missing)}; found {found}.")
        try:
            raw = {k: archive[k] for k in archive.files if k in REQUIRED_KEYS + ("class_names",)}
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
            raise ValueError(f"{path}: could not read the arrays ({e}); the file is truncated or corrupted.") from e
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
    if "class_names" in raw:
        names = np.asarray(raw["class_names"])
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise ValueError(
                f"{path}: `class_names` must be a 1-D array of strings; received {names.dtype} {names.shape}."
            )
        class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
        num_classes = len(class_names)
        if y_train.max() >= num_classes:
            raise ValueError(
                f"{path}: `y_train` holds label {int(y_train.max())} but `class_names` lists {num_classes} classes."
            )
    else:
        num_classes = int(y_train.max()) + 1
        class_names = [str(i) for i in range(num_classes)]
    if num_classes < 2:
        raise ValueError(f"{path}: found {num_classes} class; expected at least 2.")
    if y_test.size and y_test.max() >= num_classes:
        raise ValueError(
            f"{path}: `y_test` holds label {int(y_test.max())}, but the training labels "
            f"only cover classes 0..{num_classes - 1}."
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
