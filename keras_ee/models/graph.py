"""Graph utilities shared by the builders, `split_stages` and `keras_ee.costs`.

Conventions (the "hooks" documented in `keras_ee.models`):

* the logits layer of exit k (1-based) is named `exit_{k}`;
* its pooled feature (the input of that final Dense) is the output of the
  layer `exit_{k}_features`;
* `exit_{k}_branch` / `exit_{k}_trunk` are `GradientScale` layers on the path
  into head k and into the deeper layers;
* every tensor that stage k hands on to later stages passes through an
  identity layer `stage_{k}_state_{i}` (i from 0), and later stages read only
  those marker outputs. The markers define the stage boundaries exactly, so
  stage models and per-exit costs follow from the graph alone.
"""

import re
from collections.abc import Iterable, Sequence
from typing import Any

import keras

STAGE_STATE_RE = re.compile(r"^stage_(\d+)_state_(\d+)$")


def producer(tensor: keras.KerasTensor) -> tuple[Any, keras.Operation]:
    """Returns `(node, layer)` that produced a KerasTensor."""
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        raise TypeError(f"Expected a symbolic KerasTensor of a functional model, received {type(tensor).__name__}.")
    layer, node_index, _ = history
    return layer._inbound_nodes[node_index], layer


def collect_nodes(
    targets: Iterable[keras.KerasTensor],
    stop_tensors: Iterable[keras.KerasTensor] = (),
    exclude_nodes: set[int] | None = None,
) -> list[Any]:
    """Nodes needed to compute `targets`, in a valid execution order.

    The walk goes backwards from `targets` and does not go past any tensor in
    `stop_tensors` (those are treated as given), nor into input nodes, nor into
    nodes whose id is in `exclude_nodes` (already computed elsewhere).

    Args:
        targets: list of KerasTensors.
        stop_tensors: iterable of KerasTensors treated as available inputs.
        exclude_nodes: optional set of `id(node)` to skip.

    Returns:
        List of `keras` nodes in topological (execution) order.
    """
    stop = {id(t) for t in stop_tensors}
    exclude = exclude_nodes or set()
    order: list[Any] = []
    seen: set[int] = set()
    # Iterative post-order DFS: functional graphs here have thousands of nodes.
    stack = [(t, False) for t in reversed(list(targets))]
    while stack:
        tensor, expanded = stack.pop()
        if id(tensor) in stop:
            continue
        node, _ = producer(tensor)
        if node.is_input or id(node) in exclude:
            continue
        if expanded:
            if id(node) not in seen:
                seen.add(id(node))
                order.append(node)
            continue
        if id(node) in seen:
            continue
        stack.append((tensor, True))
        for x in reversed(node.input_tensors):
            stack.append((x, False))
    return order


def replay(nodes: Iterable[Any], tensor_map: dict[int, Any]) -> dict[int, Any]:
    """Calls the layers of `nodes` again on new tensors (weights are shared).

    Args:
        nodes: nodes in execution order (see `collect_nodes`).
        tensor_map: dict `id(old KerasTensor) -> new tensor`, updated in place.

    Returns:
        `tensor_map`.
    """
    for node in nodes:
        args, kwargs = node.arguments.fill_in(tensor_map)
        outputs = node.operation(*args, **kwargs)
        for old, new in zip(node.outputs, keras.tree.flatten(outputs)):
            tensor_map[id(old)] = new
    return tensor_map


def mark_stage(stage: int, tensors: Sequence[keras.KerasTensor]) -> list[keras.KerasTensor]:
    """Passes the state carried out of `stage` through named identity markers.

    Args:
        stage: int, 1-based index of the stage (= exit) that just ended.
        tensors: list of tensors needed by later stages.

    Returns:
        List of marker outputs; later layers must consume these.
    """
    return [keras.layers.Identity(name=f"stage_{stage}_state_{i}")(t) for i, t in enumerate(tensors)]


def stage_markers(model: keras.Model) -> dict[int, list[keras.layers.Layer]]:
    """Maps stage index -> list of marker layers (ordered by state index)."""
    found: dict[int, dict[int, keras.layers.Layer]] = {}
    for layer in model.layers:
        match = STAGE_STATE_RE.match(layer.name)
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = layer
    return {k: [v[i] for i in sorted(v)] for k, v in sorted(found.items())}


def stage_boundaries(model: keras.Model) -> tuple[list[list[keras.KerasTensor]], bool]:
    """Boundary tensors of each stage of a multi-exit functional model.

    Returns:
        `(boundaries, has_markers)`: `boundaries[k]` for k = 0..K-1 is the list
        of tensors available at the start of stage k+1 (`boundaries[0]` is the
        model inputs). Without markers, every stage starts from the inputs and
        per-stage sets follow from ancestry alone.
    """
    num_exits = len(model.outputs)
    markers = stage_markers(model)
    if not markers:
        return [list(model.inputs)] * num_exits, False
    expected = list(range(1, num_exits))
    if sorted(markers) != expected:
        raise ValueError(
            f"Model {model.name!r} has stage markers for stages {sorted(markers)} "
            f"but {num_exits} outputs; expected markers for stages {expected}."
        )
    boundaries = [list(model.inputs)]
    for k in expected:
        boundaries.append([layer.output for layer in markers[k]])
    return boundaries, True


def stage_nodes(model: keras.Model) -> list[list[Any]]:
    """Partitions the nodes of a multi-exit model into stages.

    Stage k holds every node computed after stage k-1's state and needed for
    exit k's logits or for stage k's carried state (its markers). Without
    markers a node belongs to the first exit that depends on it.

    Returns:
        List (one per exit) of node lists in execution order.
    """
    boundaries, has_markers = stage_boundaries(model)
    num_exits = len(model.outputs)
    done: set[int] = set()
    stages: list[list[Any]] = []
    for k in range(num_exits):
        targets = [model.outputs[k]]
        if has_markers and k + 1 < num_exits:
            targets += boundaries[k + 1]
        nodes = collect_nodes(targets, stop_tensors=boundaries[k], exclude_nodes=done)
        done.update(id(n) for n in nodes)
        stages.append(nodes)
    return stages
