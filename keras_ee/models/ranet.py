"""RANet, the resolution adaptive network of Yang et al., CIFAR Model-C-1 / Model-C-2 and other sizes.

"Resolution Adaptive Networks for Efficient Inference", Le Yang, Yizeng Han, Xi Chen, Shiji Song,
Jifeng Dai and Gao Huang, CVPR 2020, arXiv:2003.07326; as built by the authors' RANet-pytorch
code. Flows ("sub-networks") run from the lowest resolution to the highest; flow i >= 1 starts
with fusion blocks that read the lower flow's per-layer features (bilinearly resized with
align-corners, `AlignCornersResize`), and a classifier follows every normal block. Exits are
ordered flow by flow.

Initialization, as the authors' code: conv kernels He-normal with fan-out,
N(0, sqrt(2/(k*k*cout))), BN gamma 1 / beta 0, Dense bias 0 and Dense kernel PyTorch's default
U(+-1/sqrt(in)); the stem keeps PyTorch's default conv init U(+-1/sqrt(fan_in)).

Gradient-equilibrium hooks: `exit_{k}_branch` sits on the block output that feeds head k;
`exit_{k}_trunk` on the same tensor where it feeds the next block of the same flow. After a
flow's last block there is no next block of that flow, so that exit has no trunk layer (its
features reach the next flow only through the per-layer lists, which are not rescaled).
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import keras

from keras_ee import validation
from keras_ee.models.blocks import (
    UnitOptions,
    bottleneck_unit,
    conv_bn_relu,
    he_fan_out_init,
    torch_default_init,
    unit_options,
)
from keras_ee.models.graph import mark_stage
from keras_ee.models.heads import branch_and_trunk, conv_head
from keras_ee.models.layers import AlignCornersResize, ChannelConcat

_WHERE = "RANetBackbone: "


def resize_to(x: keras.KerasTensor, size: Sequence[int], name: str) -> keras.KerasTensor:
    """`x` resized (align-corners bilinear) to `size`, or `x` itself if it has that size."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return AlignCornersResize(tuple(int(s) for s in size), name=name)(x)


def flow_plan(scale_list: Sequence[int], num_blocks: int, block_step: int) -> list[dict[str, Any]]:
    """Blocks, transition positions and down-blocks of every flow.

    Returns:
        List of dicts with `blocks` (N_i), `transitions` (set of block
        indices followed by a transition) and `downs` (fusion blocks whose
        last layer halves the resolution).
    """
    plan = []
    counts = [num_blocks + block_step * i for i in range(len(scale_list))]
    for flow, resolution in enumerate(scale_list):
        blocks = counts[flow]
        transitions = {math.floor(k * blocks / resolution) for k in range(1, resolution)}
        candidates = [0] + counts[:flow]
        downs = set(candidates[len(candidates) - (resolution - 1) :]) if resolution > 1 else set()
        plan.append({"blocks": blocks, "transitions": transitions, "downs": downs})
    return plan


def stem_sizes(input_shape: Sequence[int], scale_list: Sequence[int]) -> list[tuple[int, ...]]:
    """`(height, width)` of every flow's stem map, lowest resolution first."""
    flows = len(scale_list)
    sizes: list[tuple[int, ...]] = [tuple(input_shape[:2])]
    for flow in range(flows - 2, -1, -1):
        stride = 1 if scale_list[flow] == scale_list[flow + 1] else 2
        sizes.insert(0, tuple(validation.conv_out(d, 3, stride, 1) for d in sizes[0]))
    return sizes


@dataclasses.dataclass
class FlowState:
    """The tensors later stages read, at a stage boundary (an exit).

    Attributes:
        trunk: the output of the block just ended, read by the next block of its flow (None
            after a flow's last block).
        current: block j -> the per-layer features `[Y_0..Y_L]` of the current flow's block j,
            which the next flow's fusion block j reads.
        previous: block j -> the lower flow's per-layer features not read yet.
        stems: flow -> the stem map of a flow not started yet.
    """

    trunk: keras.KerasTensor | None
    current: dict[int, list[keras.KerasTensor]]
    previous: dict[int, list[keras.KerasTensor]]
    stems: dict[int, keras.KerasTensor]

    def tensors(self) -> list[keras.KerasTensor]:
        """Every tensor, in the order of the stage's state markers."""
        out = [] if self.trunk is None else [self.trunk]
        for block in sorted(self.current):
            out += self.current[block]
        for block in sorted(self.previous):
            out += self.previous[block]
        return out + [self.stems[flow] for flow in sorted(self.stems)]

    def with_tensors(self, tensors: Sequence[keras.KerasTensor]) -> "FlowState":
        """The same structure holding `tensors` (in the order of `tensors()`)."""
        rest = iter(tensors)
        trunk = None if self.trunk is None else next(rest)
        current = {block: [next(rest) for _ in self.current[block]] for block in sorted(self.current)}
        previous = {block: [next(rest) for _ in self.previous[block]] for block in sorted(self.previous)}
        stems = {flow: next(rest) for flow in sorted(self.stems)}
        return FlowState(trunk, current, previous, stems)


