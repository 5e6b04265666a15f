"""Where commands write (issue 27, items 1, 5, 13): nothing keras-ee did not write is deleted,
a bad --out is refused before any work naming the user's path (status 2), and a path that cannot
be written gives status 4 naming that path, never a temporary name; `python -m tuning.search`
reports like `keras-ee`."""

import errno
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from keras_ee import atomic, cli, dumps, experiment, models
from keras_ee.atomic import MARKER, ForeignFolderError, WriteError
from keras_ee.config import TrainConfig
from keras_ee.inference import EarlyExitModel
from tuning import search


@pytest.fixture(scope="module")
def ee():
    """An untrained multiexit_cnn (8x8x1, 10 classes) wrapped for early exit."""
    model = models.create("multiexit_cnn", input_shape=(8, 8, 1), num_classes=10)
    x = np.random.default_rng(0).normal(size=(32, 8, 8, 1)).astype("float32")
    logits = np.stack([np.asarray(o) for o in model.predict_on_batch(x)])
    labels = np.random.default_rng(1).integers(0, 10, 32)
    return EarlyExitModel.from_model(model, logits, labels, budget=2.0, costs=[1, 2, 3, 4])


@pytest.fixture(scope="module")
def saved(ee, tmp_path_factory):
    """(ee.keras, images.npz) for `keras-ee predict --normalized`."""
    root = tmp_path_factory.mktemp("saved")
    np.savez(root / "images.npz", x=np.random.default_rng(2).normal(size=(6, 8, 8, 1)).astype("float32"))
    return ee.save(root / "ee.keras"), root / "images.npz"


@pytest.fixture(scope="module")
def dump_runs(tmp_path_factory):
    """Two 'run folders' holding only a random dump: enough for compare and sweep."""
    root = tmp_path_factory.mktemp("dumps")
    rng = np.random.default_rng(0)
    out = []
    for name in ("a", "b"):
        logits = rng.normal(size=(2, 3, 40, 5)).astype("float32")
        labels = rng.integers(0, 5, size=(2, 40))
        dumps.save_dump(root / name / "dump", logits[0], labels[0], logits[1], labels[1], costs={"mul_adds": [1, 2, 3]})
        out.append(root / name)
    return out


def _predict(saved, out):
    model, images = saved
    return cli.main(["predict", str(model), "--normalized", "--images", str(images), "--out", str(out)])


def _one_line_error(capsys, prefix="keras-ee"):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{prefix}") and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert ".tmp-" not in err, err  # never a temporary name
    return err


# --- item 1: export and every --out folder keep what keras-ee did not write -------------------


def test_export_refuses_a_folder_with_other_files_and_overwrite_keeps_them(ee, tmp_path):
    folder = tmp_path / "serving"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    with pytest.raises(FileExistsError, match=r"'.*serving' holds files keras-ee did not write \(thesis.txt\)"):
        ee.export(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]
    # overwrite=True writes the SavedModel beside the user's file; a second export replaces only its own entries.
    ee.export(folder, overwrite=True)
    (folder / "variables" / "stale.bin").write_bytes(b"x")  # in an entry of the SavedModel: replaced
    ee.export(folder)  # now a keras-ee export: no overwrite needed
    assert (folder / "thesis.txt").read_text() == "four years of work"
    assert not (folder / "variables" / "stale.bin").exists()
    assert json.loads((folder / MARKER).read_text())["kind"] == "savedmodel"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["serving"]  # no temporary or old sibling left
    m = tf.saved_model.load(str(folder))
    x = np.zeros((2, 8, 8, 1), np.float32)
    np.testing.assert_array_equal(m.serve(tf.constant(x))["exit"].numpy(), ee.predict(x)["exit"])


def test_export_onto_an_unmarked_saved_model_a_file_and_a_full_disk(ee, tmp_path, monkeypatch):
    folder = tmp_path / "old"
    ee.export(folder)
    (folder / MARKER).unlink()  # as exported before keras-ee marked its exports
    ee.export(folder)
    assert (folder / MARKER).is_file()
    (tmp_path / "f").write_text("mine")
    with pytest.raises(ValueError, match="is an existing file; expected a folder"):
        ee.export(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "mine"
    # A full disk while the SavedModel is written: the previous export stays, the error names the folder.
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def full(obj, export_dir, **kwargs):  # Keras' ExportArchive.write_out calls tf.saved_model.save
        os.makedirs(os.path.join(export_dir, "variables"))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tf.saved_model, "save", full)
    with pytest.raises(WriteError) as info:
        ee.export(folder)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(folder)
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "old"]


