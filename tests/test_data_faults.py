"""Faults in user data: bad .npz files and label arrays get one-line errors naming what and where."""

import warnings

import numpy as np
import pytest

from keras_ee import validation as v
from keras_ee.data import npz
from keras_ee.data.base import ArraySplits


def _good(n=20, classes=4, dtype=np.uint8):
    x = np.zeros((n, 6, 6), dtype)
    y = np.arange(n) % classes
    return dict(x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])


def _write(path, **arrays):
    np.savez(path, **arrays)
    return path


def _one_line(e):
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


# ----------------------------------------------------------------------------- not an .npz


@pytest.mark.parametrize(
    "content",
    [
        np.random.default_rng(0).bytes(500),
        b"x_train,y_train\n1,2\n3,4\n",  # a text (CSV) file renamed to .npz
        b"\x80\x04\x95garbage pickle",  # what numpy would offer to unpickle
    ],
)
def test_garbage_npz_is_not_a_zip_archive(tmp_path, content):
    path = tmp_path / "d.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        npz.read_npz(path)
    text = _one_line(e)
    assert str(path) in text and "not an .npz (zip) archive" in text
    assert "pickle" not in text.lower() and "allow_pickle" not in text


def test_empty_npz(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError) as e:
        npz.read_npz(path)
    text = _one_line(e)
    assert str(path) in text and "0 bytes" in text and ".npz" in text


def test_npy_renamed_to_npz(tmp_path):
    path = tmp_path / "d.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match="single .npy array") as e:
        npz.read_npz(path)
    _one_line(e)


def test_truncated_npz(tmp_path):
    path = _write(tmp_path / "d.npz", **_good())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted") as e:
        npz.read_npz(path)
    assert str(path) in _one_line(e)


def test_pickled_member_is_named(tmp_path):
    arrays = _good()
    arrays["y_train"] = np.array([object()] * 20, dtype=object)
    path = tmp_path / "d.npz"
    np.savez(path, **arrays, allow_pickle=True)
    with pytest.raises(TypeError, match="y_train") as e:
        npz.read_npz(path)
    assert "allow_pickle" not in _one_line(e)


# ----------------------------------------------------------------------------- class count


def test_sparse_inferred_labels_are_refused(tmp_path):
    arrays = _good()
    arrays["y_train"] = arrays["y_train"].copy()
    arrays["y_train"][3] = 100000
    path = _write(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError) as e:
        npz.read_npz(path)
    text = _one_line(e)
    assert "100000" in text and "num_classes" in text and "class_names" in text
    assert "no training sample" in text


def test_gap_in_inferred_labels_is_refused(tmp_path):
    arrays = _good(classes=4)
    arrays["y_train"] = np.where(arrays["y_train"] == 2, 3, arrays["y_train"])  # class 2 empty
    arrays["y_test"] = arrays["y_train"][:8]
    with pytest.raises(ValueError, match="num_classes"):
        npz.read_npz(_write(tmp_path / "d.npz", **arrays))


def test_explicit_num_classes_accepts_empty_classes_with_a_warning(tmp_path):
    arrays = _good(classes=4)
    path = _write(tmp_path / "d.npz", **arrays, num_classes=np.int64(6))
    with pytest.warns(UserWarning, match="2 of the 6 classes"):
        out = npz.read_npz(path)
    assert out["class_names"] == [str(i) for i in range(6)]


def test_explicit_class_names_accept_empty_classes_with_a_warning(tmp_path):
    arrays = _good(classes=3)
    path = _write(tmp_path / "d.npz", **arrays, class_names=np.array(list("abcde")))
    with pytest.warns(UserWarning, match="2 of the 5 classes"):
        out = npz.read_npz(path)
    assert out["class_names"] == list("abcde")


