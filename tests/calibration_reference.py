"""Plain numpy reference of `keras_ee.calibration`, used only by the tests.

Written for clarity, not speed: loops over exits and samples, boolean masks, full
sorts. `calibrate` follows the authors' threshold code (MSDNet-PyTorch's
`dynamic_eval_find_threshold`, the same in IMTA) line by line, with the conventions
documented in `keras_ee.calibration`: the floor in float64, `+inf` / `-inf` for the
authors' `1e8` / `-1e8`, and `shortfall="exit_all"` as the documented alternative to
the authors' rule when fewer samples are left than an exit's quota.
"""

import math
from fractions import Fraction

import numpy as np


def softmax_scores(logits, kind="max_softmax", temperature=1.0):
    """float64 softmax confidences and argmax predictions of (K, N, C) logits."""
    x = np.asarray(logits, dtype=np.float64)
    k = x.shape[0]
    t = np.broadcast_to(np.asarray(temperature, dtype=np.float64).reshape(-1), (k,))
    z = x / t[:, None, None]
    z = z - z.max(axis=2, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=2, keepdims=True)
    if kind == "max_softmax":
        s = p.max(axis=2)
    elif kind == "margin":
        top = np.sort(p, axis=2)
        s = top[..., -1] - top[..., -2]
    elif kind == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            plogp = np.where(p > 0, p * np.log(p), 0.0)
        s = 1.0 + plogp.sum(axis=2) / np.log(x.shape[2])
    else:
        raise ValueError(kind)
    return s, x.argmax(axis=2)


def geometric_fractions(q, num_exits):
    """`q^k / sum_j q^j` with q read as its decimal (`repr`): the exact rational rounded up
    to a float when the sum of `a^j b^(K-j)` (`q = a / b`, reduced) is below 2**64, else
    normalised powers, the same float64 operations as the Rust core."""
    r = Fraction(repr(float(q)))
    a, b = r.numerator, r.denominator
    w_exact = [a**j * b ** (num_exits - j) for j in range(1, num_exits + 1)]
    if sum(w_exact) < 2**64:
        out = []
        for x in w_exact:
            exact = Fraction(x, sum(w_exact))
            f = float(exact)  # nearest
            out.append(f if Fraction(f) >= exact else math.nextafter(f, math.inf))
        return np.array(out)
    w = np.ones(num_exits)
    if q <= 1.0:
        for k in range(1, num_exits):
            w[k] = w[k - 1] * q
    else:
        for k in range(num_exits - 2, -1, -1):
            w[k] = w[k + 1] / q
    total = 0.0
    for v in w:
        total += v
    return w / total


def per_stage_fractions(q, num_exits):
    f = []
    r = 1.0
    for _ in range(num_exits - 1):
        f.append(r * q)
        r *= 1.0 - q
    f.append(r)
    return np.array(f)


def calibrate(scores, fractions, shortfall="reference"):
    """The authors' loop: per exit, walk the samples by descending score, count those
    not yet exited, and take the score of the `n_k`-th as `T_k`. If the count never
    gets to `n_k` (`n_k == 0`, or fewer samples left), `T_k` stays `+inf` (nobody
    exits there); with `shortfall="exit_all"` a non-empty remainder short of `n_k`
    gets its lowest score instead (everybody left exits). Then every sample with
    `s >= T_k` is marked exited.
    """
    if shortfall not in ("reference", "exit_all"):
        raise ValueError(shortfall)
    scores = np.asarray(scores, dtype=np.float32)
    k, n = scores.shape
    sorted_idx = np.argsort(-scores, axis=1, kind="stable")  # descending
    filtered = np.zeros(n, dtype=bool)
    thresholds = np.full(k, np.inf)  # the authors' 1e8
    for e in range(k - 1):
        out_n = int(np.floor(n * fractions[e]))
        count, last = 0, None
        for i in range(n):
            ori_idx = sorted_idx[e, i]
            if not filtered[ori_idx]:
                count += 1
                last = ori_idx
                if count == out_n:
                    thresholds[e] = float(scores[e, ori_idx])
                    break
        else:
            if shortfall == "exit_all" and 0 < count < out_n:
                thresholds[e] = float(scores[e, last])
        filtered |= scores[e].astype(np.float64) >= thresholds[e]
    thresholds[k - 1] = -np.inf  # the authors' -1e8
    return thresholds


def exits_of(scores, thresholds):
    """Exit index of every sample: the first k with s >= T_k, else the last."""
    k, n = scores.shape
    passed = scores.astype(np.float64) >= np.asarray(thresholds)[:, None]
    passed[k - 1] = True
    return passed.argmax(axis=0)


def simulate(scores, correct, thresholds, costs):
    k, n = scores.shape
    ex = exits_of(scores, thresholds)
    counts = np.bincount(ex, minlength=k)
    right = int(correct[ex, np.arange(n)].sum())
    cost = 0.0
    for e in range(k):
        cost += float(counts[e]) * float(costs[e])
    return {"accuracy": right / n, "mean_cost": cost / n, "exit_counts": counts}


def budget_sweep(val_scores, val_correct, test_scores, test_correct, costs, qs, mode, shortfall="reference"):
    k = val_scores.shape[0]
    frac = geometric_fractions if mode == "geometric" else per_stage_fractions
    rows = []
    for q in qs:
        t = calibrate(val_scores, frac(q, k), shortfall)
        v = simulate(val_scores, val_correct, t, costs)
        s = simulate(test_scores, test_correct, t, costs)
        rows.append((t, v, s))
    return {
        "q": np.asarray(qs, dtype=np.float64),
        "thresholds": np.array([r[0] for r in rows]),
        "val_accuracy": np.array([r[1]["accuracy"] for r in rows]),
        "val_mean_cost": np.array([r[1]["mean_cost"] for r in rows]),
        "test_accuracy": np.array([r[2]["accuracy"] for r in rows]),
        "mean_cost": np.array([r[2]["mean_cost"] for r in rows]),
        "exit_counts": np.array([r[2]["exit_counts"] for r in rows]),
    }


def anytime_accuracy(correct):
    return correct.mean(axis=1)
