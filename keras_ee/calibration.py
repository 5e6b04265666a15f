"""Budgeted batch classification: confidence scores, exit thresholds, budget sweeps.

The public façade over the Rust core (`keras_ee._native`). It only checks types and
shapes and hands numpy arrays over without copying; all computation (and the NaN /
inf scans) runs in Rust with the GIL released, in parallel.

Semantics (budgeted batch classification of MSDNet, Huang et al., "Multi-Scale Dense
Networks for Resource Efficient Image Classification", ICLR 2018, arXiv:1703.09844,
as its authors' code `dynamic_eval_find_threshold` computes it):

- For exits k = 1..K-1, `n_k = floor(float64(N) * f_k)`: one IEEE float64
  multiplication then `floor` (numpy's `np.floor(N * f)`), N = all samples.
- `T_k = +inf` when `n_k == 0` or no sample is left (the exit takes no sample);
  otherwise, if at least `n_k` samples have not exited yet, `T_k` is the `n_k`-th
  largest exit-k score among them.
- A remaining sample exits at k when `s >= T_k`: ties can take more than `n_k`, and a
  later exit can then find fewer samples left than its `n_k` (tie-heavy scores, e.g.
  a max softmax saturating at 1.0). The `shortfall` argument of `calibrate` and
  `budget_sweep` says what that exit does:
  `"reference"` (default): `T_k = +inf`, nobody exits there and the rest go deeper,
  as in the authors' code (its count never reaches `n_k`, the threshold keeps its
  initial `1e8`); `"exit_all"`: `T_k` is the lowest remaining score, so every sample
  left exits at k.
- `T_K = -inf`: the last exit takes every sample left.
- Scoring: each sample exits at its first k with `s[k, i] >= T_k`; accuracy is the
  fraction of samples whose exit predicts right; `mean_cost =
  sum_k(count_k * costs[k]) / N` (summed over k in order).

Thresholds are float32 scores widened to float64 exactly, so comparisons with the
float32 scores are exact.

Memory: `logits` are read in place whatever their strides (C-contiguous arrays and
`np.memmap` dumps larger than RAM included); a non-contiguous row is gathered into a
C-sized buffer. Extra memory is O(K x N): calibrating (K, N) scores takes about
`8 (K - 1) N` bytes of sort keys plus scratch. `scores` and `correct` arrays ((K, N),
small) are made C-contiguous if they are not. If the working memory cannot be
allocated, `MemoryError` says how much was needed (the process is not aborted).
"""

from __future__ import annotations

import numbers
from typing import Any, Literal, TypedDict, cast, get_args

import numpy as np
import numpy.typing as npt

from keras_ee import _native

__all__ = [
    "exit_scores",
    "geometric_fractions",
    "per_stage_fractions",
    "calibrate",
    "simulate",
    "budget_sweep",
    "anytime_accuracy",
    "solve_budget",
    "SCORE_KINDS",
    "SHORTFALL_RULES",
]

ScoreKind = Literal["max_softmax", "margin", "entropy"]
SCORE_KINDS: tuple[ScoreKind, ...] = get_args(ScoreKind)
SHORTFALL_RULES = ("reference", "exit_all")
Shortfall = Literal["reference", "exit_all"]
SplitMode = Literal["geometric", "per_stage"]


class BudgetSweep(TypedDict):
    """What `budget_sweep` returns: one row per budget (see there)."""

    q: npt.NDArray[np.float64]
    thresholds: npt.NDArray[np.float64]
    val_accuracy: npt.NDArray[np.float64]
    test_accuracy: npt.NDArray[np.float64]
    mean_cost: npt.NDArray[np.float64]
    exit_counts: npt.NDArray[np.int64]
    val_mean_cost: npt.NDArray[np.float64]


