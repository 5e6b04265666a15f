"""Exact per-exit parameter and Mul-Add accounting for multi-exit models.

`exit_costs` walks the Keras functional graph, one node at a time, and sums
per-layer costs from static shapes (batch size 1). Counts are cumulative in
the papers' sense: the figure for exit k covers everything executed before
exit k's logits in stage-by-stage execution, i.e. the backbone up to exit k
and every head 1..k. Stage boundaries come from the `stage_{k}_state_{i}`
markers that `keras_ee.models` inserts (so a stage computes all its scales,
as the reference code does, even those exit k itself does not read); for a
model without markers a layer belongs to the first exit that depends on it.

Counting rules (`rule="reference"`: what the op counter of the authors' code of
"Multi-Scale Dense Networks for Resource Efficient Image Classification" (Huang et al.,
ICLR 2018, arXiv:1703.09844) and "Resolution Adaptive Networks for Efficient Inference"
(Yang et al., CVPR 2020, arXiv:2003.07326) measures, and what those papers publish as
"Mul-Add"):

| layer | ops |
|---|---|
| Conv (incl. depthwise/separable/transposed) | kernel size x output (transposed: input) positions; no bias |
| `ConvBNReLU` | its conv, plus its ReLU (one per output element) |
| Dense | in*out (+ out with bias), per leading position |
| ReLU / Activation / other activation layers | one per input element |
| conv or Dense with a built-in non-linear activation | + one per output element |
| Average/Max pooling | one per output element per window element |
| Global pooling | one per input element |
| BatchNorm/LayerNorm/GroupNorm, concat, add, resize, padding, reshape, identity, GradientScale | 0 |

`rule="macs"` counts pure conv and Dense weight multiply-adds (no bias, no
activations, no pooling). Parameters are the trainable weights of the layers
met so far (BN moving statistics are not trainable and are not counted).
Layers with trainable weights that the counter does not know raise a
`ValueError` rather than being silently counted as free.

Example:
```python
from keras_ee import models, costs
model = models.create("msdnet_cifar_5", num_classes=100)
costs.exit_costs(model)["mul_adds"][0]  # 6859876
```
"""

import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import keras
from keras import layers as L

from keras_ee import validation
from keras_ee.models import graph
from keras_ee.models.layers import ConvBNReLU

_UNITS = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}


