"""Building blocks shared by the architectures: conv-BN-ReLU units and exits.

Every conv-BN-ReLU is one `ConvBNReLU` layer: BN with `epsilon=1e-5,
momentum=0.9` (PyTorch's defaults) and PyTorch's unbiased moving variance (see
`batchnorm_options`), symmetric zero padding `(k-1)//2` as
PyTorch (Keras' "same" pads asymmetrically at stride 2), and the BN folded
into the conv at inference for speed. `keras_ee.costs` counts it as its conv
plus its ReLU, as the reference op counter does.
"""

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import keras
from keras import layers

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# The nonlinearity of the `conv_bn_relu` units built inside `nonlinearity_scope`.
_T = TypeVar("_T")

_NONLINEARITY = contextvars.ContextVar("keras_ee_nonlinearity", default="relu")


@contextlib.contextmanager
def nonlinearity_scope(name: str) -> Iterator[None]:
    """Build the `conv_bn_relu` units (and `activation_layer`s) in this block with `name`.

    `name` is `"relu"` or `"gelu"` (see `ConvBNReLU`); the builders' `activation`
    argument sets it for a whole model.
    """
    from keras_ee.models.layers import NONLINEARITIES

    if name not in NONLINEARITIES:
        raise ValueError(f"`activation` must be one of {list(NONLINEARITIES)}, received {name!r}.")
    with _scoped(_NONLINEARITY, name):
        yield


@contextlib.contextmanager
def _scoped(variable: contextvars.ContextVar[_T], value: _T) -> Iterator[None]:
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


# Whether the BatchNorm layers built inside `batchnorm_options(synchronized=True)` all-reduce
# their batch statistics across the replicas of a `tf.distribute` strategy.
_SYNCHRONIZED_BN = contextvars.ContextVar("keras_ee_synchronized_bn", default=False)
# How they update their moving variance (`keras_ee.models.layers.MOVING_VARIANCE_UPDATES`).
_MOVING_VARIANCE_UPDATE = contextvars.ContextVar("keras_ee_moving_variance_update", default="unbiased")


@contextlib.contextmanager
def batchnorm_options(synchronized: bool | None = None, moving_variance_update: str | None = None) -> Iterator[None]:
    """Build every BatchNorm in this block (`conv_bn_relu`, `batch_normalization`) with these
    options; an option left None keeps the enclosing block's (outside any: False, "unbiased").

    `synchronized=True` is Keras' `BatchNormalization(synchronized=True)`: in training
    under a `tf.distribute` strategy the batch mean and variance are those of the global
    batch (an all-reduce per layer), so the replicas normalise as one device would; with
    one replica it changes nothing. Models built outside it use per-replica statistics.

    `moving_variance_update`: `"unbiased"` (PyTorch's running variance, the batch variance
    times n / (n - 1), as the papers' code trains) or `"biased"` (Keras').

    Args:
        synchronized: bool or None.
        moving_variance_update: `"unbiased"`, `"biased"` or None.
    """
    from keras_ee.models.layers import check_moving_variance_update

    if synchronized is not None and not isinstance(synchronized, bool):
        raise ValueError(f"`synchronized` must be True or False; received {synchronized!r}.")
    if moving_variance_update is not None:
        check_moving_variance_update(moving_variance_update, "batchnorm_options")
    with contextlib.ExitStack() as stack:
        if synchronized is not None:
            stack.enter_context(_scoped(_SYNCHRONIZED_BN, synchronized))
        if moving_variance_update is not None:
            stack.enter_context(_scoped(_MOVING_VARIANCE_UPDATE, moving_variance_update))
        yield


def batch_normalization(
    name: str, epsilon: float = BN_EPSILON, momentum: float = BN_MOMENTUM
) -> keras.layers.BatchNormalization:
    """keras-ee's `BatchNormalization` (Keras' with the moving variance's update as chosen)
    with the scope's options (`batchnorm_options`)."""
    from keras_ee.models.layers import BatchNormalization

    return BatchNormalization(
        epsilon=epsilon,
        momentum=momentum,
        synchronized=_SYNCHRONIZED_BN.get(),
        moving_variance_update=_MOVING_VARIANCE_UPDATE.get(),
        name=name,
    )


def activation_layer(name: str) -> keras.layers.Layer:
    """A stand-alone activation layer with the scope's nonlinearity (ReLU by default)."""
    if _NONLINEARITY.get() == "gelu":
        return layers.Activation("gelu", name=name)  # keras.activations.gelu: exact (erf) by default
    return layers.ReLU(name=name)


def torch_default_init() -> keras.initializers.Initializer:
    """PyTorch's default conv/linear kernel init, U(+-1/sqrt(fan_in))."""
    return keras.initializers.VarianceScaling(scale=1.0 / 3.0, mode="fan_in", distribution="uniform")


def he_fan_out_init() -> keras.initializers.Initializer:
    """The reference code's intended conv init, N(0, sqrt(2 / (k*k*cout)))."""
    return keras.initializers.VarianceScaling(scale=2.0, mode="fan_out", distribution="untruncated_normal")