def test_no_warning_when_every_class_has_samples(tmp_path):
    path = _write(tmp_path / "d.npz", **_good(classes=4), num_classes=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(npz.read_npz(path)["class_names"]) == 4


@pytest.mark.parametrize(
    "value, match",
    [
        (np.int64(1), ">= 2"),
        (np.int64(3), "label 3"),  # labels go up to 3
        (np.float64(4.0), "integer"),
        (np.array([4, 5]), "integer"),
        (np.array(True), "integer"),
        (np.array("4"), "integer"),
    ],
)
def test_bad_num_classes(tmp_path, value, match):
    path = _write(tmp_path / "d.npz", **_good(classes=4), num_classes=value)
    with pytest.raises((ValueError, TypeError), match=match) as e:
        npz.read_npz(path)
    assert "num_classes" in _one_line(e)


def test_num_classes_must_cover_test_labels(tmp_path):
    arrays = _good(classes=4)
    arrays["y_test"] = arrays["y_test"].copy()
    arrays["y_test"][0] = 7
    with pytest.raises(ValueError, match="y_test"):
        npz.read_npz(_write(tmp_path / "d.npz", **arrays, num_classes=5))


def test_num_classes_and_class_names_must_agree(tmp_path):
    path = _write(tmp_path / "d.npz", **_good(classes=4), num_classes=5, class_names=np.array(list("abcd")))
    with pytest.raises(ValueError, match="num_classes.*class_names"):
        npz.read_npz(path)


# ----------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("value", [1e38, -300.0, 256.0])
def test_float_pixels_out_of_range(tmp_path, value):
    arrays = _good(dtype=np.float32)
    arrays["x_test"] = arrays["x_test"].copy()
    arrays["x_test"][2, 1, 1] = value
    path = _write(tmp_path / "d.npz", **arrays)
    with pytest.raises(ValueError) as e:
        npz.read_npz(path)
    text = _one_line(e)
    assert "x_test" in text and f"{abs(value):g}" in text and "[-255, 255]" in text


@pytest.mark.parametrize("lo, hi", [(0, 1), (-1, 1), (-4.5, 6.0), (0, 255), (-255, 255)])
def test_float_pixels_in_range_are_accepted(tmp_path, lo, hi):
    arrays = _good(dtype=np.float32)
    arrays["x_train"] = np.linspace(lo, hi, arrays["x_train"].size, dtype=np.float32).reshape(arrays["x_train"].shape)
    out = npz.read_npz(_write(tmp_path / "d.npz", **arrays))
    assert out["x_train"].max() == pytest.approx(hi)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_pixels_still_refused(tmp_path, value):
    arrays = _good(dtype=np.float64)
    arrays["x_train"] = arrays["x_train"].copy()
    arrays["x_train"][0, 0, 0] = value
    with pytest.raises(ValueError, match="x_train.*NaN or infinite"):
        npz.read_npz(_write(tmp_path / "d.npz", **arrays))


# ----------------------------------------------------------------------------- labels in the Python API


def test_integral_float_labels_are_accepted():
    out = v.check_labels(np.array([0.0, 2.0, 1.0]), 3)
    assert out.dtype == np.int64 and out.tolist() == [0, 2, 1]


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (np.array([0.0, 1.5, 2.0]), ValueError, "non-integer.*1.5.*index 1"),
        (np.array([0.0, np.nan]), ValueError, "NaN"),
        (np.array([0.0, np.inf]), ValueError, "inf"),
        (np.array([True, False]), TypeError, "bool"),
        (np.array([0, 3]), ValueError, r"\[0, 3\)"),
        (np.array([0, -1]), ValueError, ">= 0"),
        (np.array([0.0, -1.0]), ValueError, ">= 0"),
        (np.array(["a", "b"]), TypeError, "integer"),
        (np.array([0, 2**63 + 5], dtype=np.uint64), ValueError, r"\[0, 3\)"),
    ],
)
def test_bad_labels_are_refused(labels, error, match):
    with pytest.raises(error, match=match) as e:
        v.check_labels(labels, 3, "y_train")
    assert "y_train" in _one_line(e)


def test_huge_unsigned_labels_without_num_classes():
    with pytest.raises(ValueError, match="y"):
        v.check_labels(np.array([0, 2**64 - 1], dtype=np.uint64), None, "y")


def test_array_splits_refuses_fractional_labels():
    x = np.zeros((6, 4, 4, 1), np.float32)
    y = np.array([0, 1, 0, 1, 0, 1.5])
    with pytest.raises(ValueError, match="y_train.*non-integer"):
        ArraySplits("t", x, y, x, y.round(), x, y.round(), class_names=["a", "b"], pixel_scale=1.0)


def test_array_splits_accepts_integral_float_labels():
    x = np.zeros((6, 4, 4, 1), np.float32)
    y = np.array([0, 1, 0, 1, 0, 1], np.float32)
    s = ArraySplits("t", x, y, x, y, x, y, class_names=["a", "b"], pixel_scale=1.0)
    assert s.train_labels().dtype == np.int64 and s.train_labels().tolist() == [0, 1, 0, 1, 0, 1]


# ----------------------------------------------------------------------------- IDX and CIFAR files


def test_idx_header_with_huge_dims_reports_the_true_size():
    from keras_ee.data import idx

    data = b"\x00\x00\x08\x03" + b"\xff\xff\xff\xff" * 3 + b"\x00" * 10
    with pytest.raises(ValueError, match=f"expected {(2**32 - 1) ** 3} ") as e:
        idx.parse_idx(data, "f.idx")
    assert "f.idx" in _one_line(e)


@pytest.mark.parametrize("names", [5, None, [1, 2], np.zeros((2, 5))])
def test_cifar_meta_with_bad_class_names(names):
    import pickle

    from keras_ee.data import cifar

    with pytest.raises(ValueError, match="label_names") as e:
        cifar._parse_names(pickle.dumps({b"label_names": names}), "python", 10, "batches.meta")
    assert "batches.meta" in _one_line(e)
