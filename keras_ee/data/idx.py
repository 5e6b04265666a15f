"""IDX files (MNIST / Fashion-MNIST format), gzip-compressed or plain.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the
number of dimensions), one big-endian uint32 per dimension, then the data in
row-major order. Compression is detected from the gzip magic bytes, not from
the file name.
"""

import gzip
import math
import os
import zlib
from collections.abc import Iterable
from typing import Any

import numpy as np

from keras_ee._typing import StrPath

# IDX type code -> NumPy dtype (multi-byte types are big-endian).
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# Official file stems; each may end in ".gz" or not.
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

EXPECTED_COUNTS = {"train": 60000, "test": 10000}

# Where Debian's `dataset-fashion-mnist` package installs the files.
SYSTEM_DIRS = ["/usr/share/datasets/fashion-mnist"]


def parse_idx(data: bytes, where: str = "<bytes>") -> np.ndarray:
    """Decodes the bytes of an IDX file.

    Args:
        data: bytes, gzip-compressed or not.
        where: str. File name used in error messages.

    Returns:
        np.ndarray with the file's shape and dtype (native byte order).

    Example:

    ```python
    labels = parse_idx(open("t10k-labels-idx1-ubyte", "rb").read())
    ```
    """
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(
                f"{where}: could not decompress the gzip stream ({e}); the file is truncated or corrupted."
            ) from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(
            f"{where}: not an IDX file (magic bytes {data[:4].hex() or 'missing'}; expected 00 00 <type 08-0e> <ndim>)."
        )
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{where}: truncated IDX header ({len(data)} bytes, {ndim} dims).")
    shape = tuple(int(d) for d in np.frombuffer(data[4:header], ">u4"))
    expected = math.prod(shape) * dtype.itemsize  # exact: np.prod would overflow int64 on bogus headers
    if len(data) - header != expected:
        raise ValueError(
            f"{where}: holds {len(data) - header} data bytes, expected {expected} for "
            f"shape {shape} of {dtype}. The file is truncated or corrupted."
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: StrPath) -> np.ndarray:
    """Reads an IDX file (gzip or plain) from disk. See `parse_idx`."""
    with open(path, "rb") as f:
        return parse_idx(f.read(), str(path))


def _locate(directory: str, stem: str) -> str | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def find_idx_dir(directories: Iterable[StrPath]) -> str | None:
    """First directory holding all four Fashion-MNIST IDX files, or None."""
    for directory in directories:
        directory = os.path.expanduser(str(directory))
        subdirs = ("fashion-mnist", "fashion_mnist")
        for candidate in [directory] + [os.path.join(directory, s) for s in subdirs]:
            if all(_locate(candidate, s) for s in FASHION_MNIST_FILES.values()):
                return candidate
    return None


def read_fashion_mnist(
    directory: StrPath, num_classes: int = 10, expected_counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """Reads the four Fashion-MNIST IDX files of a directory.

    Args:
        directory: str. Folder holding `train-images-idx3-ubyte[.gz]`,
            `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]` and
            `t10k-labels-idx1-ubyte[.gz]`.
        num_classes: int. Labels must lie in [0, num_classes).
        expected_counts: dict `{"train": int, "test": int}` or None (the
            official 60,000 / 10,000; `{}` accepts any count).

    Returns:
        dict with `x_train` uint8 (N, 28, 28, 1), `y_train` int64, `x_test`,
        `y_test`, `class_names` and `source`.
    """
    directory = os.path.expanduser(str(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No such directory: {directory} (expected the Fashion-MNIST IDX files).")
    if expected_counts is None:
        expected_counts = EXPECTED_COUNTS
    out: dict[str, Any] = {}
    for key, stem in FASHION_MNIST_FILES.items():
        path = _locate(directory, stem)
        if path is None:
            raise FileNotFoundError(
                f"{directory}: missing {stem}.gz (or {stem}); expected the four "
                f"Fashion-MNIST IDX files {', '.join(FASHION_MNIST_FILES.values())}."
            )
        out[key] = (path, read_idx(path))
    for part in ("train", "test"):
        (x_path, x), (y_path, y) = out[f"x_{part}"], out[f"y_{part}"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise ValueError(f"{x_path}: expected uint8 images of shape (N, H, W); received {x.dtype} {x.shape}.")
        if y.ndim != 1 or y.dtype != np.uint8:
            raise ValueError(f"{y_path}: expected uint8 labels of shape (N,); received {y.dtype} {y.shape}.")
        if len(x) != len(y):
            raise ValueError(f"{x_path} holds {len(x)} images but {y_path} holds {len(y)} labels.")
        count = expected_counts.get(part)
        if count is not None and len(x) != count:
            raise ValueError(
                f"{x_path}: holds {len(x)} images, expected {count}. The file is truncated or not the official one."
            )
        if len(y) and y.max() >= num_classes:
            bad = int(np.argmax(y >= num_classes))
            raise ValueError(
                f"{y_path}: label {int(y[bad])} at index {bad}, expected labels in [0, {num_classes}). "
                "The file is mislabelled."
            )
        out[f"x_{part}"] = x[..., None]
        out[f"y_{part}"] = y.astype(np.int64)
    out["class_names"] = list(FASHION_MNIST_CLASSES) if num_classes == 10 else [str(i) for i in range(num_classes)]
    out["source"] = directory
    return out