def parse_mul_adds(value: float | str) -> float:
    """A Mul-Add count from a number or a string: '15M' -> 15e6, '1.5G' -> 1.5e9, '8000' -> 8000.0.

    The one parser of budgets (the command line's `--budget`, `keras_ee.inference`).

    Args:
        value: a positive int or float, or a string: a number with an optional unit
            K, M or G (case-insensitive).

    Returns:
        float, positive.

    Raises:
        ValueError: not a positive, finite Mul-Add count.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = float(value)
        if not math.isfinite(v):
            raise ValueError(f"budget {value!r} is not finite; expected a positive Mul-Add count")
        if v <= 0:
            raise ValueError(f"budget {value!r} must be a positive Mul-Add count")
        return v
    if not isinstance(value, str):
        raise ValueError(f"budget {value!r} is not a Mul-Add count like 15M, 1.2G or 8000")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgG]?)\s*", value)
    if not m:
        raise ValueError(f"budget {value!r} is not a Mul-Add count like 15M, 1.2G or 8000")
    v = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if not math.isfinite(v):
        raise ValueError(f"budget {value!r} is not finite (beyond float range); expected a Mul-Add count like 15M")
    if v <= 0:
        raise ValueError(f"budget {value!r} must be positive")
    return v


RULES = ("reference", "macs")

_TRANSPOSED = tuple(getattr(L, n) for n in ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose") if hasattr(L, n))
_SEPARABLE = tuple(getattr(L, n) for n in ("SeparableConv1D", "SeparableConv2D") if hasattr(L, n))
_DEPTHWISE = tuple(getattr(L, n) for n in ("DepthwiseConv1D", "DepthwiseConv2D") if hasattr(L, n))
_CONV = (L.Conv1D, L.Conv2D, L.Conv3D)
_POOL = tuple(
    getattr(L, n)
    for n in (
        "AveragePooling1D",
        "AveragePooling2D",
        "AveragePooling3D",
        "MaxPooling1D",
        "MaxPooling2D",
        "MaxPooling3D",
    )
)
_GLOBAL_POOL = tuple(
    getattr(L, n)
    for n in (
        "GlobalAveragePooling1D",
        "GlobalAveragePooling2D",
        "GlobalAveragePooling3D",
        "GlobalMaxPooling1D",
        "GlobalMaxPooling2D",
        "GlobalMaxPooling3D",
    )
)
# Normalization layers: the reference counter gives BatchNorm 0 ops.
_NORMALIZATION = tuple(
    getattr(L, n) for n in ("BatchNormalization", "LayerNormalization", "GroupNormalization") if hasattr(L, n)
)
_ACTIVATION = tuple(
    getattr(L, n) for n in ("ReLU", "Activation", "LeakyReLU", "PReLU", "ELU", "Softmax") if hasattr(L, n)
)


_HEAVY_OPS = {
    "matmul",
    "dot",
    "tensordot",
    "einsum",
    "conv",
    "depthwiseconv",
    "separableconv",
    "convtranspose",
    "dotproductattention",
}


def _numel(shape: Sequence[Any]) -> int:
    """Elements of one sample (batch axis dropped)."""
    dims = list(shape)[1:]
    if any(d is None for d in dims):
        raise ValueError(
            f"Cannot count ops on a tensor with unknown dimensions {tuple(shape)}; "
            "build the model with a fully static input_shape."
        )
    return math.prod(dims)


def _has_activation(layer: keras.layers.Layer) -> bool:
    act = getattr(layer, "activation", None)
    if act is None:
        return False
    return getattr(act, "__name__", "") not in ("linear", "identity")


def _node_ops(node: Any, rule: str) -> int:
    """Ops of one call of a layer (batch size 1)."""
    layer = node.operation
    reference = rule == "reference"
    if not isinstance(layer, keras.layers.Layer):
        # A raw `keras.ops` call in the graph (e.g. `x + 3`): elementwise ops
        # are free, as in the reference counter; refuse to guess heavy ones.
        if type(layer).__name__.lower() in _HEAVY_OPS:
            raise ValueError(
                f"keras_ee.costs cannot count the raw op {layer.name!r} "
                f"({type(layer).__name__}); wrap it in a layer with a counting rule."
            )
        return 0
    if isinstance(layer, keras.Model):
        return _model_ops(layer, rule)
    if isinstance(layer, ConvBNReLU):
        ops = math.prod(layer.kernel.shape) * math.prod(node.outputs[0].shape[1:-1])
        if reference and layer.activation:
            ops += _numel(node.outputs[0].shape)
        return int(ops)
    # None for a node without inputs: no rule below that reads it applies to one.
    in_shape: Any = node.input_tensors[0].shape if node.input_tensors else None
    out_shape = node.outputs[0].shape
    if isinstance(layer, _TRANSPOSED):
        spatial = math.prod(in_shape[1:-1])
        ops = math.prod(layer.kernel.shape) * spatial
    elif isinstance(layer, _SEPARABLE):
        spatial = math.prod(out_shape[1:-1])
        ops = (math.prod(layer.depthwise_kernel.shape) + math.prod(layer.pointwise_kernel.shape)) * spatial
    elif isinstance(layer, _DEPTHWISE):
        ops = math.prod(layer.kernel.shape) * math.prod(out_shape[1:-1])
    elif isinstance(layer, _CONV):
        # kernel (k..., cin/groups, cout): groups are already in the kernel shape.
        ops = math.prod(layer.kernel.shape) * math.prod(out_shape[1:-1])
    elif isinstance(layer, L.Dense):
        positions = math.prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
        ops = math.prod(layer.kernel.shape) * positions
        if reference and layer.use_bias:
            ops += layer.units * positions
    elif isinstance(layer, _POOL):
        return math.prod(layer.pool_size) * _numel(out_shape) if reference else 0
    elif isinstance(layer, _GLOBAL_POOL):
        return _numel(in_shape) if reference else 0
    elif isinstance(layer, _ACTIVATION):
        return _numel(in_shape) if reference else 0
    elif isinstance(layer, _NORMALIZATION):
        return 0
    else:
        if layer.trainable_weights:
            raise ValueError(
                f"keras_ee.costs cannot count layer {layer.name!r} of type "
                f"{type(layer).__name__}: it has trainable weights but no counting "
                "rule. Supported: Conv*/DepthwiseConv*/SeparableConv*/Conv*Transpose, "
                "Dense, pooling, activations, and weight-free layers."
            )
        return 0
    if reference and _has_activation(layer):
        ops += _numel(out_shape)
    return int(ops)


def _model_ops(model: keras.Model, rule: str) -> int:
    """Total ops of a nested model (all of its layers, one forward pass)."""
    functional = model if hasattr(model, "outputs") and model.outputs else getattr(model, "_functional", None)
    if functional is None:
        raise ValueError(
            f"keras_ee.costs cannot walk nested model {model.name!r}: it is not a built functional or Sequential model."
        )
    return sum(_node_ops(n, rule) for n in graph.collect_nodes(functional.outputs))


def _params(layer: keras.layers.Layer) -> int:
    # The weights a layer learns, also while it is frozen (`trainable=False`, e.g. in
    # IMTA's phase II): everything but normalization statistics.
    weights = getattr(layer, "weights", [])
    return int(
        sum(math.prod(w.shape) for w in weights if w.trainable or not w.path.rsplit("/", 1)[-1].startswith("moving_"))
    )


def exit_costs(model: keras.Model, rule: str = "reference") -> dict[str, list[int]]:
    """Per-exit parameters and Mul-Adds of a multi-exit functional model.

    Args:
        model: a functional `keras.Model` whose outputs are the exits' logits
            in exit order (e.g. from `keras_ee.models.create` or
            `attach_exits`, or any multi-output functional model).
        rule: `"reference"` (the papers' Mul-Add count) or `"macs"` (pure
            conv + Dense weight multiply-adds).

    Returns:
        Dict of lists of ints, one entry per exit:
        `params`, `mul_adds`: cumulative (backbone up to exit k plus heads
        1..k; what a sample leaving at exit k costs);
        `stage_params`, `stage_mul_adds`: only stage k (its backbone part and
        head k), so the cumulative lists are their running sums;
        `own_head_params`, `own_head_mul_adds`: backbone up to exit k plus
        head k only (earlier heads excluded; not what the papers publish).

    Example:
    ```python
    costs = exit_costs(keras_ee.models.create("multiexit_cnn"))
    costs["mul_adds"]  # rises across exits
    ```
    """
    validation.check_choice("rule", rule, RULES, where="exit_costs: ")
    if not isinstance(model, keras.Model) or not getattr(model, "outputs", None):
        raise TypeError(f"exit_costs expects a built functional keras.Model, received {type(model).__name__}.")
    stages = graph.stage_nodes(model)
    boundaries, has_markers = graph.stage_boundaries(model)
    seen_layers: set[int] = set()
    stage_params: list[int] = []
    stage_ops: list[int] = []
    trunk_params: list[int] = []
    trunk_ops: list[int] = []
    num_exits = len(stages)
    for k, nodes in enumerate(stages):
        if k + 1 < num_exits:
            later = boundaries[k + 1] if has_markers else model.outputs[k + 1 :]
            trunk = {id(n) for n in graph.collect_nodes(later, stop_tensors=boundaries[k])}
        else:
            trunk = set()
        p = o = tp = to = 0
        for node in nodes:
            layer = node.operation
            node_params = 0
            if id(layer) not in seen_layers:
                seen_layers.add(id(layer))
                node_params = _params(layer)
            node_ops = _node_ops(node, rule)
            p += node_params
            o += node_ops
            if id(node) in trunk:
                tp += node_params
                to += node_ops
        stage_params.append(p)
        stage_ops.append(o)
        trunk_params.append(tp)
        trunk_ops.append(to)

    def running(xs: list[int]) -> list[int]:
        out, total = [], 0
        for x in xs:
            total += x
            out.append(total)
        return out

    own_params = [sum(trunk_params[:k]) + stage_params[k] for k in range(num_exits)]
    own_ops = [sum(trunk_ops[:k]) + stage_ops[k] for k in range(num_exits)]
    return {
        "params": running(stage_params),
        "mul_adds": running(stage_ops),
        "stage_params": stage_params,
        "stage_mul_adds": stage_ops,
        "own_head_params": own_params,
        "own_head_mul_adds": own_ops,
    }


def check_recorded_costs(
    model: keras.Model, mul_adds: Iterable[float], where: str, rule: str = "reference"
) -> list[int]:
    """The model's own cumulative Mul-Adds (`exit_costs`), after checking the `mul_adds`
    recorded for it (a run's `dump/costs.json`): the model's costs are the truth, so a record
    that disagrees (edited, or another model's) is a `ValueError` naming both."""
    own = exit_costs(model, rule)["mul_adds"]
    recorded = list(mul_adds)
    agree = len(recorded) == len(own) and all(
        math.isclose(float(a), float(b), rel_tol=1e-6) for a, b in zip(recorded, own)
    )
    if not agree:
        raise ValueError(
            f"{where} gives the exits' Mul-Adds as {recorded}, but the model's own ({rule} rule) are {own}; "
            "the model's are the truth: restore the file, or rerun `keras-ee train` with the run's settings "
            "to write it again."
        )
    return own


def format_table(
    costs_by_name: Mapping[str, Mapping[str, Sequence[float]]],
    params_scale: float = 1e6,
    mul_adds_scale: float = 1e6,
    decimals: int = 2,
) -> str:
    """Text table: one row per model, params and Mul-Adds for every exit.

    Args:
        costs_by_name: dict `name -> exit_costs(...)` result (needs `params`
            and `mul_adds`).
        params_scale: divisor for params (1e6 prints millions).
        mul_adds_scale: divisor for Mul-Adds (1e6 prints millions).
        decimals: digits after the decimal point.

    Returns:
        A string, e.g. `"msdnet_cifar_5  5  params(M)  0.30 0.65 ..."`.
    """
    if not isinstance(costs_by_name, dict):
        raise TypeError(f"format_table expects a dict name -> costs, received {type(costs_by_name).__name__}.")
    p_unit = {1: "", 1e3: "K", 1e6: "M", 1e9: "G"}.get(params_scale, f"/{params_scale:g}")
    m_unit = {1: "", 1e3: "K", 1e6: "M", 1e9: "G"}.get(mul_adds_scale, f"/{mul_adds_scale:g}")
    rows = []
    for name, c in costs_by_name.items():
        if "params" not in c or "mul_adds" not in c:
            raise ValueError(f"format_table: entry {name!r} lacks 'params'/'mul_adds'.")

        def fmt(v: float) -> str:
            # Fixed decimals as the papers print them; small values keep 2 significant digits.
            return f"{v:.{decimals}f}" if v == 0 or abs(v) >= 10**-decimals * 5 else f"{v:.2g}"

        rows.append(
            (
                name,
                str(len(c["params"])),
                " ".join(fmt(x / params_scale) for x in c["params"]),
                " ".join(fmt(x / mul_adds_scale) for x in c["mul_adds"]),
            )
        )
    header = ("model", "exits", f"params ({p_unit}) per exit", f"Mul-Adds ({m_unit}) per exit")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    lines = ["  ".join(h.ljust(wd) for h, wd in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * wd for wd in widths))
    for r in rows:
        lines.append("  ".join(x.ljust(wd) for x, wd in zip(r, widths)).rstrip())
    return "\n".join(lines)


def presets_table(names: Iterable[str] | None = None, rule: str = "reference", num_classes: int | None = None) -> str:
    """Builds every preset (or `names`) and returns `format_table` of their costs.

    This is the table printed by `keras-ee models`. Building the ImageNet
    presets takes a few seconds each (no forward pass is run).

    Args:
        names: list of preset names, default `keras_ee.models.list_presets()`.
        rule: counting rule, see `exit_costs`.
        num_classes: int or None (each preset's default class count).

    Returns:
        The table as a string.
    """
    from keras_ee import models

    names = models.list_presets() if names is None else list(names)
    results = {}
    for name in names:
        kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
        model = models.create(name, **kwargs)
        results[name] = exit_costs(model, rule=rule)
        del model
        keras.backend.clear_session()
    return format_table(results)
