"""Rust calibrator (`keras_ee.calibration`) against the numpy reference."""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import calibration_reference as ref
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keras_ee import calibration as cal

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- strategies


@st.composite
def score_sets(draw, max_k=5, max_n=40):
    """(K, N) float32 scores, often from a few values (ties), sometimes all equal."""
    k = draw(st.integers(1, max_k))
    n = draw(st.integers(1, max_n))
    style = draw(st.sampled_from(["few", "continuous", "all_equal"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if style == "few":
        levels = rng.random(draw(st.integers(1, 4))).astype(np.float32)
        s = rng.choice(levels, size=(k, n))
    elif style == "continuous":
        s = rng.random((k, n), dtype=np.float32)
    else:
        s = np.full((k, n), np.float32(rng.random()))
    correct = rng.random((k, n)) < 0.6
    return s.astype(np.float32), correct


budgets = st.one_of(
    st.sampled_from([1e-9, 1e-3, 0.05, 0.5, 1.0, 1.95, 20.0, 1e6]),
    st.floats(1e-4, 5.0),
)
per_stage_q = st.one_of(st.sampled_from([1e-9, 1e-3, 0.5, 1.0]), st.floats(1e-4, 1.0))


def costs_for(k, rng=None):
    return np.cumsum(np.linspace(1.0, 3.0, k) ** 1.5)


# ----------------------------------------------------------------------------- fractions


@SETTINGS
@given(q=budgets, k=st.integers(1, 10))
def test_geometric_fractions_identical_to_reference_and_close_to_formula(q, k):
    f = cal.geometric_fractions(q, k)
    np.testing.assert_array_equal(f, ref.geometric_fractions(q, k))
    assert abs(f.sum() - 1.0) < 1e-12
    if 1e-3 <= q <= 100:
        naive = q ** np.arange(1, k + 1, dtype=np.float64)
        np.testing.assert_allclose(f, naive / naive.sum(), rtol=1e-13)


@SETTINGS
@given(q=per_stage_q, k=st.integers(1, 10))
def test_per_stage_fractions(q, k):
    f = cal.per_stage_fractions(q, k)
    np.testing.assert_array_equal(f, ref.per_stage_fractions(q, k))
    assert abs(f.sum() - 1.0) < 1e-12
    # A fraction q of the (expected) arrivals at each non-final exit leave there.
    arriving = (1.0 - q) ** np.arange(k)
    np.testing.assert_allclose(f[:-1], q * arriving[:-1], rtol=1e-12)
    np.testing.assert_allclose(f[-1], arriving[-1], rtol=1e-12)


# ----------------------------------------------------------------------------- calibrate / simulate


@SETTINGS
@given(data=score_sets(), q=budgets, per_stage=st.booleans(), shortfall=st.sampled_from(cal.SHORTFALL_RULES))
def test_calibrate_identical_to_reference(data, q, per_stage, shortfall):
    s, _ = data
    k = s.shape[0]
    f = ref.per_stage_fractions(min(q, 1.0), k) if per_stage else ref.geometric_fractions(q, k)
    got = cal.calibrate(s, f, shortfall=shortfall)
    np.testing.assert_array_equal(got, ref.calibrate(s, f, shortfall))
    assert got.dtype == np.float64 and got[-1] == -np.inf


@SETTINGS
@given(data=score_sets(), q=budgets)
def test_simulate_identical_to_reference(data, q):
    s, c = data
    k = s.shape[0]
    t = ref.calibrate(s, ref.geometric_fractions(q, k))
    costs = costs_for(k)
    got = cal.simulate(s, c, t, costs)
    want = ref.simulate(s, c, t, costs)
    assert got["accuracy"] == want["accuracy"]
    assert got["mean_cost"] == want["mean_cost"]
    np.testing.assert_array_equal(got["exit_counts"], want["exit_counts"])
    assert got["exit_counts"].sum() == s.shape[1]
    # On the calibration set, an exit with a quota of n_k takes at least n_k samples
    # if that many reach it, else none (the authors' rule).
    n = s.shape[1]
    f = ref.geometric_fractions(q, k)
    reached = n
    for e in range(k - 1):
        n_e = int(np.floor(n * f[e]))
        if n_e <= reached:
            assert got["exit_counts"][e] >= n_e
        else:
            assert got["exit_counts"][e] == 0
        reached -= got["exit_counts"][e]


@SETTINGS
@given(data=score_sets(max_n=30), extra=st.lists(st.floats(-0.5, 1.5), min_size=1, max_size=5))
def test_simulate_arbitrary_thresholds(data, extra):
    s, c = data
    k = s.shape[0]
    t = np.array((extra * k)[:k], dtype=np.float64)
    t[-1] = -np.inf
    got = cal.simulate(s, c, t, costs_for(k))
    want = ref.simulate(s, c, t, costs_for(k))
    assert got["accuracy"] == want["accuracy"] and got["mean_cost"] == want["mean_cost"]
    np.testing.assert_array_equal(got["exit_counts"], want["exit_counts"])


def test_threshold_just_above_a_float32_score_is_exact():
    s = np.array([[0.5, 0.25], [0.0, 0.0]], np.float32)
    c = np.ones((2, 2), bool)
    t = np.array([np.nextafter(0.5, 1.0), -np.inf])  # above 0.5 in float64 only
    assert cal.simulate(s, c, t, [1.0, 2.0])["exit_counts"].tolist() == [0, 2]
    t[0] = 0.5
    assert cal.simulate(s, c, t, [1.0, 2.0])["exit_counts"].tolist() == [1, 1]


@settings(max_examples=40, deadline=None)
@given(
    v=score_sets(max_n=60),
    t=score_sets(max_n=60),
    per_stage=st.booleans(),
    shortfall=st.sampled_from(cal.SHORTFALL_RULES),
)
def test_budget_sweep_identical_to_reference(v, t, per_stage, shortfall):
    vs, vc = v
    ts, tc = t
    k = min(vs.shape[0], ts.shape[0])
    vs, vc, ts, tc = vs[:k], vc[:k], ts[:k], tc[:k]
    costs = costs_for(k)
    if per_stage:
        qs, mode = np.array([1e-6, 0.1, 0.5, 0.9, 1.0]), "per_stage"
    else:
        qs, mode = None, "geometric"
    got = cal.budget_sweep(vs, vc, ts, tc, costs, qs=qs, mode=mode, shortfall=shortfall)
    want = ref.budget_sweep(vs, vc, ts, tc, costs, cal.default_qs() if qs is None else qs, mode, shortfall)
    assert set(want) <= set(got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    b = len(want["q"])
    assert got["thresholds"].shape == (b, k) and got["exit_counts"].shape == (b, k)


def test_default_qs():
    np.testing.assert_array_equal(cal.default_qs(), [p / 20 for p in range(1, 40)])


def test_edge_cases():
    # K = 1: one exit takes everything.
    assert cal.calibrate(np.array([[0.3, 0.2]], np.float32), [1.0]).tolist() == [-np.inf]
    # N = 1 and a quota of 0 at exit 1: +inf.
    assert cal.calibrate(np.array([[0.3], [0.1]], np.float32), [0.5, 0.5]).tolist() == [np.inf, -np.inf]
    # All equal: ties make the first exit with a quota take everybody.
    s = np.full((3, 10), 0.5, np.float32)
    t = cal.calibrate(s, [0.2, 0.3, 0.5])
    assert t.tolist() == [0.5, np.inf, -np.inf]
    out = cal.simulate(s, np.ones((3, 10), bool), t, [1, 2, 3])
    assert out["exit_counts"].tolist() == [10, 0, 0] and out["mean_cost"] == 1.0
    # Quota larger than what is left (ties took more): +inf by default (the authors'
    # rule), the lowest remaining score with shortfall="exit_all".
    s = np.array([[0.9, 0.9, 0.9, 0.1], [0.2, 0.3, 0.4, 0.7], [0, 0, 0, 0]], np.float32)
    t = cal.calibrate(s, [0.25, 0.5, 0.25], shortfall="exit_all")
    assert t.tolist() == [float(np.float32(0.9)), float(np.float32(0.7)), -np.inf]
    # Quota exactly what is left: the lowest remaining score under both rules.
    s = np.array([[0.9, 0.9, 0.1, 0.1], [0.2, 0.3, 0.4, 0.7], [0, 0, 0, 0]], np.float32)
    for rule in cal.SHORTFALL_RULES:
        t = cal.calibrate(s, [0.5, 0.5, 0.0], shortfall=rule)
        assert t.tolist() == [float(np.float32(0.9)), float(np.float32(0.4)), -np.inf]


def saturating_dump(k, n, seed):
    """A tie-heavy dump: max softmax of confident logits, saturated at 1.0 in float32.

    Exits share most of each sample's logits and grow more confident with depth: about
    40% (first exit) to 60% (last) of the scores are exactly 1.0.
    """
    rng = np.random.default_rng(seed)
    scale = np.linspace(40.0, 80.0, k, dtype=np.float32)[:, None, None]
    shared = rng.standard_normal((1, n, 10), dtype=np.float32)
    logits = (0.7 * shared + 0.3 * rng.standard_normal((k, n, 10), dtype=np.float32)) * scale
    s, _ = cal.exit_scores(logits)
    correct = rng.random((k, n)) < 0.2 + 0.7 * s
    return s, correct


def test_shortfall_follows_the_authors_code():
    # Exit 1 has n_1 = 1, but three samples tie at 0.9 and all leave; exit 2 then finds
    # one sample for its quota of n_2 = 2. MSDNet-PyTorch's dynamic_eval_find_threshold
    # leaves T_2 at +inf (nobody exits there, the rest go deeper).
    s = np.array([[0.9, 0.9, 0.9, 0.1], [0.2, 0.3, 0.4, 0.7], [0, 0, 0, 0]], np.float32)
    f = [0.25, 0.5, 0.25]
    want = [float(np.float32(0.9)), np.inf, -np.inf]
    assert cal.calibrate(s, f).tolist() == want
    assert ref.calibrate(s, f).tolist() == want
    c = np.ones((3, 4), bool)
    out = cal.simulate(s, c, cal.calibrate(s, f), [1.0, 2.0, 3.0])
    assert out["exit_counts"].tolist() == [3, 0, 1]


@pytest.mark.parametrize("shortfall", [None, "reference", "exit_all"])
def test_tie_heavy_budget_sweep_identical_to_reference(shortfall):
    vs, vc = saturating_dump(5, 3000, 0)
    ts, tc = saturating_dump(5, 2000, 1)
    assert (vs == 1.0).mean() > 0.4
    costs = costs_for(5)
    qs = cal.default_qs()
    kw = {} if shortfall is None else {"shortfall": shortfall}
    got = cal.budget_sweep(vs, vc, ts, tc, costs, **kw)
    want = ref.budget_sweep(vs, vc, ts, tc, costs, qs, "geometric", shortfall or "reference")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    for j, q in enumerate(qs):
        t = cal.calibrate(vs, ref.geometric_fractions(q, 5), **kw)
        np.testing.assert_array_equal(t, got["thresholds"][j])
    # The branch arose in many budgets: an exit's quota exceeded the (non-zero) number
    # of validation samples reaching it. The reference rule sends none of them out
    # there (T = +inf), the other all of them.
    n = vs.shape[1]
    quota = np.floor(n * np.array([ref.geometric_fractions(q, 5) for q in qs]))
    counts = np.array([cal.simulate(vs, vc, t, costs)["exit_counts"] for t in got["thresholds"]])
    reaching = n - np.cumsum(counts, axis=1) + counts
    short = (quota > reaching) & (reaching > 0)
    short[:, -1] = False
    assert short.any(axis=1).sum() >= 10
    if (shortfall or "reference") == "reference":
        assert np.all(np.isposinf(got["thresholds"][short])) and np.all(counts[short] == 0)
    else:
        assert np.all(counts[short] == reaching[short])


def test_anytime_accuracy():
    c = np.random.default_rng(1).random((4, 333)) < 0.4
    np.testing.assert_array_equal(cal.anytime_accuracy(c), ref.anytime_accuracy(c))


def test_lossless_float64_scores_accepted_lossy_rejected():
    s = np.array([[0.5, 0.25], [0.0, 1.0]])
    assert cal.calibrate(s, [0.5, 0.5]).tolist() == [0.5, -np.inf]
    with pytest.raises(TypeError, match="float32 cannot represent exactly"):
        cal.calibrate(s + 1e-12, [0.5, 0.5])


def test_non_contiguous_scores():
    rng = np.random.default_rng(3)
    s = rng.random((40, 3), dtype=np.float32).T  # Fortran order
    f = ref.geometric_fractions(0.7, 3)
    np.testing.assert_array_equal(cal.calibrate(s, f), ref.calibrate(np.ascontiguousarray(s), f))


# ----------------------------------------------------------------------------- exit_scores


def _logits(shape, scale, seed, dtype=np.float32):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


@pytest.mark.parametrize("kind", cal.SCORE_KINDS)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_exit_scores_match_numpy_softmax(kind, dtype):
    x = _logits((3, 50, 37), 4.0, 0, dtype)
    temps = [1.0, 0.5, 3.0]
    s, p = cal.exit_scores(x, kind=kind, temperature=temps)
    rs, rp = ref.softmax_scores(x, kind, temps)
    assert s.dtype == np.float32 and p.dtype == np.int32 and s.shape == (3, 50)
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(p, rp)


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    c=st.integers(2, 70),
    scale=st.sampled_from([1e-3, 1.0, 10.0, 40.0, 1e4]),
    t=st.sampled_from([0.1, 1.0, 7.0]),
)
def test_exit_scores_property(seed, c, scale, t):
    x = _logits((2, 5, c), scale, seed)
    for kind in cal.SCORE_KINDS:
        s, p = cal.exit_scores(x, kind=kind, temperature=t)
        rs, rp = ref.softmax_scores(x, kind, t)
        np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-6, err_msg=kind)
        np.testing.assert_array_equal(p, rp)


def test_exp_kernel_accuracy_over_its_range():
    # Two classes at distance d: max softmax = 1 / (1 + exp(-d)) exercises exp(-d).
    d = np.linspace(0.0, 87.0, 20001)
    x = np.zeros((1, d.size, 2), np.float32)
    x[0, :, 0] = d
    s, _ = cal.exit_scores(x)
    want = 1.0 / (1.0 + np.exp(-d.astype(np.float32).astype(np.float64)))
    np.testing.assert_allclose(s[0], want, rtol=2e-7)
    # 1 + 999 exp(-d) in the denominator: exp and summation errors show ~1:1.
    d = np.linspace(0.0, 30.0, 3001).astype(np.float32)
    x = np.repeat(-d[None, :, None], 1000, axis=2)
    x[0, :, 0] = 0.0
    s, _ = cal.exit_scores(x)
    want = 1.0 / (1.0 + 999.0 * np.exp(-d.astype(np.float64)))
    np.testing.assert_allclose(s[0], want, rtol=6e-7)
    # Entropy uses every probability, tiny ones included.
    x2 = np.zeros((1, d.size, 3), np.float32)
    x2[0, :, 0] = d
    x2[0, :, 1] = d
    s2, _ = cal.exit_scores(x2, kind="entropy")
    e = np.exp(-d.astype(np.float32).astype(np.float64))
    p = np.stack([np.ones_like(e), np.ones_like(e), e]) / (2 + e)
    want2 = 1 + np.sum(np.where(p > 0, p * np.log(p), 0), axis=0) / np.log(3)
    np.testing.assert_allclose(s2[0], want2, rtol=1e-5, atol=2e-7)


def test_exit_scores_huge_and_tiny_logits():
    x = np.array([[[1e4, 0, -1e4], [-1e4, -1e4, -1e4], [3e38, -3e38, 3e38]]], np.float32)
    s, p = cal.exit_scores(x)
    np.testing.assert_allclose(s[0], [1.0, 1 / 3, 0.5], rtol=1e-6)
    assert p[0].tolist() == [0, 0, 0]
    s, _ = cal.exit_scores(x, kind="margin")
    np.testing.assert_allclose(s[0], [1.0, 0.0, 0.0], atol=1e-7)
    s, _ = cal.exit_scores(x, kind="entropy")
    np.testing.assert_allclose(s[0], [1.0, 0.0, 1 - np.log(2) / np.log(3)], atol=1e-6)
    big = np.array([[[1e300, -1e300, 1e300 - 1e290]]])
    s, p = cal.exit_scores(big)
    assert s[0, 0] == 1.0 and p[0, 0] == 0
    h = np.array([[[65504, -65504, 0]]], np.float16)
    assert cal.exit_scores(h)[0][0, 0] == 1.0


def test_exit_scores_non_contiguous_and_memmap(tmp_path):
    x = _logits((3, 40, 11), 3.0, 5)
    s0, p0 = cal.exit_scores(x, kind="margin")
    # Strided views: no copy is made, results are identical.
    xt = np.ascontiguousarray(x.transpose(2, 1, 0)).transpose(2, 1, 0)
    assert not xt.flags.c_contiguous
    s1, p1 = cal.exit_scores(xt, kind="margin")
    np.testing.assert_array_equal(s0, s1)
    np.testing.assert_array_equal(p0, p1)
    s2, _ = cal.exit_scores(x[:, ::2], kind="margin")
    np.testing.assert_array_equal(s2, s0[:, ::2])
    # A read-only memmap dump.
    np.save(tmp_path / "logits.npy", x)
    m = np.load(tmp_path / "logits.npy", mmap_mode="r")
    assert isinstance(m, np.memmap) and not m.flags.writeable
    s3, p3 = cal.exit_scores(m, kind="margin")
    np.testing.assert_array_equal(s0, s3)
    np.testing.assert_array_equal(p0, p3)
    m16 = np.memmap(tmp_path / "h.bin", dtype=np.float16, mode="w+", shape=x.shape)
    m16[:] = x
    np.testing.assert_array_equal(cal.exit_scores(m16)[0], cal.exit_scores(x.astype(np.float16))[0])


def test_exit_scores_does_not_copy_logits():
    # The extension reads numpy's buffer: a read-only array with a tiny chunk of
    # changed values must change only those rows.
    x = _logits((2, 30, 9), 2.0, 8)
    x.setflags(write=False)
    s0, _ = cal.exit_scores(x)
    y = x.copy()
    y[1, 7, 3] += 5
    s1, _ = cal.exit_scores(y)
    changed = np.argwhere(s0 != s1)
    assert changed.tolist() == [[1, 7]]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "logits, kwargs, exc, match",
    [
        (np.zeros((2, 3)), {}, ValueError, "3-D"),
        (np.zeros((0, 3, 4)), {}, ValueError, "at least one exit"),
        (np.zeros((2, 0, 4)), {}, ValueError, "at least one exit"),
        (np.zeros((2, 3, 1)), {}, ValueError, "at least 2 classes"),
        (np.zeros((2, 3, 4), np.int64), {}, TypeError, "float16, float32 or float64"),
        (np.zeros((2, 3, 4), bool), {}, TypeError, "float16, float32 or float64"),
        (np.zeros((2, 3, 4), ">f4"), {}, TypeError, "native byte order"),
        (np.zeros((2, 3, 4)), {"kind": "softmax"}, ValueError, "kind"),
        (np.zeros((2, 3, 4)), {"kind": 3}, TypeError, "kind"),
        (np.zeros((2, 3, 4)), {"temperature": 0.0}, ValueError, "temperature"),
        (np.zeros((2, 3, 4)), {"temperature": -1.0}, ValueError, "temperature"),
        (np.zeros((2, 3, 4)), {"temperature": np.nan}, ValueError, "temperature"),
        (np.zeros((2, 3, 4)), {"temperature": [1.0, 2.0, 3.0]}, ValueError, "K=2"),
        (np.zeros((2, 3, 4)), {"temperature": "hot"}, TypeError, "temperature"),
        (np.zeros((2, 3, 4)), {"temperature": True}, TypeError, "temperature"),
        ("logits", {}, TypeError, "numpy array"),
    ],
)
def test_exit_scores_errors(logits, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        cal.exit_scores(logits, **kwargs)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_exit_scores_non_finite_says_where(dtype, bad):
    x = np.zeros((3, 5, 4), dtype)
    x[2, 3, 1] = bad
    with pytest.raises(ValueError, match=r"exit k=2, sample i=3, class c=1"):
        cal.exit_scores(x)


S = np.array([[0.5, 0.2, 0.9], [0.1, 0.1, 0.1]], np.float32)
C = np.ones((2, 3), bool)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: cal.calibrate(S[0], [1.0]), ValueError, "2-D"),
        (lambda: cal.calibrate(np.zeros((2, 0), np.float32), [0.5, 0.5]), ValueError, "non-empty"),
        (lambda: cal.calibrate(S.astype(int), [0.5, 0.5]), TypeError, "float32"),
        (
            lambda: cal.calibrate(np.where(S == 0.2, np.nan, S).astype(np.float32), [0.5, 0.5]),
            ValueError,
            "exit k=0, sample i=1",
        ),
        (lambda: cal.calibrate(np.where(S == 0.9, np.inf, S).astype(np.float32), [0.5, 0.5]), ValueError, "sample i=2"),
        (lambda: cal.calibrate(S, [1.0]), ValueError, "K=2"),
        (lambda: cal.calibrate(S, [0.6, 0.6]), ValueError, "sum to 1"),
        (lambda: cal.calibrate(S, [1.5, -0.5]), ValueError, ">= 0"),
        (lambda: cal.calibrate(S, [np.nan, 1.0]), ValueError, "finite"),
        (lambda: cal.calibrate(S, [[0.5, 0.5]]), ValueError, "1-D"),
        (lambda: cal.calibrate(S, ["a", "b"]), TypeError, "real numbers"),
        (lambda: cal.geometric_fractions(0.0, 3), ValueError, "q must be positive"),
        (lambda: cal.geometric_fractions(-0.5, 3), ValueError, "q must be positive"),
        (lambda: cal.geometric_fractions(np.inf, 3), ValueError, "q must be positive"),
        (lambda: cal.geometric_fractions(0.5, 0), ValueError, "num_exits"),
        (lambda: cal.geometric_fractions(0.5, 2.5), TypeError, "num_exits"),
        (lambda: cal.geometric_fractions("0.5", 2), TypeError, "q"),
        (lambda: cal.per_stage_fractions(1.5, 3), ValueError, r"\(0, 1\]"),
        (lambda: cal.per_stage_fractions(0.0, 3), ValueError, r"\(0, 1\]"),
        (lambda: cal.simulate(S, C[:, :2], [0.5, -np.inf], [1, 2]), ValueError, "shape"),
        (lambda: cal.simulate(S, C.astype(int), [0.5, -np.inf], [1, 2]), TypeError, "bool"),
        (lambda: cal.simulate(S, C, [0.5, 0.2], [1, 2]), ValueError, "-inf"),
        (lambda: cal.simulate(S, C, [np.nan, -np.inf], [1, 2]), ValueError, "NaN"),
        (lambda: cal.simulate(S, C, [0.5], [1, 2]), ValueError, "thresholds"),
        (lambda: cal.simulate(S, C, [0.5, -np.inf], [2, 1]), ValueError, "non-decreasing"),
        (lambda: cal.simulate(S, C, [0.5, -np.inf], [-1, 1]), ValueError, ">= 0"),
        (lambda: cal.simulate(S, C, [0.5, -np.inf], [1, np.inf]), ValueError, "finite"),
        (lambda: cal.simulate(S, C, [0.5, -np.inf], [1, 2, 3]), ValueError, "K=2"),
        (lambda: cal.budget_sweep(S, C, S, C, [1, 2], qs=[0.5, 0.0]), ValueError, r"qs\[1\]"),
        (lambda: cal.budget_sweep(S, C, S, C, [1, 2], qs=[-1.0]), ValueError, "positive"),
        (lambda: cal.budget_sweep(S, C, S, C, [1, 2], qs=[1.5], mode="per_stage"), ValueError, r"\(0, 1\]"),
        (lambda: cal.budget_sweep(S, C, S, C, [1, 2], qs=[]), ValueError, "at least one"),
        (lambda: cal.budget_sweep(S, C, S, C, [1, 2], mode="uniform"), ValueError, "mode"),
        (lambda: cal.budget_sweep(S, C, S, C, [1, 2], shortfall="stay"), ValueError, "shortfall"),
        (lambda: cal.budget_sweep(S, C, S, C, [1, 2], shortfall=None), TypeError, "shortfall"),
        (lambda: cal.calibrate(S, [0.5, 0.5], shortfall="exit-all"), ValueError, "'reference', 'exit_all'"),
        (lambda: cal.calibrate(S, [0.5, 0.5], shortfall=0), TypeError, "shortfall"),
        (lambda: cal._native.calibrate(S, np.array([0.5, 0.5]), "stay"), ValueError, "'reference' or 'exit_all'"),
        (lambda: cal.budget_sweep(S, C, S[:1], C[:1], [1, 2]), ValueError, "K=2"),
        (lambda: cal.budget_sweep(S, C, S, C[:, :1], [1, 2]), ValueError, "test_correct"),
        (lambda: cal.budget_sweep(S, C[:, :2], S, C, [1, 2]), ValueError, "val_correct"),
        (lambda: cal.budget_sweep(S, C, S * np.float32(np.nan), C, [1, 2]), ValueError, "test_scores must be finite"),
        (lambda: cal.budget_sweep(S, C, S, C, [3, 2]), ValueError, "non-decreasing"),
        (lambda: cal.anytime_accuracy(np.zeros((2, 0), bool)), ValueError, "non-empty"),
        (lambda: cal.anytime_accuracy(np.zeros(3, bool)), ValueError, "2-D"),
    ],
)
def test_bad_input_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------- out of memory

