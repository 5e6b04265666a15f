"""A run folder that survives faults: one writer at a time, atomic backups, an exact history.

`keras_ee.experiment.train` uses three pieces of this module:

- `RunLock`: an OS file lock (`fcntl.flock`) on `RUN/.lock` held for the whole command.
  The operating system releases it when the process ends, however it ends, so a lock
  file left by a killed process is stale and simply taken over. A second command on
  the same folder gets `RunFolderBusyError` naming the process that holds it.
- `RunBackup`: the training state (model, optimizers, the method's variables such as
  L2W's WPN and counters) after every finished epoch, written atomically as
  `backup/epoch-NNNN.weights.h5` plus `backup/epoch-NNNN.json`: each file goes to a
  temporary name, is fsynced and renamed, and the previous epoch's backup is deleted
  only once the new one is complete. `restore` loads the newest backup that reads
  back, says which one, and falls back to an older one (or to a fresh start) when a
  file is damaged.
- `HistoryLog`: `history.csv`, rewritten atomically after every epoch; on resume it
  keeps exactly the epochs before the restored one, so an epoch is never listed twice.

and `load_run_model` / `finished_model` to read back the model a run finished with. The
folder's file names and `state.json` are `keras_ee.run_folder`.

The data order of a run is a function of (seed, epoch) (`DatasetSplits.train_dataset`
with `first_epoch`), so restoring the state of epoch e and training on makes a resumed
run bit-identical to one that was never interrupted.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TextIO

import keras
import numpy as np

from keras_ee import models, training  # noqa: F401  (registers the custom classes that load_run_model loads)
from keras_ee._typing import StrPath
from keras_ee.atomic import (
    TEMPORARY_NAME,
    WriteError,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    describe_os_error,
    fsync_dir,
)
from keras_ee.optimizers import optimizer_semantics
from keras_ee.run_folder import LOCK_FILE, MODEL_FILE, read_state

_BACKUP_NAME = re.compile(r"^epoch-(\d{4,})\.weights\.h5$")


class RunFolderBusyError(RuntimeError):
    """Another live process holds the run folder's lock."""


class RunWriteError(WriteError):
    """A file the run depends on could not be written (full or read-only disk, ...).

    The message names the path and says what is still safe on disk.
    """


class RunLock:
    """Exclusive lock of a run folder for the lifetime of one command.

    Args:
        workdir: the run folder (created if missing).

    Example:
    >>> with RunLock("runs/a"):
    ...     train_in("runs/a")       # a second `keras-ee train --out runs/a` is refused
    """

    def __init__(self, workdir: StrPath) -> None:
        self.workdir = Path(workdir)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        path = self.workdir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderBusyError(
                f"run folder {str(self.workdir)!r} is in use by {holder}; wait for it to finish, "
                "or stop it, or use another --out folder."
            ) from None
        except OSError as e:  # e.g. a filesystem without flock support
            os.close(fd)
            raise RunWriteError(f"cannot lock run folder {str(self.workdir)!r}: {describe_os_error(e)}.") from None
        # Who holds it, for the message of a second command (the content is informative only:
        # the lock itself is the flock, which dies with this process).
        info = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:500],
            }
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> Literal[False]:
        self.release()
        return False


def remove_temporaries(workdir: StrPath) -> int:
    """Delete the temporary files of interrupted atomic writes under `workdir`.

    Call with the folder's lock held: then no other process is writing there, and
    every temporary (`.<name>.tmp-<pid>-<hex><suffix>`, `<dump>.tmp-<pid>`) is left over
    from a killed one. Returns how many were removed.
    """
    removed = 0
    for path in sorted(Path(workdir).rglob("*"), key=lambda p: -len(p.parts)):
        if TEMPORARY_NAME.search(path.name) and path.exists():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed += 1
    return removed


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    text = f"process {info['pid']}"
    if info.get("host") and info["host"] != socket.gethostname():
        text += f" on {info['host']}"
    if info.get("command"):
        text += f" ({info['command']!r}, started {info.get('started', '?')})"
    return text


def variable_bytes(model: keras.Model) -> int:
    """Bytes of every variable an `.weights.h5` of `model` would hold (model and optimizers)."""
    return sum(
        int(math.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
        for v in _all_variables(model)
    )


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start a write that cannot fit: HDF5 does not fail cleanly on a full disk."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise RunWriteError(
            f"not enough disk space for {what} in {str(folder)!r}: about {needed / 1e6:.1f} MB needed, "
            f"{free / 1e6:.1f} MB free."
        )


