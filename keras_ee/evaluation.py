"""Evaluation of a multi-exit model from its logit dump: anytime accuracy and budget curves.

Budgeted batch classification as in MSDNet/IMTA/L2W: thresholds are calibrated on the
validation logits (never the test set) for each budget parameter q, then the test set is
scored with them. All heavy lifting is `keras_ee.calibration` (Rust); this module turns
its arrays into tables, CSV files and plots, and compares runs.

Example:

    from keras_ee import dumps, evaluation
    ev = evaluation.evaluate_dump(dumps.load_dump("runs/demo/dump"))
    print(evaluation.format_anytime(ev)); print(evaluation.format_budget(ev))
    evaluation.write_evaluation(ev, "runs/demo/eval")
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from keras_ee import calibration, plots
from keras_ee._typing import StrPath
from keras_ee.atomic import atomic_path, atomic_write_text
from keras_ee.config import TrainConfig
from keras_ee.dumps import Dump, first_non_finite, load_dump
from keras_ee.formatting import (
    budget_label,
    check_metric,
    count_unit,
    csv_number,
    format_count,
    metric_label,
    short_metric,
    table,
)
from keras_ee.run_folder import CONFIG_FILE, DUMP_DIR, SCORES_DIR

if TYPE_CHECKING:
    import keras

    from keras_ee.calibration import Shortfall, SplitMode


@dataclasses.dataclass
class Evaluation:
    """Anytime accuracy per exit and the budget sweep of one model (accuracies are fractions).

    `mul_adds` and `params` are the exits' cumulative costs as the dump stores them
    (ints, or fractional numbers such as relative costs).
    """

    mul_adds: list[float]
    params: list[float]
    val_anytime: np.ndarray  # (K,)
    test_anytime: np.ndarray  # (K,)
    sweep: calibration.BudgetSweep  # keras_ee.calibration.budget_sweep's dict of arrays
    kind: str = "max_softmax"
    mode: str = "geometric"
    name: str = ""
    metric: str = "top1"  # what "correct" means: top-1 (the default) or top-5

    @property
    def num_exits(self) -> int:
        return len(self.mul_adds)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean cost, test accuracy) of the sweep, sorted by cost."""
        order = np.argsort(self.sweep["mean_cost"], kind="stable")
        return self.sweep["mean_cost"][order], self.sweep["test_accuracy"][order]