def apply_stems(
    inputs: keras.KerasTensor,
    channels: int,
    growth_factors: Sequence[int],
    scale_list: Sequence[int],
    options: UnitOptions,
) -> dict[int, keras.KerasTensor]:
    """Flow -> its stem map, built from the highest resolution down (PyTorch's default init)."""
    flows = len(growth_factors)
    init = torch_default_init()
    stems = {flows - 1: conv_bn_relu(inputs, channels * growth_factors[-1], 3, 1, f"stem_f{flows - 1}", init, options)}
    for flow in range(flows - 2, -1, -1):
        stride = 1 if scale_list[flow] == scale_list[flow + 1] else 2
        stems[flow] = conv_bn_relu(
            stems[flow + 1], channels * growth_factors[flow], 3, stride, f"stem_f{flow}", init, options
        )
    return stems


def apply_fusion_block(
    x: keras.KerasTensor,
    lower: list[keras.KerasTensor],
    prefix: str,
    num_layers: int,
    growth: int,
    compress_factor: float,
    down: bool,
    bottleneck_factor: int,
    lower_bottleneck_factor: int,
    init: Any,
    options: UnitOptions,
) -> tuple[keras.KerasTensor, list[keras.KerasTensor]]:
    """A fusion block: each layer adds `growth` channels, `floor(growth*compress_factor)` from the
    lower flow's features of the same layer (resized up) and the rest from its own input; with
    `down` its last layer halves the resolution. A 1x1 tail adds the lower flow's block output.

    Returns:
        `(block output, [input, layer 1 output, ...])`.
    """
    low = math.floor(growth * compress_factor)
    own = growth - low
    record = [x]
    for layer in range(1, num_layers + 1):
        stride = 2 if down and layer == num_layers else 1
        own_features = bottleneck_unit(x, own, stride, bottleneck_factor, f"{prefix}_l{layer}_own", init, options)
        size = own_features.shape[1:3]
        low_features = bottleneck_unit(
            lower[layer - 1], low, 1, lower_bottleneck_factor, f"{prefix}_l{layer}_low", init, options
        )
        low_features = resize_to(low_features, size, f"{prefix}_l{layer}_low_resize")
        identity = resize_to(x, size, f"{prefix}_l{layer}_resize")
        x = ChannelConcat(name=f"{prefix}_l{layer}_cat")([identity, low_features, own_features])
        record.append(x)
    tail = conv_bn_relu(
        lower[num_layers], math.floor(int(x.shape[-1]) * compress_factor), 1, 1, f"{prefix}_tail", init, options
    )
    tail = resize_to(tail, x.shape[1:3], f"{prefix}_tail_resize")
    return ChannelConcat(name=f"{prefix}_tail_cat")([x, tail]), record


def apply_dense_block(
    x: keras.KerasTensor,
    prefix: str,
    num_layers: int,
    growth: int,
    bottleneck_factor: int,
    init: Any,
    options: UnitOptions,
) -> tuple[keras.KerasTensor, list[keras.KerasTensor]]:
    """A normal block: each layer concatenates `growth` new channels to its input.

    Returns:
        `(block output, [input, layer 1 output, ...])`.
    """
    record = [x]
    for layer in range(1, num_layers + 1):
        new = bottleneck_unit(x, growth, 1, bottleneck_factor, f"{prefix}_l{layer}", init, options)
        x = ChannelConcat(name=f"{prefix}_l{layer}_cat")([x, new])
        record.append(x)
    return x, record


