"""MSDNet, the multi-scale dense network of Huang et al., CIFAR and ImageNet variants.

"Multi-Scale Dense Networks for Resource Efficient Image Classification", Gao Huang, Danlu Chen,
Tianhong Li, Felix Wu, Laurens van der Maaten and Kilian Q. Weinberger, ICLR 2018,
arXiv:1703.09844; as built by the authors' MSDNet-PyTorch code (which L2W, "Learning to Weight
Samples for Dynamic Early-exiting Networks", ECCV 2022, arXiv:2209.08310, and IMTA, "Improved
Techniques for Training Adaptive Deep Networks", ICCV 2019, arXiv:1908.06294, reuse):
multi-scale dense layers with bottleneck units, the "max" pruning rule that drops the finest
scale at fixed layers (followed by a 1x1 transition), and a classifier on the coarsest scale
after each block.

Initialization: the authors' init routine never reaches a conv, BN or Linear module, so their
networks train from PyTorch's defaults; so do these: conv and Dense kernels U(+-1/sqrt(fan_in))
(`VarianceScaling(1/3, "fan_in", "uniform")`), Dense bias and the ImageNet stem bias
U(+-1/sqrt(fan_in)), BN gamma 1 / beta 0.
"""

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import layers

from keras_ee import validation
from keras_ee.models.blocks import (
    UnitOptions,
    activation_layer,
    batch_normalization,
    conv_bn_relu,
    shared_bottleneck,
    torch_default_bias_init,
    torch_default_init,
    unit_options,
)
from keras_ee.models.graph import mark_stage
from keras_ee.models.heads import branch_and_trunk, conv_head
from keras_ee.models.layers import ChannelConcat

_WHERE = "MSDNetBackbone: "


def block_lengths(num_blocks: int, step_mode: str, step: int, base: int) -> list[int]:
    """Layers per block: block 1 has `base`; later blocks `step` ("even") or
    `step*(b-1)+1` ("lin_grow")."""
    lengths = [base]
    for block in range(2, num_blocks + 1):
        lengths.append(step if step_mode == "even" else step * (block - 1) + 1)
    return lengths


def scale_schedule(total_layers: int, num_scales: int) -> list[tuple[int, int]]:
    """`(in_scales, out_scales)` per layer under the authors' "max" rule."""
    interval = math.ceil(total_layers / num_scales)
    schedule = []
    for layer in range(1, total_layers + 1):
        in_scales = num_scales - max(0, layer - 2) // interval
        out_scales = num_scales - (layer - 1) // interval
        schedule.append((in_scales, out_scales))
    return schedule


def scale_sizes(input_shape: Sequence[int], stem: str, num_scales: int) -> list[tuple[int, int]]:
    """`(height, width)` of every scale, finest first."""
    height, width = input_shape[:2]
    if stem == "imagenet":
        height, width = (validation.conv_out(validation.conv_out(d, 7, 2, 3), 3, 2, 1) for d in (height, width))
    sizes = [(height, width)]
    for _ in range(1, num_scales):
        height, width = (validation.conv_out(d, 3, 2, 1) for d in (height, width))
        sizes.append((height, width))
    return sizes


def apply_stem(
    inputs: keras.KerasTensor,
    stem: str,
    channels: int,
    growth_factors: Sequence[int],
    init: Any,
    options: UnitOptions,
) -> list[keras.KerasTensor]:
    """One map per scale, each from the previous one: a 3x3 unit at full resolution (CIFAR) or a
    7x7/2 conv with bias and a 3x3/2 max-pool (ImageNet), then a 3x3/2 unit per coarser scale."""
    if stem == "cifar":
        x = conv_bn_relu(inputs, channels * growth_factors[0], 3, 1, "stem_s0", init, options)
    else:
        x = layers.ZeroPadding2D(3, name="stem_s0_pad")(inputs)
        x = layers.Conv2D(
            channels * growth_factors[0],
            7,
            strides=2,
            padding="valid",
            use_bias=True,
            kernel_initializer=init,
            bias_initializer=torch_default_bias_init(7 * 7 * int(inputs.shape[-1])),
            name="stem_s0_conv",
        )(x)
        x = batch_normalization("stem_s0_bn", options)(x)
        x = activation_layer("stem_s0_relu", options)(x)
        # Zero padding is exact for the max-pool: its input is post-ReLU (>= 0).
        x = layers.ZeroPadding2D(1, name="stem_s0_pool_pad")(x)
        x = layers.MaxPooling2D(3, strides=2, padding="valid", name="stem_s0_pool")(x)
    scales = [x]
    for scale in range(1, len(growth_factors)):
        scales.append(conv_bn_relu(scales[-1], channels * growth_factors[scale], 3, 2, f"stem_s{scale}", init, options))
    return scales


