"""Faults in logit dumps: every bad folder gets a one-line error naming the file and what was expected."""

import csv
import json
import os

import numpy as np
import pytest

from keras_ee import dumps, evaluation


def _arrays(k=3, n_val=20, n_test=30, c=5, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(k, n_val, c)).astype(np.float32),
        rng.integers(0, c, n_val),
        rng.normal(size=(k, n_test, c)).astype(np.float32),
        rng.integers(0, c, n_test),
    )


COSTS = {"mul_adds": [10, 20, 35], "params": [1, 2, 3]}
FRACTIONAL = [0.2, 0.4, 0.45, 0.9]


def _save(path, costs=COSTS, **kw):
    return dumps.save_dump(path, *_arrays(**kw), costs)


def _one_line(e):
    text = str(e.value)
    assert "\n" not in text, text
    assert "Traceback" not in text
    return text


# ----------------------------------------------------------------------------- costs


def test_fractional_costs_survive_save_and_load(tmp_path):
    _save(tmp_path / "d", {"mul_adds": FRACTIONAL, "params": [1, 2, 3, 4]}, k=4)
    assert json.loads((tmp_path / "d" / "costs.json").read_text())["mul_adds"] == FRACTIONAL
    d = dumps.load_dump(tmp_path / "d")
    assert d.mul_adds == FRACTIONAL
    assert d.params == [1, 2, 3, 4] and all(type(p) is int for p in d.params)


def test_hand_written_fractional_costs_are_kept(tmp_path):
    _save(tmp_path, k=4, costs={"mul_adds": [1, 2, 3, 4]})
    (tmp_path / "costs.json").write_text(json.dumps({"mul_adds": FRACTIONAL, "params": [0.5, 1, 1, 2.25]}))
    d = dumps.load_dump(tmp_path)
    assert d.mul_adds == FRACTIONAL and d.params == [0.5, 1, 1, 2.25]


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", "1e309"])
def test_non_finite_costs_json_is_refused(tmp_path, value):
    _save(tmp_path)
    (tmp_path / "costs.json").write_text('{"mul_adds": [10, ' + value + ', 35], "params": [1, 2, 3]}')
    with pytest.raises(ValueError) as e:
        dumps.load_dump(tmp_path)
    text = _one_line(e)
    assert "costs.json" in text and "exit_2" in text and "finite" in text


@pytest.mark.parametrize(
    "values, exit_name, word",
    [
        ([10, -1, 35], "exit_2", "negative"),
        ([-0.5, 1, 35], "exit_1", "negative"),
        ([10, 20, 15], "exit_3", "decreas"),
    ],
)
def test_negative_or_decreasing_costs_json_names_the_exit(tmp_path, values, exit_name, word):
    _save(tmp_path)
    (tmp_path / "costs.json").write_text(json.dumps({"mul_adds": values}))
    with pytest.raises(ValueError) as e:
        dumps.load_dump(tmp_path)
    text = _one_line(e)
    assert "costs.json" in text and exit_name in text and word in text


@pytest.mark.parametrize("value", ['"abc"', "null", "true", "[1]", '{"a": 1}'])
def test_non_number_costs_are_refused(tmp_path, value):
    _save(tmp_path)
    (tmp_path / "costs.json").write_text('{"mul_adds": [10, ' + value + ", 35]}")
    with pytest.raises((ValueError, TypeError)) as e:
        dumps.load_dump(tmp_path)
    text = _one_line(e)
    assert "costs.json" in text and "exit_2" in text and "number" in text


@pytest.mark.parametrize(
    "text, match",
    [
        ("[10, 20, 35]", "JSON object"),
        ('{"mul_adds": 10}', "list"),
        ('{"mul_adds": "10, 20, 35"}', "list"),
        ('{"mul_adds": [10, 20, 35], "params": {"a": 1}}', "params"),
        ('{"mul_adds": [10, 20]}', "one entry per exit"),
        ("", "not valid JSON"),
    ],
)
def test_malformed_costs_json(tmp_path, text, match):
    _save(tmp_path)
    (tmp_path / "costs.json").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        dumps.load_dump(tmp_path)
    assert "costs.json" in _one_line(e)