class RunBackup(keras.callbacks.Callback):
    """Atomic end-of-epoch backups of the whole training state, and their restore.

    Args:
        backup_dir: the folder for the backups (`RUN/backup`).
        keep: how many of the newest backups to keep (>= 1; the previous one is only
            deleted after the new one is complete).
        log: where `restore` reports what it loaded (default stderr).
    """

    def __init__(self, backup_dir: StrPath, keep: int = 1, log: TextIO | None = None) -> None:
        super().__init__()
        if int(keep) < 1:
            raise ValueError(f"`keep` must be >= 1; received {keep!r}.")
        self.backup_dir = Path(backup_dir)
        self.keep = int(keep)
        self.log = log

    # --- files ---------------------------------------------------------------

    def _paths(self, epoch: int) -> tuple[Path, Path]:
        stem = f"epoch-{epoch:04d}"
        return self.backup_dir / f"{stem}.weights.h5", self.backup_dir / f"{stem}.json"

    def backups(self) -> list[int]:
        """Epoch counts (epochs finished) of the complete-looking backups, newest first."""
        if not self.backup_dir.is_dir():
            return []
        epochs = []
        for f in self.backup_dir.iterdir():
            m = _BACKUP_NAME.match(f.name)
            if m and self._paths(int(m.group(1)))[1].is_file():
                epochs.append(int(m.group(1)))
        return sorted(epochs, reverse=True)

    def _say(self, text: str) -> None:
        print(f"[keras-ee] {text}", file=self.log or sys.stderr, flush=True)

    def optimizer_semantics(self) -> str | None:
        """The optimizer semantics the newest readable backup records (`"pytorch"` for
        `keras_ee.optimizers`, `"keras"` for Keras' own), `"keras"` for a backup written before
        keras-ee recorded them (it only had Keras' optimizers then), None without a backup."""
        for epoch in self.backups():
            try:
                info = json.loads(self._paths(epoch)[1].read_text())
            except (OSError, ValueError):
                continue
            if isinstance(info, dict):
                semantics = info.get("optimizer_semantics", "keras")
                return semantics if semantics in ("pytorch", "keras") else "keras"
        return None

    # --- restore -------------------------------------------------------------

    def restore(self, model: keras.Model, prepare: Callable[[int], object] | None = None) -> int:
        """Load the newest backup that reads back into `model`; return its epoch count.

        A damaged backup (torn file, wrong content) is reported and skipped; the next
        older one is tried; with none left, training starts over (0 is returned and
        the model keeps its fresh initialisation, which `restore` re-creates by loading
        nothing: the caller builds the model before calling it).

        Args:
            model: the model (compiled) to load into.
            prepare: optional `fn(epochs_done)` called before each backup is loaded,
                to configure the model for the state that backup holds (a
                multi-phase method: the phase of its last epoch, with that phase's
                trainable set and optimizer).
        """
        damaged = []
        for epoch in self.backups():
            weights, meta = self._paths(epoch)
            fresh = None
            try:
                info = json.loads(meta.read_text())
                if info.get("epoch") != epoch:
                    raise ValueError(f"metadata says epoch {info.get('epoch')!r}")
                if prepare is not None:
                    prepare(epoch)
                if model.optimizer is not None and not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)
                fresh = [v.numpy() for v in _all_variables(model)]  # to undo a partial load of a damaged file
                model.load_weights(weights)
                seeds = info.get("seed_states", [])
                states = _seed_states(model)
                if len(seeds) != len(states):
                    raise ValueError(f"it holds {len(seeds)} random seed states, the model has {len(states)}")
                for v, value in zip(states, seeds):
                    v.assign(np.asarray(value, dtype=keras.backend.standardize_dtype(v.dtype)))
            except Exception as e:  # h5py/OSError/ValueError: any unreadable backup is skipped
                damaged.append(f"{weights.name} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
                if fresh is not None:
                    for v, value in zip(_all_variables(model), fresh):
                        v.assign(value)
                continue
            if damaged:
                self._say(f"backup {', '.join(damaged)} is damaged; fell back to the backup after epoch {epoch}.")
            else:
                self._say(f"resuming from the backup after epoch {epoch}.")
            return epoch
        if damaged:
            self._say(
                f"backup {', '.join(damaged)} is damaged and no older backup is intact; starting the training over."
            )
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        return 0

    # --- save ----------------------------------------------------------------

    def save(self, epochs_done: int) -> None:
        """Write the backup after `epochs_done` finished epochs, atomically; prune old ones."""
        weights, meta = self._paths(epochs_done)
        try:
            self.backup_dir.mkdir(parents=True, exist_ok=True)
            check_free_space(
                self.backup_dir,
                int(variable_bytes(self.model) * 1.1) + (1 << 20),
                f"the backup after epoch {epochs_done}",
            )
            with atomic_path(weights) as tmp:
                self.model.save_weights(tmp)
            atomic_write_json(
                meta,
                {
                    "epoch": epochs_done,
                    "written": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "seed_states": [v.numpy().tolist() for v in _seed_states(self.model)],
                    # which step the optimizer state belongs to (a resume must take the same)
                    "optimizer_semantics": optimizer_semantics(self.model.optimizer),
                },
            )
        except OSError as e:
            previous = [b for b in self.backups() if b != epochs_done]
            kept = (
                f"the backup after epoch {previous[0]} is intact"
                if previous
                else "no earlier backup exists, so a rerun starts over"
            )
            reason = e if isinstance(e, RunWriteError) else f"cannot write {str(weights)!r}: {describe_os_error(e)}"
            raise RunWriteError(
                f"{reason}; nothing else was lost: {kept}. Free space (or fix the "
                "permissions) and rerun the same command to resume."
            ) from None
        for old in self.backups()[self.keep :]:
            for f in self._paths(old):
                f.unlink(missing_ok=True)
        fsync_dir(self.backup_dir)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.save(epoch + 1)

    def remove(self) -> None:
        """Delete the backups (once the final model is safely on disk)."""
        shutil.rmtree(self.backup_dir, ignore_errors=True)


def _seed_states(model: keras.Model) -> list[keras.Variable]:
    """The state variables of the model's `SeedGenerator`s (Dropout and other random layers).

    Keras' `.weights.h5` leaves them out, so a backup stores them beside it: without them
    a resumed run would draw other dropout masks than an uninterrupted one.
    """
    # Keras' `variables` are `weights` plus the seed states (metrics' state is in neither).
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _all_variables(model: keras.Model) -> list[keras.Variable]:
    out: list[keras.Variable] = []
    seen: set[int] = set()
    for obj in (model, model.optimizer):
        if obj is None:
            continue
        for v in obj.variables:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


class HistoryLog(keras.callbacks.Callback):
    """`history.csv`: one row per finished epoch, never one epoch twice.

    The file is rewritten atomically after every epoch (a few hundred rows at most), so
    a kill leaves the previous complete file. On resume from the state after epoch `e`,
    `truncate(e)` keeps only the rows of epochs `0..e-1`: rows written after the last
    intact backup (the kill came between the two writes) are dropped and trained again.

    Args:
        path: the CSV file.
    """

    def __init__(self, path: StrPath) -> None:
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict] = []
        self.keys: list[str] = []

    def truncate(self, epochs_done: int) -> None:
        """Keep the rows of the epochs before `epochs_done`; write the file if it changed."""
        self.rows, self.keys = [], []
        if self.path.is_file():
            try:
                with open(self.path, newline="") as f:
                    reader = csv.DictReader(f)
                    self.keys = [k for k in (reader.fieldnames or []) if k != "epoch"]
                    for row in reader:
                        try:
                            if int(row["epoch"]) < epochs_done:
                                self.rows.append(row)
                        except (KeyError, TypeError, ValueError):
                            continue  # a damaged line: that epoch is trained and logged again
            except (OSError, csv.Error, UnicodeDecodeError) as e:
                warnings.warn(f"{self.path}: unreadable ({e}); starting a new history.", stacklevel=2)
        by_epoch = {int(r["epoch"]): r for r in self.rows}  # one row per epoch: the last one written
        self.rows = [by_epoch[e] for e in sorted(by_epoch)]
        if self.path.is_file() or self.rows:
            self._write()

    def _write(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, fieldnames=["epoch", *self.keys], restval="", extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = dict(logs or {})
        for k in logs:
            if k not in self.keys:
                self.keys.append(k)
        row = {"epoch": str(epoch), **{k: _csv_value(v) for k, v in logs.items()}}
        self.rows = [r for r in self.rows if int(r["epoch"]) != epoch] + [row]
        try:
            self._write()
        except OSError as e:
            raise RunWriteError(
                f"cannot write {str(self.path)!r}: {describe_os_error(e)}; the previous "
                "history and backup are intact. Rerun the same command to resume."
            ) from None


def _csv_value(v: Any) -> str:
    try:
        return repr(float(v))
    except (TypeError, ValueError):
        return str(v)


def load_run_model(path: StrPath) -> keras.Model:
    """Load a run's `model.keras`, with a clear error if the file is damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist.")
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{str(path)!r} is damaged: not a complete .keras archive ({path.stat().st_size} bytes; "
            "a write was probably interrupted)."
        )
    try:
        return keras.saving.load_model(path)
    except Exception as e:  # keras reports a torn archive in many ways (even "file not found")
        raise ValueError(
            f"{str(path)!r} is damaged and cannot be loaded ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''})."
        ) from None


def finished_model(workdir: Path) -> tuple[keras.Model | None, ValueError | None]:
    """`(model, None)` for a finished run whose model.keras loads; `(None, error)` if it is
    finished but model.keras is damaged (the run trains again); `(None, None)` if unfinished.

    Under multi_worker every worker decides by this one rule on the same files, so either all
    of them train or none does: a chief retraining a damaged model alone failed in its first
    collective, the other workers having left.
    """
    if not (read_state(workdir).get("trained") and (workdir / MODEL_FILE).is_file()):
        return None, None
    try:
        return load_run_model(workdir / MODEL_FILE), None
    except ValueError as e:
        return None, e
