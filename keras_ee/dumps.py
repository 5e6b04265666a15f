"""The on-disk logit dump: what a trained multi-exit model leaves for the calibrator.

A dump is a folder holding everything the budget sweep needs, so thresholds can be
re-calibrated and curves re-drawn without the network:

    DUMP/
      val_logits.npy    (K, N_val, C)  float16 | float32 | float64, exits first
      val_labels.npy    (N_val,)       integer class ids in [0, C)
      test_logits.npy   (K, N_test, C)
      test_labels.npy   (N_test,)
      costs.json        {"mul_adds": [K ints], "params": [K ints], "rule": "reference"}

`mul_adds` are the cumulative costs of the exits (backbone up to exit k plus every head
up to and including head k), as `keras_ee.costs.exit_costs` returns them. The logits are
opened with `np.load(..., mmap_mode="r")`, so dumps larger than RAM are swept without
being read into memory (the calibrator is zero-copy on C-contiguous memmaps).

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
import os
from pathlib import Path

import numpy as np

FILES = ("val_logits.npy", "val_labels.npy", "test_logits.npy", "test_labels.npy", "costs.json")
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


@dataclasses.dataclass(frozen=True)
class Dump:
    """Validation and test logits of every exit, their labels and the exits' costs."""

    val_logits: np.ndarray
    val_labels: np.ndarray
    test_logits: np.ndarray
    test_labels: np.ndarray
    mul_adds: list[int]
    params: list[int]
    path: Path | None = None

    @property
    def num_exits(self) -> int:
        return int(self.val_logits.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.val_logits.shape[2])


def _check_split(name: str, logits: np.ndarray, labels: np.ndarray) -> None:
    if logits.ndim != 3:
        raise ValueError(
            f"`{name}_logits` must have shape (num_exits, num_samples, num_classes); "
            f"received shape {logits.shape}."
        )
    if logits.dtype.type not in _FLOAT_DTYPES:
        raise TypeError(
            f"`{name}_logits` must be float16, float32 or float64; received dtype {logits.dtype}."
        )
    if labels.ndim != 1 or labels.shape[0] != logits.shape[1]:
        raise ValueError(
            f"`{name}_labels` must have shape ({logits.shape[1]},) to match `{name}_logits` "
            f"{logits.shape}; received shape {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"`{name}_labels` must hold integer class ids; received dtype {labels.dtype}.")
    if labels.size == 0:
        raise ValueError(f"`{name}_labels` is empty: a dump needs at least one {name} sample.")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= logits.shape[2]:
        raise ValueError(
            f"`{name}_labels` must lie in [0, {logits.shape[2]}) (num_classes of the logits); "
            f"received values in [{lo}, {hi}]."
        )


def _check_costs(mul_adds, params, num_exits: int) -> tuple[list[int], list[int]]:
    out = []
    for key, values in (("mul_adds", mul_adds), ("params", params)):
        values = [int(round(float(v))) for v in values]
        if len(values) != num_exits:
            raise ValueError(
                f"costs[{key!r}] must have one entry per exit ({num_exits}); received {len(values)}."
            )
        if any(v < 0 for v in values) or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(
                f"costs[{key!r}] must be cumulative: non-negative and non-decreasing; received {values}."
            )
        out.append(values)
    return out[0], out[1]


def save_dump(path, val_logits, val_labels, test_logits, test_labels, costs: dict) -> Path:
    """Write a dump folder (see the module docstring). Returns its path.

    Args:
        path: folder to create (parents too); existing dump files in it are replaced.
        val_logits, test_logits: arrays (K, N, C), exits first.
        val_labels, test_labels: integer arrays (N,).
        costs: dict with `mul_adds` and `params`, one cumulative value per exit.
    """
    val_logits, test_logits = np.asarray(val_logits), np.asarray(test_logits)
    val_labels, test_labels = np.asarray(val_labels), np.asarray(test_labels)
    _check_split("val", val_logits, val_labels)
    _check_split("test", test_logits, test_labels)
    if val_logits.shape[0] != test_logits.shape[0] or val_logits.shape[2] != test_logits.shape[2]:
        raise ValueError(
            "`val_logits` and `test_logits` must agree in num_exits and num_classes; received "
            f"{val_logits.shape} and {test_logits.shape}."
        )
    if "mul_adds" not in costs:
        raise ValueError(f"`costs` must have a 'mul_adds' entry; received keys {sorted(costs)}.")
    mul_adds, params = _check_costs(
        costs["mul_adds"], costs.get("params", [0] * val_logits.shape[0]), val_logits.shape[0]
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays = {
        "val_logits.npy": np.ascontiguousarray(val_logits),
        "val_labels.npy": val_labels.astype(np.int32),
        "test_logits.npy": np.ascontiguousarray(test_logits),
        "test_labels.npy": test_labels.astype(np.int32),
    }
    for name, array in arrays.items():
        # Write then rename, so an interrupted save never leaves a truncated file behind.
        tmp = path / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path / name)
    meta = {"mul_adds": mul_adds, "params": params, "rule": costs.get("rule", "reference")}
    (path / "costs.json").write_text(json.dumps(meta, indent=2) + "\n")
    return path


def load_dump(path, mmap: bool = True) -> Dump:
    """Open a dump folder written by `save_dump` (or by hand in the same format).

    Args:
        path: the dump folder.
        mmap: open the logits as read-only memory maps (default), so dumps larger than
            RAM work; labels are always read into memory.

    Raises:
        FileNotFoundError: the folder or one of its files is missing (all are named).
        ValueError / TypeError: shapes, dtypes, labels or costs are inconsistent.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"dump folder {str(path)!r} does not exist; expected a folder with {FILES}.")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"dump folder {str(path)!r} lacks {missing}; a dump holds {FILES}.")
    mode = "r" if mmap else None
    try:
        val_logits = np.load(path / "val_logits.npy", mmap_mode=mode)
        test_logits = np.load(path / "test_logits.npy", mmap_mode=mode)
        val_labels = np.load(path / "val_labels.npy")
        test_labels = np.load(path / "test_labels.npy")
    except ValueError as e:  # numpy's message for a truncated .npy file
        raise ValueError(f"dump folder {str(path)!r} holds an unreadable or truncated .npy file: {e}") from e
    _check_split("val", val_logits, val_labels)
    _check_split("test", test_logits, test_labels)
    if val_logits.shape[0] != test_logits.shape[0] or val_logits.shape[2] != test_logits.shape[2]:
        raise ValueError(
            f"in {str(path)!r}, val_logits {val_logits.shape} and test_logits {test_logits.shape} "
            "disagree in num_exits or num_classes."
        )
    try:
        meta = json.loads((path / "costs.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path / 'costs.json')!r} is not valid JSON: {e}") from e
    if "mul_adds" not in meta:
        raise ValueError(f"{str(path / 'costs.json')!r} must have a 'mul_adds' list; received keys {sorted(meta)}.")
    k = val_logits.shape[0]
    mul_adds, params = _check_costs(meta["mul_adds"], meta.get("params", [0] * k), k)
    return Dump(val_logits, val_labels, test_logits, test_labels, mul_adds, params, path)
