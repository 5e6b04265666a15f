"""Multi-exit architectures: MSDNet, RANet, a small CNN, and `attach_exits`.

Every model is a functional `keras.Model` with one input and K outputs, the
logits of exits 1..K in exit order (`model.output_names == ["exit_1", ...,
"exit_K"]`). Presets: `available()`; build with `create(name, ...)`.

Hooks for training methods (plain data: named layers in the graph, so they
survive `.keras` save/load; `exit_structure(model)` collects them):

* `exit_{k}` - the Dense layer producing exit k's logits.
* `exit_{k}_features` - the layer whose output is exit k's pooled feature,
  i.e. the input of `exit_{k}` (IMTA's inline collaboration feeds the previous
  exit's logits alongside it).
* `exit_{k}_branch` / `exit_{k}_trunk` - `GradientScale` layers at exit k's
  branch point: the branch feeds head k, the trunk feeds the deeper layers
  (MSDNet: coarsest scale only, as IMTA). The last exit has no trunk, and in
  RANet an exit that ends its flow has none either. `create(...,
  gradient_equilibrium=True)` sets IMTA's scales 1/(K-k+1) (branch) and
  (K-k)/(K-k+1) (trunk); by default every scale is 1.0 (identity). Training
  code may also set `layer.scale` before tracing its train step.
* `stage_{k}_state_{i}` - identity layers on every tensor that stage k
  (everything computed after exit k-1, up to and including exit k) hands on
  to later stages; later stages read only these. `split_stages(model)` turns
  them into one `keras.Model` per stage for real batched early exit, and
  `keras_ee.costs.exit_costs` uses them to count exactly what a sample
  leaving at exit k has paid for.

Example:
```python
from keras_ee import models
model = models.create("msdnet_cifar_5", num_classes=100)
stages = models.split_stages(model)
out = stages[0](images)           # [logits_1, *state_1]
out = stages[1](out[1:])          # [logits_2, *state_2]
```
"""

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import keras

from keras_ee.models import graph
from keras_ee.models.attach import attach_exits
from keras_ee.models.cnn import multiexit_cnn
from keras_ee.models.heads import batchnorm_options
from keras_ee.models.layers import AlignCornersResize, BatchNormalization, ChannelConcat, ConvBNReLU, GradientScale
from keras_ee.models.msdnet import msdnet
from keras_ee.models.ranet import ranet

__all__ = [
    "AlignCornersResize",
    "BatchNormalization",
    "ChannelConcat",
    "ConvBNReLU",
    "ExitStructure",
    "GradientScale",
    "attach_exits",
    "available",
    "batchnorm_options",
    "create",
    "exit_structure",
    "msdnet",
    "multiexit_cnn",
    "ranet",
    "split_stages",
]

# The model option of every preset that picks how BatchNorm updates its moving variance.
MOVING_VARIANCE_OPTION = "moving_variance_update"

_CIFAR = (32, 32, 3)
_IMAGENET = (224, 224, 3)
_MSDNET_CIFAR: dict[str, Any] = dict(
    step_mode="lin_grow",
    step=1,
    base=1,
    num_channels=16,
    growth_rate=6,
    growth_factor=(1, 2, 4),
    bottleneck_factor=(1, 2, 4),
    stem="cifar",
    head_channels=128,
)
_MSDNET_IMAGENET: dict[str, Any] = dict(
    num_blocks=5,
    step_mode="even",
    base=4,
    num_channels=32,
    growth_rate=16,
    growth_factor=(1, 2, 4, 4),
    bottleneck_factor=(1, 2, 4, 4),
    stem="imagenet",
    head_channels=None,
)

# name -> (builder, preset arguments, default input shape, default classes)
_PRESETS: dict[str, tuple[Callable[..., keras.Model], dict[str, Any], tuple[int, int, int], int]] = {
    "msdnet_cifar_5": (msdnet, dict(_MSDNET_CIFAR, num_blocks=5), _CIFAR, 100),
    "msdnet_cifar_7": (msdnet, dict(_MSDNET_CIFAR, num_blocks=7), _CIFAR, 100),
    "msdnet_imagenet_s4": (msdnet, dict(_MSDNET_IMAGENET, step=4), _IMAGENET, 1000),
    "msdnet_imagenet_s6": (msdnet, dict(_MSDNET_IMAGENET, step=6), _IMAGENET, 1000),
    "msdnet_imagenet_s7": (msdnet, dict(_MSDNET_IMAGENET, step=7), _IMAGENET, 1000),
    "ranet_cifar_c1": (ranet, dict(), _CIFAR, 100),
    "ranet_cifar_c2": (
        ranet,
        dict(scale_list=(1, 2, 2, 3), growth_factor=(4, 2, 2, 1), bottleneck_factor=(4, 2, 2, 1)),
        _CIFAR,
        100,
    ),
    "multiexit_cnn": (multiexit_cnn, dict(), _CIFAR, 10),
}


