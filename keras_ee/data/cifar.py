"""CIFAR-10 and CIFAR-100 from the official files, or through tensorflow_datasets.

Both official layouts are read, from the archive (read in one streaming pass
with `tarfile`, nothing is extracted to disk) or from the extracted folder:

* binary (`cifar-10-binary.tar.gz` -> `cifar-10-batches-bin/data_batch_{1..5}.bin`,
  `test_batch.bin`, `batches.meta.txt`; `cifar-100-binary.tar.gz` ->
  `cifar-100-binary/train.bin`, `test.bin`, `fine_label_names.txt`). A record
  is the label byte(s) (CIFAR-100: coarse then fine) and 3,072 pixel bytes,
  the 32x32 red, green and blue planes in row-major order.
* python pickle (`cifar-10-python.tar.gz` -> `cifar-10-batches-py/data_batch_*`,
  `test_batch`, `batches.meta`; `cifar-100-python.tar.gz` ->
  `cifar-100-python/train`, `test`, `meta`). The pickles are read with an
  unpickler that only admits NumPy arrays, so a hostile file cannot run code.

CIFAR-100 uses the 100 fine labels.
"""

import gzip
import io
import os
import pickle
import socket
import tarfile
import threading
import warnings
from collections.abc import Iterable
from typing import IO, Any, cast

import numpy as np

from keras_ee import validation as v
from keras_ee._typing import StrPath

IMAGE_BYTES = 32 * 32 * 3

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip

# Records per file in the official releases; a file with fewer is truncated.
EXPECTED_COUNTS = {
    10: {"train": 50000, "test": 10000},
    100: {"train": 50000, "test": 10000},
}

# File names inside each official layout, by role.
_LAYOUTS: dict[tuple[int, str], dict[str, Any]] = {
    (10, "binary"): {
        "folder": "cifar-10-batches-bin",
        "archive": "cifar-10-binary.tar.gz",
        "train": [f"data_batch_{i}.bin" for i in range(1, 6)],
        "test": ["test_batch.bin"],
        "meta": "batches.meta.txt",
    },
    (10, "python"): {
        "folder": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
    },
    (100, "binary"): {
        "folder": "cifar-100-binary",
        "archive": "cifar-100-binary.tar.gz",
        "train": ["train.bin"],
        "test": ["test.bin"],
        "meta": "fine_label_names.txt",
    },
    (100, "python"): {
        "folder": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
    },
}


# --------------------------------------------------------------------------- sources


class _FolderSource:
    """Files of an extracted folder, by base name."""

    def __init__(self, folder: str) -> None:
        self.where = str(folder)
        self._folder = folder

    def has(self, name: str) -> bool:
        return os.path.isfile(os.path.join(self._folder, name))

    def read(self, names: Iterable[str]) -> dict[str, bytes]:
        out = {}
        for name in names:
            path = os.path.join(self._folder, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    out[name] = f.read()
        return out

    def describe(self, name: str) -> str:
        return os.path.join(self._folder, name)


class _ArchiveSource:
    """Files of a tar archive (any compression), by base name."""

    def __init__(self, path: str) -> None:
        self.where = str(path)
        self._path = path

    def read(self, names: Iterable[str]) -> dict[str, bytes]:
        # One streaming pass ("r|*"): a gzip stream cannot seek back cheaply,
        # so collect every wanted member while going through it once.
        wanted = set(names)
        out: dict[str, bytes] = {}
        try:
            with tarfile.open(self._path, mode="r|*") as tar:
                for member in tar:
                    base = os.path.basename(member.name)
                    if member.isfile() and base in wanted and base not in out:
                        out[base] = cast(IO[bytes], tar.extractfile(member)).read()  # a file: never None
                        if len(out) == len(wanted):
                            break
        except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile) as e:
            raise ValueError(
                f"Could not read the archive {self._path}: {e}. Expected a complete "
                "tar archive (e.g. the official cifar-*-binary.tar.gz); it may be "
                "truncated or corrupted."
            ) from e
        return out

    def describe(self, name: str) -> str:
        return f"{self._path}:{name}"


def _folder_layout(folder: str, num_classes: int) -> str | None:
    """The layout whose training files are all in `folder`, or None."""
    for fmt in ("binary", "python"):
        layout = _LAYOUTS[(num_classes, fmt)]
        if os.path.isfile(os.path.join(folder, layout["train"][0])):
            return fmt
    return None