# Run in a child process: with its address space limited (RLIMIT_AS, what `ulimit -v`
# sets) to what it already uses plus `headroom` MB, the inputs exist but the working
# buffers cannot be allocated. The child must catch MemoryError, not die by SIGABRT.
# glibc gets one malloc arena (MALLOC_ARENA_MAX=1): a thread's first allocation would
# otherwise reserve 64 MB of address space for its own arena and eat the headroom, and
# blocks up to 64 MB could come from space such arenas reserved before the limit.
_OOM_CHILD = r"""
import re, resource, sys
import numpy as np
from keras_ee import calibration as cal

what, k, n, headroom = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(0)
if what == "exit_scores":
    x = rng.random((k, n, 2), dtype=np.float32).astype(np.float16)
    call = lambda: cal.exit_scores(x)
else:
    s = rng.random((k, n), dtype=np.float32)
    c = s > 0.5
    call = {
        "calibrate": lambda: cal.calibrate(s, cal.geometric_fractions(0.5, k)),
        "budget_sweep": lambda: cal.budget_sweep(s, c, s, c, np.arange(1.0, k + 1)),
    }[what]
# Warm up (thread pool, allocator arenas) so that the limit only bites the big buffers.
small = rng.random((k, 1000), dtype=np.float32)
cal.budget_sweep(small, small > 0.5, small, small > 0.5, np.arange(1.0, k + 1))
cal.exit_scores(rng.random((k, 1000, 2), dtype=np.float32))
vm = int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + headroom * 2**20, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    call()
except MemoryError as e:
    print(f"MemoryError: {e}")
else:
    try:  # (probed only now: a failed allocation makes glibc reserve a new arena)
        np.empty((headroom + 128) * 2**20, np.uint8)  # never touched: harmless if allowed
    except MemoryError:
        sys.exit("no MemoryError")
    sys.exit(77)  # the limit is not enforced here
# Still usable afterwards.
assert cal.calibrate(small, cal.geometric_fractions(0.5, k))[-1] == -np.inf
print("ok")
"""

