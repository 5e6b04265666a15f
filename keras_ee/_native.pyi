"""Typed stub of the Rust extension `keras_ee._native` (use `keras_ee.calibration`)."""

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

# What an exit does when fewer samples are left than its quota (see keras_ee.calibration).
_Shortfall = Literal["reference", "exit_all"]

class _Sweep(TypedDict):
    q: npt.NDArray[np.float64]
    thresholds: npt.NDArray[np.float64]
    val_accuracy: npt.NDArray[np.float64]
    test_accuracy: npt.NDArray[np.float64]
    mean_cost: npt.NDArray[np.float64]
    exit_counts: npt.NDArray[np.int64]
    val_mean_cost: npt.NDArray[np.float64]

def exit_scores_f32(
    logits: npt.NDArray[np.float32], kind: str, temperatures: Sequence[float]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]: ...
def exit_scores_f64(
    logits: npt.NDArray[np.float64], kind: str, temperatures: Sequence[float]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]: ...
def exit_scores_f16(
    logits: npt.NDArray[np.uint16], kind: str, temperatures: Sequence[float]
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]: ...
def simd_path() -> str: ...
def geometric_fractions(q: float, num_exits: int) -> npt.NDArray[np.float64]: ...
def per_stage_fractions(q: float, num_exits: int) -> npt.NDArray[np.float64]: ...
def calibrate(
    scores: npt.NDArray[np.float32],
    fractions: npt.NDArray[np.float64],
    shortfall: _Shortfall,
) -> npt.NDArray[np.float64]: ...
def simulate(
    scores: npt.NDArray[np.float32],
    correct: npt.NDArray[np.bool_],
    thresholds: npt.NDArray[np.float64],
    costs: npt.NDArray[np.float64],
) -> tuple[float, float, npt.NDArray[np.int64]]: ...
def anytime_accuracy(correct: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]: ...
def budget_sweep(
    val_scores: npt.NDArray[np.float32],
    val_correct: npt.NDArray[np.bool_],
    test_scores: npt.NDArray[np.float32],
    test_correct: npt.NDArray[np.bool_],
    costs: npt.NDArray[np.float64],
    qs: npt.NDArray[np.float64],
    mode: Literal["geometric", "per_stage"],
    shortfall: _Shortfall,
) -> _Sweep: ...
def solve_budget(
    scores: npt.NDArray[np.float32],
    costs: npt.NDArray[np.float64],
    target: float,
    grid: npt.NDArray[np.float64],
    mode: Literal["geometric", "per_stage"],
    shortfall: _Shortfall,
) -> tuple[float, npt.NDArray[np.float64], float]: ...
