"""Building blocks shared by the architectures: conv-BN-ReLU units, bottlenecks, initialisers.

Every conv-BN-ReLU is one `ConvBNReLU` layer: BN with `epsilon=1e-5, momentum=0.9` (PyTorch's
defaults) and PyTorch's unbiased moving variance by default (see `UnitOptions`), symmetric zero
padding `(k-1)//2` as PyTorch (Keras' "same" pads asymmetrically at stride 2), and the BN folded
into the conv at inference for speed. `keras_ee.costs` counts it as its conv plus its ReLU, as the
reference op counter does.

The options every unit of a model shares (its nonlinearity and how its BatchNorm layers compute
and update their statistics) are one `UnitOptions`, passed down from the model's constructor.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import layers

from keras_ee import validation
from keras_ee.models.layers import (
    NONLINEARITIES,
    BatchNormalization,
    ChannelSplit,
    ConvBNReLU,
    check_moving_variance_update,
)

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class UnitOptions:
    """What every conv-BN-ReLU unit and BatchNorm of one model shares.

    Attributes:
        activation: `"relu"` or `"gelu"` (exact, erf; gphi_MSDNet's), the units' nonlinearity.
        synchronized_batchnorm: bool; True is Keras' `BatchNormalization(synchronized=True)`: in
            training under a `tf.distribute` strategy the batch mean and variance are those of the
            global batch (an all-reduce per layer), so the replicas normalise as one device would;
            with one replica it changes nothing.
        moving_variance_update: `"unbiased"` (PyTorch's running variance, the batch variance times
            n / (n - 1), as the papers' code trains) or `"biased"` (Keras').
    """

    activation: str = "relu"
    synchronized_batchnorm: bool = False
    moving_variance_update: str = "unbiased"

    def __post_init__(self) -> None:
        validation.check_choice("activation", self.activation, NONLINEARITIES)
        validation.check_bool("synchronized_batchnorm", self.synchronized_batchnorm)
        check_moving_variance_update(self.moving_variance_update, "UnitOptions")

    @classmethod
    def of(cls, model: keras.Model) -> "UnitOptions":
        """The options `model`'s units and BatchNorm layers were built with (the defaults where
        it has none), for layers added to a built model (IMTA's transfer paths) to match it."""
        found, pending = [], list(getattr(model, "layers", ()))
        while pending:
            layer = pending.pop(0)
            if isinstance(layer, (ConvBNReLU, BatchNormalization)):
                found.append(layer)
            pending += getattr(layer, "layers", ())  # nested models
        if not found:
            return cls()
        units = [layer for layer in found if isinstance(layer, ConvBNReLU)]
        return cls(
            activation=units[0].nonlinearity if units else "relu",
            synchronized_batchnorm=bool(found[0].synchronized),
            moving_variance_update=found[0].moving_variance_update,
        )


DEFAULT_UNIT_OPTIONS = UnitOptions()


def unit_options(
    activation: object, synchronized_batchnorm: object, moving_variance_update: object, where: str
) -> UnitOptions:
    """A model constructor's three unit arguments, checked, as one `UnitOptions`; errors start
    with `where` (the model's name and ": ")."""
    return UnitOptions(
        activation=str(validation.check_choice("activation", activation, NONLINEARITIES, where)),
        synchronized_batchnorm=validation.check_bool("synchronized_batchnorm", synchronized_batchnorm, where),
        moving_variance_update=check_moving_variance_update(moving_variance_update, where.rstrip(": ")),
    )


def batch_normalization(
    name: str, options: UnitOptions = DEFAULT_UNIT_OPTIONS, epsilon: float = BN_EPSILON, momentum: float = BN_MOMENTUM
) -> keras.layers.BatchNormalization:
    """keras-ee's `BatchNormalization` (Keras' with the moving variance's update as chosen)."""
    return BatchNormalization(
        epsilon=epsilon,
        momentum=momentum,
        synchronized=options.synchronized_batchnorm,
        moving_variance_update=options.moving_variance_update,
        name=name,
    )


def activation_layer(name: str, options: UnitOptions = DEFAULT_UNIT_OPTIONS) -> keras.layers.Layer:
    """A stand-alone activation layer with the options' nonlinearity."""
    if options.activation == "gelu":
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
    x: keras.KerasTensor,
    filters: int,
    kernel_size: int,
    strides: int,
    name: str,
    kernel_initializer: Any,
    options: UnitOptions = DEFAULT_UNIT_OPTIONS,
) -> keras.KerasTensor:
    """Conv (no bias) -> BatchNorm -> ReLU (one `ConvBNReLU` layer named `name`).

    Args:
        x: 4D channels-last tensor.
        filters: int, output channels.
        kernel_size: int, odd square kernel size.
        strides: int, 1 or 2.
        name: str, layer name.
        kernel_initializer: Keras initializer for the kernel.
        options: `UnitOptions`, the nonlinearity and the BatchNorm's options.

    Returns:
        The activated tensor.
    """
    return ConvBNReLU(
        filters,
        kernel_size,
        strides=strides,
        epsilon=BN_EPSILON,
        momentum=BN_MOMENTUM,
        kernel_initializer=kernel_initializer,
        nonlinearity=options.activation,
        synchronized=options.synchronized_batchnorm,
        moving_variance_update=options.moving_variance_update,
        name=name,
    )(x)


def bottleneck_unit(
    x: keras.KerasTensor,
    filters: int,
    strides: int,
    bottleneck_width: int,
    name: str,
    kernel_initializer: Any,
    options: UnitOptions = DEFAULT_UNIT_OPTIONS,
    bottleneck: bool = True,
) -> keras.KerasTensor:
    """MSDNet/RANet unit: 1x1 CBR to `min(cin, width*filters)`, then 3x3 CBR.

    Args:
        x: 4D input tensor with `cin` channels.
        filters: int, output channels.
        strides: int, stride of the 3x3 conv.
        bottleneck_width: int, the bottleneck factor (width of the 1x1 conv per output channel).
        name: str, layer-name prefix.
        kernel_initializer: Keras initializer.
        options: `UnitOptions`.
        bottleneck: bool, use the 1x1 bottleneck (reference default True).

    Returns:
        Tensor with `filters` channels.
    """
    if bottleneck:
        inner = min(int(x.shape[-1]), bottleneck_width * filters)
        x = conv_bn_relu(x, inner, 1, 1, f"{name}_a", kernel_initializer, options)
    return conv_bn_relu(x, filters, 3, strides, f"{name}_b", kernel_initializer, options)


def shared_bottleneck(
    x: keras.KerasTensor,
    widths: Sequence[int],
    name: str,
    kernel_initializer: Any,
    options: UnitOptions = DEFAULT_UNIT_OPTIONS,
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
        options: `UnitOptions`.

    Returns:
        List of tensors, one per entry of `widths`.
    """
    merged = conv_bn_relu(x, int(sum(widths)), 1, 1, name, kernel_initializer, options)
    if len(widths) == 1:
        return [merged]
    return ChannelSplit(list(widths), name=f"{name}_split")(merged)
