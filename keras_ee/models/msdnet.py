"""MSDNet (Huang et al., 2018), CIFAR and ImageNet variants.

Follows `shared/reference/architectures.md` section 3 (the MSDNet-PyTorch /
L2W-DEN / IMTA reference code): multi-scale dense layers with bottleneck
units, the "max" pruning rule that drops the finest scale at fixed layers
(followed by a 1x1 transition), and a classifier on the coarsest scale after
each block.

Initialization: the reference code's init routine never reaches a conv, BN or
Linear module (architectures.md section 3.8), so the reference trains from
PyTorch defaults; we use the same: conv and Dense kernels
U(+-1/sqrt(fan_in)) (`VarianceScaling(1/3, "fan_in", "uniform")`), Dense bias
and the ImageNet stem bias U(+-1/sqrt(fan_in)), BN gamma 1 / beta 0.
"""

import math
from collections.abc import Sequence

import keras
from keras import layers

from keras_ee import validation as v
from keras_ee.models.graph import mark_stage
from keras_ee.models.heads import (
    activation_layer,
    batch_normalization,
    branch_and_trunk,
    conv_bn_relu,
    conv_head,
    nonlinearity_scope,
    shared_bottleneck,
    torch_default_bias_init,
    torch_default_init,
)
from keras_ee.models.layers import ChannelConcat

_WHERE = "msdnet: "


def block_lengths(num_blocks: int, step_mode: str, step: int, base: int) -> list[int]:
    """Layers per block: block 1 has `base`; later blocks `step` ("even") or
    `step*(b-1)+1` ("lin_grow")."""
    lengths = [base]
    for b in range(2, num_blocks + 1):
        lengths.append(step if step_mode == "even" else step * (b - 1) + 1)
    return lengths


def scale_schedule(total_layers: int, num_scales: int) -> list[tuple[int, int]]:
    """`(in_scales, out_scales)` per layer under the reference "max" rule."""
    interval = math.ceil(total_layers / num_scales)
    schedule = []
    for layer in range(1, total_layers + 1):
        in_scales = num_scales - max(0, layer - 2) // interval
        out_scales = num_scales - (layer - 1) // interval
        schedule.append((in_scales, out_scales))
    return schedule


