"""`multiexit_cnn`: a small, fast multi-exit CNN for tests and small datasets."""

from collections.abc import Sequence

import keras

from keras_ee import validation
from keras_ee.models.blocks import (
    conv_bn_relu,
    he_fan_out_init,
    torch_default_bias_init,
    torch_default_init,
    unit_options,
)
from keras_ee.models.graph import mark_stage
from keras_ee.models.heads import branch_and_trunk, pooled_logits


def multiexit_cnn(
    num_classes: int = 10,
    input_shape: Sequence[int] = (32, 32, 3),
    widths: Sequence[int] = (16, 32, 48, 64),
    depth: int = 2,
    num_exits: int | None = None,
    gradient_equilibrium: bool = False,
    activation: str = "relu",
    synchronized_batchnorm: bool = False,
    moving_variance_update: str = "unbiased",
    name: str = "multiexit_cnn",
) -> keras.Model:
    """Plain conv stages, each followed by an exit (pool + Dense).

    Stage k has `depth` 3x3 conv-BN-ReLU units of width `widths[k-1]`; the
    first unit of stages 2.. has stride 2 while the map is at least 4 pixels
    high and wide, so any input of at least 8x8 works (8x8 digits, 28x28
    MNIST, 32x32 CIFAR). Exit k is `GlobalAveragePooling2D`
    (`exit_{k}_features`) then `Dense` (`exit_{k}`). Init: conv kernels
    He-normal (fan-out), Dense PyTorch default.

    Args:
        num_classes: int.
        input_shape: `(height, width, channels)`, height and width >= 8.
        widths: ints, channels per stage; one exit per stage.
        depth: int, conv units per stage.
        num_exits: optional int; if given without custom `widths`, uses
            widths `16, 32, ..., 16*num_exits`; if given with `widths` it must
            equal `len(widths)`.
        gradient_equilibrium: bool, IMTA gradient scales at the exits.
        activation: `"relu"` or `"gelu"`, the nonlinearity of every unit.
        synchronized_batchnorm: bool, BatchNorm with the global batch's statistics under a
            `tf.distribute` strategy (see `keras_ee.models.blocks.UnitOptions`).
        moving_variance_update: `"unbiased"` (PyTorch's) or `"biased"` (Keras').
        name: str, model name.

    Returns:
        A functional `keras.Model` with outputs `exit_1..exit_K`.

    Example:
    ```python
    model = multiexit_cnn(num_classes=10, input_shape=(8, 8, 1))
    ```
    """
    where = "multiexit_cnn: "
    num_classes = validation.check_int("num_classes", num_classes, 1, where)
    input_shape = validation.check_input_shape(input_shape, where, min_size=8)
    widths = validation.check_int_tuple("widths", widths, 1, where)
    if num_exits is not None:
        num_exits = validation.check_int("num_exits", num_exits, 1, where)
        if widths == (16, 32, 48, 64):
            widths = tuple(16 * (k + 1) for k in range(num_exits))
        elif len(widths) != num_exits:
            raise ValueError(
                f"{where}num_exits={num_exits} disagrees with widths={widths} ({len(widths)} stages); pass one of them."
            )
    depth = validation.check_int("depth", depth, 1, where)
    gradient_equilibrium = validation.check_bool("gradient_equilibrium", gradient_equilibrium, where)
    options = unit_options(activation, synchronized_batchnorm, moving_variance_update, where)
    init = he_fan_out_init()
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    outputs = []
    k_total = len(widths)
    for k, width in enumerate(widths, start=1):
        for d in range(depth):
            stride = 2 if (k > 1 and d == 0 and min(x.shape[1:3]) >= 4) else 1
            x = conv_bn_relu(x, width, 3, stride, f"s{k}_u{d + 1}", init, options)
        last = k == k_total
        branch, trunk = branch_and_trunk(x, k, k_total, gradient_equilibrium, has_trunk=not last)
        outputs.append(pooled_logits(branch, k, num_classes, torch_default_init(), torch_default_bias_init(width)))
        if not last:
            (x,) = mark_stage(k, [trunk])
    return keras.Model(inputs, outputs, name=name)
