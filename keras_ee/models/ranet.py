"""RANet (Yang et al., 2020), CIFAR Model-C-1 / Model-C-2 and other sizes.

Follows `shared/reference/architectures.md` section 4 (RANet-pytorch). Flows
("sub-networks") run from the lowest resolution to the highest; flow i >= 1
starts with fusion blocks that read the lower flow's per-layer features
(bilinearly resized with align-corners, `AlignCornersResize`), and a
classifier follows every normal block. Exits are ordered flow by flow.

Initialization (architectures.md section 4.9): conv kernels He-normal with
fan-out, N(0, sqrt(2/(k*k*cout))), BN gamma 1 / beta 0, Dense bias 0 and Dense
kernel PyTorch default U(+-1/sqrt(in)); the stem keeps PyTorch's default
conv init U(+-1/sqrt(fan_in)) as in the reference.

Gradient-equilibrium hooks: `exit_{k}_branch` sits on the block output that
feeds head k; `exit_{k}_trunk` on the same tensor where it feeds the next
block of the same flow. After a flow's last block there is no next block of
that flow, so that exit has no trunk layer (its features reach the next flow
only through the per-layer lists, which are not rescaled).
"""

import math
from collections.abc import Sequence
from typing import Any

import keras

from keras_ee import validation as v
from keras_ee.models.graph import mark_stage
from keras_ee.models.heads import (
    bottleneck_unit,
    branch_and_trunk,
    conv_bn_relu,
    conv_head,
    he_fan_out_init,
    nonlinearity_scope,
    torch_default_init,
)
from keras_ee.models.layers import AlignCornersResize, ChannelConcat

_WHERE = "ranet: "


def _resize(x: keras.KerasTensor, size: Sequence[int], name: str) -> keras.KerasTensor:
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
    for i, r in enumerate(scale_list):
        n = counts[i]
        transitions = {math.floor(k * n / r) for k in range(1, r)}
        candidates = [0] + counts[:i]
        downs = set(candidates[len(candidates) - (r - 1) :]) if r > 1 else set()
        plan.append({"blocks": n, "transitions": transitions, "downs": downs})
    return plan


