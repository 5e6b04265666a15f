"""keras_ee.data: loaders on generated files in the official formats, error paths,
splits, long tail, pipelines; and on the real files in ../shared/data when present."""

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from keras_ee import data
from keras_ee.data import cifar, idx, npz, pipeline, splits

SHARED = Path(os.environ.get("KERAS_EE_SHARED_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


# ------------------------------------------------------------------ file generators


def _cifar_arrays(n, num_classes, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = np.arange(n) % num_classes  # balanced
    rng.shuffle(y)
    return x, y.astype(np.int64)


def _binary_bytes(x, y, num_classes):
    planes = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # R, G, B planes, row-major
    if num_classes == 10:
        labels = y[:, None]
    else:
        labels = np.stack([y // 5, y], axis=1)  # coarse, fine
    return np.concatenate([labels.astype(np.uint8), planes], axis=1).tobytes()


def _pickle_bytes(x, y, num_classes):
    batch = {b"batch_label": b"generated", b"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1)}
    batch[b"labels" if num_classes == 10 else b"fine_labels"] = [int(v) for v in y]
    if num_classes == 100:
        batch[b"coarse_labels"] = [int(v) // 5 for v in y]
    return pickle.dumps(batch, protocol=2)


def _names_bytes(fmt, num_classes):
    names = [f"c{i}" for i in range(num_classes)]
    if fmt == "binary":
        return ("\n".join(names) + "\n\n").encode()
    key = b"label_names" if num_classes == 10 else b"fine_label_names"
    return pickle.dumps({key: [n.encode() for n in names]}, protocol=2)


def write_cifar(root, num_classes, fmt, kind, n_train=100, n_test=40, seed=0):
    """Writes a small CIFAR copy in an official layout; returns (path, arrays)."""
    layout = cifar._LAYOUTS[(num_classes, fmt)]
    x_tr, y_tr = _cifar_arrays(n_train, num_classes, seed)
    x_te, y_te = _cifar_arrays(n_test, num_classes, seed + 1)
    encode = _binary_bytes if fmt == "binary" else _pickle_bytes
    files = {}
    chunks = np.array_split(np.arange(n_train), len(layout["train"]))
    for name, chunk in zip(layout["train"], chunks):
        files[name] = encode(x_tr[chunk], y_tr[chunk], num_classes)
    files[layout["test"][0]] = encode(x_te, y_te, num_classes)
    files[layout["meta"]] = _names_bytes(fmt, num_classes)
    root = Path(root)
    if kind == "folder":
        folder = root / layout["folder"]
        folder.mkdir(parents=True)
        for name, blob in files.items():
            (folder / name).write_bytes(blob)
        path = folder
    else:
        root.mkdir(parents=True, exist_ok=True)
        path = root / layout["archive"]
        with tarfile.open(path, "w:gz") as tar:
            for name, blob in files.items():
                info = tarfile.TarInfo(f"{layout['folder']}/{name}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    return path, (x_tr, y_tr, x_te, y_te)


def idx_bytes(array):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.tobytes()


def write_fashion(root, n_train=60, n_test=20, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for key, stem in idx.FASHION_MNIST_FILES.items():
        blob = idx_bytes(arrays[key])
        if gz:
            (root / (stem + ".gz")).write_bytes(gzip.compress(blob))
        else:
            (root / stem).write_bytes(blob)
    return arrays


SMALL = {"train": 100, "test": 40}


@pytest.fixture
def small_counts(monkeypatch):
    """`load` checks the official record counts; generated files are smaller."""
    monkeypatch.setitem(cifar.EXPECTED_COUNTS, 10, SMALL)
    monkeypatch.setitem(cifar.EXPECTED_COUNTS, 100, SMALL)
    monkeypatch.setattr(idx, "EXPECTED_COUNTS", {"train": 60, "test": 20})


# ------------------------------------------------------------------ splits


def test_stratified_split_is_disjoint_proportional_and_seeded():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])  # sorted by class, like the shared copy
    rest, held = splits.stratified_split(labels, 100, seed=3)
    assert len(held) == 100 and len(rest) == 900
    assert np.array_equal(np.sort(np.concatenate([rest, held])), np.arange(1000))
    np.testing.assert_array_equal(np.bincount(labels[held]), [40, 30, 20, 10])
    # Seeded: same seed, same split; other seed, other split.
    rest2, held2 = splits.stratified_split(labels, 100, seed=3)
    assert np.array_equal(held, held2) and np.array_equal(rest, rest2)
    assert not np.array_equal(np.sort(splits.stratified_split(labels, 100, seed=4)[1]), np.sort(held))
    # Shuffled output: a prefix of a class-sorted input is a class mix.
    assert len(np.unique(labels[held[:20]])) > 1
    # Fractions, and rounding that still sums to the requested size.
    assert len(splits.stratified_split(labels, 0.1)[1]) == 100
    assert len(splits.stratified_split(labels, 7)[1]) == 7


def test_stratified_split_keeps_one_sample_per_class_and_refuses_bad_sizes():
    labels = np.array([0] * 10 + [1] * 2)
    rest, held = splits.stratified_split(labels, 10)
    assert set(labels[rest]) == {0, 1}  # capped: each class keeps a sample
    for size in (11, 13, 0, 0.01):  # one of each class stays behind: at most 12 - 2
        with pytest.raises(ValueError, match=r"`size` in \[1, 10\] \(12 samples; one of each of the 2 classes"):
            splits.stratified_split(labels, size)
    with pytest.raises(TypeError, match="int or a float"):
        splits.stratified_split(labels, "5")
    with pytest.raises(ValueError, match="fraction"):
        splits.stratified_split(labels, 1.5)
    with pytest.raises(ValueError, match=">= 0"):
        splits.stratified_split(np.array([0, -1, 1]), 1)


def test_long_tail_counts_match_published_dataset_sizes():
    # Totals of the long-tailed CIFAR training sets in the literature (Cui et al.; LDAM).
    assert data.long_tail_counts(500, 100, 100).sum() == 10847
    assert data.long_tail_counts(500, 100, 50).sum() == 12608
    assert data.long_tail_counts(500, 100, 200).sum() == 9502
    assert data.long_tail_counts(5000, 10, 100).sum() == 12406
    assert data.long_tail_counts(5000, 10, 50).sum() == 13996
    counts = data.long_tail_counts(500, 100, 20)
    assert counts[0] == 500 and counts[-1] == 25 and np.all(np.diff(counts) <= 0)
    with pytest.raises(ValueError, match=">= 1"):
        data.long_tail_counts(500, 100, 0.5)
    with pytest.raises(TypeError, match="imbalance_factor"):
        data.long_tail_counts(500, 100, "100")


def test_long_tail_indices_per_class_counts():
    labels = np.repeat(np.arange(10), 50)
    keep = data.long_tail_indices(labels, 10, 10, seed=0)
    counts = np.bincount(labels[keep], minlength=10)
    expected = [int(50 * 0.1 ** (c / 9) + 1e-9) for c in range(10)]
    np.testing.assert_array_equal(counts, expected)
    assert counts[0] / counts[-1] == 10
    assert len(np.unique(keep)) == len(keep)


def test_channel_stats_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (37, 5, 6, 3), dtype=np.uint8)
    mean, std = data.channel_stats(x, 1 / 255, chunk=8)
    ref = x.astype(np.float64) / 255
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, ref.std(axis=(0, 1, 2)), rtol=1e-6)
    xf = rng.normal(2.0, 3.0, (20, 4, 4, 2)).astype(np.float32)
    mean, std = data.channel_stats(xf, 0.5, chunk=7)
    np.testing.assert_allclose(mean, (xf * 0.5).mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(std, (xf * 0.5).std(axis=(0, 1, 2)), rtol=1e-5)


# ------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("fmt", ["binary", "python"])
@pytest.mark.parametrize("kind", ["archive", "folder"])
def test_read_cifar_round_trip(tmp_path, num_classes, fmt, kind):
    path, (x_tr, y_tr, x_te, y_te) = write_cifar(tmp_path, num_classes, fmt, kind)
    for where in (path, tmp_path):  # the file/folder itself, or a directory holding it
        out = cifar.read_cifar(where, num_classes, expected_counts=SMALL)
        np.testing.assert_array_equal(out["x_train"], x_tr)
        np.testing.assert_array_equal(out["y_train"], y_tr)
        np.testing.assert_array_equal(out["x_test"], x_te)
        np.testing.assert_array_equal(out["y_test"], y_te)
        assert out["class_names"] == [f"c{i}" for i in range(num_classes)]


def test_cifar_binary_pixel_layout():
    # One record by hand: label, then the red plane, green plane, blue plane.
    image = np.zeros((32, 32, 3), np.uint8)
    image[0, 1, 0] = 7  # red at row 0, column 1
    image[2, 0, 2] = 9  # blue at row 2, column 0
    record = bytes([3]) + image[..., 0].tobytes() + image[..., 1].tobytes() + image[..., 2].tobytes()
    x, y = cifar.parse_binary(record, 10, "rec")
    assert y.tolist() == [3] and x[0, 0, 1, 0] == 7 and x[0, 2, 0, 2] == 9 and x.sum() == 16


def test_load_cifar_from_a_local_folder(tmp_path, small_counts):
    write_cifar(tmp_path, 10, "binary", "folder")
    s = data.load("cifar10", data_dir=tmp_path, val_size=20, seed=1)
    assert (s.name, s.num_classes, s.input_shape) == ("cifar10", 10, (32, 32, 3))
    assert (s.num_train, s.num_val, s.num_test) == (80, 20, 40)
    np.testing.assert_array_equal(np.bincount(s.val_labels()), [2] * 10)
    assert s.augment_pad == 4 and s.augment_flip


def test_cifar_errors(tmp_path):
    path, (x, y, _, _) = write_cifar(tmp_path / "a", 100, "binary", "folder")
    good = (path / "train.bin").read_bytes()
    with pytest.raises(ValueError, match="not a positive multiple of the 3074-byte"):
        cifar.parse_binary(good[:-100], 100, "train.bin")
    with pytest.raises(ValueError, match="holds 100 records, expected 50000"):
        cifar.parse_binary(good, 100, "train.bin", expected=50000)
    bad = bytearray(good)
    bad[3074 * 5 + 1] = 100  # fine label of record 5
    with pytest.raises(ValueError, match="record 5 has label 100"):
        cifar.parse_binary(bytes(bad), 100, "train.bin")
    bad = bytearray(good)
    bad[0] = 20  # coarse label
    with pytest.raises(ValueError, match="coarse label 20"):
        cifar.parse_binary(bytes(bad), 100, "train.bin")
    with pytest.raises(ValueError, match="label 10"):
        cifar.parse_binary(bytes([10]) + bytes(3072), 10, "batch")
    # Truncated files are caught by the official record counts of `read_cifar`.
    with pytest.raises(ValueError, match="expected 50000"):
        cifar.read_cifar(path, 100)
    (path / "test.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing test.bin"):
        cifar.read_cifar(path, 100, expected_counts=SMALL)
    with pytest.raises(FileNotFoundError, match="No such file or directory"):
        cifar.read_cifar(tmp_path / "nowhere", 100)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="cifar-100-binary.tar.gz"):
        cifar.read_cifar(empty, 100)
    # A truncated archive.
    archive, _ = write_cifar(tmp_path / "b", 10, "binary", "archive")
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises((ValueError, FileNotFoundError), match="truncated|missing"):
        cifar.read_cifar(archive, 10, expected_counts=SMALL)


def test_cifar_pickle_errors_and_no_code_execution(tmp_path):
    x, y = _cifar_arrays(10, 10, 0)
    blob = _pickle_bytes(x, y, 10)
    with pytest.raises(ValueError, match="truncated"):
        cifar.parse_pickle(blob[:-50], 10, "data_batch_1")
    y_bad = y.copy()
    y_bad[4] = 12
    with pytest.raises(ValueError, match="image 4 has label 12"):
        cifar.parse_pickle(_pickle_bytes(x, y_bad, 10), 10, "data_batch_1")
    with pytest.raises(ValueError, match="missing key 'fine_labels'"):
        cifar.parse_pickle(blob, 100, "train")

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with pytest.raises(ValueError, match="Refusing to load"):
        cifar.parse_pickle(pickle.dumps({b"data": Hostile()}), 10, "evil")


def test_cifar_offline_without_local_copy_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KERAS_EE_DATA_DIR", str(tmp_path / "none"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setattr(cifar, "can_reach", lambda *a, **k: False)
    with pytest.raises(FileNotFoundError, match="cannot be reached"):
        data.load("cifar100")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load("cifar100", data_dir=tmp_path / "missing")


def test_cifar_found_in_search_dirs(tmp_path, monkeypatch, small_counts):
    write_cifar(tmp_path / "cache", 10, "python", "archive")
    monkeypatch.setenv("KERAS_EE_DATA_DIR", os.pathsep.join([str(tmp_path / "x"), str(tmp_path / "cache")]))
    s = data.load("cifar10", val_size=0.2)
    assert (s.num_train, s.num_val, s.num_test, s.num_classes) == (80, 20, 40, 10)


# ------------------------------------------------------------------ Fashion-MNIST (IDX)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz, small_counts):
    arrays = write_fashion(tmp_path / "fm", gz=gz)
    out = idx.read_fashion_mnist(tmp_path / "fm")
    np.testing.assert_array_equal(out["x_train"][..., 0], arrays["x_train"])
    np.testing.assert_array_equal(out["y_test"], arrays["y_test"])
    assert out["class_names"][0] == "T-shirt/top"
    s = data.load("fashion_mnist", data_dir=tmp_path / "fm", val_size=10)
    assert s.input_shape == (28, 28, 1) and (s.num_train, s.num_val, s.num_test) == (50, 10, 20)
    assert s.augment_pad == 2 and s.augment_flip


def test_idx_errors(tmp_path):
    blob = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    np.testing.assert_array_equal(idx.parse_idx(blob), np.arange(12).reshape(3, 4))
    with pytest.raises(ValueError, match="holds 10 data bytes, expected 12"):
        idx.parse_idx(blob[:-2], "f")
    with pytest.raises(ValueError, match="not an IDX file"):
        idx.parse_idx(b"\x01\x02\x08\x01" + bytes(8), "f")
    with pytest.raises(ValueError, match="decompress"):
        idx.parse_idx(gzip.compress(blob)[:-10], "f")
    write_fashion(tmp_path / "fm", gz=False)
    with pytest.raises(ValueError, match="expected 60000"):
        idx.read_fashion_mnist(tmp_path / "fm")
    labels = (np.arange(60) % 10).astype(np.uint8)
    labels[7] = 10
    (tmp_path / "fm" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(ValueError, match="label 10 at index 7"):
        idx.read_fashion_mnist(tmp_path / "fm", expected_counts={})
    (tmp_path / "fm" / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        idx.read_fashion_mnist(tmp_path / "fm", expected_counts={})


# ------------------------------------------------------------------ npz


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_round_trip_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 12, 12, 3), dtype=np.uint8)
    y = np.arange(50) % 5
    path = _write_npz(
        tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10], class_names=np.array(list("abcde"))
    )
    s = data.load(f"npz:{path}", val_size=10)
    assert (s.num_classes, s.class_names, s.input_shape) == (5, list("abcde"), (12, 12, 3))
    assert (s.num_train, s.num_val, s.num_test, s.augment_pad, s.augment_flip) == (40, 10, 10, 2, False)
    xt, _ = next(iter(s.test_dataset(10)))
    np.testing.assert_allclose(xt.numpy(), (x[:10] / 255 - s.mean) / s.std, atol=1e-5)
    xf = rng.random((30, 8, 8)).astype(np.float64)
    path = _write_npz(
        tmp_path / "f.npz",
        x_train=xf,
        y_train=(np.arange(30) % 3).astype(np.float32),
        x_test=xf[:6],
        y_test=np.arange(6)[:, None] % 3,
    )
    s = data.load(f"npz:{path}")  # default validation: 10%
    assert (s.num_classes, s.input_shape, s.num_val, s.pixel_scale) == (3, (8, 8, 1), 3, 1.0)


def test_npz_errors(tmp_path):
    x = np.zeros((10, 8, 8), np.uint8)
    y = np.arange(10) % 2
    good = dict(x_train=x, y_train=y, x_test=x, y_test=y)
    cases = [
        (dict(good, y_test=None), ValueError, "missing key"),
        (dict(good, x_train=x.astype(np.int32)), TypeError, "expected uint8"),
        (dict(good, y_train=y[:5]), ValueError, "10 train images but 5 train labels"),
        (dict(good, y_test=y + 1), ValueError, "only cover classes 0..1"),
        (dict(good, x_test=np.zeros((10, 9, 9), np.uint8)), ValueError, "test images are"),
        (dict(good, y_train=y - 1), ValueError, "negative label"),
        (dict(good, y_train=y + 0.5), ValueError, "non-integer"),
        (dict(good, x_train=np.zeros((10, 8), np.uint8)), ValueError, "shape"),
        (dict(good, x_train=np.full((10, 8, 8), np.nan)), ValueError, "NaN"),
    ]
    for i, (arrays, err, message) in enumerate(cases):
        arrays = {k: v for k, v in arrays.items() if v is not None}
        path = _write_npz(tmp_path / f"bad{i}.npz", **arrays)
        with pytest.raises(err, match=message):
            npz.read_npz(path)
    with pytest.raises(FileNotFoundError, match="x_train"):
        data.load(f"npz:{tmp_path / 'absent.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="readable"):
        npz.read_npz(tmp_path / "junk.npz")


# ------------------------------------------------------------------ load, available


def test_unknown_names_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'; available: .*cifar100.*npz:PATH"):
        data.load("svhn")
    with pytest.raises(ValueError, match="string"):
        data.load(3)
    with pytest.raises(TypeError, match="seed"):
        data.load("digits", seed=1.5)
    assert data.list_datasets() == ["digits", "cifar10", "cifar100", "fashion_mnist", "imagenet", "npz:PATH"]


def test_digits_default_splits():
    from sklearn.datasets import load_digits

    a = data.load()
    b = data.load(seed=1)
    assert (a.name, a.input_shape, a.num_classes) == ("digits", (8, 8, 1), 10)
    assert (a.num_train, a.num_val, a.num_test) == (1137, 300, 360)
    # Test split fixed across seeds, validation split seeded.
    np.testing.assert_array_equal(a.test_labels(), b.test_labels())
    np.testing.assert_array_equal(a._x_test, b._x_test)
    assert not np.array_equal(a._x_val, b._x_val)
    # Together the three splits are exactly the bundled dataset.
    target = load_digits().target
    counts = np.bincount(np.concatenate([a.train_labels(), a.val_labels(), a.test_labels()]))
    np.testing.assert_array_equal(counts, np.bincount(target))
    # Stratified: every class in every split in proportion.
    assert np.all(np.abs(np.bincount(a.val_labels()) - 30) <= 1)
    # Statistics on the training split, pixels in [0, 1] (digits are 0..16).
    ref = a._x_train.astype(np.float64) / 16
    np.testing.assert_allclose(a.mean, [ref.mean()], rtol=1e-6)
    np.testing.assert_allclose(a.std, [ref.std()], rtol=1e-6)


def test_long_tail_through_load(tmp_path, small_counts):
    write_cifar(tmp_path, 10, "binary", "archive", n_train=100)  # 10 per class
    s = data.load("cifar10", data_dir=tmp_path, imbalance_factor=10, val_size=5, seed=2)
    expected = [int(10 * 0.1 ** (c / 9) + 1e-9) for c in range(10)]  # 10 ... 1
    counts = np.bincount(np.concatenate([s.train_labels(), s.val_labels()]), minlength=10)
    np.testing.assert_array_equal(counts, expected)
    assert s.name == "cifar10-lt10" and s.imbalance_factor == 10.0
    assert s.num_train + s.num_val == sum(expected) and s.num_val == 5
    assert np.all(s.train_class_counts() >= 1)
    np.testing.assert_array_equal(np.bincount(s.test_labels()), [4] * 10)  # test stays balanced
    # Default validation under long tail: 10% of the long-tailed set.
    assert data.load("cifar10", data_dir=tmp_path, imbalance_factor=10).num_val == round(0.1 * sum(expected))


# ------------------------------------------------------------------ pipelines


def _toy_splits(pad=2, flip=True, n=40):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 6, 5, 2), dtype=np.uint8)
    y = np.arange(n) % 4
    return data.ArraySplits(
        "toy", x, y, x[:12], y[:12], x[:9], y[:9], list("abcd"), pixel_scale=1 / 255, augment_pad=pad, augment_flip=flip
    )


def _is_crop_of(out, image, pad, flip):
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    h, w = image.shape[:2]
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[dy : dy + h, dx : dx + w]
            if np.allclose(out, crop, atol=1e-5) or (flip and np.allclose(out, crop[:, ::-1], atol=1e-5)):
                return (dy, dx)
    return None


def test_random_crop_flip_outputs_are_shifted_or_flipped_inputs():
    rng = np.random.default_rng(1)
    images = rng.random((64, 7, 7, 3)).astype(np.float32)
    out = pipeline.random_crop_flip(tf.constant(images), 2, True, tf.constant([3, 4])).numpy()
    offsets = [_is_crop_of(o, i, 2, True) for o, i in zip(out, images)]
    assert all(o is not None for o in offsets)
    assert len(set(offsets)) > 5  # the offsets vary within the batch
    flipped = [
        np.allclose(o, _crop(i, 2, off)[:, ::-1]) and not np.allclose(o, _crop(i, 2, off))
        for o, i, off in zip(out, images, offsets)
    ]
    assert 10 < sum(flipped) < 54
    same = pipeline.random_crop_flip(tf.constant(images), 0, False, tf.constant([3, 4])).numpy()
    np.testing.assert_array_equal(same, images)
    with pytest.raises(ValueError, match="pad"):
        pipeline.random_crop_flip(tf.constant(images), -1, False, tf.constant([1, 2]))


def _crop(image, pad, off):
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    return padded[off[0] : off[0] + image.shape[0], off[1] : off[1] + image.shape[1]]


def test_pipelines_shapes_normalization_and_order():
    s = _toy_splits()
    batches = list(s.train_dataset(16, augment=False, shuffle=False))
    assert [b[0].shape[0] for b in batches] == [16, 16, 8]
    assert batches[0][0].dtype == tf.float32 and batches[0][1].dtype == tf.int32
    x = np.concatenate([b[0].numpy() for b in batches])
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0, atol=1e-5)  # mean/std of the train split
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1, atol=1e-4)
    np.testing.assert_allclose(x, (s._x_train / 255 - s.mean) / s.std, atol=1e-5)
    assert [b[0].shape[0] for b in s.train_dataset(16, drop_remainder=True)] == [16, 16]
    # Validation and test: exact, in order, never augmented.
    for ds, labels, raw in (
        (s.val_dataset(5), s.val_labels(), s._x_val),
        (s.test_dataset(4), s.test_labels(), s._x_test),
    ):
        xs, ys = zip(*[(a.numpy(), b.numpy()) for a, b in ds])
        np.testing.assert_array_equal(np.concatenate(ys), labels)
        np.testing.assert_allclose(np.concatenate(xs), (raw / 255 - s.mean) / s.std, atol=1e-5)
    with pytest.raises(ValueError, match="`batch_size` must be >= 1, received 0"):
        s.train_dataset(0)


def test_training_pipeline_shuffles_and_augments_reproducibly():
    s = _toy_splits(pad=1, flip=True)
    ds = s.train_dataset(40, seed=5)
    epoch1, epoch2 = [(x.numpy(), y.numpy()) for x, y in ds], [(x.numpy(), y.numpy()) for x, y in ds]
    again = [(x.numpy(), y.numpy()) for x, y in s.train_dataset(40, seed=5)]
    np.testing.assert_array_equal(epoch1[0][0], again[0][0])  # same seed, same batches
    assert not np.array_equal(epoch1[0][0], epoch2[0][0])  # a new epoch reshuffles and re-augments
    assert sorted(epoch1[0][1].tolist()) == sorted(s.train_labels().tolist())
    # Each augmented image is a crop/flip of a training image with that label.
    raw = s._x_train / 255
    x, y = epoch1[0]
    x = x * s.std + s.mean
    matched = 0
    for out, label in zip(x, y):
        for i in np.flatnonzero(s._y_train == label):
            if _is_crop_of(out, raw[i], 1, True) is not None:
                matched += 1
                break
    assert matched == len(y)
    # Some images actually moved (augmentation on), none does with augment=False.
    unaugmented = next(iter(s.train_dataset(40, seed=5, augment=False)))[0].numpy() * s.std + s.mean
    moved = [not any(np.allclose(o, r, atol=1e-5) for r in raw) for o in x]
    assert sum(moved) > 10
    assert not any(not any(np.allclose(o, r, atol=1e-5) for r in raw) for o in unaugmented)


# ------------------------------------------------------------------ ImageNet


def test_imagenet_missing_manual_download_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "ILSVRC2012_img_val.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar.*holds ILSVRC2012_img_val.tar"):
        data.load("imagenet", data_dir=tmp_path / "manual")
    with pytest.raises(ValueError, match="imbalance_factor"):
        data.load("imagenet", imbalance_factor=10)


