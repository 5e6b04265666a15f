"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every helper writes to a temporary file in the *same folder* as the target (so the final
rename never crosses a filesystem), flushes and fsyncs it, renames it over the target with
`os.replace` (atomic on POSIX and Windows) and then fsyncs the folder so the rename itself
survives a power cut. If anything fails, the temporary file is removed and the error
propagates unchanged; a full or read-only disk (`OSError` with errno ENOSPC, EROFS,
EACCES, ...) stays an `OSError`, and the target keeps its previous content.

    from keras_ee.atomic import atomic_write_json, atomic_path

    atomic_write_json("runs/x/costs.json", {"mul_adds": [1.5, 3.0]})
    with atomic_path("runs/x/model.keras") as tmp:   # tmp ends in ".keras" too
        model.save(tmp)                              # renamed to model.keras on success

Temporary names are `.<name>.tmp-<pid>-<random><suffix>`, hidden and in the target's
folder; a killed process can leave one behind, but never a truncated target. An `OSError`
while writing comes out as `WriteError`, an `OSError` with the same errno that names the
target (the path the caller gave), never the temporary name.

The second half is the one rule for every path a command writes (`--out` of `train`,
`predict`, `compare`, `sweep`, `plot-weights`, `python -m tuning.search`, and
`EarlyExitModel.export`): keras-ee never deletes what it did not write.

- `check_out_file` / `check_out_folder` run before any work: a folder where a file is
  expected, a file where a folder is, a path under a file, or a folder that holds files
  keras-ee did not write (`ForeignFolderError`) is refused with one line naming the path
  and what was expected; a folder that cannot be written is found by a probe (`WriteError`).
- `claim_out_folder` creates the folder and marks it with the file `.keras-ee.json`
  (`MARKER`, written atomically), so a later command recognises the folder as its own.
- `writing(path)`: any `OSError` raised in the block becomes a `WriteError` naming `path`.
- `atomic_folder(path, owned, kind)` writes a folder next to `path` and moves its entries
  in, replacing only those (a SavedModel's own files): every other file stays where it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from keras_ee._typing import StrPath

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_path",
    "fsync_dir",
    "WriteError",
    "ForeignFolderError",
    "MARKER",
    "check_out_file",
    "check_out_folder",
    "claim_out_folder",
    "writing",
    "atomic_folder",
]

MARKER = ".keras-ee.json"
# The temporary names of this module (`.<name>.tmp-<pid>-<hex><suffix>`) and of `save_dump`
# (`<dump>.tmp-<pid>`): left by a killed process, never a user's file.
TEMPORARY_NAME = re.compile(r"\.tmp-\d+(-[0-9a-f]+)?")


class WriteError(OSError):
    """A path could not be written (full or read-only disk, no permission, ...).

    Built as `WriteError(errno, reason, path)` it keeps the errno and names the caller's
    path (`filename`); built from one message (`keras_ee.runs.RunWriteError`) it says more.
    """


class ForeignFolderError(FileExistsError, ValueError):
    """An output folder holds files keras-ee did not write: refused, so nothing of them is lost.

    A `FileExistsError` for Python callers, a `ValueError` (bad input, exit status 2) for the CLI.
    """


def describe_os_error(e: OSError) -> str:
    """`'No space left on device'` and the like: the OS's reason without the errno number."""
    return e.strerror or str(e)


@contextlib.contextmanager
def writing(path: StrPath) -> Iterator[None]:
    """Raise any `OSError` of the block as a `WriteError` naming `path` (not a temporary name).

    A `WriteError` naming `path` or a file in it passes unchanged; so does an `OSError`
    without an errno (a message of keras-ee's own).
    """
    try:
        yield
    except OSError as e:
        if e.errno is None or (isinstance(e, WriteError) and _within(e.filename, path)):
            raise
        raise WriteError(e.errno, describe_os_error(e), str(path)) from e


