"""The exits: classifier heads and the gradient-scale hooks at their branch points."""

from typing import Any

import keras
from keras import layers

from keras_ee.models.blocks import (
    DEFAULT_UNIT_OPTIONS,
    UnitOptions,
    conv_bn_relu,
    torch_default_bias_init,
    torch_default_init,
)
from keras_ee.models.layers import GradientScale


def pooled_logits(
    x: keras.KerasTensor, exit_index: int, num_classes: int, dense_kernel_initializer: Any, dense_bias_initializer: Any
) -> keras.KerasTensor:
    """Global average pool (`exit_{k}_features`) then Dense logits (`exit_{k}`)."""
    features = layers.GlobalAveragePooling2D(name=f"exit_{exit_index}_features")(x)
    return layers.Dense(
        num_classes,
        kernel_initializer=dense_kernel_initializer,
        bias_initializer=dense_bias_initializer,
        name=f"exit_{exit_index}",
    )(features)


def conv_head(
    x: keras.KerasTensor,
    exit_index: int,
    num_classes: int,
    channels: int | None = 128,
    kernel_initializer: Any = None,
    zero_dense_bias: bool = False,
    options: UnitOptions = DEFAULT_UNIT_OPTIONS,
) -> keras.KerasTensor:
    """MSDNet/RANet classifier: two stride-2 3x3 CBRs, average pool, Dense.

    With `channels=128` this is the CIFAR head `Hc(C)`; with `channels=None`
    the convs keep the input width, which is the ImageNet head `Hi(C)`. The
    pool averages the whole remaining map; on the 2x2 map the papers' inputs
    produce it equals their 2x2 average pool.

    Args:
        x: 4D tensor at the exit's branch point.
        exit_index: int, 1-based exit index (sets the layer names).
        num_classes: int.
        channels: int or None, width of the two head convs.
        kernel_initializer: conv kernel initializer (PyTorch default if None).
        zero_dense_bias: bool, zero Dense bias (RANet) instead of PyTorch's
            U(+-1/sqrt(in)).
        options: `UnitOptions` of the head's conv units.

    Returns:
        Logits tensor from the Dense layer named `exit_{exit_index}`.
    """
    kernel_initializer = kernel_initializer or torch_default_init()
    width = int(x.shape[-1]) if channels is None else channels
    prefix = f"exit_{exit_index}_head"
    x = conv_bn_relu(x, width, 3, 2, f"{prefix}_1", kernel_initializer, options)
    x = conv_bn_relu(x, width, 3, 2, f"{prefix}_2", kernel_initializer, options)
    bias = "zeros" if zero_dense_bias else torch_default_bias_init(width)
    return pooled_logits(x, exit_index, num_classes, torch_default_init(), bias)


def branch_and_trunk(
    x: keras.KerasTensor, exit_index: int, num_exits: int, gradient_equilibrium: bool, has_trunk: bool = True
) -> tuple[keras.KerasTensor, keras.KerasTensor | None]:
    """Inserts the `exit_{k}_branch` / `exit_{k}_trunk` GradientScale layers.

    IMTA's gradient equilibrium scales the gradient into head k by
    1/(K-k+1) and into the deeper layers by (K-k)/(K-k+1); otherwise both
    scales are 1.0 (identity).

    Returns:
        `(branch, trunk)` tensors; `trunk` is None when `has_trunk` is False.
    """
    remaining = num_exits - exit_index + 1
    branch_scale = 1.0 / remaining if gradient_equilibrium else 1.0
    trunk_scale = (remaining - 1) / remaining if gradient_equilibrium else 1.0
    branch = GradientScale(branch_scale, name=f"exit_{exit_index}_branch")(x)
    trunk = None
    if has_trunk:
        trunk = GradientScale(trunk_scale, name=f"exit_{exit_index}_trunk")(x)
    return branch, trunk