def msdnet(
    num_classes: int = 100,
    input_shape: Sequence[int] = (32, 32, 3),
    num_blocks: int = 5,
    step_mode: str = "lin_grow",
    step: int = 1,
    base: int = 1,
    num_channels: int = 16,
    growth_rate: int = 6,
    growth_factor: Sequence[int] = (1, 2, 4),
    bottleneck_factor: Sequence[int] = (1, 2, 4),
    reduction: float = 0.5,
    bottleneck: bool = True,
    stem: str = "cifar",
    head_channels: int | None = 128,
    gradient_equilibrium: bool = False,
    activation: str = "relu",
    name: str = "msdnet",
) -> keras.Model:
    """Builds a multi-scale dense network with one exit per block.

    Args:
        num_classes: int, classes per exit.
        input_shape: `(height, width, channels)`.
        num_blocks: int, number of blocks = number of exits (`nBlocks`).
        step_mode: `"even"` or `"lin_grow"` (`stepmode`).
        step: int, layers per later block (`step`).
        base: int, layers in block 1 (`base`).
        num_channels: int, stem base width (`nChannels`).
        growth_rate: int, base growth per layer (`growthRate`).
        growth_factor: ints, channel multiplier per scale, finest first
            (`grFactor`); its length is the number of scales.
        bottleneck_factor: ints, bottleneck width per scale (`bnFactor`).
        reduction: float in [0, 1), transition compression after a dropping
            layer (0 disables transitions).
        bottleneck: bool, use the 1x1 bottleneck in every unit.
        stem: `"cifar"` (3x3 conv at full resolution) or `"imagenet"` (7x7/2
            conv with bias + 3x3/2 max-pool).
        head_channels: int, width of the head convs (128 = CIFAR head), or
            None to keep the exit's width (ImageNet head).
        gradient_equilibrium: bool, IMTA gradient scales at the exits'
            branch points (coarsest scale) instead of 1.0.
        name: str, model name.

    Returns:
        A functional `keras.Model` with outputs `exit_1..exit_{num_blocks}`.

    Example:
    ```python
    model = msdnet(num_classes=10, num_blocks=5)  # the CIFAR 5-exit model
    ```
    """
    w = _WHERE
    num_classes = v.check_int("num_classes", num_classes, 1, w)
    input_shape = v.check_input_shape(input_shape, w)
    num_blocks = v.check_int("num_blocks", num_blocks, 1, w)
    step_mode = v.check_choice("step_mode", step_mode, ("even", "lin_grow"), w)
    step = v.check_int("step", step, 1, w)
    base = v.check_int("base", base, 1, w)
    num_channels = v.check_int("num_channels", num_channels, 1, w)
    growth_rate = v.check_int("growth_rate", growth_rate, 1, w)
    gr = v.check_int_tuple("growth_factor", growth_factor, 1, w)
    bn = v.check_int_tuple("bottleneck_factor", bottleneck_factor, 1, w, length=len(gr))
    reduction = v.check_fraction("reduction", reduction, 0.0, 1.0, w)
    bottleneck = v.check_bool("bottleneck", bottleneck, w)
    stem = v.check_choice("stem", stem, ("cifar", "imagenet"), w)
    if head_channels is not None:
        head_channels = v.check_int("head_channels", head_channels, 1, w)
    gradient_equilibrium = v.check_bool("gradient_equilibrium", gradient_equilibrium, w)
    num_scales = len(gr)
    for s in range(1, num_scales):
        if (growth_rate * gr[s]) % 2:
            raise ValueError(
                f"{w}scale {s} splits growth_rate*growth_factor[{s}] = "
                f"{growth_rate * gr[s]} channels into two equal branches; it must "
                f"be even (growth_rate={growth_rate}, growth_factor={gr})."
            )

    # Spatial size of every scale; the coarsest must be at least 2x2.
    sizes = []
    h, wd = input_shape[:2]
    if stem == "imagenet":
        h, wd = (v.conv_out(v.conv_out(d, 7, 2, 3), 3, 2, 1) for d in (h, wd))
    sizes.append((h, wd))
    for _ in range(1, num_scales):
        h, wd = (v.conv_out(d, 3, 2, 1) for d in (h, wd))
        sizes.append((h, wd))
    if min(sizes[-1]) < 2:
        raise ValueError(
            f"{w}input_shape={input_shape} is too small for {num_scales} scales "
            f"with the {stem!r} stem: the scales would be {sizes}, and the "
            "coarsest must be at least 2x2. Use a larger input or fewer scales "
            "(shorter growth_factor/bottleneck_factor)."
        )

    with nonlinearity_scope(activation):
        init = torch_default_init()
        inputs = keras.Input(input_shape, name="image")

        # Stem: one map per scale, each from the previous one.
        if stem == "cifar":
            x = conv_bn_relu(inputs, num_channels * gr[0], 3, 1, "stem_s0", init)
        else:
            x = layers.ZeroPadding2D(3, name="stem_s0_pad")(inputs)
            x = layers.Conv2D(
                num_channels * gr[0],
                7,
                strides=2,
                padding="valid",
                use_bias=True,
                kernel_initializer=init,
                bias_initializer=torch_default_bias_init(7 * 7 * input_shape[2]),
                name="stem_s0_conv",
            )(x)
            x = batch_normalization("stem_s0_bn")(x)
            x = activation_layer("stem_s0_relu")(x)
            # Zero padding is exact for the max-pool: its input is post-ReLU (>= 0).
            x = layers.ZeroPadding2D(1, name="stem_s0_pool_pad")(x)
            x = layers.MaxPooling2D(3, strides=2, padding="valid", name="stem_s0_pool")(x)
        scales = [x]
        for s in range(1, num_scales):
            scales.append(conv_bn_relu(scales[-1], num_channels * gr[s], 3, 2, f"stem_s{s}", init))

        lengths = block_lengths(num_blocks, step_mode, step, base)
        schedule = scale_schedule(sum(lengths), num_scales)
        n = num_channels
        layer_index = 0
        outputs = []
        for block in range(1, num_blocks + 1):
            for _ in range(lengths[block - 1]):
                layer_index += 1
                in_scales, out_scales = schedule[layer_index - 1]
                offset = num_scales - out_scales
                dropping = in_scales > out_scales
                # `scales` holds the in_scales active maps, finest first.
                by_scale = dict(zip(range(num_scales - in_scales, num_scales), scales))
                prefix = f"l{layer_index}"
                # Every 3x3 unit of this layer: (out scale, branch, source scale,
                # filters, bottleneck factor of the source scale).
                units = []
                for s in range(offset, num_scales):
                    if s == offset and not dropping:
                        units.append((s, "", s, growth_rate * gr[s], bn[s]))
                    else:
                        half = growth_rate * gr[s] // 2
                        units.append((s, "_down", s - 1, half, bn[s - 1]))
                        units.append((s, "_same", s, half, bn[s]))
                # The 1x1 bottlenecks that read the same map (scale s's own unit
                # and scale s+1's down unit) run as one wider conv + split:
                # identical math, parameters and Mul-Adds (see shared_bottleneck).
                inner = {}
                if bottleneck:
                    for src in sorted({u[2] for u in units}):
                        readers = [u for u in units if u[2] == src]
                        # Own/same unit first, then the down unit into scale src+1.
                        readers.sort(key=lambda u: u[0])
                        cin = int(by_scale[src].shape[-1])
                        widths = [min(cin, u[4] * u[3]) for u in readers]
                        parts = shared_bottleneck(by_scale[src], widths, f"{prefix}_x{src}_a", init)
                        inner.update({(u[0], u[1]): t for u, t in zip(readers, parts)})
                outs = {}
                for s, branch, src, filters, _ in units:
                    x_in = inner[(s, branch)] if bottleneck else by_scale[src]
                    stride = 2 if branch == "_down" else 1
                    outs[(s, branch)] = conv_bn_relu(x_in, filters, 3, stride, f"{prefix}_s{s}{branch}_b", init)
                new_scales = []
                for s in range(offset, num_scales):
                    if (s, "") in outs:
                        parts = [by_scale[s], outs[(s, "")]]
                    else:
                        parts = [by_scale[s], outs[(s, "_down")], outs[(s, "_same")]]
                    new_scales.append(ChannelConcat(name=f"{prefix}_s{s}_cat")(parts))
                n += growth_rate
                if dropping and reduction > 0:
                    n_new = math.floor(reduction * n)
                    new_scales = [
                        conv_bn_relu(t, n_new * gr[s], 1, 1, f"{prefix}_s{s}_transition", init)
                        for s, t in zip(range(offset, num_scales), new_scales)
                    ]
                    n = n_new
                for s, t in zip(range(offset, num_scales), new_scales):
                    # Internal consistency of the channel bookkeeping (n * grFactor).
                    assert int(t.shape[-1]) == n * gr[s], (prefix, s, t.shape, n)
                scales = new_scales

            last = block == num_blocks
            branch, trunk = branch_and_trunk(scales[-1], block, num_blocks, gradient_equilibrium, has_trunk=not last)
            outputs.append(conv_head(branch, block, num_classes, head_channels, init))
            if not last:
                scales = mark_stage(block, scales[:-1] + [trunk])

        return keras.Model(inputs, outputs, name=name)