def _within(filename: StrPath | bytes | None, path: StrPath) -> bool:
    if not filename:
        return False
    filename, path = Path(os.fsdecode(filename)), Path(path)
    return filename == path or path in filename.parents


def fsync_dir(path: StrPath) -> None:
    """Flush a folder's entries (renames, new files) to disk.

    A no-op where folders cannot be opened for fsync (Windows) or the filesystem refuses
    it (EINVAL / ENOTSUP on some network or FUSE filesystems).

    Args:
        path: the folder.
    """
    if os.name == "nt":
        return
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # the filesystem does not support fsync on folders; nothing more to do
    finally:
        os.close(fd)


def _temp_name(target: Path) -> Path:
    # The suffix is kept last so writers that insist on an extension (Keras' `.keras`,
    # numpy's `.npz`, h5py's `.h5`) accept the temporary path and do not append one.
    # All suffixes are kept (`.weights.h5`, which Keras' `save_weights` insists on).
    suffix = "".join(target.suffixes)
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    return target.with_name(f".{stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _keep_mode(target: Path, tmp: Path) -> None:
    # Replacing a file must not change its permissions (a 0600 secrets file stays 0600).
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return  # no previous file
    with contextlib.suppress(OSError):
        os.chmod(tmp, mode)


@contextlib.contextmanager
def atomic_path(path: StrPath) -> Iterator[Path]:
    """Yield a temporary path next to `path` (same folder, same suffix); on success move it in.

    The body writes the file at the yielded path by any means (`model.save(tmp)`,
    `np.savez(tmp, ...)`, `h5py.File(tmp, "w")`). When the block exits normally the file is
    fsynced, renamed onto `path` (keeping the permission bits of a file it replaces) and
    the folder fsynced; if the block raises, or the body wrote nothing, the temporary file
    is deleted and `path` is left untouched (the error propagates; a body that wrote
    nothing raises FileNotFoundError).

    Args:
        path: the final file path; its folder must exist.

    Yields:
        pathlib.Path: the temporary path to write to.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(target)!r}: folder {str(target.parent)!r} does not exist.")
    tmp = _temp_name(target)
    try:
        with writing(target):
            yield tmp
        if not tmp.exists():
            raise FileNotFoundError(
                f"atomic_path({str(target)!r}): nothing was written to the temporary path {str(tmp)!r}."
            )
        with writing(target):
            if tmp.is_file():
                _keep_mode(target, tmp)
                fd = os.open(tmp, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows fsyncs writable fds only
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, target)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write_bytes(path: StrPath, data: bytes | bytearray | memoryview) -> Path:
    """Write `data` to `path` atomically (temporary file, fsync, rename, fsync folder).

    Args:
        path: the file to (over)write; its folder must exist.
        data: bytes-like content.

    Returns:
        pathlib.Path: `path`.

    Raises:
        TypeError: `data` is not bytes-like.
        WriteError: the disk is full, read-only or not writable (the temporary file is removed
            and `path` keeps its old content); it names `path`.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes: `data` must be bytes; received {type(data).__name__}.")
    target = Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return target


def atomic_write_text(path: StrPath, text: str, encoding: str = "utf-8") -> Path:
    """Write the string `text` to `path` atomically (see `atomic_write_bytes`).

    Args:
        path: the file to (over)write; its folder must exist.
        text: the content; written as is (no newline translation).
        encoding: text encoding, UTF-8 by default.

    Returns:
        pathlib.Path: `path`.
    """
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text: `text` must be a str; received {type(text).__name__}.")
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: StrPath, obj: object) -> Path:
    """Write `obj` as JSON (indent=2, trailing newline) to `path` atomically.

    NaN and infinities are refused (`allow_nan=False`), since they are not JSON and other
    readers reject them; the target is not touched then.

    Args:
        path: the file to (over)write; its folder must exist.
        obj: a JSON-serialisable object.

    Returns:
        pathlib.Path: `path`.

    Raises:
        ValueError: `obj` holds NaN or an infinity.
        TypeError: `obj` holds something JSON cannot encode.
    """
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"cannot write {str(path)!r}: JSON has no NaN or Infinity ({e}).") from None
    return atomic_write_text(path, text + "\n")