def _array(x: object, name: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    if x is None or isinstance(x, (str, bytes)):
        raise TypeError(f"`{name}` must be a numpy array; received {type(x).__name__}")
    return np.asarray(x)


def _check_ndim(a: np.ndarray, ndim: int, name: str, layout: str) -> None:
    if a.ndim != ndim:
        raise ValueError(f"`{name}` must be a {ndim}-D array of shape {layout}; received shape {a.shape}")


def _scores_array(x: object, name: str) -> npt.NDArray[np.float32]:
    """(K, N) float32, C-contiguous. Other float dtypes only if exactly representable."""
    a = _array(x, name)
    _check_ndim(a, 2, name, "(K, N) (exits first)")
    if a.dtype != np.float32:
        if a.dtype.kind != "f":
            raise TypeError(f"`{name}` must be a float32 array (as returned by exit_scores); received dtype {a.dtype}")
        b = a.astype(np.float32)
        # A lossy cast would silently move samples across thresholds.
        with np.errstate(invalid="ignore"):
            lossless = np.array_equal(b.astype(a.dtype), a, equal_nan=True)
        if not lossless:
            raise TypeError(
                f"`{name}` must be float32 (as returned by exit_scores); received "
                f"{a.dtype} values that float32 cannot represent exactly"
            )
        a = b
    return np.ascontiguousarray(a)


def _correct_array(x: object, name: str, shape: tuple[int, ...] | None = None) -> npt.NDArray[np.bool_]:
    a = _array(x, name)
    _check_ndim(a, 2, name, "(K, N) (exits first)")
    if a.dtype != np.bool_:
        raise TypeError(f"`{name}` must be a bool array; received dtype {a.dtype}")
    if shape is not None and a.shape != shape:
        raise ValueError(f"`{name}` must have the shape of the scores {shape}; received {a.shape}")
    return np.ascontiguousarray(a)


def _vector(x: object, name: str) -> npt.NDArray[np.float64]:
    a = _array(x, name)
    if a.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D sequence; received shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise TypeError(f"`{name}` must hold real numbers; received dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=np.float64)


def _real(x: object, name: str) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"`{name}` must be a real number; received {x!r}")
    return float(x)


def _shortfall(x: object) -> Shortfall:
    if not isinstance(x, str):
        raise TypeError(f"`shortfall` must be one of {SHORTFALL_RULES}; received {x!r}")
    if x not in SHORTFALL_RULES:
        raise ValueError(f"`shortfall` must be one of {SHORTFALL_RULES}; received {x!r}")
    return cast(Shortfall, x)


def _mode(mode: object) -> SplitMode:
    if not isinstance(mode, str):
        raise TypeError(f"`mode` must be 'geometric' or 'per_stage'; received {mode!r}")
    if mode not in ("geometric", "per_stage"):
        raise ValueError(f"`mode` must be 'geometric' or 'per_stage'; received {mode!r}")
    return cast(SplitMode, mode)


def _count(x: object, name: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"`{name}` must be an int; received {x!r}")
    return int(x)


def exit_scores(
    logits: npt.ArrayLike, kind: str = "max_softmax", temperature: npt.ArrayLike = 1.0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]]:
    """Confidence scores and predictions of every exit from its logits.

    Softmax over classes of `logits / temperature`, then one confidence per sample:
    `"max_softmax"` (largest probability), `"margin"` (largest minus second largest)
    or `"entropy"` (`1 + sum_c p_c log p_c / log C`; 1 = one-hot, 0 = uniform).
    Higher is more confident for every kind. Max-subtraction keeps huge or tiny
    logits safe; `exp` is a vectorised float32 kernel (relative error ~1e-7).

    Args:
        logits: array of shape `(K, N, C)` (exits, samples, classes), float16,
            float32 or float64, any strides; an `np.memmap` is read in place, never
            copied. `C >= 2`.
        kind: one of `"max_softmax"`, `"margin"`, `"entropy"`.
        temperature: positive float, or a sequence of `K` positive floats (one per
            exit).

    Returns:
        `(scores, predictions)`: float32 `(K, N)` and int32 `(K, N)` (argmax over
        classes, first index on ties).

    Raises:
        ValueError: wrong ndim, empty array, `C < 2`, NaN or inf in `logits` (the
            message gives exit, sample and class), unknown `kind`, bad temperature.
        TypeError: unsupported dtype (ints, bool, complex, non-native byte order).
        MemoryError: the `(K, N)` outputs cannot be allocated (the message says how
            much they need).

    Example:

    >>> logits = np.array([[[2.0, 0.0], [0.0, 0.0]]], dtype=np.float32)
    >>> scores, preds = exit_scores(logits)
    >>> scores.astype(np.float64).round(4).tolist(), preds.tolist()
    ([[0.8808, 0.5]], [[0, 0]])
    """
    a = _array(logits, "logits")
    _check_ndim(a, 3, "logits", "(K, N, C) (exits, samples, classes)")
    if not isinstance(kind, str):
        raise TypeError(f"`kind` must be a str, one of {SCORE_KINDS}; received {kind!r}")
    if kind not in SCORE_KINDS:
        raise ValueError(f"`kind` must be one of {SCORE_KINDS}; received {kind!r}")
    if a.dtype.kind != "f" or a.dtype.itemsize not in (2, 4, 8):
        raise TypeError(f"`logits` must be float16, float32 or float64; received dtype {a.dtype}")
    if not a.dtype.isnative:
        raise TypeError(
            f"`logits` must be in native byte order; received dtype {a.dtype.str} "
            "(convert with a.astype(a.dtype.newbyteorder('='))"
        )
    if isinstance(temperature, (bool, np.bool_)):
        raise TypeError(f"`temperature` must be a positive float; received {temperature!r}")
    t = np.asarray(temperature)
    if t.dtype.kind not in "fiu" or t.ndim > 1:
        raise TypeError(
            f"`temperature` must be a positive float or a 1-D sequence of K positive floats; received {temperature!r}"
        )
    temps = [float(v) for v in t.reshape(-1)]
    if not temps:
        raise ValueError("`temperature` must not be empty")
    if a.dtype == np.float16:
        # Same itemsize, so this is a zero-copy view for any strides.
        return _native.exit_scores_f16(a.view(np.uint16), kind, temps)
    if a.dtype == np.float32:
        return _native.exit_scores_f32(a, kind, temps)
    return _native.exit_scores_f64(a, kind, temps)