def test_binary_costs_json(tmp_path):
    _save(tmp_path)
    (tmp_path / "costs.json").write_bytes(b"\xff\xfe\x00\x81garbage")
    with pytest.raises(ValueError, match="UTF-8") as e:
        dumps.load_dump(tmp_path)
    assert "costs.json" in _one_line(e)


@pytest.mark.parametrize(
    "costs, error, match",
    [
        ({"mul_adds": [1, float("inf"), 3]}, ValueError, "exit_2.*finite"),
        ({"mul_adds": [1, float("nan"), 3]}, ValueError, "exit_2.*finite"),
        ({"mul_adds": [1, 2, 1.5]}, ValueError, "exit_3.*decreas"),
        ({"mul_adds": "123"}, TypeError, "list"),
        ({"mul_adds": 5}, TypeError, "list"),
        ({"mul_adds": [1, "2", 3]}, TypeError, "exit_2.*number"),
        ({"mul_adds": [1, True, 3]}, TypeError, "exit_2.*number"),
        ([1, 2, 3], TypeError, "dict"),
    ],
)
def test_save_dump_refuses_bad_costs(tmp_path, costs, error, match):
    with pytest.raises(error, match=match):
        dumps.save_dump(tmp_path / "d", *_arrays(), costs)
    assert not (tmp_path / "d").exists()


def test_numpy_costs_are_plain_python_numbers(tmp_path):
    _save(tmp_path / "d", {"mul_adds": np.array([1.5, 2.5, 3.0]), "params": np.array([1, 2, 3])})
    meta = json.loads((tmp_path / "d" / "costs.json").read_text())
    assert meta["mul_adds"] == [1.5, 2.5, 3.0] and meta["params"] == [1, 2, 3]
    _save(tmp_path / "e", {"mul_adds": np.array([0.2, 0.4, 0.45], np.float32)})
    assert json.loads((tmp_path / "e" / "costs.json").read_text())["mul_adds"] == [0.2, 0.4, 0.45]


# ----------------------------------------------------------------------------- .npy files


NPY_FILES = ["val_logits.npy", "val_labels.npy", "test_logits.npy", "test_labels.npy"]


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("name", NPY_FILES)
def test_empty_npy_names_the_file(tmp_path, name, mmap):
    _save(tmp_path)
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError) as e:
        dumps.load_dump(tmp_path, mmap=mmap)
    text = _one_line(e)
    assert name in text and "0 bytes" in text and "expected" in text


@pytest.mark.parametrize("content", [b"hello world, not numpy" * 10, b"\x00" * 200, b"PK\x03\x04garbage"])
def test_garbage_npy_is_not_a_npy_file(tmp_path, content):
    _save(tmp_path)
    (tmp_path / "test_logits.npy").write_bytes(content)
    with pytest.raises(ValueError) as e:
        dumps.load_dump(tmp_path)
    text = _one_line(e)
    assert "test_logits.npy" in text and "not a .npy file" in text and "pickle" not in text


@pytest.mark.parametrize("keep", [6, 9, 40])
def test_truncated_npy_header(tmp_path, keep):
    _save(tmp_path)
    raw = (tmp_path / "val_logits.npy").read_bytes()
    (tmp_path / "val_logits.npy").write_bytes(raw[:keep])
    with pytest.raises(ValueError) as e:
        dumps.load_dump(tmp_path)
    text = _one_line(e)
    assert "val_logits.npy" in text and "truncated" in text


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("name", NPY_FILES)
def test_truncated_npy_data(tmp_path, name, mmap):
    _save(tmp_path)
    raw = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(raw[:-4])
    with pytest.raises(ValueError) as e:
        dumps.load_dump(tmp_path, mmap=mmap)
    text = _one_line(e)
    assert name in text and "truncated" in text and "bytes" in text


