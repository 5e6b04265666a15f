"""The q-split of samples over exits: training's allocation and the calibrator count alike.

Both take `floor(n * f_k)` samples at exit k from `calibration.geometric_fractions`, the
one implementation of `f_k = q^k / sum_j q^j`. These tests check the counts the two
actually produce (L2W's allocation of a batch; the calibrator's budget sweep) over the
q of the sweep grid, K = 2..8 and n up to 5,000, and that they are the paper's exact
`floor(n q^k / sum_j q^j)` with q read as its decimal (L2W-DEN, Han et al., ECCV 2022,
arXiv:2209.08310, Sec. 3.2). No training.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fractions import Fraction  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from keras_ee import calibration as cal  # noqa: E402
from keras_ee.training import allocation  # noqa: E402

GRID = cal.default_qs()


def exact_counts(q: float, num_exits: int, n: int) -> list[int]:
    """`floor(n q^k / sum_j q^j)` for k = 1..K in rational arithmetic, q as its decimal."""
    r = Fraction(repr(float(q)))
    powers = [r**k for k in range(1, num_exits + 1)]
    total = sum(powers)
    return [int(n * w / total) for w in powers]


def test_fractions_give_exact_counts_on_the_grid():
    """Every q of the grid, K = 2..8, every n = 0..5000: floor(n f_k) is the exact count."""
    n = np.arange(5001)
    for q in GRID:
        r = Fraction(repr(float(q)))
        for k in range(2, 9):
            f = cal.geometric_fractions(float(q), k)
            counts = np.floor(n[:, None] * f).astype(np.int64)
            powers = [r**j for j in range(1, k + 1)]
            total = sum(powers)
            for j, w in enumerate(powers):
                ratio = w / total  # exact: n * num // den
                want = n.astype(object) * ratio.numerator // ratio.denominator
                np.testing.assert_array_equal(counts[:, j], want.astype(np.int64), err_msg=f"q={q} K={k} exit {j}")


def calibrator_counts(scores: np.ndarray) -> np.ndarray:
    """Exit counts of the budget sweep (every q of the grid) on distinct scores `(K, n)`."""
    correct = np.ones(scores.shape, bool)
    costs = np.arange(1.0, scores.shape[0] + 1)
    return cal.budget_sweep(scores, correct, scores, correct, costs, qs=GRID)["exit_counts"]


def training_counts(scores: np.ndarray, q: float) -> np.ndarray:
    exits = allocation.allocate_by_confidence_numpy(scores.T, q)
    return np.bincount(exits, minlength=scores.shape[0])


@settings(max_examples=40, deadline=None, derandomize=True)
@given(num_exits=st.integers(2, 8), n=st.integers(1, 5000))
@example(num_exits=3, n=366)  # the case: q = 0.8 gave exit 1 150 samples in training, 149 in the calibrator
@example(num_exits=6, n=3367)  # q = 0.75: log-space NumPy gave one sample too few at exit 1
def test_training_and_calibrator_allocate_the_same_counts(num_exits, n):
    rng = np.random.default_rng([num_exits, n])
    scores = rng.permutation(num_exits * n).reshape(num_exits, n).astype(np.float32)  # distinct: no ties
    sweep = calibrator_counts(scores)
    for j, q in enumerate(GRID):
        want = exact_counts(q, num_exits, n)[:-1]
        ours = training_counts(scores, float(q))
        assert ours[:-1].tolist() == want, f"training, q={q}"
        assert sweep[j, :-1].tolist() == want, f"calibrator, q={q}"


@pytest.mark.parametrize(("num_exits", "n"), [(3, 366), (6, 3367), (8, 999)])
def test_graph_allocation_counts_match_the_calibrator(num_exits, n):
    """The TensorFlow allocation (the one a training step runs) counts as the sweep does."""
    rng = np.random.default_rng(n)
    scores = rng.permutation(num_exits * n).reshape(num_exits, n).astype(np.float32)
    sweep = calibrator_counts(scores)
    confidence = tf.constant(scores.T)
    for j, q in enumerate(GRID):
        mask = allocation.allocate_by_confidence(confidence, float(q)).numpy()
        np.testing.assert_array_equal(mask.sum(axis=0), sweep[j], err_msg=f"q={q}")