def find_cifar(num_classes: int, directories: Iterable[StrPath]) -> tuple[str, str, str] | None:
    """Locates an official CIFAR copy in the given directories.

    Looks, in each directory in turn, for the extracted folders
    (`cifar-100-binary/`, `cifar-100-python/`, `cifar-10-batches-bin/`,
    `cifar-10-batches-py/`, also one level down, as Keras' cache keeps them),
    for the archives (`cifar-*-binary.tar.gz`, `cifar-*-python.tar.gz`), and
    for the data files directly inside the directory. A directory argument
    may also be the archive file itself.

    Args:
        num_classes: int, 10 or 100.
        directories: list of paths.

    Returns:
        `(path, format, kind)` with format "binary" or "python" and kind
        "folder" or "archive", or None when nothing was found.
    """
    v.check_choice("num_classes", num_classes, (10, 100))
    for directory in directories:
        directory = os.path.expanduser(str(directory))
        if os.path.isfile(directory):
            fmt = "python" if "python" in os.path.basename(directory) else "binary"
            return directory, fmt, "archive"  # read_cifar re-detects the format
        if not os.path.isdir(directory):
            continue
        folder_fmt = _folder_layout(directory, num_classes)
        if folder_fmt:
            return directory, folder_fmt, "folder"
        for fmt in ("binary", "python"):
            layout = _LAYOUTS[(num_classes, fmt)]
            candidates = [os.path.join(directory, layout["folder"])]
            try:
                candidates += [
                    os.path.join(directory, sub, layout["folder"])
                    for sub in sorted(os.listdir(directory))
                    if os.path.isdir(os.path.join(directory, sub))
                ]
            except OSError:
                pass
            for folder in candidates:
                if _folder_layout(folder, num_classes) == fmt:
                    return folder, fmt, "folder"
            archive = os.path.join(directory, layout["archive"])
            if os.path.isfile(archive):
                return archive, fmt, "archive"
    return None


# --------------------------------------------------------------------------- parsing


