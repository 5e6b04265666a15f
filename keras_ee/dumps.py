"""The on-disk logit dump: what a trained multi-exit model leaves for the calibrator.

A dump is a folder holding everything the budget sweep needs, so thresholds can be
re-calibrated and curves re-drawn without the network:

    DUMP/
      val_logits.npy    (K, N_val, C)  float16 | float32 | float64, exits first
      val_labels.npy    (N_val,)       integer class ids in [0, C)
      test_logits.npy   (K, N_test, C) same K and C as val_logits
      test_labels.npy   (N_test,)
      costs.json        {"mul_adds": [K numbers], "params": [K numbers], "rule": "reference"}

`mul_adds` are the cumulative costs of the exits (backbone up to exit k plus every head
up to and including head k), as `keras_ee.costs.exit_costs` returns them. Costs are any
finite, non-negative, non-decreasing numbers, one per exit: integer counts, or fractional
ones (relative costs such as `[0.2, 0.4, 0.45, 0.9]`, GFLOPs, milliseconds) which are
kept exactly as given (`params` follows the same rule and defaults to zeros). JSON's
non-standard `NaN` / `Infinity` (and overflowing literals such as `1e309`) are refused.
The `.npy` files are standard NumPy arrays without pickled objects, in native byte order.

The logits are opened with `np.load(..., mmap_mode="r")`, so dumps larger than RAM are
swept without being read into memory (the calibrator is zero-copy on C-contiguous
memmaps). `load_dump` checks every file (size against the `.npy` header, dtypes, shapes,
label range, costs) and names the file and what it expected when something is wrong;
NaN / inf logits are reported by `keras_ee.evaluation` (split, `exit_k` and first sample).

`save_dump` is atomic: it writes the whole dump into a sibling temporary folder
`DUMP.tmp-<pid>`, fsyncs every file and the folder, then swaps it in (an existing DUMP is
renamed to `DUMP.old-<pid>`, the new folder renamed to DUMP, the old one deleted). A kill
at any point leaves either the previous dump or the new one at DUMP, never a mix or a
half-written file; leftovers of killed saves (`DUMP.tmp-*`, `DUMP.old-*` of processes
that no longer run) are removed by the next `save_dump`, and `load_dump` names them if
DUMP itself is missing. Other files of an existing DUMP folder (say the CSVs and plot
`keras-ee sweep` writes there) are carried over into the new folder before the swap
(hard-linked, or copied where links are not supported).

Example:

    from keras_ee import dumps
    dumps.save_dump("runs/x/dump", val_logits, val_labels, test_logits, test_labels,
                    costs={"mul_adds": [6.9e6, 14.4e6], "params": [3e5, 6.5e5]})
    dump = dumps.load_dump("runs/x/dump")
    dump.val_logits.shape  # (K, N_val, C)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

from keras_ee import validation as v
from keras_ee._typing import StrPath
from keras_ee.atomic import atomic_write_json, fsync_dir

FILES = ("val_logits.npy", "val_labels.npy", "test_logits.npy", "test_labels.npy", "costs.json")
_NPY_MAGIC = b"\x93NUMPY"
_EXPECTED = {
    "val_logits.npy": "a float16/float32/float64 array of shape (num_exits, N_val, num_classes)",
    "test_logits.npy": "a float16/float32/float64 array of shape (num_exits, N_test, num_classes)",
    "val_labels.npy": "an integer array of shape (N_val,)",
    "test_labels.npy": "an integer array of shape (N_test,)",
}


@dataclasses.dataclass(frozen=True)
class Dump:
    """Validation and test logits of every exit, their labels and the exits' costs.

    `mul_adds` and `params` hold one cumulative cost per exit, ints or floats as they
    were stored.
    """

    val_logits: np.ndarray
    val_labels: np.ndarray
    test_logits: np.ndarray
    test_labels: np.ndarray
    mul_adds: list[float]
    params: list[float]
    path: Path | None = None

    @property
    def num_exits(self) -> int:
        return int(self.val_logits.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.val_logits.shape[2])


def first_non_finite(logits: np.ndarray, chunk: int | None = None) -> tuple[int, int, int] | None:
    """The first `(exit, sample, class)` (0-based) holding NaN or inf, or None.

    "First" is in exit order, then sample, then class. The array (a memmap too) is
    scanned exit by exit in blocks of `chunk` samples, so memory stays small.

    Args:
        logits: float array (K, N, C).
        chunk: samples per block; default about 2**20 values a block.
    """
    logits = np.asarray(logits) if not isinstance(logits, np.ndarray) else logits
    k_count, n, c = logits.shape
    step = max(1, int(chunk) if chunk else (1 << 20) // max(c, 1))
    for k in range(k_count):
        for start in range(0, n, step):
            bad = ~np.isfinite(logits[k, start : start + step])
            if bad.any():
                i, j = divmod(int(np.flatnonzero(bad.reshape(-1))[0]), c)
                return k, start + i, j
    return None


# ----------------------------------------------------------------------------- .npy files


def _clean(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _read_npy(file: Path, mmap: bool) -> np.ndarray:
    """np.load with a one-line error naming the file for every way a .npy can be broken."""
    expected = _EXPECTED.get(file.name, "a NumPy .npy array")
    shown = repr(str(file))
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
            if head != _NPY_MAGIC:
                if size == 0:
                    raise ValueError(
                        f"{shown} is empty (0 bytes); expected a .npy file holding {expected} "
                        "(was the save interrupted or the disk full?)."
                    )
                if len(head) < len(_NPY_MAGIC) and _NPY_MAGIC.startswith(head):
                    raise ValueError(
                        f"{shown} is truncated ({size} bytes, less than a .npy header); expected {expected}."
                    )
                hint = " (it is a zip archive, e.g. an .npz)" if head.startswith(b"PK") else ""
                raise ValueError(
                    f"{shown} is not a .npy file{hint}: it does not start with the .npy magic "
                    f"b'\\x93NUMPY'; expected {expected}."
                )
            f.seek(0)
            try:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version in ((2, 0), (3, 0)):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
            except (ValueError, EOFError, SyntaxError, TypeError) as e:
                raise ValueError(
                    f"{shown} has a damaged or truncated .npy header ({_clean(e)}); expected {expected}."
                ) from None
            offset = f.tell()
    except OSError as e:
        raise FileNotFoundError(f"cannot read {shown}: {_clean(e)}.") from None
    if dtype.hasobject:
        raise TypeError(
            f"{shown} holds Python objects (dtype {dtype}), which a dump never stores; expected {expected}."
        )
    data_bytes = math.prod(shape) * dtype.itemsize
    if size - offset < data_bytes:
        raise ValueError(
            f"{shown} is truncated: its header announces shape {shape} of {dtype} ({data_bytes} bytes of data) "
            f"but the file holds only {size - offset} bytes after the header (was the save interrupted?)."
        )
    try:
        if mmap and data_bytes > 0:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        return np.load(file, allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:
        raise ValueError(f"{shown} could not be read as a .npy file ({_clean(e)}); expected {expected}.") from None


def _read_costs(file: Path, num_exits: int) -> tuple[list, list]:
    shown = repr(str(file))
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{shown} is not UTF-8 text ({_clean(e)}); expected a JSON object with 'mul_adds'.") from None
    except OSError as e:
        raise FileNotFoundError(f"cannot read {shown}: {_clean(e)}.") from None
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{shown} is not valid JSON: {_clean(e)}.") from None
    if not isinstance(meta, dict):
        raise ValueError(
            f'{shown} must hold a JSON object like {{"mul_adds": [...], "params": [...]}}; '
            f"received a JSON {type(meta).__name__}."
        )
    if "mul_adds" not in meta:
        raise ValueError(f"{shown} must have a 'mul_adds' list; received keys {sorted(meta)}.")
    mul_adds = v.check_exit_costs(meta["mul_adds"], "mul_adds", num_exits, shown, ValueError)
    params = meta.get("params")
    params = [0] * num_exits if params is None else v.check_exit_costs(params, "params", num_exits, shown, ValueError)
    return mul_adds, params


# ----------------------------------------------------------------------------- save


_LEFTOVER = re.compile(r"\.(tmp|old)-(\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover: no other save of this process is running on it
    if os.name == "nt":
        return True  # no safe liveness probe: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _leftovers(path: Path) -> list[Path]:
    """Sibling folders `<name>.tmp-<pid>` / `<name>.old-<pid>` that a save_dump left behind."""
    if not path.parent.is_dir():
        return []
    prefix = path.name + "."
    out = []
    for entry in path.parent.iterdir():
        if entry.name.startswith(prefix) and _LEFTOVER.fullmatch(entry.name[len(path.name) :]):
            out.append(entry)
    return sorted(out)


def _check_target(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"cannot save a dump at {str(path)!r}: it is a file, not a folder.")
    if path.is_dir():
        here, target = Path.cwd().resolve(), path.resolve()
        if here == target or target in here.parents:
            raise ValueError(
                f"cannot save a dump at {str(path)!r}: save_dump replaces the folder as a whole, and it holds "
                "the current working folder; save the dump into a folder of its own."
            )


def _link_or_copy(src: StrPath, dst: StrPath) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) the entries of `old` that are not dump files into `new`."""
    for entry in old.iterdir():
        if entry.name in FILES or entry.name.endswith(".npy.tmp"):
            continue  # the new dump's own files; `.npy.tmp` are leftovers of older versions
        target = new / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def save_dump(
    path: StrPath,
    val_logits: npt.ArrayLike,
    val_labels: npt.ArrayLike,
    test_logits: npt.ArrayLike,
    test_labels: npt.ArrayLike,
    costs: dict,
) -> Path:
    """Write a dump folder atomically (see the module docstring). Returns its path.

    Args:
        path: folder to create (parents too). An existing dump there is replaced
            atomically; other files in that folder are kept.
        val_logits, test_logits: float arrays (K, N, C), exits first (converted to native
            byte order and C order).
        val_labels, test_labels: integer arrays (N,) in [0, C).
        costs: dict with `mul_adds` and optionally `params` (default zeros): one
            cumulative, finite, non-negative, non-decreasing number per exit, kept as
            given (ints stay ints, fractions are not rounded); optional `rule` string.

    Raises:
        TypeError / ValueError: bad arrays or costs (nothing is written then).
        FileExistsError: `path` is a file.
        ValueError: `path` is (or holds) the current working folder.
        OSError: disk full or read-only (the previous dump, if any, is left intact).
    """
    arrays = {}
    for name, value in (("val_logits", val_logits), ("test_logits", test_logits)):
        a = np.asarray(value)
        if a.dtype.kind == "f" and not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        v.check_exit_logits(a, f"`{name}`")
        arrays[name] = a
    v.check_logits_pair(arrays["val_logits"], arrays["test_logits"], "`val_logits`", "`test_logits`")
    for split, value in (("val", val_labels), ("test", test_labels)):
        labels = np.asarray(value)
        v.check_labels_of_logits(labels, arrays[f"{split}_logits"].shape, f"`{split}_labels`", split)
        arrays[f"{split}_labels"] = labels
    if not isinstance(costs, Mapping):
        raise TypeError(f"`costs` must be a dict with 'mul_adds' (and 'params'); received {type(costs).__name__}.")
    if "mul_adds" not in costs:
        raise ValueError(f"`costs` must have a 'mul_adds' entry; received keys {sorted(map(str, costs))}.")
    k = arrays["val_logits"].shape[0]
    mul_adds = v.check_exit_costs(costs["mul_adds"], "mul_adds", k, "costs")
    params = costs.get("params")
    params = [0] * k if params is None else v.check_exit_costs(params, "params", k, "costs")
    rule = costs.get("rule", "reference")
    if not isinstance(rule, str):
        raise TypeError(f"costs['rule'] must be a string; received {type(rule).__name__}.")

    given = path
    path = Path(os.path.abspath(path))  # normalised, so "." or "a/.." name a real sibling
    _check_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in _leftovers(path):
        if not _pid_alive(int(leftover.name.rsplit("-", 1)[1])):  # `<name>.tmp-<pid>`: _leftovers matched it
            shutil.rmtree(leftover, ignore_errors=True)
    pid = os.getpid()
    tmp = path.with_name(f"{path.name}.tmp-{pid}")
    old = path.with_name(f"{path.name}.old-{pid}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    moved_aside = False
    try:
        for name in ("val_logits", "val_labels", "test_logits", "test_labels"):
            a = arrays[name]
            if name.endswith("_logits"):
                a = np.ascontiguousarray(a)
            else:
                a = a.astype(np.int32)
            with open(tmp / f"{name}.npy", "wb") as f:
                np.save(f, a)
                f.flush()
                os.fsync(f.fileno())
        atomic_write_json(tmp / "costs.json", {"mul_adds": mul_adds, "params": params, "rule": rule})
        if path.is_dir():
            _carry_over(path, tmp)
        fsync_dir(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            moved_aside = True
        try:
            os.rename(tmp, path)
        except BaseException:
            if moved_aside:
                os.rename(old, path)  # put the previous dump back
                moved_aside = False
            raise
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if moved_aside:
        shutil.rmtree(old, ignore_errors=True)
    return Path(given)


# ----------------------------------------------------------------------------- load


def is_dump_folder(path: StrPath) -> bool:
    """Whether `path` is a folder holding every file of a dump (`FILES`); their content is not read."""
    path = Path(path)
    return path.is_dir() and all((path / f).is_file() for f in FILES)


def load_dump(path: StrPath, mmap: bool = True) -> Dump:
    """Open a dump folder written by `save_dump` (or by hand in the same format).

    Args:
        path: the dump folder.
        mmap: open the logits as read-only memory maps (default), so dumps larger than
            RAM work; labels are always read into memory.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (all are named; so
            are the leftovers of an interrupted `save_dump`).
        ValueError / TypeError: a file is empty, truncated, not a .npy file or holds
            objects; shapes, dtypes, labels or costs are inconsistent. The message names
            the file and what was expected.
    """
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise FileNotFoundError(f"dump path {str(path)!r} is a file, not a folder; expected a folder with {FILES}.")
        leftovers = [p.name for p in _leftovers(path)]
        hint = (
            f"; an interrupted save_dump left {leftovers} next to it ('.old-*' is the previous dump, '.tmp-*' "
            "the new one, complete if it holds all five files): rename one to "
            f"{path.name!r}"
            if leftovers
            else ""
        )
        raise FileNotFoundError(f"dump folder {str(path)!r} does not exist{hint}; expected a folder with {FILES}.")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"dump folder {str(path)!r} lacks the file(s) {missing}; a dump holds {FILES}.")
    where = {f[: -len(".npy")]: repr(str(path / f)) for f in FILES if f.endswith(".npy")}
    val_logits = _read_npy(path / "val_logits.npy", mmap)
    test_logits = _read_npy(path / "test_logits.npy", mmap)
    v.check_exit_logits(val_logits, where["val_logits"])
    v.check_exit_logits(test_logits, where["test_logits"])
    v.check_logits_pair(val_logits, test_logits, where["val_logits"], where["test_logits"])
    val_labels = _read_npy(path / "val_labels.npy", False)
    test_labels = _read_npy(path / "test_labels.npy", False)
    v.check_labels_of_logits(val_labels, val_logits.shape, where["val_labels"], "val")
    v.check_labels_of_logits(test_labels, test_logits.shape, where["test_labels"], "test")
    mul_adds, params = _read_costs(path / "costs.json", val_logits.shape[0])
    return Dump(val_logits, val_labels, test_logits, test_labels, mul_adds, params, path)
