"""`InferenceSnapshot`: a model's BatchNorm-folded conv kernels, computed once, for serving.

It lives with inference (`keras_ee.inference` uses it) and reaches the layers through
`keras_ee.models.layers.folded_kernels_scope`, so that the models never import inference.
"""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import keras

from keras_ee.models.layers import ConvBNReLU, folded_kernels_scope


class InferenceSnapshot:
    """The BatchNorm-folded (and width-packed) inference kernels of every `ConvBNReLU` in a
    model, computed once and held in variables, for serving.

    At inference a `ConvBNReLU` folds its BatchNorm into the kernel on every call, so that it
    is always right when the weights change. For MSDNet/RANet's hundreds of units those small
    weight ops are a large share of a batch-1 pass (`bench/inference.py`). Inside
    `with snapshot.active():` the units use the snapshot instead: the same kernels, read from
    variables. The snapshot holds the weights as of its last `refresh()`: refresh it after
    changing the model's weights (`keras_ee.inference.EarlyExitModel` refreshes its own at
    every `predict`, eager call, `serving_function` and `export`).

    Args:
        model: a built Keras model; its `ConvBNReLU` layers (nested models included) are held
            at every input width they are called at in the model's graph.

    Example:
    ```python
    snapshot = InferenceSnapshot(model)
    with snapshot.active():
        logits = model(images, training=False)
    ```
    """

    def __init__(self, model: keras.Model) -> None:
        import tensorflow as tf

        if not isinstance(model, keras.Model) or not model.built:
            what = "an unbuilt model" if isinstance(model, keras.Model) else type(model).__name__
            raise ValueError(f"InferenceSnapshot expects a built Keras model; received {what}.")
        self._entries: dict[
            tuple[int, int | None], tuple[Any, Any, int]
        ] = {}  # (id(layer), input width) -> (kernel, shift, pack)
        self._sources: list[tuple[Any, Any, Any, Any]] = []  # (layer, input width, kernel variable, shift variable)
        for layer in _conv_bn_units(model):
            widths = dict.fromkeys(n.input_tensors[0].shape[2] for n in layer._inbound_nodes if n.input_tensors)
            for width in widths:
                kernel, shift, pack = layer.inference_weights(layer.compute_dtype, width)
                k = tf.Variable(kernel, trainable=False, name=f"{layer.name}_folded_kernel")
                b = tf.Variable(shift, trainable=False, name=f"{layer.name}_folded_shift")
                self._entries[(id(layer), width)] = (k, b, pack)
                self._sources.append((layer, width, k, b))
        self.module = tf.Module(name="inference_snapshot")  # tracks the variables (SavedModel export)
        self.module.folded = [v for _, _, k, b in self._sources for v in (k, b)]
        self._refresh: Callable[[], object] | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def refresh(self) -> None:
        """Re-folds the kernels from the model's current weights (one compiled call)."""
        if not self._sources:
            return
        if self._refresh is None:
            import tensorflow as tf

            def refresh() -> None:
                for layer, width, k, b in self._sources:
                    kernel, shift, _ = layer.inference_weights(k.dtype, width)
                    k.assign(kernel)
                    b.assign(shift)

            self._refresh = tf.function(refresh)
        self._refresh()

    @contextlib.contextmanager
    def active(self) -> Iterator["InferenceSnapshot"]:
        """Inside it, inference calls of the held layers use the snapshot's kernels."""
        with folded_kernels_scope(self._entries):
            yield self


def _conv_bn_units(model: keras.Model) -> list[ConvBNReLU]:
    seen: set[int] = set()
    out: list[ConvBNReLU] = []

    def walk(m: keras.Model) -> None:
        for layer in getattr(m, "layers", ()):
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if isinstance(layer, ConvBNReLU):
                out.append(layer)
            elif isinstance(layer, keras.Model):
                walk(layer)

    walk(model)
    return out
