"""Plots: accuracy versus Mul-Adds (budget curves) and L2W's sample-weight figure.

matplotlib runs headless (Agg); every function writes a PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from keras_ee._typing import StrPath
from keras_ee.formatting import count_unit, metric_label


class BudgetCurve(Protocol):
    """What `budget_plot` draws of a run (`keras_ee.evaluation.Evaluation` is one)."""

    mul_adds: list[float]
    test_anytime: np.ndarray
    metric: str

    def curve(self) -> tuple[np.ndarray, np.ndarray]: ...


def pyplot() -> ModuleType:
    """matplotlib's `pyplot` on the headless Agg backend (imported on first use: it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def budget_plot(evaluations: Mapping[str, BudgetCurve], path: StrPath, title: str | None = None) -> Path:
    """Budgeted-batch accuracy (lines) and anytime accuracy per exit (markers) against Mul-Adds.

    Args:
        evaluations: name -> `keras_ee.evaluation.Evaluation`.
        path: PNG to write.
        title: optional figure title.
    """
    plt = pyplot()
    unit, scale = count_unit([max(ev.mul_adds) for ev in evaluations.values()])
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for i, (name, ev) in enumerate(evaluations.items()):
        color = f"C{i}"
        x, y = ev.curve()
        ax.plot(x / scale, 100 * y, "-", color=color, lw=1.8, label=f"{name}: budgeted batch")
        ax.plot(
            np.asarray(ev.mul_adds) / scale,
            100 * np.asarray(ev.test_anytime),
            "o--",
            color=color,
            ms=4,
            lw=0.8,
            alpha=0.7,
            label=f"{name}: single exits",
        )
    ax.set_xlabel(f"mean Mul-Adds per image ({unit})" if unit else "mean Mul-Adds per image")
    metrics = {getattr(ev, "metric", "top1") for ev in evaluations.values()}
    ax.set_ylabel(f"test {metric_label(metrics.pop()) if len(metrics) == 1 else 'accuracy'} (%)")
    ax.grid(alpha=0.3)
    if len(evaluations) > 2:  # many runs: keep the legend off the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        fig.set_size_inches(9.0, 4.4)
    else:
        ax.legend(fontsize=8, loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_weight_plot(
    loss: np.ndarray, weight: np.ndarray, selected: np.ndarray, path: StrPath, max_points: int = 4000, seed: int = 0
) -> Path:
    """L2W-DEN's Figure 8: the WPN's weight against the sample's loss, one panel per exit.

    Args:
        loss: (N, K) per-sample cross-entropy of every exit.
        weight: (N, K) weights the WPN gave.
        selected: (N,) bool, whether the sample would exit at exit 1 (most confident share).
        path: PNG to write.
        max_points: subsample for a readable scatter.
    """
    loss, weight, selected = np.asarray(loss), np.asarray(weight), np.asarray(selected, bool)
    if loss.ndim != 2 or loss.shape != weight.shape or selected.shape != (loss.shape[0],):
        raise ValueError(
            "sample_weight_plot expects loss and weight of shape (N, K) and selected of shape (N,); "
            f"received {loss.shape}, {weight.shape} and {selected.shape}."
        )
    plt = pyplot()
    n, k = loss.shape
    idx = np.random.default_rng(seed).permutation(n)[:max_points]
    fig, axes = plt.subplots(1, k, figsize=(3.0 * k, 3.0), dpi=110, sharey=True, squeeze=False)
    for j, ax in enumerate(axes[0]):
        for mask, color, label in (
            (~selected[idx], "C1", "not selected by exit 1"),
            (selected[idx], "C0", "selected by exit 1"),
        ):
            ax.scatter(loss[idx][mask, j], weight[idx][mask, j], s=3, alpha=0.4, c=color, label=label)
        ax.set_title(f"exit {j + 1}")
        ax.set_xlabel("loss")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("weight")
    axes[0][-1].legend(fontsize=7, markerscale=3, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