def test_object_npy_is_refused_without_pickle_advice(tmp_path):
    _save(tmp_path)
    np.save(tmp_path / "val_labels.npy", np.array([{"a": 1}] * 20, dtype=object), allow_pickle=True)
    with pytest.raises(TypeError) as e:
        dumps.load_dump(tmp_path)
    text = _one_line(e)
    assert "val_labels.npy" in text and "object" in text and "allow_pickle" not in text


def test_a_folder_in_place_of_a_file(tmp_path):
    _save(tmp_path)
    (tmp_path / "val_labels.npy").unlink()
    (tmp_path / "val_labels.npy").mkdir()
    with pytest.raises(FileNotFoundError, match="val_labels.npy"):
        dumps.load_dump(tmp_path)


def test_dump_path_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        dumps.load_dump(tmp_path / "f")


# ----------------------------------------------------------------------------- shapes


def test_class_count_mismatch_is_reported_as_such(tmp_path):
    _save(tmp_path)
    np.save(tmp_path / "test_logits.npy", np.zeros((3, 30, 4), np.float32))
    with pytest.raises(ValueError) as e:
        dumps.load_dump(tmp_path)
    text = _one_line(e)
    assert "class-count mismatch" in text and "(3, 20, 5)" in text and "(3, 30, 4)" in text
    assert "label" not in text


def test_class_count_mismatch_in_save_dump(tmp_path):
    vl, vy, tl, ty = _arrays()
    with pytest.raises(ValueError, match="class-count mismatch"):
        dumps.save_dump(tmp_path, vl, vy, tl[:, :, :4], np.minimum(ty, 3), COSTS)


def test_exit_count_mismatch(tmp_path):
    _save(tmp_path)
    np.save(tmp_path / "test_logits.npy", np.zeros((2, 30, 5), np.float32))
    with pytest.raises(ValueError, match="exit-count mismatch") as e:
        dumps.load_dump(tmp_path)
    assert "(3, 20, 5)" in _one_line(e)


@pytest.mark.parametrize(
    "labels, match",
    [
        (np.zeros(19, np.int64), r"test_labels.npy.*\(30,\)"),
        (np.zeros((30, 1), np.int64), r"test_labels.npy.*\(30,\)"),
        (np.full(30, 7), r"test_labels.npy.*\[0, 5\)"),
        (np.zeros(30, np.float32), "test_labels.npy.*integer"),
    ],
)
def test_bad_labels_name_the_file(tmp_path, labels, match):
    _save(tmp_path)
    np.save(tmp_path / "test_labels.npy", labels)
    with pytest.raises((ValueError, TypeError), match=match) as e:
        dumps.load_dump(tmp_path)
    _one_line(e)


def test_big_endian_logits_are_named(tmp_path):
    _save(tmp_path)
    np.save(tmp_path / "val_logits.npy", _arrays()[0].astype(">f4"))
    with pytest.raises(TypeError, match="val_logits.npy.*byte order"):
        dumps.load_dump(tmp_path)


def test_save_dump_converts_big_endian_logits(tmp_path):
    vl, vy, tl, ty = _arrays()
    dumps.save_dump(tmp_path, vl.astype(">f4"), vy, tl, ty, COSTS)
    d = dumps.load_dump(tmp_path)
    assert d.val_logits.dtype.isnative
    np.testing.assert_array_equal(d.val_logits, vl)


def test_load_dump_of_empty_split(tmp_path):
    _save(tmp_path)
    np.save(tmp_path / "test_logits.npy", np.zeros((3, 0, 5), np.float32))
    np.save(tmp_path / "test_labels.npy", np.zeros(0, np.int32))
    with pytest.raises(ValueError, match="empty") as e:
        dumps.load_dump(tmp_path)
    _one_line(e)


