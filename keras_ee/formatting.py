"""The text forms that evaluation, plots, callbacks and the CLI share: metrics, counts, tables.

Pure functions of numbers and strings (no TensorFlow, no matplotlib), so that `keras_ee.evaluation`
and `keras_ee.plots` both import them and neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("top1", "top5")


def check_metric(metric: str) -> int:
    """The k of a correctness metric (`top1` -> 1, `top5` -> 5); a clear error otherwise."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}; received {metric!r}.")
    return int(metric[3:])


def metric_label(metric: str) -> str:
    """'accuracy' for top-1 (the default everywhere), 'top-5 accuracy' for top-5 (tables, plots)."""
    return "accuracy" if metric == "top1" else f"top-{check_metric(metric)} accuracy"


def budget_label(mul_adds: float) -> str:
    """15e6 -> '15M', 1.5e9 -> '1.5G', 8000 -> '8K' (for log keys and table headers)."""
    unit, scale = count_unit([abs(mul_adds)])
    return f"{mul_adds / scale:.4g}{unit}"


def format_count(value: float, scale: float = 1.0) -> str:
    """`value / scale` for a table cell: two decimals, or 3 significant digits below 1.

    So fractional costs stay readable: 14.4e6 / 1e6 -> '14.40', 0.45 -> '0.45',
    0.0045 -> '0.0045' (not '0.00'), 0 -> '0.00'.
    """
    v = float(value) / scale
    if v == 0 or abs(v) >= 1 or not np.isfinite(v):
        return f"{v:.2f}"
    three = f"{v:.3g}"  # below 1, two decimals could drop digits (0.0045 -> 0.00, 0.125 -> 0.12)
    return f"{v:.2f}" if float(f"{v:.2f}") == float(three) else three


def csv_number(value: float) -> str:
    """A cost for a CSV cell: ints as ints, floats exactly (shortest round-trip repr)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    return repr(float(value))


def count_unit(values: Sequence[float] | np.ndarray) -> tuple[str, float]:
    """The unit ('G', 'M', 'K' or '') and its scale for printing counts as large as max(values)."""
    top = max(values) if len(values) else 1.0
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if top >= scale:
            return unit, scale
    return "", 1.0


def table(header: list[str], rows: list[list[str]]) -> str:
    """A plain-text table: the header, a rule, the rows; every column right-aligned to its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def short_metric(metric: str) -> str:
    """'acc' for top-1, 'top-5' for top-5 (table headers)."""
    return "acc" if metric == "top1" else f"top-{check_metric(metric)}"