def test_imagenet_preprocessing_shapes():
    from keras_ee.data import imagenet

    image = tf.cast(tf.random.stateless_uniform([300, 400, 3], [1, 2], maxval=255), tf.uint8)
    jpeg = tf.io.encode_jpeg(image)
    train = imagenet.train_preprocess(jpeg, tf.constant([1, 2]), 64)
    evaluation = imagenet.eval_preprocess(jpeg, 64, 73)
    assert train.shape == (64, 64, 3) and evaluation.shape == (64, 64, 3)
    assert train.dtype == tf.float32
    # Normalized with the ImageNet statistics: a mid-gray image maps near (0.5 - mean) / std.
    gray = tf.io.encode_jpeg(tf.fill([100, 120, 3], tf.constant(128, tf.uint8)))
    np.testing.assert_allclose(
        imagenet.eval_preprocess(gray, 32).numpy()[16, 16], (128 / 255 - imagenet.MEAN) / imagenet.STD, atol=0.05
    )


# ------------------------------------------------------------------ real data (skipped without it)

CIFAR100_ARCHIVE = SHARED / "cifar-100-binary.tar.gz"
FASHION_DIR = SHARED / "fashion-mnist"


@pytest.fixture(scope="module")
def real_cifar100():
    if not CIFAR100_ARCHIVE.is_file():
        pytest.skip(f"{CIFAR100_ARCHIVE} not present")
    return cifar.read_cifar(CIFAR100_ARCHIVE, 100)