def top_k_correct(logits: np.ndarray, labels: np.ndarray, k: int = 5, chunk: int = 4096) -> np.ndarray:
    """(K, N) bool: whether each sample's label is among each exit's `k` largest logits.

    A class ranks before the label when its logit is larger, or equal with a smaller class
    index (the order of `argmax` and `top_k`), so `k = 1` is exactly `argmax == label`.
    Works through `chunk` samples at a time (dumps may be memory-mapped and large).
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    num_exits, n, classes = logits.shape
    out = np.empty((num_exits, n), bool)
    index = np.arange(classes)
    for start in range(0, n, chunk):
        z = np.asarray(logits[:, start : start + chunk, :])
        y = labels[start : start + chunk]
        zy = np.take_along_axis(z, np.broadcast_to(y[None, :, None], (num_exits, len(y), 1)), axis=2)
        ahead = (z > zy) | ((z == zy) & (index[None, None, :] < y[None, :, None]))
        out[:, start : start + chunk] = ahead.sum(axis=2) < k
    return out


def scores_and_correct(
    logits: np.ndarray,
    labels: np.ndarray,
    kind: str = "max_softmax",
    temperature: npt.ArrayLike = 1.0,
    what: str = "the logits",
    metric: str = "top1",
) -> tuple[np.ndarray, np.ndarray]:
    """Confidence scores (K, N) and a correctness mask (K, N) from logits (K, N, C).

    `metric="top1"` (default): the exit's prediction is the label; `"top5"`: the label is
    among its 5 largest logits (`top_k_correct`). The scores, and so which exit a sample
    leaves at, are the same for both. NaN or inf in `logits` raise a ValueError naming
    `what` (e.g. a dump's file), the first bad exit (`exit_1` is the first exit) and its
    first bad sample index.
    """
    top = check_metric(metric)
    try:
        scores, predictions = calibration.exit_scores(logits, kind=kind, temperature=temperature)
    except ValueError as e:
        where = None
        if "finite" in str(e) and isinstance(logits, np.ndarray) and logits.ndim == 3 and logits.dtype.kind == "f":
            where = first_non_finite(logits)
        if where is None:
            raise
        k, i, c = where
        raise ValueError(
            f"NaN or inf in {what}: first at exit_{k + 1}, sample {i}, class {c} (sample and class are "
            "0-based indices); the model produced non-finite outputs (check its inputs and weights)."
        ) from None
    if top == 1:
        return scores, predictions == np.asarray(labels)[None, :]
    return scores, top_k_correct(logits, labels, top)


def evaluate_dump(
    dump: Dump,
    kind: str = "max_softmax",
    temperature: npt.ArrayLike = 1.0,
    qs: npt.ArrayLike | None = None,
    mode: calibration.SplitMode = "geometric",
    name: str = "",
    shortfall: calibration.Shortfall = "reference",
    scores: tuple[npt.ArrayLike, npt.ArrayLike] | None = None,
    metric: str = "top1",
) -> Evaluation:
    """Anytime accuracy and the budget sweep (validation-calibrated, test-scored) of a dump.

    Args:
        dump: a `keras_ee.dumps.Dump`.
        kind: confidence measure (`max_softmax`, `margin`, `entropy`).
        temperature: scalar or per-exit softmax temperature.
        qs: budget parameters; default p/20 for p = 1..39 (`geometric`).
        mode: `geometric` (MSDNet's fractions) or `per_stage`.
        name: label used in tables and plots.
        shortfall: what an exit does when ties sent more than the earlier exits' quotas
            out and fewer samples than its own quota remain: `reference` (MSDNet's
            code: its threshold stays +inf) or `exit_all` (every remaining sample
            exits there); see `keras_ee.calibration.calibrate`.
        scores: optional `(val_scores, test_scores)`, each `(K, N)`, a confidence score of
            another kind than the built-in ones (e.g. budget-aware gating's gater, `kind`
            then names it); predictions and correctness still come from the logits.
        metric: `top1` (default) or `top5`: which predictions count as correct, in the
            anytime accuracies and the budget sweep (the HDKD paper reports top-5); the
            exits are still chosen by the confidence score.
    """

    def what(split: str) -> str:
        return f"`{split}_logits`" if dump.path is None else repr(str(Path(dump.path) / f"{split}_logits.npy"))

    builtin = kind if scores is None else "max_softmax"
    check_metric(metric)
    val_scores, val_correct = scores_and_correct(
        dump.val_logits, dump.val_labels, builtin, temperature, what("val"), metric=metric
    )
    test_scores, test_correct = scores_and_correct(
        dump.test_logits, dump.test_labels, builtin, temperature, what("test"), metric=metric
    )
    if scores is not None:
        val_scores, test_scores = (
            _given_scores(s, ref, f"{kind} {split} scores")
            for s, ref, split in zip(scores, (val_scores, test_scores), ("val", "test"))
        )
    sweep = calibration.budget_sweep(
        val_scores,
        val_correct,
        test_scores,
        test_correct,
        np.asarray(dump.mul_adds, np.float64),
        qs=qs,
        mode=mode,
        shortfall=shortfall,
    )
    return Evaluation(
        mul_adds=list(dump.mul_adds),
        params=list(dump.params),
        val_anytime=calibration.anytime_accuracy(val_correct),
        test_anytime=calibration.anytime_accuracy(test_correct),
        sweep=sweep,
        kind=kind,
        mode=mode,
        name=name,
        metric=metric,
    )


def _given_scores(scores: npt.ArrayLike, reference: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(scores)
    if a.shape != reference.shape:
        raise ValueError(
            f"{what} have shape {a.shape}; the dump's logits need (num_exits, num_samples) = {reference.shape}."
        )
    if a.dtype.kind != "f" or not np.all(np.isfinite(a)):
        raise ValueError(
            f"{what} must be finite floats; received dtype {a.dtype}"
            + ("" if a.dtype.kind != "f" else " with NaN or inf")
            + "."
        )
    return np.ascontiguousarray(a, dtype=reference.dtype)


# ----------------------------------------------------------------------------- curves


def accuracy_at(costs: np.ndarray, accuracy: np.ndarray, budgets: npt.ArrayLike) -> np.ndarray:
    """Accuracy of a budget curve at the given Mul-Add budgets.

    Linear interpolation between the swept points (sorted by cost); NaN outside the
    curve's cost range, because extrapolating a budget curve would invent a result.
    """
    order = np.argsort(costs, kind="stable")
    x, y = np.asarray(costs, np.float64)[order], np.asarray(accuracy, np.float64)[order]
    budgets = np.atleast_1d(np.asarray(budgets, np.float64))
    out = np.interp(budgets, x, y)
    out[(budgets < x[0]) | (budgets > x[-1])] = np.nan
    return out


def mean_accuracy_over(costs: np.ndarray, accuracy: np.ndarray, lo: float, hi: float) -> float:
    """Area under the accuracy-versus-cost curve on [lo, hi], divided by hi - lo.

    So it reads as an accuracy (the curve's mean over that budget range) and runs with
    different ranges stay comparable. NaN when the range is empty or outside the curve.
    """
    order = np.argsort(costs, kind="stable")
    x, y = np.asarray(costs, np.float64)[order], np.asarray(accuracy, np.float64)[order]
    if not (hi > lo) or lo < x[0] or hi > x[-1]:
        return float("nan")
    inside = (x > lo) & (x < hi)
    xs = np.concatenate([[lo], x[inside], [hi]])
    ys = np.interp(xs, x, y)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0) / (hi - lo))


# ----------------------------------------------------------------------------- tables and files


def format_anytime(ev: Evaluation) -> str:
    """Per-exit table: cumulative params and Mul-Adds, validation and test accuracy."""
    unit, scale = count_unit(ev.mul_adds)
    punit, pscale = count_unit(ev.params)
    rows = [
        [
            str(k + 1),
            format_count(ev.params[k], pscale),
            format_count(ev.mul_adds[k], scale),
            f"{100 * ev.val_anytime[k]:.2f}",
            f"{100 * ev.test_anytime[k]:.2f}",
        ]
        for k in range(ev.num_exits)
    ]
    acc = short_metric(ev.metric)
    return table(["exit", f"params ({punit})", f"Mul-Adds ({unit})", f"val {acc} %", f"test {acc} %"], rows)


def format_budget(ev: Evaluation, every: int = 1) -> str:
    """Budget table: q, expected Mul-Adds, test accuracy and the exit distribution."""
    unit, scale = count_unit(ev.mul_adds)
    sw = ev.sweep
    n = sw["exit_counts"].sum(axis=1)
    rows = []
    for b in range(0, len(sw["q"]), every):
        share = "/".join(f"{100 * c / n[b]:.0f}" for c in sw["exit_counts"][b])
        rows.append(
            [
                f"{sw['q'][b]:.2f}",
                format_count(sw["mean_cost"][b], scale),
                f"{100 * sw['val_accuracy'][b]:.2f}",
                f"{100 * sw['test_accuracy'][b]:.2f}",
                share,
            ]
        )
    acc = short_metric(ev.metric)
    return table(["q", f"mean Mul-Adds ({unit})", f"val {acc} %", f"test {acc} %", "exit share %"], rows)


@contextlib.contextmanager
def _atomic_csv(path: StrPath) -> Iterator[Any]:
    buf = io.StringIO()
    yield csv.writer(buf, lineterminator="\n")
    atomic_write_text(path, buf.getvalue())


def write_evaluation(ev: Evaluation, out_dir: StrPath, title: str | None = None) -> dict[str, Path]:
    """Write `anytime.csv`, `budget.csv` and `budget.png` into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each file is written whole to a temporary name and renamed (keras_ee.atomic).
    with _atomic_csv(out / "anytime.csv") as w:
        w.writerow(["exit", "params", "mul_adds", "val_accuracy", "test_accuracy"])
        for k in range(ev.num_exits):
            w.writerow(
                [
                    k + 1,
                    csv_number(ev.params[k]),
                    csv_number(ev.mul_adds[k]),
                    f"{ev.val_anytime[k]:.6f}",
                    f"{ev.test_anytime[k]:.6f}",
                ]
            )
    sw = ev.sweep
    with _atomic_csv(out / "budget.csv") as w:
        k = ev.num_exits
        w.writerow(
            ["q", "mean_mul_adds", "val_accuracy", "test_accuracy"]
            + [f"threshold_{i + 1}" for i in range(k)]
            + [f"exit_count_{i + 1}" for i in range(k)]
        )
        for b in range(len(sw["q"])):
            w.writerow(
                [
                    f"{sw['q'][b]:.6g}",
                    f"{sw['mean_cost'][b]:.12g}",
                    f"{sw['val_accuracy'][b]:.6f}",
                    f"{sw['test_accuracy'][b]:.6f}",
                ]
                + [repr(float(t)) for t in sw["thresholds"][b]]
                + [int(c) for c in sw["exit_counts"][b]]
            )
    with atomic_path(out / "budget.png") as tmp:
        plots.budget_plot({ev.name or "model": ev}, tmp, title=title)
    return {"anytime": out / "anytime.csv", "budget": out / "budget.csv", "plot": out / "budget.png"}


def compare(evaluations: list[Evaluation], budgets: npt.ArrayLike | None = None) -> tuple[str, list[dict]]:
    """Compare runs: test accuracy at Mul-Add budgets and the mean accuracy over the common range.

    Args:
        evaluations: `Evaluation`s with distinct `name`s.
        budgets: Mul-Add budgets; default five evenly spaced points of the common range.

    Returns:
        (text table, rows as dicts) where the area entry is `mean_accuracy_over` the cost
        range every curve covers.
    """
    if not evaluations:
        raise ValueError("compare needs at least one evaluation; received none.")
    curves = [ev.curve() for ev in evaluations]
    lo = max(float(c[0][0]) for c in curves)
    hi = min(float(c[0][-1]) for c in curves)
    if budgets is None:
        budgets = np.linspace(lo, hi, 5) if hi > lo else np.array([lo])
    budgets = np.asarray(budgets, np.float64)
    labels = [budget_label(b) for b in budgets]
    rows, cells = [], []
    for ev, (x, y) in zip(evaluations, curves):
        accs = accuracy_at(x, y, budgets)
        auc = mean_accuracy_over(x, y, lo, hi)
        rows.append({"name": ev.name, **{f"acc@{l}": float(a) for l, a in zip(labels, accs)}, "auc": auc})
        cells.append(
            [ev.name]
            + [("-" if np.isnan(a) else f"{100 * a:.2f}") for a in accs]
            + ["-" if np.isnan(auc) else f"{100 * auc:.2f}"]
        )
    metrics = {ev.metric for ev in evaluations}
    if len(metrics) > 1:
        raise ValueError(f"compare needs evaluations of one metric; received {sorted(metrics)}.")
    acc = short_metric(metrics.pop())
    header = ["run"] + [f"{acc}@{l} %" for l in labels] + [f"mean {acc} {budget_label(lo)}-{budget_label(hi)} %"]
    return table(header, cells), rows


# ----------------------------------------------------------------------------- a run's logits and evaluation


def predict_exit_logits(model: keras.Model, dataset: Iterable[Any], verbose: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` over a batched `(x, y)` dataset; return logits (K, N, C) float32 and labels (N,).

    `model` is a multi-exit Keras model whose outputs are the exits' logits in exit order
    (a functional backbone or a `keras_ee.training.MultiExitModel`).
    """
    import keras  # here, not at the top: `keras-ee evaluate` reads dumps without TensorFlow

    logits, labels = [], []
    for batch in dataset:
        x, y = batch[0], batch[1]
        out = model(x, training=False)
        out = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else [out]
        logits.append(np.stack([keras.ops.convert_to_numpy(o).astype(np.float32) for o in out]))
        labels.append(np.asarray(keras.ops.convert_to_numpy(y)).reshape(-1))
    if not logits:
        raise ValueError("the dataset passed for prediction yielded no batch; expected (x, y) batches.")
    return np.concatenate(logits, axis=1), np.concatenate(labels).astype(np.int64)


def evaluate_run(
    workdir: StrPath,
    kind: str = "max_softmax",
    qs: np.ndarray | Sequence[float] | None = None,
    mode: SplitMode = "geometric",
    echo: bool = True,
    shortfall: Shortfall = "reference",
    metric: str = "top1",
) -> Evaluation:
    """Anytime accuracy and budget sweep of a run's dump into `workdir/eval/`; prints the tables.

    `kind` is a built-in confidence score (`max_softmax`, `margin`, `entropy`: written to
    `eval/`) or one that the run's method saved in `scores/<kind>.npz` (budget-aware
    gating's `gater`: written to `eval/<kind>/`). `metric="top5"` counts a sample correct
    when its label is among the exit's 5 largest logits (the HDKD paper's measure; exits
    are still chosen by the confidence score) and writes to `eval/top5/` (`eval/top5/<kind>/`),
    so the top-1 files stay.
    """
    check_metric(metric)
    workdir = Path(workdir)
    dump = load_dump(workdir / DUMP_DIR)
    scores, out = None, workdir / "eval"
    if metric != "top1":
        out = out / metric
    if kind not in calibration.SCORE_KINDS:
        scores = load_run_scores(workdir, kind)
        out = out / kind
    ev = evaluate_dump(
        dump, kind=kind, qs=qs, mode=mode, name=workdir.name, shortfall=shortfall, scores=scores, metric=metric
    )
    title = _title(workdir)
    if metric != "top1" and title:
        title = f"{title} ({metric_label(metric)})"
    paths = write_evaluation(ev, out, title=title)
    if echo:
        what = "" if metric == "top1" else f", {metric_label(metric)}"
        print(f"\nAnytime prediction (each exit on the whole test set{what}), {workdir}:")
        print(format_anytime(ev))
        print(f"\nBudgeted batch classification (thresholds calibrated on validation, {kind}{what}):")
        print(format_budget(ev, every=2))
        print(f"\nwrote {paths['anytime']}, {paths['budget']}, {paths['plot']}")
    return ev


def run_score_kinds(workdir: StrPath) -> list[str]:
    """The confidence scores a run's method saved besides the built-in ones (`scores/*.npz`)."""
    folder = Path(workdir) / SCORES_DIR
    return sorted(p.stem for p in folder.glob("*.npz")) if folder.is_dir() else []


def load_run_scores(workdir: StrPath, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """`(val_scores, test_scores)` from a run's `scores/<kind>.npz`, with a clear error if absent."""
    path = Path(workdir) / SCORES_DIR / f"{kind}.npz"
    if not path.is_file():
        saved = run_score_kinds(workdir)
        raise ValueError(
            f"confidence {kind!r}: {str(workdir)!r} has no {SCORES_DIR}/{kind}.npz (the built-in scores "
            f"are {list(calibration.SCORE_KINDS)}; this run saved {saved or 'no others'}; the gater's "
            "scores come from a run trained with --method gating)."
        )
    try:
        with np.load(path) as f:
            return np.asarray(f["val"]), np.asarray(f["test"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{str(path)!r} is damaged ({type(e).__name__}); rerun `keras-ee train` with the same "
            "settings to write it again."
        ) from None


def compare_confidences(workdir: StrPath, evaluations: dict[str, Evaluation]) -> Path:
    """`eval/confidence.png`: the budget curves of one run under several confidence scores."""
    out = Path(workdir) / "eval" / "confidence.png"
    with atomic_path(out) as tmp:
        plots.budget_plot(evaluations, tmp, title=_title(Path(workdir)))
    return out


def _title(workdir: Path) -> str | None:
    cfg = workdir / CONFIG_FILE
    if not cfg.is_file():
        return None
    c = TrainConfig.from_file(cfg)
    return f"{c.model} / {c.method} on {c.dataset}"