def geometric_fractions(q: float, num_exits: int) -> npt.NDArray[np.float64]:
    """Target exit fractions of the geometric split, `f_k = q^k / sum_j q^j`.

    `q = 1` splits uniformly, `q < 1` favours early (cheap) exits, `q > 1` late ones.
    The one implementation of the split: the calibrator and L2W's meta-data allocation
    (`keras_ee.training.allocation`) both count `floor(float64(n) * f_k)` samples from it.
    `q` is read as the decimal it prints as (`0.8`, not the binary float nearest to it):
    for a short decimal (every `p / 20` of the sweep grid) `f_k` is the exact rational
    rounded up to a float, so `floor(n * f_k)` is the exact `floor(n q^k / sum_j q^j)`
    whenever that is an integer (at `q = 0.8`, `K = 3`, `n = 366`: 150, where fractions
    rounded to nearest give 149); otherwise normalised powers (no overflow for large `q`,
    no underflow for tiny). Only integer and IEEE-rounded arithmetic: the same bits on
    every machine.

    Args:
        q: positive finite float.
        num_exits: number of exits `K >= 1`.

    Returns:
        float64 array `(K,)` summing to 1.

    Example:

    >>> geometric_fractions(0.5, 3).round(4).tolist()
    [0.5714, 0.2857, 0.1429]
    """
    return _native.geometric_fractions(_real(q, "q"), _count(num_exits, "num_exits"))


def per_stage_fractions(q: float, num_exits: int) -> npt.NDArray[np.float64]:
    """Target exit fractions when a fraction `q` of the samples reaching an exit leave.

    `f_k = q (1 - q)^(k-1)` for `k < K` and `f_K = (1 - q)^(K-1)` (the last exit takes
    the rest). Used through `calibrate` these are fractions of all N samples, so with
    ties the realised per-stage proportions can differ from `q`.

    Args:
        q: float in `(0, 1]`.
        num_exits: number of exits `K >= 1`.

    Returns:
        float64 array `(K,)` summing to 1.

    Example:

    >>> per_stage_fractions(0.5, 3).tolist()
    [0.5, 0.25, 0.25]
    """
    return _native.per_stage_fractions(_real(q, "q"), _count(num_exits, "num_exits"))