def available() -> list[str]:
    """Names of the presets accepted by `create`.

    Returns:
        List of str.
    """
    return list(_PRESETS)


def create(
    name: str, num_classes: int | None = None, input_shape: Sequence[int] | None = None, **overrides: Any
) -> keras.Model:
    """Builds a preset multi-exit model.

    Presets: `msdnet_cifar_5`, `msdnet_cifar_7` (L2W/IMTA CIFAR MSDNets),
    `msdnet_imagenet_s4/s6/s7` (224x224, 4 scales), `ranet_cifar_c1` (6
    exits), `ranet_cifar_c2` (8 exits), `multiexit_cnn` (small and fast).

    Args:
        name: str, a preset from `available()`.
        num_classes: int; default 100 for CIFAR presets, 1000 for ImageNet
            presets, 10 for `multiexit_cnn`.
        input_shape: `(height, width, channels)`; default the preset's
            (32x32x3, or 224x224x3 for ImageNet presets).
        **overrides: any other argument of the underlying builder
            (`msdnet`, `ranet`, `multiexit_cnn`), e.g. `growth_rate=8` or
            `gradient_equilibrium=True`; and, for every preset,
            `moving_variance_update`: how its BatchNorm layers update their moving
            variance, `"unbiased"` (default, PyTorch's: the papers' code) or
            `"biased"` (Keras'); see `batchnorm_options`.

    Returns:
        A functional `keras.Model` with outputs `exit_1..exit_K`.

    Example:
    ```python
    model = create("multiexit_cnn", num_classes=10, input_shape=(8, 8, 1))
    ```
    """
    if not isinstance(name, str) or name not in _PRESETS:
        raise ValueError(f"Unknown model preset {name!r}. Available: {available()}.")
    builder, preset, default_shape, default_classes = _PRESETS[name]
    overrides = dict(overrides)
    bn_update = overrides.pop(MOVING_VARIANCE_OPTION, None)
    allowed = set(inspect.signature(builder).parameters) - {"num_classes", "input_shape"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"create({name!r}): unknown override(s) {unknown}; {builder.__name__} accepts "
            f"{sorted(allowed | {MOVING_VARIANCE_OPTION})}."
        )
    kwargs = dict(preset)
    kwargs.update(overrides)
    kwargs.setdefault("name", name)
    with batchnorm_options(moving_variance_update=bn_update):
        return builder(
            num_classes=default_classes if num_classes is None else num_classes,
            input_shape=default_shape if input_shape is None else input_shape,
            **kwargs,
        )


@dataclasses.dataclass(frozen=True)
class ExitStructure:
    """Hook layers of a multi-exit model (see the module docstring).

    Attributes:
        num_exits: int, K.
        logits: tuple of the K `exit_{k}` layers.
        features: tuple of the K `exit_{k}_features` layers.
        branch: tuple of K `exit_{k}_branch` GradientScale layers (or None).
        trunk: tuple of K `exit_{k}_trunk` GradientScale layers (or None).
        stage_states: tuple of K-1 tuples: the `stage_{k}_state_{i}` layers.
    """

    num_exits: int
    logits: tuple
    features: tuple
    branch: tuple
    trunk: tuple
    stage_states: tuple

    @property
    def names(self) -> dict[str, Any]:
        """The same structure with layer names instead of layer objects."""

        def nm(layer: keras.layers.Layer | None) -> str | None:
            return None if layer is None else layer.name

        return {
            "num_exits": self.num_exits,
            "logits": [nm(l) for l in self.logits],
            "features": [nm(l) for l in self.features],
            "branch": [nm(l) for l in self.branch],
            "trunk": [nm(l) for l in self.trunk],
            "stage_states": [[nm(l) for l in s] for s in self.stage_states],
        }