# ----------------------------------------------------------------------------- output paths


def _label(path: Path, what: str | None) -> str:
    return f"{what} {str(path)!r}" if what else repr(str(path))


def _check_parents(path: Path, label: str) -> Path:
    """Refuse a path under a file; return the nearest folder that exists (where the path would be created)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{label} lies under the file {str(parent)!r}; expected a path in a folder.")
            return parent
    return Path(".")


def _probe(folder: Path, path: Path) -> None:
    """Create and delete a temporary file in `folder`: a read-only or pseudo filesystem is found
    before any work, named by the user's `path`."""
    probe = _temp_name(folder / f"{path.name}-probe")
    with writing(path):
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        os.unlink(probe)


def check_out_file(path: StrPath, what: str | None = "--out", expected: str = "the path of a file to write") -> Path:
    """Refuse, before any work, a file target that cannot be one.

    Args:
        path: the file to be written (its folders may not exist yet).
        what: how the caller names it in messages (`"--out"`; None: the path alone).
        expected: what the message says was expected instead of a folder.

    Raises:
        ValueError: `path` is a folder, or lies under a file.
        WriteError: its folder cannot be written (read-only, no permission, a pseudo
            filesystem such as /proc); it names `path`.
    """
    path = Path(path)
    label = _label(path, what)
    if path.is_dir():
        raise ValueError(f"{label} is a folder; expected {expected}.")
    _probe(_check_parents(path, label), path)
    return path


def _own_entries(folder: Path) -> list[str]:
    """The entries of `folder`, leftovers of killed atomic writes left out."""
    return sorted(e.name for e in folder.iterdir() if not TEMPORARY_NAME.search(e.name))


def check_out_folder(
    path: StrPath,
    what: str | None = "--out",
    recognise: Callable[[Path], bool] | None = None,
    overwrite: bool = False,
    hint: str = "",
    probe: bool = True,
) -> Path:
    """Refuse, before any work, a folder that keras-ee may not write into.

    A folder may be written when it does not exist, is empty, carries keras-ee's `MARKER`,
    or `recognise(path)` says it is a folder of this command from before the marker (a run
    folder with its lock file); any other non-empty folder holds files keras-ee did not
    write and is refused, unless `overwrite` (the caller then replaces only its own entries).

    Args:
        path: the folder.
        what: how the caller names it in messages (`"--out"`; None: the path alone).
        recognise: optional `fn(path) -> bool` for older keras-ee folders without the marker.
        overwrite: accept a folder holding other files.
        hint: appended to the refusal of such a folder (how to go on).
        probe: check that the folder (or the one it will be created in) can be written.

    Raises:
        ValueError: `path` is a file or lies under one.
        ForeignFolderError: a non-empty folder keras-ee did not write.
        WriteError: it cannot be written (with `probe`).
    """
    path = Path(path)
    label = _label(path, what)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label} is an existing file; expected a folder (new, empty, or one keras-ee wrote).")
    existing = _check_parents(path, label)
    if path.is_dir():
        existing = path
        entries = _own_entries(path)
        if entries and not overwrite and MARKER not in entries and not (recognise and recognise(path)):
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise ForeignFolderError(
                f"{label} holds files keras-ee did not write ({shown}); expected a new or empty folder, or one "
                f"keras-ee wrote. Nothing was changed; {hint or 'choose another folder.'}"
            )
    if probe:
        _probe(existing, path)
    return path