def test_real_cifar100_counts_and_published_statistics(real_cifar100):
    d = real_cifar100
    assert d["x_train"].shape == (50000, 32, 32, 3) and d["x_test"].shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(d["y_train"]), [500] * 100)
    np.testing.assert_array_equal(np.bincount(d["y_test"]), [100] * 100)
    assert d["class_names"][:3] == ["apple", "aquarium_fish", "baby"] and len(d["class_names"]) == 100
    mean, std = data.channel_stats(d["x_train"], 1 / 255)
    np.testing.assert_allclose(mean, [0.5071, 0.4865, 0.4409], atol=1e-4)
    np.testing.assert_allclose(std, [0.2673, 0.2564, 0.2762], atol=1e-4)


def test_real_cifar100_splits(real_cifar100):
    d = real_cifar100
    s = data.build_array_splits(
        "cifar100",
        d["x_train"],
        d["y_train"],
        d["x_test"],
        d["y_test"],
        d["class_names"],
        5000,
        seed=0,
        augment_pad=4,
        augment_flip=True,
    )
    assert (s.num_train, s.num_val, s.num_test) == (45000, 5000, 10000)
    np.testing.assert_array_equal(np.bincount(s.val_labels()), [50] * 100)
    np.testing.assert_allclose(s.mean, [0.5071, 0.4865, 0.4409], atol=3e-3)
    x, y = next(iter(s.train_dataset(256)))
    assert x.shape == (256, 32, 32, 3) and len(np.unique(y.numpy())) > 50  # shuffled across classes
    lt = data.build_array_splits(
        "cifar100", d["x_train"], d["y_train"], d["x_test"], d["y_test"], d["class_names"], 0.1, imbalance_factor=100
    )
    assert lt.num_train + lt.num_val == 10847 and lt.num_test == 10000
    counts = np.bincount(np.concatenate([lt.train_labels(), lt.val_labels()]))
    assert counts[0] == 500 and counts[-1] == 5