def calibrate(
    scores: npt.ArrayLike, fractions: npt.ArrayLike, shortfall: Shortfall = "reference"
) -> npt.NDArray[np.float64]:
    """Exit thresholds on a validation set for target exit fractions.

    See the module docstring for the exact rule (ties, exits taking no sample).

    Args:
        scores: float32 array `(K, N)` of confidences (e.g. from `exit_scores`).
        fractions: `(K,)` non-negative target fractions summing to 1 (within 1e-9).
        shortfall: what an exit does when ties at earlier exits left it fewer
            samples than its quota `n_k`: `"reference"` (default, the authors'
            code): `T_k = +inf`, nobody exits there; `"exit_all"`: `T_k` is the
            lowest remaining score, every sample left exits there.

    Returns:
        float64 array `(K,)`: `+inf` where an exit takes no sample, `-inf` at the
        last exit.

    Raises:
        ValueError: bad shapes or values (NaN / inf scores, fractions not summing
            to 1, unknown `shortfall`).
        TypeError: wrong dtypes.
        MemoryError: the working memory (about `8 (K - 1) N` bytes plus scratch)
            cannot be allocated; the message says how much was needed.

    Example:

    >>> s = np.array([[0.9, 0.2, 0.6, 0.4], [0.5, 0.5, 0.5, 0.5]], np.float32)
    >>> calibrate(s, [0.5, 0.5]).round(3).tolist()
    [0.6, -inf]
    >>> ties = np.array([[0.9, 0.9, 0.9, 0.1], [0.2, 0.3, 0.4, 0.7], [0, 0, 0, 0]], np.float32)
    >>> calibrate(ties, [0.25, 0.5, 0.25]).round(3).tolist()  # exit 2: 1 left, n_2 = 2
    [0.9, inf, -inf]
    >>> calibrate(ties, [0.25, 0.5, 0.25], shortfall="exit_all").round(3).tolist()
    [0.9, 0.7, -inf]
    """
    sf = _shortfall(shortfall)
    s = _scores_array(scores, "scores")
    f = _vector(fractions, "fractions")
    return _native.calibrate(s, f, sf)


def simulate(
    scores: npt.ArrayLike, correct: npt.ArrayLike, thresholds: npt.ArrayLike, costs: npt.ArrayLike
) -> dict[str, Any]:
    """Applies thresholds: accuracy, expected cost and exit counts.

    Each sample exits at its first exit k with `scores[k, i] >= thresholds[k]`; the
    last exit takes the rest.

    Args:
        scores: float32 `(K, N)` confidences.
        correct: bool `(K, N)`, whether exit k predicts sample i right.
        thresholds: `(K,)` float64, `-inf` at the last exit (as from `calibrate`).
        costs: `(K,)` cumulative cost of each exit (e.g. Mul-Adds), `>= 0` and
            non-decreasing.

    Returns:
        dict with `accuracy` (float in [0, 1]), `mean_cost` (float, cost per sample)
        and `exit_counts` (int64 `(K,)`, summing to N).

    Example:

    >>> s = np.array([[0.9, 0.2], [0.5, 0.5]], np.float32)
    >>> ok = np.array([[True, True], [False, False]])
    >>> simulate(s, ok, [0.5, -np.inf], [1.0, 3.0])["mean_cost"]
    2.0
    """
    s = _scores_array(scores, "scores")
    c = _correct_array(correct, "correct", s.shape)
    t = _vector(thresholds, "thresholds")
    w = _vector(costs, "costs")
    accuracy, mean_cost, counts = _native.simulate(s, c, t, w)
    return {"accuracy": accuracy, "mean_cost": mean_cost, "exit_counts": counts}


def default_qs() -> npt.NDArray[np.float64]:
    """The usual 39 budgets, `q = p / 20` for `p = 1..39`."""
    return np.arange(1, 40, dtype=np.float64) / 20.0


