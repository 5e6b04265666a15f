"""The authors' PyTorch checkpoints as keras-ee models: architecture inference and weight mapping.

Supported: MSDNet as kalviny/MSDNet-PyTorch, L2W-DEN and IMTA phase I write it (CIFAR and
ImageNet stems, any block count, step mode, step, base, channels, growth and bottleneck
factors of the "max" pruning rule), IMTA's phase-II model, L2W-DEN's WPN, the budget-aware
paper's GELU MSDNet with its gaters (YouvaADDAD/gphi_MSDNet, onto `BudgetAwareGating`), and
RANet as yangle15/RANet-pytorch writes it (CIFAR stem).
Papers: "Multi-Scale Dense Networks for Resource Efficient Image Classification" (Huang et al.,
ICLR 2018, arXiv:1703.09844); "Resolution Adaptive Networks for Efficient Inference" (Yang et
al., CVPR 2020, arXiv:2003.07326).

How their keys map onto keras-ee's layers: conv weight OIHW -> HWIO; BatchNorm `weight, bias,
running_mean, running_var` -> `gamma, beta, moving_mean, moving_variance`; Linear weight
transposed. In MSDNet every unit's 1x1 bottleneck is a channel slice of one merged
`l{L}_x{src}_a` layer (the units reading the same source scale, ordered by output scale; see
`keras_ee.models.blocks.shared_bottleneck`); RANet's stem is built highest resolution first
(`FirstLayer.layers.{k}` -> `stem_f{S-1-k}`).

Every checkpoint tensor is used exactly once and every Keras weight element filled exactly once,
or `CheckpointMismatchError` lists what disagrees; `num_batches_tracked` entries and everything
beside the state_dict (optimizer states, epoch, ...) are read and ignored (`ImportReport` says so).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeGuard

import numpy as np

from keras_ee.interop.torch_file import CheckpointError, SavedArguments, read_checkpoint

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_IGNORED_SUFFIX = "num_batches_tracked"
_SHOWN = 6  # how many disagreements an error names


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's tensors do not fit the model (missing, extra or differently shaped)."""


@dataclasses.dataclass
class ImportReport:
    """What `import_torch_checkpoint` read, found and ignored (written as a run's import.json)."""

    source: str
    sha256: str
    size_bytes: int
    serialisation: str
    container: str
    module_prefix: bool
    family: str
    preset: str
    model_options: dict[str, Any]
    num_classes: int
    input_shape: list[int]
    tensors_total: int
    tensors_used: int
    keras_weights: int
    ignored: dict[str, Any]
    method: str = "baseline"  # the keras-ee training method whose model this is (IMTA phase II: "imta")
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # L2W-DEN: the WPN found in `meta_state_dict` (depth, width, input size, outputs, tensors, input type)
    wpn: dict[str, Any] | None = None
    # gphi_MSDNet: the gaters found in `meta_net` (count, depth, width, features, tensors, options from `args`)
    gater: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- checkpoint layout


def _is_state_dict(obj: object) -> TypeGuard[dict[str, np.ndarray]]:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
    )


def unwrap_checkpoint(obj: object) -> tuple[dict[str, np.ndarray], str, dict[str, Any]]:
    """The model's state_dict inside what a script saved.

    Returns:
        `(state_dict, container, ignored)`: `container` says where it was (`"bare"` or the
        key), `ignored` maps every other top-level key to a short description.
    """
    if _is_state_dict(obj):
        return dict(obj), "bare", {}
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            found = obj.get(key)
            if _is_state_dict(found):
                ignored: dict[str, Any] = {str(k): _describe(v) for k, v in obj.items() if k != key}
                return dict(found), key, ignored
    keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise CheckpointError(
        f"holds no state_dict: expected a dict of tensors, or a dict with one under {list(_STATE_DICT_KEYS)}; "
        f"found {keys}"
    )


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"tensor {list(value.shape)}"
    if isinstance(value, dict):
        n = sum(1 for _ in _walk_arrays(value))
        return f"dict of {len(value)} entries ({n} tensors)"
    if isinstance(value, (int, float, str, bool)) or value is None:
        return repr(value)[:60]
    if isinstance(value, SavedArguments):
        return f"argparse.Namespace of {len(vars(value))} arguments"
    return type(value).__name__


