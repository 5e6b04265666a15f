"""Multi-exit architectures: MSDNet, RANet, a small CNN, and `attach_exits`.

Every model is a functional `keras.Model` with one input and K outputs, the
logits of exits 1..K in exit order (`model.output_names == ["exit_1", ...,
"exit_K"]`). MSDNet and RANet are `MSDNetBackbone` and `RANetBackbone`, functional
`keras.Model` subclasses built from their hyper-parameters; presets (`list_presets()`,
`get_preset(name)`, keras_ee/models/presets.py) name the papers' configurations; build one with
`create(name, ...)`.

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
from typing import Any

import keras

from keras_ee.models import graph
from keras_ee.models.attach import attach_exits
from keras_ee.models.blocks import UnitOptions
from keras_ee.models.cnn import multiexit_cnn
from keras_ee.models.layers import AlignCornersResize, BatchNormalization, ChannelConcat, ConvBNReLU, GradientScale
from keras_ee.models.msdnet import MSDNetBackbone
from keras_ee.models.presets import Preset, create, get_preset, list_presets, register_preset
from keras_ee.models.ranet import RANetBackbone

__all__ = [
    "AlignCornersResize",
    "BatchNormalization",
    "ChannelConcat",
    "ConvBNReLU",
    "ExitStructure",
    "GradientScale",
    "MSDNetBackbone",
    "Preset",
    "RANetBackbone",
    "UnitOptions",
    "attach_exits",
    "create",
    "exit_structure",
    "get_preset",
    "list_presets",
    "multiexit_cnn",
    "register_preset",
    "split_stages",
]


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

        def name_of(layer: keras.layers.Layer | None) -> str | None:
            return None if layer is None else layer.name

        return {
            "num_exits": self.num_exits,
            "logits": [name_of(layer) for layer in self.logits],
            "features": [name_of(layer) for layer in self.features],
            "branch": [name_of(layer) for layer in self.branch],
            "trunk": [name_of(layer) for layer in self.trunk],
            "stage_states": [[name_of(layer) for layer in stage] for stage in self.stage_states],
        }


def exit_structure(model: keras.Model) -> ExitStructure:
    """Collects the hook layers of a keras-ee multi-exit model.

    Args:
        model: model from `create`, `attach_exits`, a backbone or builder (also after
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
        logits=tuple(by_name[name] for name in expected),
        features=tuple(get(f"{name}_features", True) for name in expected),
        branch=tuple(get(f"{name}_branch", False) for name in expected),
        trunk=tuple(get(f"{name}_trunk", False) for name in expected),
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