@keras.saving.register_keras_serializable(package="keras_ee")
class RANetBackbone(keras.Model):
    """A resolution adaptive network (RANet), with the CIFAR stem and heads.

    "Resolution Adaptive Networks for Efficient Inference", Yang et al., CVPR 2020,
    arXiv:2003.07326. The arguments in parentheses are the authors' command-line names; per-flow
    lists are ordered lowest resolution first, as theirs. The outputs are the logits of exits
    `exit_1..exit_K`, `K = num_blocks + block_step*(flows-1)`, flow by flow.

    Args:
        channels: int, base width (`nChannels`).
        growth_rate: int, base growth (`growthRate`).
        growth_factors: ints per flow (`grFactor`): channels and growth of flow i are
            `channels*growth_factors[i]` and `growth_rate*growth_factors[i]`.
        bottleneck_factors: ints per flow (`bnFactor`).
        scale_list: ints per flow (`scale-list`): resolution label, 1 = lowest; must start at 1
            and rise by 0 or 1 from flow to flow.
        num_blocks: int, blocks of flow 0 (`nBlocks`).
        block_step: int, extra blocks per further flow (`block-step`).
        step: int, layers per block (`step`).
        step_mode: `"even"` (every block has `step` layers) or `"lg"` (block j has `step*j`
            layers) (`stepmode`).
        compress_factor: float in (0, 1), share of growth taken from the lower flow
            (`compress-factor`).
        reduction: float in (0, 1), transition compression.
        head_channels: int, width of the two head convs (128 in the papers).
        num_classes: int, classes per exit.
        input_shape: `(height, width, channels)`.
        gradient_equilibrium: bool, IMTA's gradient scales at the exits.
        activation: `"relu"` or `"gelu"`, the nonlinearity of every unit.
        synchronized_batchnorm: bool, BatchNorm with the global batch's statistics under a
            `tf.distribute` strategy (see `keras_ee.models.blocks.UnitOptions`).
        moving_variance_update: `"unbiased"` (PyTorch's, the papers' code) or `"biased"` (Keras').
        name: str, model name.

    Example:
    ```python
    model = RANetBackbone(num_classes=100)  # Model-C-1: 6 exits
    logits = model(images)  # [logits_1, ..., logits_6]
    ```
    """

    def __init__(
        self,
        channels: int = 16,
        growth_rate: int = 6,
        growth_factors: Sequence[int] = (4, 2, 1),
        bottleneck_factors: Sequence[int] = (4, 2, 1),
        scale_list: Sequence[int] = (1, 2, 3),
        num_blocks: int = 2,
        block_step: int = 2,
        step: int = 2,
        step_mode: str = "lg",
        compress_factor: float = 0.25,
        reduction: float = 0.5,
        head_channels: int = 128,
        num_classes: int = 100,
        input_shape: Sequence[int] = (32, 32, 3),
        gradient_equilibrium: bool = False,
        activation: str = "relu",
        synchronized_batchnorm: bool = False,
        moving_variance_update: str = "unbiased",
        name: str = "ranet",
        **kwargs: Any,
    ) -> None:
        where = _WHERE
        channels = validation.check_int("channels", channels, 1, where)
        growth_rate = validation.check_int("growth_rate", growth_rate, 1, where)
        growth_factors = validation.check_int_tuple("growth_factors", growth_factors, 1, where)
        flows = len(growth_factors)
        bottleneck_factors = validation.check_int_tuple(
            "bottleneck_factors", bottleneck_factors, 1, where, length=flows
        )
        scale_list = validation.check_int_tuple("scale_list", scale_list, 1, where, length=flows)
        if scale_list[0] != 1 or any(b - a not in (0, 1) for a, b in zip(scale_list, scale_list[1:])):
            raise ValueError(
                f"{where}`scale_list` must start at 1 and rise by 0 or 1 per flow (lowest resolution first), "
                f"received {scale_list}."
            )
        num_blocks = validation.check_int("num_blocks", num_blocks, 1, where)
        block_step = validation.check_int("block_step", block_step, 0, where)
        step = validation.check_int("step", step, 1, where)
        step_mode = validation.check_choice("step_mode", step_mode, ("even", "lg"), where)
        compress_factor = validation.check_fraction(
            "compress_factor", compress_factor, 0.0, 1.0, where, low_inclusive=False
        )
        reduction = validation.check_fraction("reduction", reduction, 0.0, 1.0, where, low_inclusive=False)
        head_channels = validation.check_int("head_channels", head_channels, 1, where)
        num_classes = validation.check_int("num_classes", num_classes, 1, where)
        input_shape = validation.check_input_shape(input_shape, where)
        gradient_equilibrium = validation.check_bool("gradient_equilibrium", gradient_equilibrium, where)
        options = unit_options(activation, synchronized_batchnorm, moving_variance_update, where)
        for flow in range(1, flows):
            low = math.floor(growth_rate * growth_factors[flow] * compress_factor)
            if low < 1 or low >= growth_rate * growth_factors[flow]:
                raise ValueError(
                    f"{where}flow {flow} splits its growth {growth_rate * growth_factors[flow]} into "
                    f"floor(growth*compress_factor) = {low} low-resolution channels "
                    "and the rest own channels; both must be >= 1. Adjust "
                    "growth_rate, growth_factors or compress_factor."
                )
        sizes = stem_sizes(input_shape, scale_list)
        if min(sizes[0]) < 2:
            raise ValueError(
                f"{where}input_shape={input_shape} is too small for scale_list={scale_list}: the "
                f"lowest resolution would be {sizes[0]}, it must be at least 2x2."
            )

        # === Layers and functional model ===
        init = he_fan_out_init()
        plan = flow_plan(scale_list, num_blocks, block_step)
        num_exits = plan[-1]["blocks"]
        inputs = keras.Input(input_shape, name="image")
        state = FlowState(None, {}, {}, apply_stems(inputs, channels, growth_factors, scale_list, options))
        outputs = []
        exit_index = 0
        for flow in range(flows):
            x = state.stems.pop(flow)
            growth = growth_rate * growth_factors[flow]
            for block in range(1, plan[flow]["blocks"] + 1):
                prefix = f"f{flow}_b{block}"
                num_layers = step if step_mode == "even" else step * block
                fusion = flow > 0 and block <= plan[flow - 1]["blocks"]
                if fusion:
                    out, record = apply_fusion_block(
                        x,
                        state.previous.pop(block),
                        prefix,
                        num_layers,
                        growth,
                        compress_factor,
                        block in plan[flow]["downs"],
                        bottleneck_factors[flow],
                        bottleneck_factors[flow - 1],
                        init,
                        options,
                    )
                else:
                    out, record = apply_dense_block(
                        x, prefix, num_layers, growth, bottleneck_factors[flow], init, options
                    )
                if block in plan[flow]["transitions"]:
                    out = conv_bn_relu(
                        out, math.floor(reduction * int(out.shape[-1])), 1, 1, f"{prefix}_transition", init, options
                    )
                if flow + 1 < flows:
                    state.current[block] = record
                x = out
                if fusion:
                    continue
                exit_index += 1
                more_blocks = block < plan[flow]["blocks"]
                branch, trunk = branch_and_trunk(x, exit_index, num_exits, gradient_equilibrium, has_trunk=more_blocks)
                outputs.append(
                    conv_head(
                        branch, exit_index, num_classes, head_channels, init, zero_dense_bias=True, options=options
                    )
                )
                if exit_index == num_exits:
                    break
                # Stage boundary: carry exactly what later stages read.
                state.trunk = trunk
                state = state.with_tensors(mark_stage(exit_index, state.tensors()))
                if state.trunk is not None:
                    x = state.trunk
            state = FlowState(None, {}, state.current, state.stems)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        # === Config ===
        self.channels = channels
        self.growth_rate = growth_rate
        self.growth_factors = growth_factors
        self.bottleneck_factors = bottleneck_factors
        self.scale_list = scale_list
        self.num_blocks = num_blocks
        self.block_step = block_step
        self.step = step
        self.step_mode = step_mode
        self.compress_factor = compress_factor
        self.reduction = reduction
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
            "channels": self.channels,
            "growth_rate": self.growth_rate,
            "growth_factors": list(self.growth_factors),
            "bottleneck_factors": list(self.bottleneck_factors),
            "scale_list": list(self.scale_list),
            "num_blocks": self.num_blocks,
            "block_step": self.block_step,
            "step": self.step,
            "step_mode": self.step_mode,
            "compress_factor": self.compress_factor,
            "reduction": self.reduction,
            "head_channels": self.head_channels,
            "num_classes": self.num_classes,
            "input_shape": list(self.image_shape),
            "gradient_equilibrium": self.gradient_equilibrium,
            "activation": self.activation,
            "synchronized_batchnorm": self.synchronized_batchnorm,
            "moving_variance_update": self.moving_variance_update,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: Any = None) -> "RANetBackbone":
        return cls(**config)
