"""Typed stub of the Rust extension `keras_ee._native` (use `keras_ee.calibration`).

The functions expect what the façade `keras_ee.calibration` hands them: C-contiguous
numpy arrays of the stated dtypes (the logits of `exit_scores_*` may have any strides),
exits first. They release the GIL and raise `ValueError` on bad input and
`MemoryError` when working memory cannot be allocated (with how much was needed).
"""

from collections.abc import Sequence
from typing import Literal, TypedDict

import numpy as np
import numpy.typing as npt

__all__ = [
    "exit_scores_f32",
    "exit_scores_f64",
    "exit_scores_f16",
    "geometric_fractions",
    "per_stage_fractions",
    "calibrate",
    "simulate",
    "anytime_accuracy",
    "budget_sweep",
    "simd_path",
    "solve_budget",
]

# The confidence measures of `exit_scores_*` (see keras_ee.calibration.exit_scores).
_ScoreKind = Literal["max_softmax", "margin", "entropy"]
# What an exit does when fewer samples are left than its quota (see keras_ee.calibration).
_Shortfall = Literal["reference", "exit_all"]
# How a budget q turns into exit fractions.
_SplitMode = Literal["geometric", "per_stage"]

class _Sweep(TypedDict):
    q: npt.NDArray[np.float64]
    thresholds: npt.NDArray[np.float64]
    val_accuracy: npt.NDArray[np.float64]
    test_accuracy: npt.NDArray[np.float64]
    mean_cost: npt.NDArray[np.float64]
    exit_counts: npt.NDArray[np.int64]
    val_mean_cost: npt.NDArray[np.float64]

def exit_scores_f32(
    logits: npt.NDArray[np.float32], kind: _ScoreKind, temperatures: Sequence[float]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """Confidence scores and argmax predictions, both `(K, N)`, of float32 logits `(K, N, C)`.

    Args:
        logits: `(K, N, C)`, any strides (read in place, never copied).
        kind: the confidence measure of each softmax row.
        temperatures: one temperature for every exit, or one per exit (`K` values).

    Raises:
        ValueError: a NaN or inf logit (says where), fewer than 2 classes, an empty
            array, an unknown `kind` or a temperature that is not positive and finite.
    """

def exit_scores_f64(
    logits: npt.NDArray[np.float64], kind: _ScoreKind, temperatures: Sequence[float]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """`exit_scores_f32` for float64 logits (shifted by the row max in float64)."""

def exit_scores_f16(
    logits: npt.NDArray[np.uint16], kind: _ScoreKind, temperatures: Sequence[float]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """`exit_scores_f32` for float16 logits given as their bits (`a.view(np.uint16)`)."""

def simd_path() -> str:
    """The kernel `exit_scores_*` runs on this CPU: `"avx2+fma"` or `"portable"`."""

def geometric_fractions(q: float, num_exits: int) -> npt.NDArray[np.float64]:
    """`(K,)` fractions `q^k / sum_j q^j` of the geometric split, with `q` read as its decimal.

    Raises:
        ValueError: `q` not positive and finite, or `num_exits` not in `1..=255`.
    """

def per_stage_fractions(q: float, num_exits: int) -> npt.NDArray[np.float64]:
    """`(K,)` fractions `q (1 - q)^(k-1)` (the last exit: `(1 - q)^(K-1)`), `q` in `(0, 1]`.

    Raises:
        ValueError: `q` outside `(0, 1]`, or `num_exits` not in `1..=255`.
    """

def calibrate(
    scores: npt.NDArray[np.float32],
    fractions: npt.NDArray[np.float64],
    shortfall: _Shortfall,
) -> npt.NDArray[np.float64]:
    """`(K,)` exit thresholds for `(K, N)` validation scores and target fractions `(K,)`.

    Exit k takes `floor(N f_k)` of the samples left; `+inf` where an exit takes no
    sample, `-inf` at the last exit.
    """

def simulate(
    scores: npt.NDArray[np.float32],
    correct: npt.NDArray[np.bool_],
    thresholds: npt.NDArray[np.float64],
    costs: npt.NDArray[np.float64],
) -> tuple[float, float, npt.NDArray[np.int64]]:
    """`(accuracy, mean_cost, exit_counts)` of thresholds `(K,)` on `(K, N)` scores.

    Each sample exits at its first k with `scores[k, i] >= thresholds[k]`; `costs` are
    cumulative per exit.
    """

def anytime_accuracy(correct: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """`(K,)` accuracy of every exit on the whole set, from `(K, N)` correct flags."""

def budget_sweep(
    val_scores: npt.NDArray[np.float32],
    val_correct: npt.NDArray[np.bool_],
    test_scores: npt.NDArray[np.float32],
    test_correct: npt.NDArray[np.bool_],
    costs: npt.NDArray[np.float64],
    qs: npt.NDArray[np.float64],
    mode: _SplitMode,
    shortfall: _Shortfall,
) -> _Sweep:
    """Calibrates on validation for every budget in `qs` and scores validation and test.

    Returns one row per budget (see `keras_ee.calibration.budget_sweep`).
    """

def solve_budget(
    scores: npt.NDArray[np.float32],
    costs: npt.NDArray[np.float64],
    target: float,
    grid: npt.NDArray[np.float64],
    mode: _SplitMode,
    shortfall: _Shortfall,
) -> tuple[float, npt.NDArray[np.float64], float]:
    """`(q, thresholds, val_mean_cost)` of the latest split whose validation mean cost is
    at most `target` (bracketed on `grid`, then bisected in `ln q`)."""