def claim_out_folder(path: StrPath, kind: str) -> Path:
    """Create `path` (and its parents) and mark it as keras-ee's if it is new or empty.

    A folder already holding files (keras-ee's from before the marker, or accepted with
    `overwrite`) is not marked: the marker says that keras-ee wrote the folder.

    Args:
        path: a folder `check_out_folder` accepted.
        kind: what the folder holds ("compare", "sweep", "run", ...), recorded in the marker.

    Raises:
        WriteError: it cannot be created or written; it names `path`.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not _own_entries(path):
            atomic_write_json(path / MARKER, {"written_by": "keras-ee", "kind": kind})
    except OSError as e:  # named by the folder the user gave, not by the marker inside it
        if e.errno is None:
            raise
        raise WriteError(e.errno, describe_os_error(e), str(path)) from e
    return path


@contextlib.contextmanager
def atomic_folder(path: StrPath, owned: Iterable[str], kind: str, first: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder path; on success move what the body wrote there into `path`.

    The body creates the folder at the yielded path (a SavedModel writer does). Then keras-ee's
    `MARKER` (recording `kind`) is added, every file fsynced, and the entries moved into `path`
    replacing only `owned` ones there (see `_replace_entries`): a missing or empty `path` is
    replaced in one rename, and every other entry of an existing `path` stays where it is.
    On failure the temporary folder is removed and `path` keeps its previous entries.

    Args:
        path: the folder to write (its parent must exist; check it with `check_out_folder`).
        owned: names of the entries the body writes (the marker is added to them).
        kind: recorded in the marker ("savedmodel").
        first: the entry whose presence makes the folder valid (moved out first, in last).

    Yields:
        pathlib.Path: the temporary folder path to write.

    Raises:
        WriteError: the disk is full or read-only; it names `path`.
    """
    target = Path(path)
    tmp = _temp_name(target)
    try:
        with writing(target):
            yield tmp
            if not tmp.is_dir():
                raise FileNotFoundError(f"atomic_folder({str(target)!r}): nothing was written to {str(tmp)!r}.")
            atomic_write_json(tmp / MARKER, {"written_by": "keras-ee", "kind": kind})
            for folder, _, files in os.walk(tmp):
                for name in files:
                    fd = os.open(os.path.join(folder, name), os.O_RDWR if os.name == "nt" else os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                fsync_dir(folder)
            _replace_entries(tmp, target, {*owned, MARKER}, first)
    finally:
        _remove_quietly(tmp)


def _replace_entries(new: StrPath, target: StrPath, owned: Iterable[str], first: str | None = None) -> Path:
    """Move the entries of the folder `new` into `target`, replacing only the `owned` ones there.

    A missing or empty `target` is replaced by `new` in one rename. Otherwise each entry of
    `target` named in `owned` (or present in `new`) moves to a hidden sibling folder, the
    entries of `new` move in, and that sibling is deleted; every other entry of `target` stays
    where it is. `first` (a SavedModel's `saved_model.pb`) is moved out first and in last, so
    a reader meanwhile finds no model rather than a mix. If a move fails, the previous entries
    are put back.
    """
    new, target = Path(new), Path(target)
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(new, target)
        fsync_dir(target.parent)
        return target
    names = sorted(set(owned) | {e.name for e in new.iterdir()})
    if first in names:  # out first, in last
        names.remove(first)
        names = [first, *names]
    old = _temp_name(target.with_name(f"{target.name}-previous"))  # a temporary name: cleaned up like one
    old.mkdir()
    moved_out, moved_in = [], []
    try:
        for name in names:
            if os.path.lexists(target / name):
                os.replace(target / name, old / name)
                moved_out.append(name)
        for name in reversed(names):
            if os.path.lexists(new / name):
                os.replace(new / name, target / name)
                moved_in.append(name)
        fsync_dir(target)
    except BaseException:
        restored = True
        for name in moved_in:
            with contextlib.suppress(OSError):
                os.replace(target / name, new / name)
        for name in moved_out:
            try:
                os.replace(old / name, target / name)
            except OSError:
                restored = False  # the previous entries stay in the hidden sibling folder
        if restored:
            _remove_quietly(old)
        raise
    _remove_quietly(old)
    return target