# ----------------------------------------------------------------------------- non-finite logits


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_name_split_exit_and_sample(tmp_path, split, value):
    arrays = list(_arrays())
    index = 0 if split == "val" else 2
    arrays[index][1, 7, 2] = value
    arrays[index][2, 3, 0] = value  # a later exit: the first bad exit is reported
    dumps.save_dump(tmp_path, *arrays, COSTS)
    with pytest.raises(ValueError) as e:
        evaluation.evaluate_dump(dumps.load_dump(tmp_path))
    text = _one_line(e)
    assert f"{split}_logits" in text and "exit_2" in text and "sample 7" in text
    assert str(tmp_path) in text
    assert "k=1" not in text


def test_non_finite_logits_float16(tmp_path):
    vl, vy, tl, ty = _arrays()
    vl = vl.astype(np.float16)
    vl[0, 4, 1] = np.inf
    dumps.save_dump(tmp_path, vl, vy, tl.astype(np.float16), ty, COSTS)
    with pytest.raises(ValueError, match="val_logits.*exit_1.*sample 4"):
        evaluation.evaluate_dump(dumps.load_dump(tmp_path))


def test_first_non_finite_is_found_in_exit_order():
    a = np.zeros((3, 50, 4), np.float32)
    assert dumps.first_non_finite(a) is None
    a[2, 1, 0] = np.nan
    a[1, 40, 3] = np.inf
    a[1, 40, 1] = np.inf
    assert dumps.first_non_finite(a) == (1, 40, 1)
    assert dumps.first_non_finite(a, chunk=7) == (1, 40, 1)


# ----------------------------------------------------------------------------- atomic save


