"""keras_ee.atomic: atomic writes leave the old file or the new one, never a temp or half file."""

import errno
import json
import os

import numpy as np
import pytest

from keras_ee import atomic
from keras_ee.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_write_bytes_text_json(tmp_path):
    assert atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01") == tmp_path / "a.bin"
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "a.json", {"x": [1, 2.5]})
    text = (tmp_path / "a.json").read_text()
    assert text == json.dumps({"x": [1, 2.5]}, indent=2) + "\n"
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_json_refuses_nan_inf_and_keeps_old(tmp_path, value):
    target = tmp_path / "c.json"
    target.write_text("{}\n")
    with pytest.raises(ValueError, match="NaN or Infinity"):
        atomic_write_json(target, {"mul_adds": [1.0, value]})
    assert target.read_text() == "{}\n"
    assert _leftovers(tmp_path) == []


def test_type_errors(tmp_path):
    with pytest.raises(TypeError, match="bytes"):
        atomic_write_bytes(tmp_path / "x", "text")
    with pytest.raises(TypeError, match="str"):
        atomic_write_text(tmp_path / "x", b"bytes")
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"a": object()})
    assert list(tmp_path.iterdir()) == []


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write_text(tmp_path / "nope" / "x.txt", "a")


def test_atomic_path_keeps_suffix_and_renames(tmp_path):
    target = tmp_path / "arrays.npz"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.suffix == ".npz"
        assert tmp != target
        np.savez(tmp, a=np.arange(3))
        assert not target.exists()
    assert not tmp.exists()
    np.testing.assert_array_equal(np.load(target)["a"], np.arange(3))
    assert _leftovers(tmp_path) == []


def test_atomic_path_failure_removes_temp_and_keeps_old(tmp_path):
    target = tmp_path / "model.keras"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_nothing_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "x.h5"):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_errors_propagate_and_remove_temp(tmp_path, monkeypatch, code):
    target = tmp_path / "f.json"
    target.write_text("old")
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(atomic.os, "fsync", failing_fsync)
    with pytest.raises(OSError) as info:
        atomic_write_json(target, {"a": 1})
    assert info.value.errno == code
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_replace_error_removes_temp(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "x.bin", b"data")
    assert list(tmp_path.iterdir()) == []


def test_fsync_dir(tmp_path):
    fsync_dir(tmp_path)  # no error
    fsync_dir(tmp_path / "missing")  # a no-op, not an error


def test_replacing_keeps_the_permission_bits(tmp_path):
    target = tmp_path / "secret.json"
    target.write_text("{}")
    target.chmod(0o600)
    atomic_write_json(target, {"a": 1})
    assert (target.stat().st_mode & 0o777) == 0o600


def test_read_only_temp_file_is_still_moved_in(tmp_path):
    target = tmp_path / "ro.bin"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"x")
        tmp.chmod(0o444)
    assert target.read_bytes() == b"x"