def apply_dense_layer(
    scales: list[keras.KerasTensor],
    prefix: str,
    in_scales: int,
    out_scales: int,
    growth_rate: int,
    growth_factors: Sequence[int],
    bottleneck_factors: Sequence[int],
    bottleneck: bool,
    init: Any,
    options: UnitOptions,
) -> list[keras.KerasTensor]:
    """One multi-scale dense layer: every kept scale concatenates its input with new features
    from its own scale and, where the layer drops a scale or below the first kept one, from the
    next finer scale (stride 2), half the growth each.

    Args:
        scales: the `in_scales` active maps, finest first.

    Returns:
        The `out_scales` new maps, finest first.
    """
    num_scales = len(growth_factors)
    offset = num_scales - out_scales
    dropping = in_scales > out_scales
    by_scale = dict(zip(range(num_scales - in_scales, num_scales), scales))
    # Every 3x3 unit of this layer: (out scale, branch, source scale, filters, bottleneck factor
    # of the source scale).
    units = []
    for scale in range(offset, num_scales):
        if scale == offset and not dropping:
            units.append((scale, "", scale, growth_rate * growth_factors[scale], bottleneck_factors[scale]))
        else:
            half = growth_rate * growth_factors[scale] // 2
            units.append((scale, "_down", scale - 1, half, bottleneck_factors[scale - 1]))
            units.append((scale, "_same", scale, half, bottleneck_factors[scale]))
    # The 1x1 bottlenecks that read the same map (scale s's own unit and scale s+1's down unit)
    # run as one wider conv + split: identical math, parameters and Mul-Adds (see
    # shared_bottleneck).
    inner = {}
    if bottleneck:
        for source in sorted({unit[2] for unit in units}):
            readers = [unit for unit in units if unit[2] == source]
            # Own/same unit first, then the down unit into scale source+1.
            readers.sort(key=lambda unit: unit[0])
            cin = int(by_scale[source].shape[-1])
            widths = [min(cin, unit[4] * unit[3]) for unit in readers]
            parts = shared_bottleneck(by_scale[source], widths, f"{prefix}_x{source}_a", init, options)
            inner.update({(unit[0], unit[1]): t for unit, t in zip(readers, parts)})
    outs = {}
    for scale, branch, source, filters, _ in units:
        x_in = inner[(scale, branch)] if bottleneck else by_scale[source]
        stride = 2 if branch == "_down" else 1
        outs[(scale, branch)] = conv_bn_relu(x_in, filters, 3, stride, f"{prefix}_s{scale}{branch}_b", init, options)
    new_scales = []
    for scale in range(offset, num_scales):
        if (scale, "") in outs:
            parts = [by_scale[scale], outs[(scale, "")]]
        else:
            parts = [by_scale[scale], outs[(scale, "_down")], outs[(scale, "_same")]]
        new_scales.append(ChannelConcat(name=f"{prefix}_s{scale}_cat")(parts))
    return new_scales