def test_a_failed_move_puts_the_previous_entries_back(tmp_path, monkeypatch):
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep.txt").write_text("user")
    (target / "a").write_text("old a")
    (target / "b").write_text("old b")
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 4:  # the marker written, a and b moved out: the first move in fails
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(WriteError, match="Input/output error"):
        with atomic.atomic_folder(target, ("a", "b"), "test") as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("new a")
            (tmp / "b").write_text("new b")
    monkeypatch.setattr(atomic.os, "replace", real)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"keep.txt": "user", "a": "old a", "b": "old b"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]


def test_compare_and_sweep_refuse_a_folder_with_other_files(dump_runs, tmp_path, capsys):
    a, b = dump_runs
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "compare.png").write_bytes(b"my own figure")
    assert cli.main(["compare", str(a), str(b), "--out", str(mine)]) == 2
    err = _one_line_error(capsys)
    assert f"--out {str(mine)!r} holds files keras-ee did not write (compare.png)" in err
    assert cli.main(["sweep", str(a / "dump"), "--out", str(mine)]) == 2
    assert "did not write (compare.png)" in _one_line_error(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["compare.png"]
    assert (mine / "compare.png").read_bytes() == b"my own figure"
    # A new folder is marked and can be written again; the dump folder is sweep's default.
    for _ in range(2):
        assert cli.main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
        assert cli.main(["sweep", str(a / "dump"), "--out", str(tmp_path / "sw")]) == 0
    assert (tmp_path / "cmp" / MARKER).is_file() and (tmp_path / "sw" / "budget.csv").is_file()
    assert cli.main(["sweep", str(b / "dump")]) == 0
    assert (b / "dump" / "budget.csv").is_file()


def test_train_refuses_a_folder_with_other_files_and_resumes_its_own(tmp_path, capsys):
    cfg = TrainConfig(dataset="digits", model="multiexit_cnn", epochs=1, batch_size=128, val_size=200, train_size=200)
    folder = tmp_path / "project"
    folder.mkdir()
    mine = '{"dataset": "digits", "epochs": 1}'
    (folder / "config.json").write_text(mine)  # the user's own settings, not a run: train would replace them
    with pytest.raises(ForeignFolderError, match=r"holds files keras-ee did not write \(config.json\)"):
        experiment.prepare_workdir(cfg, folder)
    argv = ["train", "--config", str(folder / "config.json"), "--train-size", "200", "--val-size", "200"]
    assert cli.main([*argv, "--quiet", "--out", str(folder)]) == 2
    assert "did not write (config.json)" in _one_line_error(capsys)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    assert (folder / "config.json").read_text() == mine
    # A run folder from before the marker (its lock file, a started run) is recognised: it resumes.
    old = tmp_path / "old_run"
    old.mkdir()
    cfg.to_json(old / "config.json")
    (old / ".lock").write_text("")
    (old / "history.csv").write_text("epoch,loss\n0,1.0\n")
    assert experiment.prepare_workdir(cfg, old) == old
    with pytest.raises(ValueError, match="other settings"):
        experiment.prepare_workdir(TrainConfig.from_dict({**cfg.to_dict(), "epochs": 3}), old)
    # A new folder gets the mark with its config.
    experiment.prepare_workdir(cfg, tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [MARKER, "config.json"]


# --- item 5: tuning.search reports like keras-ee -----------------------------------------------


def test_tuning_search_bad_config_and_out_are_one_line_like_train(tmp_path, capsys):
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"epochz": 3}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"epochs": 3,')
    for config in (unknown, broken):
        assert search.main(["--config", str(config), "--out", str(tmp_path / "t")]) == 2
        tuning_err = _one_line_error(capsys, "tuning.search: error: ")
        assert cli.main(["train", "--config", str(config), "--out", str(tmp_path / "r")]) == 2
        train_err = _one_line_error(capsys, "keras-ee train: error: ")
        assert tuning_err.removeprefix("tuning.search: error: ") == train_err.removeprefix("keras-ee train: error: ")
    assert "epochz" in tuning_err or "JSON" in tuning_err
    (tmp_path / "file").write_text("x")
    assert search.main(["--dataset", "digits", "--out", str(tmp_path / "file")]) == 2
    err = _one_line_error(capsys, "tuning.search: error: ")
    assert f"--out {str(tmp_path / 'file')!r} is an existing file; expected a folder" in err
    mine = tmp_path / "mine"
    (mine / "l2w").mkdir(parents=True)  # --overwrite would delete the method's project folder
    (mine / "l2w" / "notes.md").write_text("mine")
    assert search.main(["--dataset", "digits", "--method", "l2w", "--overwrite", "--out", str(mine)]) == 2
    assert "did not write (l2w)" in _one_line_error(capsys, "tuning.search: error: ")
    assert (mine / "l2w" / "notes.md").read_text() == "mine"
    assert not list(tmp_path.glob("t")) and not list(tmp_path.glob("r"))


def test_tuning_search_read_only_out_exits_4_naming_it(tmp_path, monkeypatch, capsys):
    _read_only(monkeypatch, tmp_path)
    assert search.main(["--dataset", "digits", "--out", str(tmp_path / "t")]) == 4
    err = _one_line_error(capsys, "tuning.search: error: ")
    assert err == f"tuning.search: error: cannot write {str(tmp_path / 't')!r}: Read-only file system."


def _read_only(monkeypatch, folder):
    """New files in `folder` fail with EROFS (tests may run as root, for whom chmod changes nothing)."""
    real = os.open

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", open_)


# --- item 13: --out messages name the user's path and what was expected -----------------------


def test_predict_out_of_the_wrong_kind_is_refused_first_naming_it(saved, tmp_path, monkeypatch, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")

    def no_load(path):
        raise AssertionError("the model was loaded before --out was checked")

    with monkeypatch.context() as m:
        m.setattr(EarlyExitModel, "load", staticmethod(no_load))
        assert _predict(saved, tmp_path / "folder") == 2
        err = _one_line_error(capsys)
        assert f"--out {str(tmp_path / 'folder')!r} is a folder; expected the path of the CSV to write" in err
        assert _predict(saved, tmp_path / "file" / "x.csv") == 2
        err = _one_line_error(capsys)
        assert f"lies under the file {str(tmp_path / 'file')!r}; expected a path in a folder" in err
        assert "File exists" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]
    run = tmp_path / "folder"
    np.savez(run / "l2w_samples.npz", loss=np.zeros(3))
    assert cli.main(["plot-weights", str(run), "--out", str(run)]) == 2
    assert f"--out {str(run)!r} is a folder; expected the path of the PNG to write" in _one_line_error(capsys)


@pytest.mark.skipif(not os.path.isdir("/proc/self") or sys.platform != "linux", reason="needs Linux /proc")
def test_predict_into_proc_exits_4_naming_the_path(saved, capsys):
    assert _predict(saved, "/proc/x.csv") == 4
    assert _one_line_error(capsys) == "keras-ee predict: error: cannot write '/proc/x.csv': No such file or directory."


@pytest.mark.parametrize("where", ["replace", "fsync"])
def test_a_full_disk_names_the_out_path_with_status_4(saved, dump_runs, tmp_path, monkeypatch, capsys, where):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = tmp_path / "p.csv"
    monkeypatch.setattr(atomic.os, where, full)
    assert _predict(saved, out) == 4
    assert _one_line_error(capsys) == f"keras-ee predict: error: cannot write {str(out)!r}: No space left on device."
    a, b = dump_runs
    assert cli.main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 4
    err = _one_line_error(capsys)
    assert f"cannot write {str(tmp_path / 'cmp')!r}: No space left on device." in err or (
        f"cannot write {str(tmp_path / 'cmp' / 'compare.png')!r}: No space left on device." in err
    )
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary left


def test_a_read_only_out_is_found_before_predicting(saved, tmp_path, monkeypatch, capsys):
    _read_only(monkeypatch, tmp_path)

    def no_load(path):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(EarlyExitModel, "load", staticmethod(no_load))
    out = tmp_path / "sub" / "p.csv"
    assert _predict(saved, out) == 4
    assert _one_line_error(capsys) == f"keras-ee predict: error: cannot write {str(out)!r}: Read-only file system."


def test_atomic_writes_name_the_target_not_the_temporary(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(WriteError) as info:
        atomic.atomic_write_text(tmp_path / "a.txt", "x")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "a.txt")
    assert isinstance(info.value, OSError) and not isinstance(info.value, FileNotFoundError)