_CAL_OOM = "calibration needs 200.0 MB of working memory for 20,000,000 scores; it could not be allocated"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS (ulimit -v) and /proc")
@pytest.mark.parametrize(
    "what, k, n, headroom, message",
    [
        # (2, 10M) float32 scores: 80 MB of sorted keys, then 80 MB of sort scratch and
        # 40 MB of ranks. 16 MB spare: the keys do not fit; 100 MB: the scratch does not.
        ("calibrate", 2, 10_000_000, 16, _CAL_OOM),
        ("calibrate", 2, 10_000_000, 100, _CAL_OOM),
        ("budget_sweep", 2, 10_000_000, 16, _CAL_OOM),
        ("budget_sweep", 2, 10_000_000, 100, _CAL_OOM),
        # (4, 5M, 2) float16 logits (80 MB): 80 MB of scores and 80 MB of predictions out.
        (
            "exit_scores",
            4,
            5_000_000,
            16,
            "exit_scores needs 160.0 MB for 20,000,000 scores and predictions; it could not be allocated",
        ),
    ],
)
def test_out_of_memory_raises_memory_error(what, k, n, headroom, message):
    resource = pytest.importorskip("resource")
    if not hasattr(resource, "RLIMIT_AS"):
        pytest.skip("no RLIMIT_AS (ulimit -v) on this platform")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MALLOC_ARENA_MAX="1", RAYON_NUM_THREADS="2", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _OOM_CHILD, what, str(k), str(n), str(headroom)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env=env,
    )
    if proc.returncode == 77:
        pytest.skip("RLIMIT_AS is not enforced on this system")
    assert proc.returncode == 0, f"child exited with {proc.returncode}: {proc.stdout}{proc.stderr}"
    assert proc.stdout == f"MemoryError: {message}\nok\n"