def torch_default_bias_init(fan_in: int) -> keras.initializers.Initializer:
    """PyTorch's default bias init, U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(minval=-bound, maxval=bound)


def conv_bn_relu(
    x: keras.KerasTensor, filters: int, kernel_size: int, strides: int, name: str, kernel_initializer: Any
) -> keras.KerasTensor:
    """Conv (no bias) -> BatchNorm -> ReLU (one `ConvBNReLU` layer named `name`).

    Args:
        x: 4D channels-last tensor.
        filters: int, output channels.
        kernel_size: int, odd square kernel size.
        strides: int, 1 or 2.
        name: str, layer name.
        kernel_initializer: Keras initializer for the kernel.

    Returns:
        The activated tensor.
    """
    from keras_ee.models.layers import ConvBNReLU

    return ConvBNReLU(
        filters,
        kernel_size,
        strides=strides,
        epsilon=BN_EPSILON,
        momentum=BN_MOMENTUM,
        kernel_initializer=kernel_initializer,
        nonlinearity=_NONLINEARITY.get(),
        synchronized=_SYNCHRONIZED_BN.get(),
        moving_variance_update=_MOVING_VARIANCE_UPDATE.get(),
        name=name,
    )(x)


def bottleneck_unit(
    x: keras.KerasTensor,
    filters: int,
    strides: int,
    bottleneck_width: int,
    name: str,
    kernel_initializer: Any,
    bottleneck: bool = True,
) -> keras.KerasTensor:
    """MSDNet/RANet unit: 1x1 CBR to `min(cin, width*filters)`, then 3x3 CBR.

    Args:
        x: 4D input tensor with `cin` channels.
        filters: int, output channels.
        strides: int, stride of the 3x3 conv.
        bottleneck_width: int, the bottleneck factor `w`.
        name: str, layer-name prefix.
        kernel_initializer: Keras initializer.
        bottleneck: bool, use the 1x1 bottleneck (reference default True).

    Returns:
        Tensor with `filters` channels.
    """
    if bottleneck:
        inner = min(int(x.shape[-1]), bottleneck_width * filters)
        x = conv_bn_relu(x, inner, 1, 1, f"{name}_a", kernel_initializer)
    return conv_bn_relu(x, filters, 3, strides, f"{name}_b", kernel_initializer)


def shared_bottleneck(
    x: keras.KerasTensor, widths: Sequence[int], name: str, kernel_initializer: Any
) -> list[keras.KerasTensor]:
    """Several 1x1 bottleneck CBRs that read the same map, run as one conv.

    A 1x1 conv + BN + ReLU acts on each output channel independently, so
    1x1 CBRs with `widths[0], widths[1], ...` channels on the same input are
    exactly one CBR with `sum(widths)` channels whose outputs are split in
    that order: same parameters, same Mul-Adds, same ReLUs, but the input is
    read once and the conv is wide enough to run efficiently (MSDNet's
    bottlenecks have 6-24 channels). Weight layout of the merged layer
    `name`: `kernel[..., a_i:a_i + widths[i]]` (and the same slice of gamma,
    beta and the moving statistics) is consumer i's 1x1 conv and BN, with
    `a_i = sum(widths[:i])`.

    Args:
        x: 4D channels-last input tensor.
        widths: list of ints, output channels of each consumer's 1x1 CBR.
        name: str, name of the merged `ConvBNReLU` (the split is
            `{name}_split`).
        kernel_initializer: Keras initializer (per-element, so initializing
            the merged kernel is the same as initializing each part).

    Returns:
        List of tensors, one per entry of `widths`.
    """
    from keras_ee.models.layers import ChannelSplit

    y = conv_bn_relu(x, int(sum(widths)), 1, 1, name, kernel_initializer)
    if len(widths) == 1:
        return [y]
    return ChannelSplit(list(widths), name=f"{name}_split")(y)


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

    Returns:
        Logits tensor from the Dense layer named `exit_{exit_index}`.
    """
    kernel_initializer = kernel_initializer or torch_default_init()
    width = int(x.shape[-1]) if channels is None else channels
    prefix = f"exit_{exit_index}_head"
    x = conv_bn_relu(x, width, 3, 2, f"{prefix}_1", kernel_initializer)
    x = conv_bn_relu(x, width, 3, 2, f"{prefix}_2", kernel_initializer)
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
    from keras_ee.models.layers import GradientScale

    remaining = num_exits - exit_index + 1
    branch_scale = 1.0 / remaining if gradient_equilibrium else 1.0
    trunk_scale = (remaining - 1) / remaining if gradient_equilibrium else 1.0
    branch = GradientScale(branch_scale, name=f"exit_{exit_index}_branch")(x)
    trunk = None
    if has_trunk:
        trunk = GradientScale(trunk_scale, name=f"exit_{exit_index}_trunk")(x)
    return branch, trunk
