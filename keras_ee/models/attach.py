"""`attach_exits`: turn any Keras functional backbone into a multi-exit model."""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import keras

from keras_ee import validation
from keras_ee.models import graph
from keras_ee.models.blocks import torch_default_bias_init, torch_default_init
from keras_ee.models.heads import branch_and_trunk, conv_head, pooled_logits


def _backbone_graph(backbone: keras.Model) -> keras.KerasTensor:
    if not isinstance(backbone, keras.Model):
        raise TypeError(f"attach_exits: `backbone` must be a keras.Model, received {type(backbone).__name__}.")
    inputs = getattr(backbone, "inputs", None)
    outputs = getattr(backbone, "outputs", None)
    if not inputs or not outputs:
        raise ValueError(
            f"attach_exits: backbone {backbone.name!r} is not a built functional model "
            "(subclassed models have no layer graph to attach exits to)."
        )
    if len(inputs) != 1:
        raise ValueError(
            f"attach_exits: the backbone must have exactly one input, {backbone.name!r} has {len(inputs)}."
        )
    return inputs[0]


def attach_exits(
    backbone: keras.Model,
    layer_names: Sequence[str],
    head: Literal["conv"] | Callable[[keras.KerasTensor, int], keras.KerasTensor] | None = None,
    num_classes: int | None = None,
    gradient_equilibrium: bool = False,
    name: str | None = None,
) -> keras.Model:
    """Adds an exit after each named layer of a functional backbone.

    The new model reuses (shares) the backbone's layers. The backbone's own
    outputs are not kept: name its last layer to put an exit there. Each exit
    k gets the same hooks as the built-in architectures
    (`exit_{k}_branch`/`exit_{k}_trunk` GradientScale layers,
    `exit_{k}_features`, logits `exit_{k}`) and the state carried between
    exits passes through `stage_{k}_state_{i}` markers, so `split_stages` and
    `keras_ee.costs.exit_costs` work on the result. Stage k holds the
    backbone layers that exit k needs and earlier exits did not.

    Args:
        backbone: functional `keras.Model` with one input (e.g. a
            `keras.applications` model with `include_top=False`).
        layer_names: list of layer names, in execution order; each layer must
            be called once in the backbone.
        head: None (global average pool + Dense), `"conv"` (the MSDNet CIFAR
            head: two stride-2 3x3 conv-BN-ReLU with 128 channels, pool,
            Dense), or a callable `head(x, exit_index) -> features` that builds
            fresh layers and returns a 2D `(batch, features)` tensor; a Dense
            `exit_{k}` is added on top.
        num_classes: int, classes per exit (required).
        gradient_equilibrium: bool, IMTA gradient scales at the exits.
        name: str, model name (default `"{backbone.name}_multiexit"`).

    Returns:
        A functional `keras.Model` with outputs `exit_1..exit_K`.

    Example:
    ```python
    backbone = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), include_top=False, weights=None)
    model = attach_exits(backbone, ["expanded_conv_2_add", "expanded_conv_5_add"],
                         num_classes=10)
    ```
    """
    where = "attach_exits: "
    old_input = _backbone_graph(backbone)
    if num_classes is None:
        raise ValueError(f"{where}`num_classes` is required.")
    num_classes = validation.check_int("num_classes", num_classes, 1, where)
    gradient_equilibrium = validation.check_bool("gradient_equilibrium", gradient_equilibrium, where)
    if isinstance(layer_names, str) or not isinstance(layer_names, (list, tuple)) or not layer_names:
        raise TypeError(f"{where}`layer_names` must be a non-empty list of layer names, received {layer_names!r}.")
    if len(set(layer_names)) != len(layer_names):
        raise ValueError(f"{where}`layer_names` has duplicates: {list(layer_names)}.")
    if not (head is None or head == "conv" or callable(head)):
        raise ValueError(
            f"{where}`head` must be None, 'conv' or a callable (x, exit_index) -> features, received {head!r}."
        )
    by_name = {layer.name: layer for layer in backbone.layers}
    for layer in backbone.layers:
        if layer.name.startswith("exit_") or graph.STAGE_STATE_RE.match(layer.name):
            raise ValueError(
                f"{where}backbone layer name {layer.name!r} clashes with the names "
                "attach_exits creates (exit_*, stage_*_state_*); rename it."
            )
    backbone_nodes = graph.collect_nodes(backbone.outputs)
    exit_tensors = []
    for lname in layer_names:
        if lname not in by_name:
            candidates = [layer.name for layer in backbone.layers if not isinstance(layer, keras.layers.InputLayer)]
            shown = candidates if len(candidates) <= 12 else candidates[:6] + ["..."] + candidates[-6:]
            raise ValueError(
                f"{where}no layer named {lname!r} in backbone {backbone.name!r}. "
                f"Valid names include: {shown} ({len(candidates)} layers; see "
                "backbone.summary())."
            )
        layer = by_name[lname]
        if isinstance(layer, keras.layers.InputLayer):
            raise ValueError(f"{where}cannot attach an exit to the input layer {lname!r}.")
        # Only calls inside the backbone's own graph count (attach_exits itself
        # re-calls the layers in new graphs).
        calls = [n for n in backbone_nodes if n.operation is layer]
        if len(calls) != 1 or len(calls[0].outputs) != 1:
            raise ValueError(
                f"{where}layer {lname!r} is called {len(calls)} times in the backbone "
                "(or has several outputs); its output is ambiguous. Pick a layer "
                "called once with one output."
            )
        tensor = calls[0].outputs[0]
        if (head is None or head == "conv") and len(tensor.shape) != 4:
            raise ValueError(
                f"{where}layer {lname!r} outputs shape {tuple(tensor.shape)}; the built-in "
                "heads need a 4D (batch, height, width, channels) feature map. Pass a "
                "callable `head` for other outputs."
            )
        exit_tensors.append(tensor)

    # Exits must be given in execution order: exit k may not depend on exit k+1.
    for k in range(len(exit_tensors) - 1):
        ancestors = {id(n) for n in graph.collect_nodes([exit_tensors[k]])}
        for j in range(k + 1, len(exit_tensors)):
            node_j, _ = graph.producer(exit_tensors[j])
            if id(node_j) in ancestors:
                raise ValueError(
                    f"{where}layer {layer_names[j]!r} runs before {layer_names[k]!r}; "
                    "list `layer_names` in execution order."
                )

    num_exits = len(exit_tensors)
    new_input = keras.Input(shape=tuple(old_input.shape[1:]), dtype=old_input.dtype, name=old_input.name)
    tensor_map = {id(old_input): new_input}
    done: set[int] = set()
    outputs = []
    for k, exit_tensor in enumerate(exit_tensors, start=1):
        nodes = graph.collect_nodes([exit_tensor], exclude_nodes=done)
        done.update(id(n) for n in nodes)
        graph.replay(nodes, tensor_map)
        later_nodes = graph.collect_nodes(exit_tensors[k:], exclude_nodes=done)
        # Tensors computed so far that later stages read (the carried state).
        carried: list[Any] = []
        seen: set[int] = set()
        for node in later_nodes:
            for t in node.input_tensors:
                src, _ = graph.producer(t)
                if (src.is_input or id(src) in done) and id(t) not in seen:
                    seen.add(id(t))
                    carried.append(t)
        has_trunk = id(exit_tensor) in seen
        branch, trunk = branch_and_trunk(
            tensor_map[id(exit_tensor)], k, num_exits, gradient_equilibrium, has_trunk=has_trunk
        )
        if has_trunk:
            tensor_map[id(exit_tensor)] = trunk
        outputs.append(_make_head(branch, k, num_classes, head))
        if k < num_exits:
            marked = graph.mark_stage(k, [tensor_map[id(t)] for t in carried])
            for t, m in zip(carried, marked):
                tensor_map[id(t)] = m
    return keras.Model(new_input, outputs, name=name or f"{backbone.name}_multiexit")


def _make_head(
    x: keras.KerasTensor,
    k: int,
    num_classes: int,
    head: Literal["conv"] | Callable[[keras.KerasTensor, int], keras.KerasTensor] | None,
) -> keras.KerasTensor:
    if head is None:
        return pooled_logits(x, k, num_classes, torch_default_init(), torch_default_bias_init(int(x.shape[-1])))
    if head == "conv":
        return conv_head(x, k, num_classes, 128)
    features = head(x, k)
    if not isinstance(features, keras.KerasTensor) or len(features.shape) != 2:
        raise ValueError(
            f"attach_exits: the `head` callable must return a 2D (batch, features) "
            f"KerasTensor, it returned {getattr(features, 'shape', features)!r} for exit {k}."
        )
    features = keras.layers.Identity(name=f"exit_{k}_features")(features)
    return keras.layers.Dense(
        num_classes,
        kernel_initializer=torch_default_init(),
        bias_initializer=torch_default_bias_init(int(features.shape[-1])),
        name=f"exit_{k}",
    )(features)