def test_save_dump_replaces_an_existing_dump(tmp_path):
    _save(tmp_path / "d", seed=1)
    _save(tmp_path / "d", {"mul_adds": FRACTIONAL[:3]}, seed=2)
    d = dumps.load_dump(tmp_path / "d")
    np.testing.assert_array_equal(d.val_logits, _arrays(seed=2)[0])
    assert d.mul_adds == FRACTIONAL[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(dumps.FILES)


def test_interrupted_save_keeps_the_old_dump(tmp_path, monkeypatch):
    _save(tmp_path / "d", seed=1)
    real_save = np.save
    calls = []

    def failing_save(file, arr, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(dumps.np, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        _save(tmp_path / "d", seed=2)
    monkeypatch.setattr(dumps.np, "save", real_save)
    d = dumps.load_dump(tmp_path / "d")
    np.testing.assert_array_equal(d.val_logits, _arrays(seed=1)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def failing_write(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(dumps, "atomic_write_json", failing_write)
    with pytest.raises(OSError, match="Read-only"):
        _save(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


def test_killed_save_never_loads_half_a_dump(tmp_path):
    # What a kill during save_dump leaves: a partial sibling temporary folder.
    _save(tmp_path / "d", seed=1)
    stale = tmp_path / "d.tmp-999999999"
    stale.mkdir()
    (stale / "val_logits.npy").write_bytes(b"\x93NUMPY half")
    d = dumps.load_dump(tmp_path / "d")
    np.testing.assert_array_equal(d.val_logits, _arrays(seed=1)[0])
    # The next save clears the leftovers of processes that no longer run.
    _save(tmp_path / "d", seed=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_interrupted_swap_is_explained(tmp_path):
    # Killed between moving the old dump aside and moving the new one in.
    _save(tmp_path / "d.tmp-999999999")
    with pytest.raises(FileNotFoundError, match="d.tmp-999999999"):
        dumps.load_dump(tmp_path / "d")


def test_save_dump_keeps_other_files_of_the_folder(tmp_path):
    d = tmp_path / "d"
    _save(d, seed=1)
    (d / "budget.csv").write_text("q\n0.5\n")  # what `keras-ee sweep DUMP` leaves there
    (d / "notes").mkdir()
    (d / "notes" / "a.txt").write_text("mine")
    (d / "val_logits.npy.tmp").write_bytes(b"stale")  # a leftover of an older save
    _save(d, seed=2)
    assert (d / "budget.csv").read_text() == "q\n0.5\n"
    assert (d / "notes" / "a.txt").read_text() == "mine"
    assert not (d / "val_logits.npy.tmp").exists()
    np.testing.assert_array_equal(dumps.load_dump(d).val_logits, _arrays(seed=2)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_save_dump_refuses_to_replace_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "d" / "sub")
    with pytest.raises(ValueError, match="current working folder"):
        _save(tmp_path / "d")
    with pytest.raises(ValueError, match="current working folder"):
        _save(".")


def test_save_dump_onto_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        _save(tmp_path / "f")


def test_save_dump_into_an_empty_existing_folder(tmp_path):
    (tmp_path / "d").mkdir()
    _save(tmp_path / "d")
    assert dumps.load_dump(tmp_path / "d").num_exits == 3


def test_save_dump_fsyncs_every_file(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    _save(tmp_path / "d")
    assert len(synced) >= len(dumps.FILES)


def test_loaded_memmaps_survive_resaving_the_same_folder(tmp_path):
    _save(tmp_path / "d", seed=1)
    d = dumps.load_dump(tmp_path / "d")
    dumps.save_dump(tmp_path / "d", d.val_logits, d.val_labels, d.test_logits, d.test_labels, COSTS)
    np.testing.assert_array_equal(dumps.load_dump(tmp_path / "d").val_logits, _arrays(seed=1)[0])


# ----------------------------------------------------------------------------- evaluation output


def _fractional_eval(tmp_path, mul_adds):
    k = len(mul_adds)
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(2, 200))
    logits = rng.normal(size=(2, k, 200, 4)).astype(np.float32)
    for e in range(k):
        for s in range(2):
            logits[s, e, np.arange(200), labels[s]] += 1.0 + e
    dumps.save_dump(
        tmp_path / "dump",
        logits[0],
        labels[0],
        logits[1],
        labels[1],
        {"mul_adds": mul_adds, "params": [0.5 * (i + 1) for i in range(k)]},
    )
    return evaluation.evaluate_dump(dumps.load_dump(tmp_path / "dump"), name="frac")


def test_tables_print_fractional_costs(tmp_path):
    ev = _fractional_eval(tmp_path, FRACTIONAL)
    table = evaluation.format_anytime(ev)
    for text in ("0.2", "0.4", "0.45", "0.9"):
        assert text in table
    assert evaluation.format_budget(ev)


def test_tables_print_tiny_costs_with_significant_digits(tmp_path):
    ev = _fractional_eval(tmp_path, [0.002, 0.004, 0.0045])
    table = evaluation.format_anytime(ev)
    assert "0.002" in table and "0.0045" in table
    rows = evaluation.format_budget(ev).splitlines()[2:]
    means = [float(r.split()[1]) for r in rows]
    assert all(0.002 <= m <= 0.0045 for m in means), means


def test_csvs_keep_fractional_costs(tmp_path):
    ev = _fractional_eval(tmp_path, FRACTIONAL)
    paths = evaluation.write_evaluation(ev, tmp_path / "eval")
    anytime = list(csv.DictReader(open(paths["anytime"])))
    assert [float(r["mul_adds"]) for r in anytime] == FRACTIONAL
    assert [float(r["params"]) for r in anytime] == [0.5, 1.0, 1.5, 2.0]
    budget = list(csv.DictReader(open(paths["budget"])))
    np.testing.assert_allclose([float(r["mean_mul_adds"]) for r in budget], ev.sweep["mean_cost"], rtol=1e-9)


def test_csv_keeps_integer_costs_as_integers(tmp_path):
    ev = _fractional_eval(tmp_path, [100, 250, 400])
    paths = evaluation.write_evaluation(ev, tmp_path / "eval")
    assert [r["mul_adds"] for r in csv.DictReader(open(paths["anytime"]))] == ["100", "250", "400"]
