"""The on-disk dump format: round trip, memory maps and every refusal."""

import json

import numpy as np
import pytest

from keras_ee import dumps


def _arrays(k=3, n_val=20, n_test=30, c=5, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(k, n_val, c)).astype(np.float32),
        rng.integers(0, c, n_val),
        rng.normal(size=(k, n_test, c)).astype(np.float32),
        rng.integers(0, c, n_test),
    )


COSTS = {"mul_adds": [10, 20, 35], "params": [1, 2, 3]}


def test_round_trip_is_exact_and_memory_mapped(tmp_path):
    vl, vy, tl, ty = _arrays()
    dumps.save_dump(tmp_path / "d", vl, vy, tl, ty, COSTS)
    d = dumps.load_dump(tmp_path / "d")
    assert isinstance(d.val_logits, np.memmap) and isinstance(d.test_logits, np.memmap)
    np.testing.assert_array_equal(d.val_logits, vl)
    np.testing.assert_array_equal(d.test_labels, ty)
    assert d.mul_adds == [10, 20, 35] and d.params == [1, 2, 3]
    assert d.num_exits == 3 and d.num_classes == 5
    assert not list((tmp_path / "d").glob("*.tmp"))


def test_float16_logits_are_kept(tmp_path):
    vl, vy, tl, ty = _arrays()
    dumps.save_dump(tmp_path, vl.astype(np.float16), vy, tl.astype(np.float16), ty, COSTS)
    assert dumps.load_dump(tmp_path).val_logits.dtype == np.float16


def test_missing_folder_and_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dumps.load_dump(tmp_path / "nope")
    vl, vy, tl, ty = _arrays()
    dumps.save_dump(tmp_path, vl, vy, tl, ty, COSTS)
    (tmp_path / "test_labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match="test_labels.npy"):
        dumps.load_dump(tmp_path)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: (a[0][0], *a[1:]), ValueError, "shape"),  # 2-D logits
        (lambda a: (a[0], a[1][:-1], *a[2:]), ValueError, "val_labels"),  # N mismatch
        (lambda a: (a[0], a[1] + 10, *a[2:]), ValueError, r"\[0, 5\)"),  # label out of range
        (lambda a: (a[0].astype(np.int32), *a[1:]), TypeError, "float16, float32 or float64"),
        (lambda a: (a[0], a[1].astype(np.float32), *a[2:]), TypeError, "integer"),
        (lambda a: (*a[:2], a[2][:2], a[3]), ValueError, "num_exits"),  # K mismatch val/test
    ],
)
def test_bad_arrays_are_refused(tmp_path, change, error, match):
    with pytest.raises(error, match=match):
        dumps.save_dump(tmp_path, *change(_arrays()), COSTS)


@pytest.mark.parametrize("mul_adds", [[10, 5, 20], [-1, 2, 3], [1, 2]])
def test_bad_costs_are_refused(tmp_path, mul_adds):
    with pytest.raises(ValueError, match="mul_adds"):
        dumps.save_dump(tmp_path, *_arrays(), {"mul_adds": mul_adds, "params": [1, 2, 3]})


def test_hand_written_costs_json_is_checked(tmp_path):
    dumps.save_dump(tmp_path, *_arrays(), COSTS)
    (tmp_path / "costs.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        dumps.load_dump(tmp_path)
    (tmp_path / "costs.json").write_text(json.dumps({"params": [1, 2, 3]}))
    with pytest.raises(ValueError, match="mul_adds"):
        dumps.load_dump(tmp_path)


def test_truncated_npy_is_reported(tmp_path):
    dumps.save_dump(tmp_path, *_arrays(), COSTS)
    raw = (tmp_path / "val_logits.npy").read_bytes()
    (tmp_path / "val_logits.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        dumps.load_dump(tmp_path)