def parse_binary(
    data: bytes, num_classes: int, where: str, expected: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Parses records of the official CIFAR binary format.

    Args:
        data: bytes of one file.
        num_classes: int, 10 or 100.
        where: str. File name used in error messages.
        expected: int, optional. Exact number of records the file must hold.

    Returns:
        `(images, labels)`: uint8 (N, 32, 32, 3) and int64 (N,) (fine labels
        for CIFAR-100).
    """
    v.check_choice("num_classes", num_classes, (10, 100))
    label_bytes = 1 if num_classes == 10 else 2
    record = label_bytes + IMAGE_BYTES
    if len(data) == 0 or len(data) % record:
        raise ValueError(
            f"{where}: {len(data)} bytes is not a positive multiple of the "
            f"{record}-byte CIFAR-{num_classes} binary record "
            f"({label_bytes} label byte(s) + {IMAGE_BYTES} pixels). The file is "
            "truncated or not in the CIFAR binary format."
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, record)
    if expected is not None and len(records) != expected:
        raise ValueError(
            f"{where}: holds {len(records)} records, expected {expected}. The file "
            "is truncated or not the official one."
        )
    labels = records[:, label_bytes - 1].astype(np.int64)
    if num_classes == 100:
        coarse = records[:, 0]
        if coarse.max() >= 20:
            raise ValueError(
                f"{where}: coarse label {int(coarse.max())} out of range [0, 20). "
                "The file is mislabelled or not in the CIFAR-100 binary format."
            )
    if labels.max() >= num_classes:
        bad = int(np.argmax(labels >= num_classes))
        raise ValueError(
            f"{where}: record {bad} has label {int(labels[bad])}, expected a label in "
            f"[0, {num_classes}). The file is mislabelled or not in the "
            f"CIFAR-{num_classes} binary format."
        )
    images = records[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that only reconstructs NumPy arrays (no arbitrary code)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        # Python 3 writes bytes with protocol 2 as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"Refusing to load {module}.{name}: a CIFAR pickle holds only NumPy arrays, lists, strings and numbers."
            )
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def _unpickle(data: bytes, where: str) -> dict[str, Any]:
    try:
        obj = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # Any failure means: not a readable CIFAR pickle.
        raise ValueError(
            f"{where}: could not be read as a CIFAR python pickle ({e}). The file is "
            "truncated or not in the official cifar-*-python format."
        ) from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a pickled dict, received {type(obj).__name__}.")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def parse_pickle(
    data: bytes, num_classes: int, where: str, expected: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Parses one batch of the official CIFAR python-pickle format.

    Args:
        data: bytes of one pickle file.
        num_classes: int, 10 or 100.
        where: str. File name used in error messages.
        expected: int, optional. Exact number of images the batch must hold.

    Returns:
        `(images, labels)`: uint8 (N, 32, 32, 3) and int64 (N,).
    """
    v.check_choice("num_classes", num_classes, (10, 100))
    batch = _unpickle(data, where)
    label_key = "labels" if num_classes == 10 else "fine_labels"
    for key in ("data", label_key):
        if key not in batch:
            raise ValueError(
                f"{where}: missing key {key!r}; found keys {sorted(batch)}. Expected "
                f"a CIFAR-{num_classes} python batch."
            )
    pixels = batch["data"]
    if (
        not isinstance(pixels, np.ndarray)
        or pixels.dtype != np.uint8
        or pixels.ndim != 2
        or pixels.shape[1] != IMAGE_BYTES
    ):
        desc = (
            f"{pixels.dtype} array of shape {pixels.shape}" if isinstance(pixels, np.ndarray) else type(pixels).__name__
        )
        raise ValueError(f"{where}: 'data' must be a uint8 array of shape (N, {IMAGE_BYTES}); received a {desc}.")
    labels = np.asarray(batch[label_key])
    if labels.ndim != 1 or len(labels) != len(pixels) or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(
            f"{where}: {label_key!r} must be {len(pixels)} integer labels (one per "
            f"image); received {labels.dtype} of shape {labels.shape}."
        )
    if expected is not None and len(pixels) != expected:
        raise ValueError(
            f"{where}: holds {len(pixels)} images, expected {expected}. The file is truncated or not the official one."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(np.argmax((labels < 0) | (labels >= num_classes)))
        raise ValueError(
            f"{where}: image {bad} has label {int(labels[bad])}, expected a label in "
            f"[0, {num_classes}). The file is mislabelled."
        )
    images = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _parse_names(data: bytes, fmt: str, num_classes: int, where: str) -> list[str]:
    if fmt == "binary":
        names = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
        names = [n for n in names if n]
    else:
        meta = _unpickle(data, where)
        key = "label_names" if num_classes == 10 else "fine_label_names"
        if key not in meta:
            raise ValueError(f"{where}: missing key {key!r}; found keys {sorted(meta)}.")
        raw = meta[key]
        if isinstance(raw, np.ndarray):
            raw = raw.tolist() if raw.ndim == 1 else None
        if not isinstance(raw, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in raw):
            raise ValueError(
                f"{where}: {key!r} must be a list of {num_classes} class-name strings; "
                f"received {type(meta[key]).__name__}."
            )
        try:
            names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in raw]
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: a class name in {key!r} is not UTF-8 ({e}).") from None
    if len(names) != num_classes:
        raise ValueError(f"{where}: lists {len(names)} class names, expected {num_classes}.")
    return names


def read_cifar(
    path: StrPath, num_classes: int, fmt: str | None = None, expected_counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """Reads an official CIFAR copy (archive or extracted folder).

    Args:
        path: str. The archive (`cifar-100-binary.tar.gz`, ...), the extracted
            folder (`cifar-100-binary/`, ...), or a directory holding either.
        num_classes: int, 10 or 100.
        fmt: "binary", "python" or None (detected).
        expected_counts: dict `{"train": int, "test": int}` or None. Exact
            numbers of training and test images; defaults to the official
            ones (`EXPECTED_COUNTS`), so a truncated file is an error. Pass
            `{}` to accept any count.

    Returns:
        dict with `x_train` uint8 (N, 32, 32, 3), `y_train` int64 (N,),
        `x_test`, `y_test`, `class_names` and `source` (where it was read).

    Example:

    ```python
    data = read_cifar("~/datasets/cifar-100-binary.tar.gz", 100)
    data["x_train"].shape  # (50000, 32, 32, 3)
    ```
    """
    v.check_choice("num_classes", num_classes, (10, 100))
    if fmt not in (None, "binary", "python"):
        raise ValueError(f"Expected `fmt` 'binary', 'python' or None. Received {fmt!r}.")
    path = os.path.expanduser(str(path))
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No such file or directory: {path} (expected a CIFAR-{num_classes} archive or folder)."
        )
    if os.path.isdir(path):
        found = find_cifar(num_classes, [path])
        if found is None:
            raise FileNotFoundError(
                f"No CIFAR-{num_classes} data found in {path}. Expected "
                + " or ".join(
                    f"{_LAYOUTS[(num_classes, f)]['archive']}, {_LAYOUTS[(num_classes, f)]['folder']}/"
                    for f in ("binary", "python")
                )
                + ", or the data files themselves."
            )
        path, detected, kind = found
        fmt = fmt or detected
        source: _FolderSource | _ArchiveSource = _FolderSource(path) if kind == "folder" else _ArchiveSource(path)
    else:
        source = _ArchiveSource(path)
    formats = [fmt] if fmt else ["binary", "python"]
    wanted = []
    for f in formats:
        layout = _LAYOUTS[(num_classes, f)]
        wanted += layout["train"] + layout["test"] + [layout["meta"]]
    files = source.read(wanted)
    if fmt is None:
        # An archive of either layout: the one whose data files it holds.
        fmt = next(
            (f for f in formats if all(n in files for n in _LAYOUTS[(num_classes, f)]["train"])),
            "binary",
        )
    layout = _LAYOUTS[(num_classes, fmt)]
    missing = [n for n in layout["train"] + layout["test"] if n not in files]
    if missing:
        raise FileNotFoundError(
            f"{source.where}: missing {', '.join(missing)} of the CIFAR-{num_classes} "
            f"{fmt} layout (expected {', '.join(layout['train'] + layout['test'])})."
        )
    if expected_counts is None:
        expected_counts = EXPECTED_COUNTS[num_classes]
    parse = parse_binary if fmt == "binary" else parse_pickle
    out: dict[str, Any] = {}
    for part in ("train", "test"):
        total = expected_counts.get(part)
        per_file = None
        if total is not None:
            if total % len(layout[part]):
                raise ValueError(f"Expected {part} count {total} to split evenly over {len(layout[part])} files.")
            per_file = total // len(layout[part])
        parsed = [parse(files.pop(n), num_classes, source.describe(n), per_file) for n in layout[part]]
        out[f"x_{part}"] = np.concatenate([p[0] for p in parsed])
        out[f"y_{part}"] = np.concatenate([p[1] for p in parsed])
    if layout["meta"] in files:
        out["class_names"] = _parse_names(files[layout["meta"]], fmt, num_classes, source.describe(layout["meta"]))
    elif num_classes == 10:
        out["class_names"] = list(CIFAR10_CLASSES)
    else:
        warnings.warn(
            f"{source.describe(layout['meta'])} is missing: CIFAR-100 classes are named class_0 ... class_99.",
            stacklevel=2,
        )
        out["class_names"] = [f"class_{i}" for i in range(100)]
    out["source"] = source.where
    return out


# --------------------------------------------------------------------------- tfds


def can_reach(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to `host` opens within about `timeout` seconds.

    The whole check, name resolution included, runs in a daemon thread: a
    socket timeout does not bound a DNS lookup, which can hang when offline.
    """
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def load_tfds_arrays(tfds_name: str, data_dir: StrPath | None = None, download: bool = True) -> dict[str, Any]:
    """Loads a small image dataset with tensorflow_datasets into arrays.

    Uses an already prepared copy when there is one; otherwise downloads and
    prepares it, but only after a quick reachability check of the CIFAR host
    (so an offline machine gets an error in seconds instead of hanging).

    Args:
        tfds_name: str, e.g. "cifar10", "cifar100", "fashion_mnist".
        data_dir: str or None. tensorflow_datasets data directory.
        download: bool. Allow downloading.

    Returns:
        dict with `x_train`, `y_train`, `x_test`, `y_test`, `class_names`,
        `source`.

    Raises:
        FileNotFoundError: the dataset is not prepared and cannot be
            downloaded.
    """
    import tensorflow_datasets as tfds

    builder = tfds.builder(tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        hosts = {
            "cifar10": "www.cs.toronto.edu",
            "cifar100": "www.cs.toronto.edu",
            "fashion_mnist": "fashion-mnist.s3-website.eu-central-1.amazonaws.com",
        }
        host = hosts.get(tfds_name, "storage.googleapis.com")
        if not download:
            raise FileNotFoundError(
                f"tensorflow_datasets has no prepared {tfds_name} in {builder.data_dir} and downloading is disabled."
            )
        if not can_reach(host, 443 if tfds_name != "fashion_mnist" else 80):
            raise FileNotFoundError(
                f"tensorflow_datasets has no prepared {tfds_name} in "
                f"{builder.data_dir} and {host} cannot be reached (offline?)."
            )
        builder.download_and_prepare()
    out: dict[str, Any] = {}
    for part, split in (("train", "train"), ("test", "test")):
        arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        out[f"x_{part}"] = np.asarray(arrays["image"], np.uint8)
        out[f"y_{part}"] = np.asarray(arrays["label"], np.int64)
    out["class_names"] = list(builder.info.features["label"].names)
    out["source"] = f"tensorflow_datasets:{tfds_name} ({builder.data_dir})"
    return out