def test_real_fashion_mnist():
    if not FASHION_DIR.is_dir():
        pytest.skip(f"{FASHION_DIR} not present")
    s = data.load("fashion_mnist", data_dir=FASHION_DIR)
    assert (s.num_train, s.num_val, s.num_test, s.input_shape) == (55000, 5000, 10000, (28, 28, 1))
    np.testing.assert_array_equal(np.bincount(s.test_labels()), [1000] * 10)
    np.testing.assert_array_equal(np.bincount(s.val_labels()), [500] * 10)
    # Published Fashion-MNIST training statistics: mean 0.2860, std 0.3530.
    assert abs(float(s.mean[0]) - 0.2860) < 2e-3 and abs(float(s.std[0]) - 0.3530) < 2e-3


def test_tfds_is_the_fallback_and_a_local_copy_is_preferred(tmp_path, monkeypatch, small_counts):
    calls = []
    x, y = _cifar_arrays(100, 10, 7)

    def fake_tfds(name, data_dir=None, download=True):
        calls.append((name, data_dir))
        return {
            "x_train": x,
            "y_train": y,
            "x_test": x[:40],
            "y_test": y[:40],
            "class_names": [f"t{i}" for i in range(10)],
            "source": "tfds",
        }

    monkeypatch.setattr(cifar, "load_tfds_arrays", fake_tfds)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KERAS_EE_DATA_DIR", str(tmp_path / "local"))
    s = data.load("cifar10", val_size=10)
    assert calls == [("cifar10", None)] and s.class_names[0] == "t0"
    write_cifar(tmp_path / "local", 10, "binary", "archive")
    s = data.load("cifar10", val_size=10)
    assert len(calls) == 1 and s.class_names[0] == "c0"  # the local copy, tfds not asked


