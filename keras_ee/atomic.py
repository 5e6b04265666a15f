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
folder; a killed process can leave one behind, but never a truncated target.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from keras_ee._typing import StrPath

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_path", "fsync_dir"]


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
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(
                f"atomic_path({str(target)!r}): nothing was written to the temporary path {str(tmp)!r}."
            )
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
        OSError: the disk is full, read-only or not writable (the temporary file is removed
            and `path` keeps its old content).
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