@keras.saving.register_keras_serializable(package="keras_ee")
class MSDNetBackbone(keras.Model):
    """A multi-scale dense network with one exit per block (MSDNet).

    "Multi-Scale Dense Networks for Resource Efficient Image Classification", Huang et al., ICLR
    2018, arXiv:1703.09844. The arguments in parentheses are the authors' command-line names.
    The outputs are the logits of exits `exit_1..exit_{num_blocks}`; the hooks training methods
    read (see `keras_ee.models`) are named layers of the graph.

    Args:
        num_blocks: int, number of blocks = number of exits (`nBlocks`).
        step_mode: `"even"` or `"lin_grow"` (`stepmode`).
        step: int, layers per later block (`step`).
        base: int, layers in block 1 (`base`).
        channels: int, stem base width (`nChannels`).
        growth_rate: int, base growth per layer (`growthRate`).
        growth_factors: ints, channel multiplier per scale, finest first (`grFactor`); its
            length is the number of scales.
        bottleneck_factors: ints, bottleneck width per scale (`bnFactor`).
        reduction: float in [0, 1), transition compression after a dropping layer (0 disables
            transitions).
        bottleneck: bool, use the 1x1 bottleneck in every unit.
        stem: `"cifar"` (3x3 conv at full resolution) or `"imagenet"` (7x7/2 conv with bias +
            3x3/2 max-pool).
        head_channels: int, width of the head convs (128 = CIFAR head), or None to keep the
            exit's width (ImageNet head).
        num_classes: int, classes per exit.
        input_shape: `(height, width, channels)`.
        gradient_equilibrium: bool, IMTA's gradient scales at the exits' branch points (coarsest
            scale) instead of 1.0.
        activation: `"relu"` or `"gelu"` (gphi_MSDNet's), the nonlinearity of every unit.
        synchronized_batchnorm: bool, BatchNorm with the global batch's statistics under a
            `tf.distribute` strategy (see `keras_ee.models.blocks.UnitOptions`).
        moving_variance_update: `"unbiased"` (PyTorch's, the papers' code) or `"biased"` (Keras').
        name: str, model name.

    Example:
    ```python
    model = MSDNetBackbone(num_blocks=5, num_classes=100)  # the CIFAR 5-exit model
    logits = model(images)  # [logits_1, ..., logits_5]
    ```
    """

    def __init__(
        self,
        num_blocks: int = 5,
        step_mode: str = "lin_grow",
        step: int = 1,
        base: int = 1,
        channels: int = 16,
        growth_rate: int = 6,
        growth_factors: Sequence[int] = (1, 2, 4),
        bottleneck_factors: Sequence[int] = (1, 2, 4),
        reduction: float = 0.5,
        bottleneck: bool = True,
        stem: str = "cifar",
        head_channels: int | None = 128,
        num_classes: int = 100,
        input_shape: Sequence[int] = (32, 32, 3),
        gradient_equilibrium: bool = False,
        activation: str = "relu",
        synchronized_batchnorm: bool = False,
        moving_variance_update: str = "unbiased",
        name: str = "msdnet",
        **kwargs: Any,
    ) -> None:
        where = _WHERE
        num_blocks = validation.check_int("num_blocks", num_blocks, 1, where)
        step_mode = validation.check_choice("step_mode", step_mode, ("even", "lin_grow"), where)
        step = validation.check_int("step", step, 1, where)
        base = validation.check_int("base", base, 1, where)
        channels = validation.check_int("channels", channels, 1, where)
        growth_rate = validation.check_int("growth_rate", growth_rate, 1, where)
        growth_factors = validation.check_int_tuple("growth_factors", growth_factors, 1, where)
        num_scales = len(growth_factors)
        bottleneck_factors = validation.check_int_tuple(
            "bottleneck_factors", bottleneck_factors, 1, where, length=num_scales
        )
        reduction = validation.check_fraction("reduction", reduction, 0.0, 1.0, where)
        bottleneck = validation.check_bool("bottleneck", bottleneck, where)
        stem = validation.check_choice("stem", stem, ("cifar", "imagenet"), where)
        if head_channels is not None:
            head_channels = validation.check_int("head_channels", head_channels, 1, where)
        num_classes = validation.check_int("num_classes", num_classes, 1, where)
        input_shape = validation.check_input_shape(input_shape, where)
        gradient_equilibrium = validation.check_bool("gradient_equilibrium", gradient_equilibrium, where)
        options = unit_options(activation, synchronized_batchnorm, moving_variance_update, where)
        for scale in range(1, num_scales):
            if (growth_rate * growth_factors[scale]) % 2:
                raise ValueError(
                    f"{where}scale {scale} splits growth_rate*growth_factors[{scale}] = "
                    f"{growth_rate * growth_factors[scale]} channels into two equal branches; it must "
                    f"be even (growth_rate={growth_rate}, growth_factors={growth_factors})."
                )
        sizes = scale_sizes(input_shape, stem, num_scales)
        if min(sizes[-1]) < 2:
            raise ValueError(
                f"{where}input_shape={input_shape} is too small for {num_scales} scales "
                f"with the {stem!r} stem: the scales would be {sizes}, and the "
                "coarsest must be at least 2x2. Use a larger input or fewer scales "
                "(shorter growth_factors/bottleneck_factors)."
            )

        # === Layers and functional model ===
        init = torch_default_init()
        inputs = keras.Input(input_shape, name="image")
        scales = apply_stem(inputs, stem, channels, growth_factors, init, options)
        lengths = block_lengths(num_blocks, step_mode, step, base)
        schedule = scale_schedule(sum(lengths), num_scales)
        width = channels  # channels per growth-factor unit, after every layer so far
        layer_index = 0
        outputs = []
        for block in range(1, num_blocks + 1):
            for _ in range(lengths[block - 1]):
                layer_index += 1
                in_scales, out_scales = schedule[layer_index - 1]
                prefix = f"l{layer_index}"
                scales = apply_dense_layer(
                    scales,
                    prefix,
                    in_scales,
                    out_scales,
                    growth_rate,
                    growth_factors,
                    bottleneck_factors,
                    bottleneck,
                    init,
                    options,
                )
                width += growth_rate
                kept = range(num_scales - out_scales, num_scales)
                if in_scales > out_scales and reduction > 0:
                    width = math.floor(reduction * width)
                    scales = [
                        conv_bn_relu(t, width * growth_factors[s], 1, 1, f"{prefix}_s{s}_transition", init, options)
                        for s, t in zip(kept, scales)
                    ]
                for s, t in zip(kept, scales):
                    # Internal consistency of the channel bookkeeping (width * grFactor).
                    assert int(t.shape[-1]) == width * growth_factors[s], (prefix, s, t.shape, width)
            last = block == num_blocks
            branch, trunk = branch_and_trunk(scales[-1], block, num_blocks, gradient_equilibrium, has_trunk=not last)
            outputs.append(conv_head(branch, block, num_classes, head_channels, init, options=options))
            if not last:
                scales = mark_stage(block, scales[:-1] + [trunk])
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        # === Config ===
        self.num_blocks = num_blocks
        self.step_mode = step_mode
        self.step = step
        self.base = base
        self.channels = channels
        self.growth_rate = growth_rate
        self.growth_factors = growth_factors
        self.bottleneck_factors = bottleneck_factors
        self.reduction = reduction
        self.bottleneck = bottleneck
        self.stem = stem
        self.head_channels = head_channels
        self.num_classes = num_classes
        self.image_shape = input_shape  # `input_shape` is Keras' property (with the batch axis)
        self.gradient_equilibrium = gradient_equilibrium
        self.activation = options.activation
        self.synchronized_batchnorm = options.synchronized_batchnorm
        self.moving_variance_update = options.moving_variance_update

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "num_blocks": self.num_blocks,
            "step_mode": self.step_mode,
            "step": self.step,
            "base": self.base,
            "channels": self.channels,
            "growth_rate": self.growth_rate,
            "growth_factors": list(self.growth_factors),
            "bottleneck_factors": list(self.bottleneck_factors),
            "reduction": self.reduction,
            "bottleneck": self.bottleneck,
            "stem": self.stem,
            "head_channels": self.head_channels,
            "num_classes": self.num_classes,
            "input_shape": list(self.image_shape),
            "gradient_equilibrium": self.gradient_equilibrium,
            "activation": self.activation,
            "synchronized_batchnorm": self.synchronized_batchnorm,
            "moving_variance_update": self.moving_variance_update,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> "MSDNetBackbone":
        return cls(**config)