def _walk_arrays(obj: object) -> Iterator[np.ndarray]:
    if isinstance(obj, np.ndarray):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _walk_arrays(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk_arrays(v)


def strip_module_prefix(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
    """Drops DataParallel's `module.` path components (also nested ones, as IMTA's `module.net.module.`)."""
    out: dict[str, np.ndarray] = {}
    stripped = False
    for key, value in state_dict.items():
        parts = key.split(".")
        kept = [p for p in parts if p != "module"]
        stripped |= len(kept) != len(parts)
        new = ".".join(kept)
        if new in out:
            raise CheckpointError(f"keys {key!r} and another one are the same without `module.`")
        out[new] = value
    return out, stripped


def detect_family(state_dict: dict[str, np.ndarray]) -> str:
    keys = state_dict.keys()
    if _is_wpn(state_dict):
        raise CheckpointError(
            "holds L2W-DEN's WPN alone (first_hidden_layer.*, output_layer.*): import the checkpoint of "
            "tools/main_*_DDP.py that holds it as `meta_state_dict` beside the MSDNet's `state_dict`"
        )
    if any(k.startswith("isc_modules.") for k in keys) or any(k.startswith("net.blocks.") for k in keys):
        return "imta"
    if any(k.startswith("FirstLayer.") for k in keys) and any(k.startswith("scale_flows.") for k in keys):
        return "ranet"
    if any(k.startswith("blocks.") for k in keys) and any(k.startswith("classifier.") for k in keys):
        return "msdnet"
    raise CheckpointError(
        f"keys of no known architecture (first keys {list(keys)[:4]}); keras-ee imports MSDNet "
        "(blocks.*, classifier.*) and RANet (FirstLayer.*, scale_flows.*, classifier.*)"
    )


# --------------------------------------------------------------------------- assignments


@dataclasses.dataclass(frozen=True)
class _Assign:
    torch_key: str
    layer: str
    variable: str
    start: int = 0  # channel offset in the Keras variable's last axis (merged bottlenecks)
    # The authors' forward never uses it (MSDNet's last layer computes finer scales that no exit
    # reads); Keras' functional graph drops such layers, so it may have no Keras weight.
    dead: bool = False
    partial: bool = False  # fills a channel slice of a merged layer (else the whole variable)


def _conv_bn(
    conv: str, bn: str, layer: str, start: int | None = None, bn_layer: str | None = None, conv_bias: bool = False
) -> list[_Assign]:
    """A conv + BatchNorm pair onto one ConvBNReLU layer (`start`: a slice of a merged one)."""
    partial, start = start is not None, start or 0
    out = [_Assign(f"{conv}.weight", layer, "kernel", start)]
    if conv_bias:
        out.append(_Assign(f"{conv}.bias", layer, "bias", start))
    bn_layer = bn_layer or layer
    for t, k in (
        ("weight", "gamma"),
        ("bias", "beta"),
        ("running_mean", "moving_mean"),
        ("running_var", "moving_variance"),
    ):
        out.append(_Assign(f"{bn}.{t}", bn_layer, k, start))
    return [dataclasses.replace(a, partial=partial) for a in out]


def _classifier(sd_keys: dict[str, np.ndarray], index: int, exit_number: int) -> list[_Assign]:
    p = f"classifier.{index}"
    out: list[_Assign] = []
    for j, name in ((0, "head_1"), (1, "head_2")):
        out += _conv_bn(f"{p}.m.{j}.net.0", f"{p}.m.{j}.net.1", f"exit_{exit_number}_{name}")
    out += [
        _Assign(f"{p}.linear.weight", f"exit_{exit_number}", "kernel"),
        _Assign(f"{p}.linear.bias", f"exit_{exit_number}", "bias"),
    ]
    return out


class StateDict(dict[str, np.ndarray]):
    """A state_dict with its keys as a tree of dotted paths (built once: the walks below ask it
    thousands of questions, each a scan of every key otherwise)."""

    _tree: dict[str, set[str]] | None = None

    @property
    def tree(self) -> dict[str, set[str]]:
        if self._tree is None:
            tree: dict[str, set[str]] = collections.defaultdict(set)
            for key in self:
                parts = key.split(".")
                for i in range(len(parts)):
                    tree[".".join(parts[:i])].add(parts[i])
            self._tree = dict(tree)
        return self._tree


def _tree(sd: dict[str, np.ndarray]) -> dict[str, set[str]]:
    return (sd if isinstance(sd, StateDict) else StateDict(sd)).tree


_INDEX_SUFFIX = r"\.(\d+)\."


def _indices(sd: dict[str, np.ndarray], pattern: str) -> list[int]:
    r"""The numbers n of the keys `<prefix>.<n>.*`; `pattern` is the regex `<prefix>\.(\d+)\.`."""
    if not pattern.endswith(_INDEX_SUFFIX):
        raise ValueError(f"an index pattern ends with {_INDEX_SUFFIX}; received {pattern!r}")
    prefix = pattern[: -len(_INDEX_SUFFIX)].replace("\\", "")  # the literal (escaped dots, nothing else)
    return sorted(int(c) for c in _tree(sd).get(prefix, ()) if c.isdigit())


def _has(sd: dict[str, np.ndarray], prefix: str) -> bool:
    """Whether some key starts with `prefix.`."""
    return prefix in _tree(sd)


def _shape(sd: dict[str, np.ndarray], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointMismatchError(f"the checkpoint lacks {key!r}")
    return sd[key].shape


# ---- MSDNet


def _msdnet_units(sd: dict[str, np.ndarray], prefix: str, offset: int) -> list[tuple[int, str, int, str]]:
    """`(out scale, branch, source scale, torch module)` of one MSDNLayer at `prefix`."""
    units: list[tuple[int, str, int, str]] = []
    for i in _indices(sd, re.escape(prefix) + r"\.layers\.(\d+)\."):
        s, q = offset + i, f"{prefix}.layers.{i}"
        if _has(sd, f"{q}.conv_down"):
            units += [(s, "_down", s - 1, f"{q}.conv_down"), (s, "_same", s, f"{q}.conv_normal")]
        else:
            units.append((s, "", s, f"{q}.conv_normal"))
    return units


def _msdnet_walk(sd: dict[str, np.ndarray]) -> Iterator[tuple[str, int, int, str]]:
    """Walks the authors' MSDNet modules: yields `(kind, block, seq, prefix)`."""
    num_blocks = len(_indices(sd, r"classifier\.(\d+)\."))
    blocks = _indices(sd, r"blocks\.(\d+)\.")
    if blocks != list(range(num_blocks)):
        raise CheckpointMismatchError(
            f"blocks {blocks} and {num_blocks} classifiers: expected one classifier per block"
        )
    for b in range(num_blocks):
        for seq in _indices(sd, rf"blocks\.{b}\.(\d+)\."):
            p = f"blocks.{b}.{seq}"
            if b == 0 and seq == 0:
                yield "stem", b, seq, p
            elif _has(sd, f"{p}.m"):
                yield "transition", b, seq, p
            else:
                yield "layer", b, seq, p


def _msdnet_scales(sd: dict[str, np.ndarray]) -> int:
    return len(_indices(sd, r"blocks\.0\.0\.layers\.(\d+)\."))


def _msdnet_imagenet_stem(sd: dict[str, np.ndarray]) -> bool:
    return "blocks.0.0.layers.0.0.weight" in sd


def msdnet_assignments(sd: dict[str, np.ndarray]) -> list[_Assign]:
    num_scales = _msdnet_scales(sd)
    out: list[_Assign] = []
    layer = 0
    walk = list(_msdnet_walk(sd))
    last_layer = max((i for i, w in enumerate(walk) if w[0] == "layer"), default=-1)
    for position, (kind, _b, _seq, p) in enumerate(walk):
        if kind == "stem":
            for s in range(num_scales):
                if s == 0 and _msdnet_imagenet_stem(sd):
                    out += _conv_bn(
                        f"{p}.layers.0.0", f"{p}.layers.0.1", "stem_s0_conv", bn_layer="stem_s0_bn", conv_bias=True
                    )
                else:
                    out += _conv_bn(f"{p}.layers.{s}.net.0", f"{p}.layers.{s}.net.1", f"stem_s{s}")
        elif kind == "transition":
            idx = _indices(sd, re.escape(p) + r"\.m\.(\d+)\.")
            offset = num_scales - len(idx)
            for i in idx:
                out += _conv_bn(f"{p}.m.{i}.net.0", f"{p}.m.{i}.net.1", f"l{layer}_s{offset + i}_transition")
        else:
            layer += 1
            offset = num_scales - len(_indices(sd, re.escape(p) + r"\.layers\.(\d+)\."))
            units = _msdnet_units(sd, p, offset)
            own = {src: m for s, _br, src, m in units if s == src}
            for s, branch, src, m in units:
                unit: list[_Assign] = []
                if f"{m}.net.3.weight" in sd:  # bottleneck: 1x1 slice of the merged l{L}_x{src}_a
                    start = _shape(sd, f"{own[src]}.net.0.weight")[0] if branch == "_down" and src in own else 0
                    unit += _conv_bn(f"{m}.net.0", f"{m}.net.1", f"l{layer}_x{src}_a", start)
                    unit += _conv_bn(f"{m}.net.3", f"{m}.net.4", f"l{layer}_s{s}{branch}_b")
                else:
                    unit += _conv_bn(f"{m}.net.0", f"{m}.net.1", f"l{layer}_s{s}{branch}_b")
                if position == last_layer and s != num_scales - 1:  # only the coarsest scale reaches an exit
                    unit = [dataclasses.replace(a, dead=True) for a in unit]
                out += unit
    for b in range(len(_indices(sd, r"classifier\.(\d+)\."))):
        out += _classifier(sd, b, b + 1)
    return out


def infer_msdnet(sd: dict[str, np.ndarray]) -> tuple[dict[str, Any], int, tuple[int, ...]]:
    """`(MSDNetBackbone arguments, num_classes, input_shape)` read off an MSDNet state_dict's keys and shapes."""
    num_scales = _msdnet_scales(sd)
    imagenet = _msdnet_imagenet_stem(sd)
    stem = [
        _shape(sd, "blocks.0.0.layers.0.0.weight" if s == 0 and imagenet else f"blocks.0.0.layers.{s}.net.0.weight")
        for s in range(num_scales)
    ]
    num_channels = stem[0][0]
    growth_factor = []
    for s, shape in enumerate(stem):
        if shape[0] % num_channels:
            raise CheckpointMismatchError(
                f"stem scale {s} has {shape[0]} channels, not a multiple of scale 0's {num_channels}"
            )
        growth_factor.append(shape[0] // num_channels)
    lengths: list[int] = []
    bottleneck_stats: dict[int, list[tuple[int, int, int]]] = collections.defaultdict(list)
    transitions: list[tuple[int, int]] = []
    bottleneck: bool | None = None
    for kind, b, _seq, p in _msdnet_walk(sd):
        if kind == "layer":
            while len(lengths) <= b:
                lengths.append(0)
            lengths[b] += 1
            offset = num_scales - len(_indices(sd, re.escape(p) + r"\.layers\.(\d+)\."))
            for _s, _br, src, m in _msdnet_units(sd, p, offset):
                has = f"{m}.net.3.weight" in sd
                bottleneck = has if bottleneck is None else bottleneck
                if has:
                    a, c = _shape(sd, f"{m}.net.0.weight"), _shape(sd, f"{m}.net.3.weight")
                    bottleneck_stats[src].append((a[1], c[0], a[0]))  # (cin, filters, width)
        elif kind == "transition":
            for i in _indices(sd, re.escape(p) + r"\.m\.(\d+)\."):
                s = num_scales - len(_indices(sd, re.escape(p) + r"\.m\.(\d+)\.")) + i
                w = _shape(sd, f"{p}.m.{i}.net.0.weight")
                transitions.append((w[1] // growth_factor[s], w[0] // growth_factor[s]))
    first = "blocks.0.1.layers.0.conv_normal.net." + ("3" if bottleneck else "0") + ".weight"
    growth_rate = _shape(sd, first)[0] // growth_factor[0]
    bottleneck_factor = []
    for s in range(num_scales):
        stats = bottleneck_stats.get(s, [])
        witness = [(f, w) for cin, f, w in stats if w < cin]
        if witness:
            filters, width = witness[0]
            bottleneck_factor.append(max(1, width // filters))
        else:  # always capped by the input width: any factor this large builds the same network
            need = max((math.ceil(cin / f) for cin, f, _ in stats), default=1)
            bottleneck_factor.append(max(growth_factor[s], need))
    reduction = _fit_fraction(transitions, 0.5) if transitions else 0.5
    step_mode, step = _step_from_lengths(lengths[1:], "lin_grow")
    num_classes = _last_linear(sd)
    head = None if imagenet else _shape(sd, "classifier.0.m.0.net.0.weight")[0]
    in_channels = stem[0][1]
    kwargs = dict(
        num_blocks=len(lengths),
        step_mode=step_mode,
        step=step,
        base=lengths[0] if lengths else 1,
        channels=num_channels,
        growth_rate=growth_rate,
        growth_factors=tuple(growth_factor),
        bottleneck_factors=tuple(bottleneck_factor),
        reduction=reduction,
        bottleneck=bool(bottleneck),
        stem="imagenet" if imagenet else "cifar",
        head_channels=head,
    )
    shape = (224, 224, in_channels) if imagenet else (32, 32, in_channels)
    return kwargs, num_classes, shape


def _fit_fraction(pairs: list[tuple[int, int]], default: float) -> float:
    """A fraction r with floor(r * n_in) == n_out for every (n_in, n_out): `default` if it fits."""
    for r in [default] + sorted({o / i for i, o in pairs if i}):
        if all(math.floor(r * i) == o for i, o in pairs):
            return r
    raise CheckpointMismatchError(f"no single reduction gives the transition widths {pairs[:4]}")


def _step_from_lengths(later: list[int], growing_name: str) -> tuple[str, int]:
    """Step mode and step from the layer counts of blocks 2, 3, ... (MSDNet's rule)."""
    if not later:
        return "even", 1
    if all(n == later[0] for n in later):
        return "even", later[0]
    step = later[1] - later[0]
    if step >= 1 and all(n == step * (b + 1) + 1 for b, n in enumerate(later)):
        return growing_name, step
    raise CheckpointMismatchError(f"blocks 2.. have {later} layers: neither even nor linearly growing")


def _last_linear(sd: dict[str, np.ndarray]) -> int:
    exits = _indices(sd, r"classifier\.(\d+)\.")
    if not exits:
        raise CheckpointMismatchError("the checkpoint has no classifier.* tensors")
    return int(_shape(sd, f"classifier.{exits[-1]}.linear.weight")[0])


# ---- IMTA phase II (kalviny/IMTA `IMTA_MSDNet`: `net` the frozen phase-I MSDNet)


def _imta_backbone(sd: dict[str, np.ndarray]) -> StateDict:
    """The phase-I MSDNet's tensors (`net.*`, without the prefix)."""
    return StateDict((k[len("net.") :], v) for k, v in sd.items() if k.startswith("net."))


def imta_phase_one_classifiers(sd: dict[str, np.ndarray]) -> list[str]:
    """The phase-I classifiers' tensors (`net.classifier.{i}.linear.*`): IMTA's forward pass does
    not use them; the last one is the teacher of its one-for-all distillation."""
    return sorted(k for k in sd if re.match(r"net\.classifier\.\d+\.linear\.", k))


def imta_assignments(sd: dict[str, np.ndarray]) -> list[_Assign]:
    """The phase-I MSDNet under `net.` onto the backbone, the new classifiers `classifier.{i}` onto
    `exit_{i+1}`, the transfer paths `isc_modules.{i}.{0,1}` (Linear, BatchNorm1d) onto
    `exit_{i+2}_collab_dense` / `_collab_bn` (`keras_ee.training.IMTA.transform_backbone`)."""
    phase_one = set(imta_phase_one_classifiers(sd))
    out = [
        dataclasses.replace(a, torch_key=f"net.{a.torch_key}")
        for a in msdnet_assignments(_imta_backbone(sd))
        if f"net.{a.torch_key}" not in phase_one
    ]
    for i in _indices(sd, r"classifier\.(\d+)\."):
        out += [_Assign(f"classifier.{i}.{t}", f"exit_{i + 1}", k) for t, k in (("weight", "kernel"), ("bias", "bias"))]
    for i in _indices(sd, r"isc_modules\.(\d+)\."):
        p, layer = f"isc_modules.{i}", f"exit_{i + 2}_collab"
        out += [_Assign(f"{p}.0.{t}", f"{layer}_dense", k) for t, k in (("weight", "kernel"), ("bias", "bias"))]
        out += [
            _Assign(f"{p}.1.{t}", f"{layer}_bn", k)
            for t, k in (
                ("weight", "gamma"),
                ("bias", "beta"),
                ("running_mean", "moving_mean"),
                ("running_var", "moving_variance"),
            )
        ]
    return out


def infer_imta(sd: dict[str, np.ndarray]) -> tuple[dict[str, Any], int, tuple[int, ...]]:
    """The phase-I MSDNet's `MSDNetBackbone` arguments, classes and input shape (see `infer_msdnet`)."""
    kwargs, num_classes, shape = infer_msdnet(_imta_backbone(sd))
    heads = _indices(sd, r"classifier\.(\d+)\.")
    if not heads:
        raise CheckpointMismatchError("an IMTA checkpoint without its phase-II classifiers (classifier.{i}.weight)")
    return kwargs, int(_shape(sd, f"classifier.{heads[-1]}.weight")[0]), shape


def imta_method(sd: dict[str, np.ndarray], backbone: Any) -> tuple[Any, tuple[np.ndarray, np.ndarray] | None]:
    """keras-ee's `IMTA` in phase II with the checkpoint's transfer widths (None where every path is
    as wide as its exit's pooled feature, keras-ee's default), and the teacher `(kernel, bias)`."""
    from keras_ee import models
    from keras_ee.training import IMTA

    structure = models.exit_structure(backbone)
    features = [int(f.output.shape[-1]) for f in structure.features]
    widths = list(features)
    for i in _indices(sd, r"isc_modules\.(\d+)\."):
        if i + 1 < len(widths):
            widths[i + 1] = int(_shape(sd, f"isc_modules.{i}.0.weight")[0])
    method = IMTA(transfer_widths=None if widths == features else widths)
    method.current_phase = 1  # the classifiers and transfer paths of phase II, gates open
    phase_one = [k for k in imta_phase_one_classifiers(sd) if k.endswith(".weight")]
    teacher = None
    if phase_one:
        last = phase_one[-1]
        teacher = (np.asarray(sd[last]).T, np.asarray(sd[last[: -len("weight")] + "bias"]))
    return method, teacher


def _open_collaboration(backbone: Any) -> None:
    """Phase II: IMTA's transfer paths pass their input (read when the model is traced)."""
    from keras_ee.training.imta import CollaborationGate

    for layer in backbone.layers:
        if isinstance(layer, CollaborationGate):
            layer.open = True


# ---- L2W-DEN's weight prediction network (`meta_state_dict` of tools/main_*_DDP.py)

WPN_CONTAINER = "meta_state_dict"
WPN_INPUTS = ("loss", "confidence", "both")  # keras-ee's `L2W(wpn_input=)`: their loss / conf / both


def _is_wpn(sd: dict[str, np.ndarray]) -> bool:
    return "first_hidden_layer.fc.weight" in sd and "output_layer.weight" in sd


def infer_wpn(sd: dict[str, np.ndarray], num_exits: int, wpn_input: str | None) -> dict[str, Any]:
    """`L2W`'s WPN options read off their `MLP_tanh` state_dict (models/weight_predict.py).

    Their input is K per-exit losses (`--meta_net_input_type loss`) or confidences (`conf`), or
    both (2K): K inputs cannot tell loss from confidence, so `wpn_input` says which (default
    `"loss"`, what the authors' README commands use).
    """
    if not _is_wpn(sd):
        raise CheckpointMismatchError(
            f"`{WPN_CONTAINER}` is not L2W-DEN's WPN (no first_hidden_layer.fc.weight / output_layer.weight; "
            f"keys {list(sd)[:4]})"
        )
    width, input_dim = _shape(sd, "first_hidden_layer.fc.weight")
    outputs = _shape(sd, "output_layer.weight")[0]
    depth = 1 + len(_indices(sd, r"rest_hidden_layers\.(\d+)\."))
    if outputs != num_exits:
        raise CheckpointMismatchError(f"the WPN has {outputs} outputs; the network has {num_exits} exits")
    if input_dim not in (num_exits, 2 * num_exits):
        raise CheckpointMismatchError(
            f"the WPN takes {input_dim} inputs; expected {num_exits} (losses or confidences) or {2 * num_exits} (both)"
        )
    if wpn_input is not None and wpn_input not in WPN_INPUTS:
        raise ValueError(f"wpn_input {wpn_input!r}: expected one of {list(WPN_INPUTS)}")
    if input_dim == 2 * num_exits and num_exits > 0:
        if wpn_input not in (None, "both"):
            raise CheckpointMismatchError(
                f"the WPN takes {input_dim} = 2K inputs (losses and confidences); wpn_input {wpn_input!r} takes K"
            )
        found = "both"
    else:
        if wpn_input == "both":
            raise CheckpointMismatchError(f"the WPN takes {input_dim} = K inputs; wpn_input 'both' takes 2K")
        found = wpn_input or "loss"
    return {"wpn_depth": depth, "wpn_width": int(width), "wpn_input": found}


def wpn_assignments(sd: dict[str, np.ndarray], wpn_head: str = "out") -> list[_Assign]:
    """Their `first_hidden_layer.fc`, `rest_hidden_layers.{i}.fc`, `output_layer` onto the WPN's
    `hidden_1`, `hidden_{i+2}` and its output layer (`keras_ee.training.l2w.WeightPredictionNetwork`)."""
    linears = [("first_hidden_layer.fc", "hidden_1")]
    linears += [(f"rest_hidden_layers.{i}.fc", f"hidden_{i + 2}") for i in _indices(sd, r"rest_hidden_layers\.(\d+)\.")]
    linears.append(("output_layer", wpn_head))
    return [_Assign(f"{t}.{v}", layer, k) for t, layer in linears for v, k in (("weight", "kernel"), ("bias", "bias"))]


def build_wpn(sd: dict[str, np.ndarray], options: dict[str, Any], num_exits: int) -> Any:
    """keras-ee's WPN with the checkpoint's weights (every tensor used once, every weight filled once)."""
    import types

    from keras_ee.training.l2w import WeightPredictionNetwork

    input_dim = 2 * num_exits if options["wpn_input"] == "both" else num_exits
    wpn = WeightPredictionNetwork(
        num_exits=num_exits, input_dim=input_dim, depth=options["wpn_depth"], width=options["wpn_width"], name="wpn"
    )
    wpn.build((None, input_dim))
    # `plan_fill` checks a model's layers; the WPN's Dense layers stand for them.
    layers = types.SimpleNamespace(layers=[*wpn.hidden, wpn.head])
    plan, _used, _filled, _dead = plan_fill(layers, sd, wpn_assignments(sd, wpn.head.name), f"L2W's WPN {options}")
    apply_fill(plan)
    return wpn


# ---- gphi_MSDNet's gaters (`meta_net` of utils.save_model), onto BudgetAwareGating's gater

GATER_CONTAINER = "meta_net"
# utils.compute_uncertainty: (max probability, margin) of each early exit's softmax, in that order
GATER_FEATURES = ("max_prob", "margin")
GATED_ACTIVATION = "gelu"  # every activation of their MSDNet and of their gaters' hidden layers (nn.GELU, F.gelu)
# their main.py arguments -> BudgetAwareGating's options (the optimizer: `--opt`'s last `_` part)
_GATER_ARGS = {
    "alpha_cost": "cost_weight",
    "meta_lr": "gater_learning_rate",
    "meta_min_lr": "gater_final_learning_rate",
    "meta_weight_decay": "gater_weight_decay",
}


def _gate_indices(sd: dict[str, np.ndarray]) -> list[int]:
    """The gaters `{j}.*` of a `meta_net` (an `nn.ModuleList`); a key of another form is an error."""
    other = [k for k in sd if not re.match(r"\d+\.", k)]
    if other:
        raise CheckpointMismatchError(
            f"`{GATER_CONTAINER}` holds keys of no gater ({other[:_SHOWN]}); expected gphi_MSDNet's ModuleList of "
            "MLP_sigmoid gaters ({j}.first_hidden_layer.fc.*, {j}.rest_hidden_layers.{i}.fc.*, {j}.output_layer.*)"
        )
    return sorted({int(k.split(".", 1)[0]) for k in sd})


def infer_gater(sd: dict[str, np.ndarray], num_exits: int) -> dict[str, Any]:
    """`BudgetAwareGating`'s gater options read off their `meta_net` (models/weightModel.py `MLP_sigmoid`).

    Their gater j reads `(max_prob, margin)` of early exit j (utils.compute_uncertainty): a GELU MLP
    of `meta_net_num_layers` hidden layers of `meta_net_hidden_size`, one output, then a sigmoid,
    which keras-ee's gater applies as `P = sigmoid(z)`.
    """
    gates = _gate_indices(sd)
    if gates != list(range(num_exits - 1)):
        raise CheckpointMismatchError(
            f"`{GATER_CONTAINER}` holds gaters {gates}; a network of {num_exits} exits has one per early exit "
            f"(0..{num_exits - 2})"
        )
    first = "0.first_hidden_layer.fc.weight"
    if first not in sd:
        raise CheckpointMismatchError(f"`{GATER_CONTAINER}` lacks {first!r}")
    width, input_dim = sd[first].shape
    if input_dim != len(GATER_FEATURES):
        raise CheckpointMismatchError(
            f"the gaters take {input_dim} inputs; gphi_MSDNet's take {len(GATER_FEATURES)} "
            f"({', '.join(GATER_FEATURES)} of utils.compute_uncertainty)"
        )
    outputs = _shape(sd, "0.output_layer.weight")[0]
    if outputs != 1:
        raise CheckpointMismatchError(f"the gaters have {outputs} outputs; a gater has one (its exit's probability)")
    return {
        "features": list(GATER_FEATURES),
        "gater_width": int(width),
        "gater_depth": 1 + len(_indices(sd, r"0\.rest_hidden_layers\.(\d+)\.")),
        "gater_activation": GATED_ACTIVATION,
    }


def gater_options_from_args(args: object) -> dict[str, Any]:
    """`BudgetAwareGating` options from the `args` their utils.save_model saves (an argparse.Namespace read
    as plain attributes): lambda, the gater's learning rates, weight decay and optimizer, where present."""
    saved = getattr(args, "__dict__", None)
    if not isinstance(saved, dict):
        return {}
    out: dict[str, Any] = {}
    for theirs, ours in _GATER_ARGS.items():
        value = saved.get(theirs)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[ours] = float(value)
    opt = saved.get("opt")
    if isinstance(opt, str) and opt.lower().split("_")[-1] in ("adamw", "adam"):
        out["gater_optimizer"] = opt.lower().split("_")[-1]
    return out


def build_gating(sd: dict[str, np.ndarray], options: dict[str, Any], num_exits: int) -> tuple[Any, Any]:
    """keras-ee's `BudgetAwareGating` with `options`, and its `ExitGater` with the checkpoint's weights
    (every tensor used once, every weight filled once)."""
    import types

    from keras_ee.training.gating import BudgetAwareGating, ExitGater

    try:
        method = BudgetAwareGating(**options)
    except ValueError as e:
        raise CheckpointMismatchError(f"the gated MSDNet's settings do not fit BudgetAwareGating: {e}") from None
    gater = ExitGater(
        num_exits - 1,
        len(method.features),
        depth=method.gater_depth,
        width=method.gater_width,
        activation=method.gater_activation,
        name="gater",
    )
    gater.build((None, num_exits - 1, len(method.features)))
    # `plan_fill` checks a model's layers; every gate's Dense layers stand for them, named per gate
    # (each gate names its own `hidden_1`, ...). Their MLP_sigmoid has the layout of L2W-DEN's
    # MLP_tanh (both weightModel.py), hence `wpn_assignments` per gate.
    layers, assignments = [], []
    for j, gate in enumerate(gater.gates):
        for dense in (*gate.hidden, gate.head):
            layers.append(types.SimpleNamespace(name=f"{gate.name}/{dense.name}", weights=dense.weights))
        assignments += [
            dataclasses.replace(a, torch_key=f"{j}.{a.torch_key}", layer=f"{gate.name}/{a.layer}")
            for a in wpn_assignments(_gate(sd, j), gate.head.name)
        ]
    plan, _used, _filled, _dead = plan_fill(
        types.SimpleNamespace(layers=layers), sd, assignments, f"BudgetAwareGating's gater {options}"
    )
    apply_fill(plan)
    return method, gater


def _gate(sd: dict[str, np.ndarray], j: int) -> StateDict:
    prefix = f"{j}."
    return StateDict((k[len(prefix) :], v) for k, v in sd.items() if k.startswith(prefix))


def _check_activation(model: Any, expected: str) -> None:
    """The gated MSDNet's activations are GELU: a model built with another gives other logits."""
    found = {str(n) for layer in model.layers if (n := getattr(layer, "nonlinearity", None)) is not None} - {expected}
    if found:
        raise CheckpointMismatchError(
            f"the gated MSDNet's activations are {expected}; the model uses {sorted(found)} (build it with "
            f"activation={expected!r})"
        )


# ---- RANet


def _ranet_blocks(sd: dict[str, np.ndarray], i: int) -> list[int]:
    return _indices(sd, rf"scale_flows\.{i}\.(\d+)\.")


def ranet_assignments(sd: dict[str, np.ndarray]) -> list[_Assign]:
    flows = len(_indices(sd, r"FirstLayer\.layers\.(\d+)\."))
    out: list[_Assign] = []
    for k in range(flows):
        out += _conv_bn(f"FirstLayer.layers.{k}.net.0", f"FirstLayer.layers.{k}.net.1", f"stem_f{flows - 1 - k}")
    for i in range(flows):
        for jj in _ranet_blocks(sd, i):
            p, kp = f"scale_flows.{i}.{jj}", f"f{i}_b{jj + 1}"
            fusion = f"{p}.conv_last.net.0.weight" in sd
            for ll in _indices(sd, re.escape(p) + r"\.layers\.(\d+)\."):
                q, kq = f"{p}.layers.{ll}", f"{kp}_l{ll + 1}"
                own = f"{kq}_own" if fusion else kq
                out += _conv_bn(f"{q}.conv_normal.net.0", f"{q}.conv_normal.net.1", f"{own}_a")
                out += _conv_bn(f"{q}.conv_normal.net.3", f"{q}.conv_normal.net.4", f"{own}_b")
                if fusion:
                    out += _conv_bn(f"{q}.conv_up.net.0", f"{q}.conv_up.net.1", f"{kq}_low_a")
                    out += _conv_bn(f"{q}.conv_up.net.3", f"{q}.conv_up.net.4", f"{kq}_low_b")
            if fusion:
                out += _conv_bn(f"{p}.conv_last.net.0", f"{p}.conv_last.net.1", f"{kp}_tail")
            if f"{p}.trans.net.0.weight" in sd:
                out += _conv_bn(f"{p}.trans.net.0", f"{p}.trans.net.1", f"{kp}_transition")
    for e in _indices(sd, r"classifier\.(\d+)\."):
        out += _classifier(sd, e, e + 1)
    return out


def infer_ranet(sd: dict[str, np.ndarray]) -> tuple[dict[str, Any], int, tuple[int, ...]]:
    """`(RANetBackbone arguments, num_classes, input_shape)` read off a RANet state_dict's keys and shapes."""
    flows = len(_indices(sd, r"FirstLayer\.layers\.(\d+)\."))
    stem = [_shape(sd, f"FirstLayer.layers.{flows - 1 - i}.net.0.weight") for i in range(flows)]  # flow order
    num_channels = min(s[0] for s in stem)
    if any(s[0] % num_channels for s in stem):
        raise CheckpointMismatchError(f"stem widths {[s[0] for s in stem]} are not multiples of the smallest")
    gf = [s[0] // num_channels for s in stem]
    blocks = [len(_ranet_blocks(sd, i)) for i in range(flows)]
    block_step = blocks[1] - blocks[0] if flows > 1 else 2
    lengths = [len(_indices(sd, rf"scale_flows\.{flows - 1}\.{jj}\.layers\.(\d+)\.")) for jj in range(blocks[-1])]
    if all(n == lengths[0] for n in lengths):
        step_mode, step = "even", lengths[0]
    else:
        step_mode, step = "lg", lengths[0]
    growth_rate = _shape(sd, "scale_flows.0.0.layers.0.conv_normal.net.3.weight")[0] // gf[0]
    witnesses: dict[int, list[tuple[int, int, int]]] = collections.defaultdict(list)
    capped: dict[int, list[tuple[int, int, int]]] = collections.defaultdict(list)
    low_pairs: list[tuple[int, int]] = []
    tail_pairs: list[tuple[int, int]] = []
    trans_pairs: list[tuple[int, int]] = []
    transitions = [0] * flows
    for i in range(flows):
        for jj in _ranet_blocks(sd, i):
            p = f"scale_flows.{i}.{jj}"
            for ll in _indices(sd, re.escape(p) + r"\.layers\.(\d+)\."):
                for part, flow in (("conv_normal", i), ("conv_up", i - 1)):
                    key = f"{p}.layers.{ll}.{part}.net.0.weight"
                    if key in sd:
                        a, c = sd[key].shape, _shape(sd, f"{p}.layers.{ll}.{part}.net.3.weight")
                        (witnesses if a[0] < a[1] else capped)[flow].append((a[1], c[0], a[0]))
                up = f"{p}.layers.{ll}.conv_up.net.3.weight"
                if up in sd:
                    low_pairs.append((growth_rate * gf[i], sd[up].shape[0]))
            if f"{p}.conv_last.net.0.weight" in sd:
                tail = sd[f"{p}.conv_last.net.0.weight"].shape[0]
                last = _indices(sd, re.escape(p) + r"\.layers\.(\d+)\.")[-1]
                width_in = _shape(sd, f"{p}.layers.{last}.conv_normal.net.0.weight")[1]
                x_width = width_in + growth_rate * gf[i]  # the block's output before the tail
                tail_pairs.append((x_width, tail))
            if f"{p}.trans.net.0.weight" in sd:
                t = sd[f"{p}.trans.net.0.weight"].shape
                trans_pairs.append((t[1], t[0]))
                transitions[i] += 1
    bf = []
    for i in range(flows):
        if witnesses[i]:
            _cin, f, w = witnesses[i][0]
            bf.append(max(1, w // f))
        else:
            bf.append(max([gf[i]] + [math.ceil(cin / f) for cin, f, _ in capped[i]]))
    compress = _fit_fraction(low_pairs + tail_pairs, 0.25) if low_pairs else 0.25
    kwargs = dict(
        channels=num_channels,
        growth_rate=growth_rate,
        growth_factors=tuple(gf),
        bottleneck_factors=tuple(bf),
        scale_list=tuple(1 + t for t in transitions),
        num_blocks=blocks[0],
        block_step=block_step,
        step=step,
        step_mode=step_mode,
        compress_factor=compress,
        reduction=_fit_fraction(trans_pairs, 0.5) if trans_pairs else 0.5,
        head_channels=_shape(sd, "classifier.0.m.0.net.0.weight")[0],
    )
    return kwargs, _last_linear(sd), (32, 32, stem[-1][1])


# --------------------------------------------------------------------------- filling a model


def _to_keras(array: np.ndarray, variable: str, keras_ndim: int) -> np.ndarray:
    if variable == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if variable == "kernel" and array.ndim == 2:
        return array.T  # Linear (out, in) -> Dense (in, out)
    return array


def plan_fill(
    model: Any, sd: dict[str, np.ndarray], assignments: list[_Assign], where: str
) -> tuple[list[tuple[Any, Any]], int, int, list[str]]:
    """Checks that `assignments` use every checkpoint tensor once and fill every Keras weight
    element of `model` once, and says what goes where (nothing is written yet: `apply_fill`).

    Returns:
        `(plan, tensors used, keras variables, dead)`: `plan` pairs each Keras variable with its
        value (an array, a view of the file's bytes where the layout allows) or the channel
        slices of a merged layer; `dead` lists the tensors the authors' forward pass never
        reads and the Keras graph does not hold (read and ignored).

    Raises:
        CheckpointMismatchError: naming the first disagreements and what is left over.
    """
    variables: dict[tuple[str, str], Any] = {}
    for layer in model.layers:
        for v in layer.weights:
            variables[(layer.name, v.name)] = v
    shapes = {key: tuple(v.shape) for key, v in variables.items()}
    counts = {key: np.zeros(shape[-1:] or (1,), np.int32) for key, shape in shapes.items()}
    values: dict[tuple[str, str], Any] = {}
    problems: list[str] = []
    used: collections.Counter[str] = collections.Counter()
    dead: list[str] = []
    for a in assignments:
        if a.torch_key not in sd:
            problems.append(f"the checkpoint lacks {a.torch_key!r} (for {a.layer}/{a.variable})")
            continue
        used[a.torch_key] += 1
        key = (a.layer, a.variable)
        if key not in variables and a.dead:
            dead.append(a.torch_key)
            continue
        if key not in variables:
            problems.append(f"{a.torch_key!r} has no Keras weight {a.layer}/{a.variable}")
            continue
        value = _to_keras(np.asarray(sd[a.torch_key]), a.variable, len(shapes[key]))
        target = shapes[key]
        width = value.shape[-1] if value.ndim else 1
        full = target[-1] if target else 1
        if value.shape[:-1] != target[:-1] or a.start + width > full or (not a.partial and width != full):
            problems.append(
                f"{a.torch_key!r} of shape {list(sd[a.torch_key].shape)} does not fit {a.layer}/{a.variable} "
                f"{list(target)}" + (f" at channel {a.start}" if a.start else "")
            )
            continue
        counts[key][a.start : a.start + width] += 1
        if a.partial:
            values.setdefault(key, []).append((a.start, value))
        else:
            values[key] = value
    twice = [k for k, n in used.items() if n > 1]
    problems += [f"{k!r} is used {used[k]} times" for k in twice]
    unused = [k for k in sd if k not in used and not k.endswith(_IGNORED_SUFFIX)]
    unfilled = [f"{layer}/{name}" for (layer, name), c in counts.items() if (c != 1).any()]
    if unused:
        problems.append(f"{len(unused)} checkpoint tensor(s) unused: {unused[:_SHOWN]}")
    if unfilled:
        problems.append(f"{len(unfilled)} Keras weight(s) of {where} not filled exactly once: {unfilled[:_SHOWN]}")
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise CheckpointMismatchError(f"does not fit {where}: " + "; ".join(problems[:_SHOWN]) + more)
    plan = [(variables[key], values[key]) for key in variables]
    return plan, len(used) - len(dead), len(variables), dead


def apply_fill(plan: list[tuple[Any, Any]]) -> None:
    """Writes `plan_fill`'s values into the Keras variables: one TensorFlow assignment per variable,
    from one copy of its value (the transposed kernel, or the merged slices)."""
    import tensorflow as tf

    for variable, value in plan:
        dtype = np.dtype(variable.dtype)
        if isinstance(value, list):  # channel slices of a merged 1x1 bottleneck
            merged = np.empty(tuple(variable.shape), dtype)
            for start, piece in value:
                merged[..., start : start + (piece.shape[-1] if piece.ndim else 1)] = piece
            value = merged
        if value.dtype != dtype:
            value = value.astype(dtype)
        # `tf.constant` copies an ndarray (C order): the one copy, which also makes a transposed
        # view contiguous. The TensorFlow variable under the Keras one is assigned directly: Keras'
        # `assign` converts and checks again (2.5x slower over the 1181 variables of the ImageNet
        # step-7 MSDNet).
        tf.raw_ops.AssignVariableOp(resource=variable.handle, value=tf.constant(value))


# --------------------------------------------------------------------------- entry points


def _nearest_preset(family: str, stem: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The keras-ee preset of this family with the fewest overrides that give `kwargs`."""
    from keras_ee import models

    candidates = [
        name for name in models.list_presets() if name.startswith(family) and (stem in name or family == "ranet")
    ]
    best: tuple[str, dict[str, Any]] | None = None
    for name in candidates:
        preset = models.get_preset(name).arguments
        diff = {k: v for k, v in kwargs.items() if _norm(preset.get(k, _default(family, k))) != _norm(v)}
        if best is None or len(diff) < len(best[1]):
            best = (name, diff)
    if best is None:
        raise CheckpointMismatchError(f"keras-ee has no {family} preset with the {stem} stem")
    return best


def _default(family: str, key: str) -> Any:
    import inspect

    from keras_ee import models

    builder = models.MSDNetBackbone if family == "msdnet" else models.RANetBackbone
    return inspect.signature(builder).parameters[key].default


def _norm(value: object) -> object:
    return list(value) if isinstance(value, (tuple, list)) else value


def import_torch_checkpoint(
    path: str | os.PathLike[str], model: Any = None, **options: Any
) -> tuple[Any, ImportReport]:
    """Reads an authors' checkpoint into a keras-ee model and says what it did.

    Args:
        path: a `torch.save` file (zip or legacy serialisation).
        model: None to infer the architecture from the keys and shapes, a preset name of
            `keras_ee.models.list_presets()` (then `options` override it, and `num_classes`
            defaults to the checkpoint's), or a built keras-ee `keras.Model` to fill.
        **options: builder arguments (`num_classes`, `input_shape`, `growth_rate`, ...);
            with `model=None` they override what was inferred.

    Returns:
        `(keras.Model, ImportReport)`.

    Raises:
        FileNotFoundError: no file at `path`.
        CheckpointError: (and its subclasses UnsafeCheckpointError, CheckpointMismatchError)
            one line naming what was wrong.
    """
    built, report, _method, _state = read_checkpoint_into_model(path, model, **options)
    return built, report


_FAMILIES = {  # family -> (architecture inference, assignments, the builder family of its presets)
    "msdnet": (infer_msdnet, msdnet_assignments, "msdnet"),
    "ranet": (infer_ranet, ranet_assignments, "ranet"),
    "imta": (infer_imta, imta_assignments, "msdnet"),
}


def read_checkpoint_into_model(
    path: str | os.PathLike[str], model: Any = None, *, wpn_input: str | None = None, **options: Any
) -> tuple[Any, ImportReport, Any, dict[str, Any]]:
    """`import_torch_checkpoint`, and the keras-ee training method the model belongs to.

    Args:
        path, model, **options: as `import_torch_checkpoint`.
        wpn_input: an L2W-DEN checkpoint's WPN input (`"loss"`, the default, or `"confidence"`;
            `"both"` is read off a WPN of 2K inputs): K inputs cannot tell losses from confidences.

    Returns:
        `(keras.Model, ImportReport, method, method_state)`: `method` a `keras_ee.training.Method`
        (IMTA in phase II for an IMTA checkpoint, L2W for an L2W-DEN one with its WPN,
        BudgetAwareGating for a gphi_MSDNet one with its gaters) or None (the baseline);
        `method_state` holds `"teacher"`, IMTA's phase-I last classifier `(kernel, bias)` for its
        distillation, `"wpn"`, the WPN (a `WeightPredictionNetwork` with the checkpoint's
        weights), or `"gater"`, the gaters (an `ExitGater` with the checkpoint's weights), where
        the checkpoint has them.
    """
    import keras

    from keras_ee import models

    path = Path(path)
    obj, serialisation, checks = read_checkpoint(path)
    method: Any = None
    teacher: tuple[np.ndarray, np.ndarray] | None = None
    method_state: dict[str, Any] = {}
    wpn_report: dict[str, Any] | None = None
    gater_report: dict[str, Any] | None = None
    gating_keys: set[str] = set()
    preset: str | None
    model_options: dict[str, Any]
    input_shape: tuple[int, ...] | None
    try:
        raw, container, ignored = unwrap_checkpoint(obj)
        # gphi_MSDNet (utils.save_model): its GELU MSDNet under `model`, the gaters under `meta_net`
        gaters = obj.get(GATER_CONTAINER) if isinstance(obj, dict) and container != "bare" else None
        if gaters is not None and not _is_state_dict(gaters):
            raise CheckpointMismatchError(
                f"`{GATER_CONTAINER}` is {_describe(gaters)}, not the state_dict of gphi_MSDNet's gaters"
            )
        meta = obj.get(WPN_CONTAINER) if isinstance(obj, dict) and container != "bare" else None
        if not _is_state_dict(meta):
            meta = None
            if wpn_input is not None:
                raise ValueError(f"wpn_input {wpn_input!r}: the checkpoint holds no WPN (`{WPN_CONTAINER}`)")
        sd, prefixed = strip_module_prefix(raw)
        sd = StateDict(sd)
        family = detect_family(sd)
        if gaters is not None and family != "msdnet":
            raise CheckpointMismatchError(f"gaters (`{GATER_CONTAINER}`) beside a {family}: expected an MSDNet")
        infer, assign, builder_family = _FAMILIES[family]
        assignments = assign(sd)
        if isinstance(model, keras.Model):
            built, preset, model_options = model, None, {}
        else:
            if model is None:
                kwargs, num_classes, input_shape = infer(sd)
                if gaters is not None:  # not in the weights: their code builds every activation as GELU
                    kwargs["activation"] = GATED_ACTIVATION
                stem = kwargs.get("stem", "cifar")
                preset, model_options = _nearest_preset(builder_family, stem, kwargs)
                model_options.update(options)
            else:
                models.get_preset(model)  # an unknown name: one error, listing the presets
                preset, model_options = model, dict(options)
                num_classes = infer_imta(sd)[1] if family == "imta" else _last_linear(sd)
                input_shape = None
                if gaters is not None:
                    model_options.setdefault("activation", GATED_ACTIVATION)
            model_options.setdefault("num_classes", num_classes)
            if input_shape is not None:
                model_options.setdefault("input_shape", tuple(input_shape))
            built = models.create(preset, **model_options)
            if family == "imta":
                method, teacher = imta_method(sd, built)
                built = method.transform_backbone(built)  # its BatchNorm as the backbone's
        if gaters is not None:
            _check_activation(built, GATED_ACTIVATION)
        if family == "imta":
            _open_collaboration(built)
            phase_one = imta_phase_one_classifiers(sd)
            ignored = {"phase_one_classifiers": phase_one, **ignored}
            fill_sd = StateDict((k, v) for k, v in sd.items() if k not in set(phase_one))
        else:
            fill_sd = sd
        shown = {k: v for k, v in model_options.items() if k not in ("num_classes", "input_shape")}
        where = f"model {preset!r}" + (f" with {shown}" if preset and shown else "")
        if family == "imta":
            where += " and IMTA's phase-II heads"
        plan, used, filled, dead = plan_fill(built, fill_sd, assignments, where if preset else f"model {built.name!r}")
        if preset is None:  # the caller's model: nothing is written into it from a damaged file
            digest = checks.sha256()
        if meta is not None:  # L2W-DEN: the WPN onto keras-ee's L2W
            from keras_ee.training import L2W

            wpn_sd, _wpn_prefixed = strip_module_prefix(meta)
            wpn_sd = StateDict(wpn_sd)
            wpn_options = infer_wpn(wpn_sd, len(built.outputs), wpn_input)
            method_state["wpn"] = build_wpn(wpn_sd, wpn_options, len(built.outputs))
            method = L2W(**wpn_options)
            ignored.pop(WPN_CONTAINER, None)
            wpn_report = {
                **wpn_options,
                "input_dim": int(wpn_sd["first_hidden_layer.fc.weight"].shape[1]),
                "tensors": len(wpn_sd),
                "input_type_from": "the weights (2K inputs)"
                if wpn_options["wpn_input"] == "both"
                else (
                    "the caller (wpn_input)" if wpn_input is not None else "the default (K inputs: loss or confidence)"
                ),
            }
        if gaters is not None:  # gphi_MSDNet: the gaters onto keras-ee's BudgetAwareGating
            gater_sd = StateDict(strip_module_prefix(gaters)[0])
            gater_options = infer_gater(gater_sd, len(built.outputs))
            from_args = gater_options_from_args(obj.get("args") if isinstance(obj, dict) else None)
            gating_keys = {*gater_options, *from_args}
            method, method_state["gater"] = build_gating(gater_sd, {**gater_options, **from_args}, len(built.outputs))
            ignored.pop(GATER_CONTAINER, None)
            gater_report = {
                "gaters": len(built.outputs) - 1,
                **gater_options,
                "tensors": len(gater_sd),
                "from_args": from_args,
            }
        apply_fill(plan)
        del plan
        digest = checks.sha256()  # hashed (and the zip CRC-32s checked) while the tensors were mapped
    except CheckpointError as e:
        raise type(e)(f"checkpoint {str(path)!r}: {e}") from None
    ignored_tensors = sorted(k for k in sd if k.endswith(_IGNORED_SUFFIX))
    method_options: dict[str, Any] = {}
    if family == "imta" and method is not None:
        method_options = {k: v for k, v in method.get_config().items() if k == "transfer_widths" and v is not None}
    if teacher is not None:
        method_state["teacher"] = teacher
    if wpn_report is not None:
        method_options = {k: wpn_report[k] for k in ("wpn_depth", "wpn_width", "wpn_input")}
    if gater_report is not None:
        method_options = {k: v for k, v in method.get_config().items() if k in gating_keys}
    report = ImportReport(
        source=str(path),
        sha256=digest,
        size_bytes=path.stat().st_size,
        serialisation=serialisation,
        container=container,
        module_prefix=prefixed,
        family=family,
        preset=preset or built.name,
        model_options={k: _norm(v) for k, v in model_options.items()},
        num_classes=int(built.outputs[0].shape[-1]),
        input_shape=[int(d) for d in built.inputs[0].shape[1:]],
        tensors_total=len(sd),
        tensors_used=used,
        keras_weights=filled,
        ignored={
            "num_batches_tracked": len(ignored_tensors),
            "unused_by_forward": dead,
            **ignored,
        },
        method=_method_name(family, wpn_report, gater_report),
        method_options=method_options,
        wpn=wpn_report,
        gater=gater_report,
    )
    return built, report, method, method_state


def _method_name(family: str, wpn: dict[str, Any] | None, gater: dict[str, Any] | None) -> str:
    if family == "imta":
        return "imta"
    if wpn is not None:
        return "l2w"
    return "gating" if gater is not None else "baseline"


def load_torch_checkpoint(path: str | os.PathLike[str], model: Any = None, **options: Any) -> Any:
    """An authors' PyTorch checkpoint as a keras-ee `keras.Model` (no torch needed).

    Args:
        path: the checkpoint (`torch.save` zip or legacy file): a bare state_dict or the dict the
            authors' scripts save (`state_dict`, optimizer states, ...), with or without
            DataParallel's `module.` prefix.
        model: None (infer MSDNet / RANet / IMTA phase II / the gated GELU MSDNet and their
            settings from the keys and shapes), a preset name, or a keras-ee model to fill.
        **options: builder arguments overriding the preset or what was inferred.

    Returns:
        The functional `keras.Model` (outputs `exit_1..exit_K`), in inference form.

    Example:
    ```python
    model = keras_ee.interop.load_torch_checkpoint("msdnet_step4.pth.tar")
    logits = model.predict(normalised_images)
    ```
    """
    return import_torch_checkpoint(path, model, **options)[0]