def exit_structure(model: keras.Model) -> ExitStructure:
    """Collects the hook layers of a keras-ee multi-exit model.

    Args:
        model: model from `create`, `attach_exits` or a builder (also after
            `.keras` save/load).

    Returns:
        `ExitStructure`.

    Raises:
        ValueError: the outputs are not `exit_1..exit_K` or hooks are missing.
    """
    if not isinstance(model, keras.Model) or not getattr(model, "outputs", None):
        raise TypeError(f"exit_structure expects a built functional keras.Model, received {type(model).__name__}.")
    num_exits = len(model.outputs)
    expected = [f"exit_{k}" for k in range(1, num_exits + 1)]
    names = [graph.producer(t)[1].name for t in model.outputs]
    if names != expected:
        raise ValueError(
            f"exit_structure: outputs of {model.name!r} come from layers {names}; a keras-ee "
            f"multi-exit model has {expected}."
        )
    by_name = {layer.name: layer for layer in model.layers}

    def get(lname: str, required: bool) -> keras.layers.Layer | None:
        layer = by_name.get(lname)
        if layer is None and required:
            raise ValueError(f"exit_structure: {model.name!r} has no layer {lname!r}.")
        return layer

    markers = graph.stage_markers(model)
    if sorted(markers) != list(range(1, num_exits)):
        raise ValueError(
            f"exit_structure: {model.name!r} has stage markers for stages {sorted(markers)}, "
            f"expected stages 1..{num_exits - 1}."
        )
    return ExitStructure(
        num_exits=num_exits,
        logits=tuple(by_name[n] for n in expected),
        features=tuple(get(f"{n}_features", True) for n in expected),
        branch=tuple(get(f"{n}_branch", False) for n in expected),
        trunk=tuple(get(f"{n}_trunk", False) for n in expected),
        stage_states=tuple(tuple(markers[k]) for k in range(1, num_exits)),
    )


class StageModel(keras.Model):
    """Functional stage model that always returns a list of outputs.

    Keras unwraps single-output models; a stage that returns only
    `[logits_K]` would then return a bare tensor, and `out[0]` would silently
    pick the first sample. This keeps the output a list for every stage.
    """

    def call(self, *args: Any, **kwargs: Any) -> list[Any]:
        out = super().call(*args, **kwargs)
        return list(out) if isinstance(out, (list, tuple)) else [out]


def split_stages(model: keras.Model) -> list[keras.Model]:
    """Splits a multi-exit model into per-stage models sharing its weights.

    Stage 1 maps the image to `[logits_1, *state_1]`; stage k maps
    `state_{k-1}` (a list, the outputs of the `stage_{k-1}_state_*` markers)
    to `[logits_k, *state_k]`; the last stage returns `[logits_K]` (always a
    list, also for `predict_on_batch`). Chaining
    the stages computes exactly the full model, so an early-exit runtime can
    run stage by stage and drop the samples that already left.

    Args:
        model: a keras-ee multi-exit model (see `exit_structure`).

    Returns:
        List of K `keras.Model`s.

    Example:
    ```python
    stages = split_stages(model)
    out = stages[0](x)
    logits_1, state = out[0], out[1:]
    out = stages[1](state)
    ```
    """
    structure = exit_structure(model)
    boundaries, _ = graph.stage_boundaries(model)
    stages = []
    for k in range(structure.num_exits):
        starts = boundaries[k]
        new_inputs = []
        for i, t in enumerate(starts):
            new_inputs.append(
                keras.Input(
                    shape=tuple(t.shape[1:]),
                    dtype=t.dtype,
                    name="image" if k == 0 else f"stage_{k}_in_{i}",
                )
            )
        tensor_map = {id(t): n for t, n in zip(starts, new_inputs)}
        targets = [model.outputs[k]] + (boundaries[k + 1] if k + 1 < structure.num_exits else [])
        nodes = graph.collect_nodes(targets, stop_tensors=starts)
        graph.replay(nodes, tensor_map)
        outs = [tensor_map[id(t)] for t in targets]
        ins = new_inputs[0] if k == 0 else new_inputs
        stages.append(StageModel(ins, outs, name=f"{model.name}_stage_{k + 1}"))
    return stages