def budget_sweep(
    val_scores: npt.ArrayLike,
    val_correct: npt.ArrayLike,
    test_scores: npt.ArrayLike,
    test_correct: npt.ArrayLike,
    costs: npt.ArrayLike,
    qs: npt.ArrayLike | None = None,
    mode: SplitMode = "geometric",
    shortfall: Shortfall = "reference",
) -> BudgetSweep:
    """Calibrates on validation and scores on test for many budgets in one call.

    For every budget `q`: fractions (`geometric_fractions` or `per_stage_fractions`),
    thresholds from the validation set (`calibrate`), then `simulate` on validation
    and test. One Rust call, parallel over budgets and samples; each exit's
    validation scores are sorted once for all budgets.

    Args:
        val_scores: float32 `(K, N_val)`.
        val_correct: bool `(K, N_val)`.
        test_scores: float32 `(K, N_test)`.
        test_correct: bool `(K, N_test)`.
        costs: `(K,)` cumulative cost per exit, `>= 0`, non-decreasing.
        qs: budgets `(B,)`; default `p / 20` for `p = 1..39`.
        mode: `"geometric"` (q > 0) or `"per_stage"` (q in (0, 1]).
        shortfall: `"reference"` (default) or `"exit_all"`, as in `calibrate`.

    Returns:
        dict of arrays, one row per budget: `q` (B,), `thresholds` (B, K),
        `val_accuracy` (B,), `test_accuracy` (B,), `mean_cost` (B,) (expected test
        cost per sample), `exit_counts` (B, K) (test), and `val_mean_cost` (B,).

    Raises:
        ValueError, TypeError: bad input, as in `calibrate` and `simulate`.
        MemoryError: the working memory cannot be allocated (as in `calibrate`).

    Example:

    >>> rng = np.random.default_rng(0)
    >>> s = rng.random((3, 100), dtype=np.float32)
    >>> ok = rng.random((3, 100)) < 0.7
    >>> out = budget_sweep(s, ok, s, ok, [1.0, 2.0, 3.0])
    >>> out["thresholds"].shape, out["exit_counts"].sum(axis=1).tolist()[:2]
    ((39, 3), [100, 100])
    """
    _mode(mode)
    sf = _shortfall(shortfall)
    vs = _scores_array(val_scores, "val_scores")
    vc = _correct_array(val_correct, "val_correct", vs.shape)
    ts = _scores_array(test_scores, "test_scores")
    if ts.shape[0] != vs.shape[0]:
        raise ValueError(f"`test_scores` must have K={vs.shape[0]} exits like `val_scores`; received shape {ts.shape}")
    tc = _correct_array(test_correct, "test_correct", ts.shape)
    w = _vector(costs, "costs")
    q = default_qs() if qs is None else _vector(np.atleast_1d(_array(qs, "qs")), "qs")
    return _native.budget_sweep(vs, vc, ts, tc, w, q, mode, sf)


def anytime_accuracy(correct: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Accuracy of every exit on the whole set (anytime prediction).

    Args:
        correct: bool `(K, N)`.

    Returns:
        float64 `(K,)`, fraction of samples exit k gets right.

    Example:

    >>> anytime_accuracy(np.array([[True, False], [True, True]])).tolist()
    [0.5, 1.0]
    """
    return _native.anytime_accuracy(_correct_array(correct, "correct"))


def solve_budget(
    val_scores: npt.ArrayLike,
    costs: npt.ArrayLike,
    target: float,
    qs: npt.ArrayLike | None = None,
    mode: SplitMode = "geometric",
    shortfall: Shortfall = "reference",
) -> dict[str, Any]:
    """The budget `q` whose validation mean cost meets a target cost, and its thresholds.

    The validation mean cost of the thresholds calibrated at `q` is a step function of
    `q`; this brackets `target` on the grid `qs` (a saved sweep's budgets, widened by end
    points where almost everyone leaves at exit 1 / runs to exit K), then bisects in
    `ln q`. It returns the latest split found (largest `q` for the geometric split,
    smallest for the per-stage one) whose validation mean cost is `<= target`.

    Args:
        val_scores: float32 `(K, N)` validation confidences.
        costs: `(K,)` cumulative cost per exit, `>= 0`, non-decreasing.
        target: the mean cost per sample to meet, in `[costs[0], costs[-1]]`.
        qs: the bracketing grid `(B,)`; default `p / 20` for `p = 1..39`.
        mode: `"geometric"` or `"per_stage"`, as in `budget_sweep`.
        shortfall: `"reference"` (default) or `"exit_all"`, as in `calibrate`.

    Returns:
        dict with `q` (float; `0` / `inf` for geometric, `1` / `0` for per-stage mean
        everyone at exit 1 / everyone at exit K), `thresholds` (float64 `(K,)`, as
        `calibrate` gives them at `q`) and `val_mean_cost` (float, `<= target`).

    Raises:
        ValueError: `target` below the first exit's cost or above the last one's, bad
            shapes or values, a grid value invalid for `mode`.
        TypeError: wrong dtypes.

    Example:

    >>> s = np.array([[0.9, 0.2, 0.6, 0.4], [0.5, 0.5, 0.5, 0.5]], np.float32)
    >>> out = solve_budget(s, [1.0, 3.0], 2.0)
    >>> out["val_mean_cost"], out["thresholds"].round(3).tolist()
    (2.0, [0.6, -inf])
    """
    _mode(mode)
    sf = _shortfall(shortfall)
    vs = _scores_array(val_scores, "val_scores")
    w = _vector(costs, "costs")
    t = _real(target, "target")
    q = default_qs() if qs is None else _vector(np.atleast_1d(_array(qs, "qs")), "qs")
    q_star, thresholds, cost = _native.solve_budget(vs, w, t, q, mode, sf)
    return {"q": q_star, "thresholds": thresholds, "val_mean_cost": cost}