def ranet(
    num_classes: int = 100,
    input_shape: Sequence[int] = (32, 32, 3),
    num_channels: int = 16,
    growth_rate: int = 6,
    growth_factor: Sequence[int] = (4, 2, 1),
    bottleneck_factor: Sequence[int] = (4, 2, 1),
    scale_list: Sequence[int] = (1, 2, 3),
    num_blocks: int = 2,
    block_step: int = 2,
    step: int = 2,
    step_mode: str = "lg",
    compress_factor: float = 0.25,
    reduction: float = 0.5,
    head_channels: int = 128,
    gradient_equilibrium: bool = False,
    activation: str = "relu",
    name: str = "ranet",
) -> keras.Model:
    """Builds a resolution-adaptive network (CIFAR stem and heads).

    Per-flow lists are ordered lowest resolution first, as in the reference
    arguments.

    Args:
        num_classes: int, classes per exit.
        input_shape: `(height, width, channels)`.
        num_channels: int, base width (`nChannels`).
        growth_rate: int, base growth (`growthRate`).
        growth_factor: ints per flow (`grFactor`): channels and growth of
            flow i are `num_channels*gf[i]` and `growth_rate*gf[i]`.
        bottleneck_factor: ints per flow (`bnFactor`).
        scale_list: ints per flow (`scale-list`): resolution label, 1 =
            lowest; must start at 1 and rise by 0 or 1 from flow to flow.
        num_blocks: int, blocks of flow 0 (`nBlocks`).
        block_step: int, extra blocks per further flow (`block-step`).
        step: int, layers per block (`step`).
        step_mode: `"even"` (every block has `step` layers) or `"lg"` (block
            j has `step*j` layers).
        compress_factor: float in (0, 1), share of growth taken from the
            lower flow (`compress-factor`).
        reduction: float in (0, 1), transition compression.
        head_channels: int, width of the two head convs (128 in the papers).
        gradient_equilibrium: bool, IMTA gradient scales at the exits.
        name: str, model name.

    Returns:
        A functional `keras.Model` with `num_blocks + block_step*(S-1)` exits.

    Example:
    ```python
    model = ranet(num_classes=100)  # Model-C-1: 6 exits
    ```
    """
    w = _WHERE
    num_classes = v.check_int("num_classes", num_classes, 1, w)
    input_shape = v.check_input_shape(input_shape, w)
    num_channels = v.check_int("num_channels", num_channels, 1, w)
    growth_rate = v.check_int("growth_rate", growth_rate, 1, w)
    gf = v.check_int_tuple("growth_factor", growth_factor, 1, w)
    flows = len(gf)
    bf = v.check_int_tuple("bottleneck_factor", bottleneck_factor, 1, w, length=flows)
    rs = v.check_int_tuple("scale_list", scale_list, 1, w, length=flows)
    if rs[0] != 1 or any(b - a not in (0, 1) for a, b in zip(rs, rs[1:])):
        raise ValueError(
            f"{w}`scale_list` must start at 1 and rise by 0 or 1 per flow (lowest resolution first), received {rs}."
        )
    num_blocks = v.check_int("num_blocks", num_blocks, 1, w)
    block_step = v.check_int("block_step", block_step, 0, w)
    step = v.check_int("step", step, 1, w)
    step_mode = v.check_choice("step_mode", step_mode, ("even", "lg"), w)
    cf = v.check_fraction("compress_factor", compress_factor, 0.0, 1.0, w, low_inclusive=False)
    reduction = v.check_fraction("reduction", reduction, 0.0, 1.0, w, low_inclusive=False)
    head_channels = v.check_int("head_channels", head_channels, 1, w)
    gradient_equilibrium = v.check_bool("gradient_equilibrium", gradient_equilibrium, w)
    for i in range(1, flows):
        low = math.floor(growth_rate * gf[i] * cf)
        if low < 1 or low >= growth_rate * gf[i]:
            raise ValueError(
                f"{w}flow {i} splits its growth {growth_rate * gf[i]} into "
                f"floor(growth*compress_factor) = {low} low-resolution channels "
                "and the rest own channels; both must be >= 1. Adjust "
                "growth_rate, growth_factor or compress_factor."
            )

    # Stem sizes, highest-resolution flow first; the lowest must be >= 2x2.
    sizes: list[Any] = [None] * flows  # (height, width) per flow
    sizes[-1] = tuple(input_shape[:2])
    for i in range(flows - 2, -1, -1):
        stride = 1 if rs[i] == rs[i + 1] else 2
        sizes[i] = tuple(v.conv_out(d, 3, stride, 1) for d in sizes[i + 1])
    if min(sizes[0]) < 2:
        raise ValueError(
            f"{w}input_shape={input_shape} is too small for scale_list={rs}: the "
            f"lowest resolution would be {sizes[0]}, it must be at least 2x2."
        )

    init = he_fan_out_init()
    stem_init = torch_default_init()
    plan = flow_plan(rs, num_blocks, block_step)
    num_exits = plan[-1]["blocks"]

    def layers_in(j: int) -> int:
        return step if step_mode == "even" else step * j

    with nonlinearity_scope(activation):
        inputs = keras.Input(input_shape, name="image")
        stem = {flows - 1: conv_bn_relu(inputs, num_channels * gf[-1], 3, 1, f"stem_f{flows - 1}", stem_init)}
        for i in range(flows - 2, -1, -1):
            stride = 1 if rs[i] == rs[i + 1] else 2
            stem[i] = conv_bn_relu(stem[i + 1], num_channels * gf[i], 3, stride, f"stem_f{i}", stem_init)

        outputs = []
        prev_lists: dict[int, list[Any]] = {}  # block j -> [Y_0..Y_L] of the lower flow
        exit_index = 0
        for i in range(flows):
            x = stem.pop(i)
            g = growth_rate * gf[i]
            cur_lists: dict[int, list[Any]] = {}
            for j in range(1, plan[i]["blocks"] + 1):
                p = f"f{i}_b{j}"
                n_layers = layers_in(j)
                fusion = i > 0 and j <= plan[i - 1]["blocks"]
                record = [x]
                if fusion:
                    ys = prev_lists.pop(j)
                    low = math.floor(g * cf)
                    own = g - low
                    down = j in plan[i]["downs"]
                    for l in range(1, n_layers + 1):
                        stride = 2 if down and l == n_layers else 1
                        own_t = bottleneck_unit(x, own, stride, bf[i], f"{p}_l{l}_own", init)
                        size = own_t.shape[1:3]
                        low_t = bottleneck_unit(ys[l - 1], low, 1, bf[i - 1], f"{p}_l{l}_low", init)
                        low_t = _resize(low_t, size, f"{p}_l{l}_low_resize")
                        ident = _resize(x, size, f"{p}_l{l}_resize")
                        x = ChannelConcat(name=f"{p}_l{l}_cat")([ident, low_t, own_t])
                        record.append(x)
                    z = conv_bn_relu(ys[n_layers], math.floor(int(x.shape[-1]) * cf), 1, 1, f"{p}_tail", init)
                    z = _resize(z, x.shape[1:3], f"{p}_tail_resize")
                    out = ChannelConcat(name=f"{p}_tail_cat")([x, z])
                else:
                    for l in range(1, n_layers + 1):
                        new = bottleneck_unit(x, g, 1, bf[i], f"{p}_l{l}", init)
                        x = ChannelConcat(name=f"{p}_l{l}_cat")([x, new])
                        record.append(x)
                    out = x
                if j in plan[i]["transitions"]:
                    out = conv_bn_relu(out, math.floor(reduction * int(out.shape[-1])), 1, 1, f"{p}_transition", init)
                if i + 1 < flows:
                    cur_lists[j] = record
                x = out
                if fusion:
                    continue
                exit_index += 1
                more_blocks = j < plan[i]["blocks"]
                branch, trunk = branch_and_trunk(x, exit_index, num_exits, gradient_equilibrium, has_trunk=more_blocks)
                outputs.append(conv_head(branch, exit_index, num_classes, head_channels, init, zero_dense_bias=True))
                if exit_index == num_exits:
                    break
                # Stage boundary: carry exactly what later stages read.
                carried: list[tuple[Any, Any]] = []  # (what it is, tensor)
                if more_blocks:
                    carried.append(("x", trunk))
                for jj in sorted(cur_lists):
                    carried += [(("cur", jj, l), t) for l, t in enumerate(cur_lists[jj])]
                for jj in sorted(prev_lists):
                    carried += [(("prev", jj, l), t) for l, t in enumerate(prev_lists[jj])]
                for ii in sorted(stem):
                    carried.append((("stem", ii), stem[ii]))
                marked = mark_stage(exit_index, [t for _, t in carried])
                for (key, _), t in zip(carried, marked):
                    if key == "x":
                        x = t
                    elif key[0] == "cur":
                        cur_lists[key[1]][key[2]] = t
                    elif key[0] == "prev":
                        prev_lists[key[1]][key[2]] = t
                    else:
                        stem[key[1]] = t
            prev_lists = cur_lists

        return keras.Model(inputs, outputs, name=name)