def test_can_reach_a_local_listener_and_not_a_closed_port():
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        assert cifar.can_reach("127.0.0.1", port, timeout=2.0)
    assert not cifar.can_reach("127.0.0.1", port, timeout=2.0)  # closed now


def test_train_size_keeps_a_stratified_seeded_subset():
    full = data.load("digits", seed=3)
    sub = data.load("digits", seed=3, train_size=500)
    assert sub.num_train == 500 and sub.num_val == full.num_val and sub.num_test == full.num_test
    np.testing.assert_array_equal(sub.val_labels(), full.val_labels())
    counts = sub.train_class_counts()
    assert counts.min() >= 45 and counts.max() <= 55  # stratified: ~50 per class
    again = data.load("digits", seed=3, train_size=500)
    np.testing.assert_array_equal(again.train_labels(), sub.train_labels())
    with pytest.raises(ValueError):
        data.load("digits", train_size=10_000)


def test_samples_per_class_takes_x_seeded_images_of_every_class_after_the_hold_out():
    from keras_ee.config import TrainConfig

    full = data.load("digits", seed=3, val_size=300)
    sub = data.load("digits", seed=3, val_size=300, samples_per_class=40)
    assert np.array_equal(np.bincount(sub.train_labels(), minlength=10), np.full(10, 40))
    np.testing.assert_array_equal(sub._x_val, full._x_val)  # the hold-out is unchanged
    train = {x.tobytes() for x in full._x_train}
    assert all(x.tobytes() in train for x in sub._x_train)
    again = data.load("digits", seed=3, val_size=300, samples_per_class=40)
    np.testing.assert_array_equal(again._x_train, sub._x_train)
    other = data.load("digits", seed=4, val_size=300, samples_per_class=40)
    assert not np.array_equal(other._y_train, sub._y_train)
    assert len(set(sub.train_labels()[:20].tolist())) > 3  # a class mix, not sorted
    with pytest.raises(ValueError, match=r"`samples_per_class` is 500, but class \d has only \d+ training images"):
        data.load("digits", val_size=300, samples_per_class=500)
    with pytest.raises(ValueError, match="both choose the training subset"):
        data.load("digits", samples_per_class=10, train_size=100)
    with pytest.raises(ValueError, match=r"config `samples_per_class` must be a positive integer"):
        TrainConfig(samples_per_class=0)
    with pytest.raises(ValueError, match=r"config `samples_per_class` must be None when `train_size` is set"):
        TrainConfig(samples_per_class=10, train_size=100)
    cfg = TrainConfig(samples_per_class=30, val_size=200)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_samples_per_class_on_the_command_line(tmp_path):
    import json

    from keras_ee import cli

    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--method",
                "baseline",
                "--epochs",
                "1",
                "--batch-size",
                "128",
                "--val-size",
                "200",
                "--samples-per-class",
                "20",
                "--no-evaluate",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["samples_per_class"] == 20
    assert (
        cli.main(
            [
                "train",
                "--method",
                "baseline",
                "--samples-per-class",
                "1000",
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "bad"),
            ]
        )
        == 2
    )
