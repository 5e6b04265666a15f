"""The model presets: named architectures as data, with what the papers say of them.

Each preset is a `Preset` (the builder, its arguments, the default input and classes, the paper,
the authors' command-line arguments it corresponds to, and its parameters and Mul-Adds per exit)
in one `keras_ee.registry.Registry`, as timm's `register_model` / `list_models`:
`register_preset`, `list_presets`, `get_preset`; `create(name, ...)` builds one.

The costs are the exact counts of `keras_ee.costs.exit_costs` (rule "reference", the papers'
Mul-Add) at the preset's default input and classes, cumulative over exits; tests/test_presets.py
recomputes them.
"""

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import keras

from keras_ee.models.cnn import multiexit_cnn
from keras_ee.models.msdnet import MSDNetBackbone
from keras_ee.models.ranet import RANetBackbone
from keras_ee.registry import Registry

MSDNET_PAPER = "Multi-Scale Dense Networks for Resource Efficient Image Classification (ICLR 2018, arXiv:1703.09844)"
RANET_PAPER = "Resolution Adaptive Networks for Efficient Inference (CVPR 2020, arXiv:2003.07326)"


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named architecture.

    Attributes:
        builder: the model class or function (`MSDNetBackbone`, `RANetBackbone`, `multiexit_cnn`).
        arguments: its arguments (besides `num_classes` and `input_shape`).
        input_shape: the default `(height, width, channels)`.
        num_classes: the default number of classes.
        paper: title, venue and arXiv id of the architecture's paper ("" for keras-ee's own).
        authors_arguments: the authors' command-line arguments that build the same network.
        params: cumulative parameters per exit at the defaults (exit k: everything a sample
            leaving at exit k has run, heads 1..k included).
        mul_adds: cumulative Mul-Adds per exit at the defaults, as `params`.
        description: a few words.
    """

    builder: Callable[..., keras.Model]
    arguments: Mapping[str, Any]
    input_shape: tuple[int, int, int]
    num_classes: int
    paper: str
    authors_arguments: str
    params: tuple[int, ...]
    mul_adds: tuple[int, ...]
    description: str = ""

    @property
    def num_exits(self) -> int:
        return len(self.params)


_presets: Registry[Preset] = Registry("model preset")


def register_preset(name: str, preset: Preset, *, replace: bool = False) -> Preset:
    """Adds `preset` under `name` (a taken name is refused unless `replace`) and returns it."""
    if not isinstance(preset, Preset):
        raise TypeError(f"register_preset({name!r}): expected a Preset, received {type(preset).__name__}.")
    return _presets.register(name, preset, replace=replace)


def list_presets() -> list[str]:
    """The names `create` accepts, in registration order."""
    return _presets.names()


def get_preset(name: str) -> Preset:
    """The preset named `name`; an unknown name is a `ValueError` listing the presets."""
    return _presets.get(name)


def describe_presets() -> str:
    """One paragraph per preset: its exits, description, paper and the authors' arguments
    (`keras-ee models` prints it under the costs table)."""
    lines = []
    for name in list_presets():
        preset = get_preset(name)
        lines.append(f"{name}: {preset.num_exits} exits, {preset.description}")
        if preset.paper:
            lines.append(f"    paper: {preset.paper}")
        if preset.authors_arguments:
            lines.append(f"    the authors' arguments: {preset.authors_arguments}")
    return "\n".join(lines)


def _builder_arguments(builder: Callable[..., keras.Model]) -> set[str]:
    """The named arguments of `builder` a preset's user may override."""
    parameters = inspect.signature(builder).parameters.values()
    named = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return named - {"num_classes", "input_shape"}


def create(
    name: str, num_classes: int | None = None, input_shape: Sequence[int] | None = None, **overrides: Any
) -> keras.Model:
    """Builds a preset multi-exit model.

    Presets (`list_presets()`; `keras-ee models` prints them with their costs):
    `msdnet_cifar_5`, `msdnet_cifar_7` (L2W/IMTA CIFAR MSDNets), `msdnet_imagenet_s4/s6/s7`
    (224x224, 4 scales), `ranet_cifar_c1` (6 exits), `ranet_cifar_c2` (8 exits),
    `multiexit_cnn` (small and fast).

    Args:
        name: str, a preset from `list_presets()`.
        num_classes: int; default the preset's (100 for CIFAR presets, 1000 for ImageNet
            presets, 10 for `multiexit_cnn`).
        input_shape: `(height, width, channels)`; default the preset's (32x32x3, or 224x224x3
            for ImageNet presets).
        **overrides: any other argument of the preset's builder (`MSDNetBackbone`,
            `RANetBackbone`, `multiexit_cnn`), e.g. `growth_rate=8`,
            `gradient_equilibrium=True`, `synchronized_batchnorm=True` or
            `moving_variance_update="biased"` (Keras' moving variance instead of PyTorch's).

    Returns:
        A functional `keras.Model` with outputs `exit_1..exit_K`.

    Example:
    ```python
    model = create("multiexit_cnn", num_classes=10, input_shape=(8, 8, 1))
    ```
    """
    preset = get_preset(name)
    allowed = _builder_arguments(preset.builder)
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise ValueError(
            f"create({name!r}): unknown override(s) {unknown}; {preset.builder.__name__} accepts {sorted(allowed)}."
        )
    arguments = {"name": name, **preset.arguments, **overrides}
    return preset.builder(
        num_classes=preset.num_classes if num_classes is None else num_classes,
        input_shape=preset.input_shape if input_shape is None else input_shape,
        **arguments,
    )


_CIFAR = (32, 32, 3)
_IMAGENET = (224, 224, 3)
_MSDNET_CIFAR: dict[str, Any] = dict(
    step_mode="lin_grow",
    step=1,
    base=1,
    channels=16,
    growth_rate=6,
    growth_factors=(1, 2, 4),
    bottleneck_factors=(1, 2, 4),
    stem="cifar",
    head_channels=128,
)
_MSDNET_IMAGENET: dict[str, Any] = dict(
    num_blocks=5,
    step_mode="even",
    base=4,
    channels=32,
    growth_rate=16,
    growth_factors=(1, 2, 4, 4),
    bottleneck_factors=(1, 2, 4, 4),
    stem="imagenet",
    head_channels=None,
)
# The authors' command-line arguments (MSDNet-PyTorch's and RANet-pytorch's main.py).
_MSDNET_CIFAR_COMMAND = (
    "--arch msdnet --stepmode lin_grow --step 1 --base 1 --nChannels 16 --growthRate 6 "
    "--grFactor 1-2-4 --bnFactor 1-2-4"
)
_MSDNET_IMAGENET_COMMAND = (
    "--arch msdnet --data ImageNet --nBlocks 5 --stepmode even --base 4 --nChannels 32 --growthRate 16 "
    "--grFactor 1-2-4-4 --bnFactor 1-2-4-4"
)
_RANET_COMMAND = (
    "--arch RANet --nBlocks 2 --block-step 2 --step 2 --stepmode lg --nChannels 16 --growthRate 6 "
    "--compress-factor 0.25"
)

register_preset(
    "msdnet_cifar_5",
    Preset(
        MSDNetBackbone,
        dict(_MSDNET_CIFAR, num_blocks=5),
        _CIFAR,
        100,
        MSDNET_PAPER,
        f"{_MSDNET_CIFAR_COMMAND} --nBlocks 5",
        (299704, 649740, 1018308, 1492424, 2078924),
        (6859876, 14350024, 27536684, 41714576, 58480628),
        "L2W's 5-exit CIFAR MSDNet",
    ),
)
register_preset(
    "msdnet_cifar_7",
    Preset(
        MSDNetBackbone,
        dict(_MSDNET_CIFAR, num_blocks=7),
        _CIFAR,
        100,
        MSDNET_PAPER,
        f"{_MSDNET_CIFAR_COMMAND} --nBlocks 7",
        (299704, 649740, 1111388, 1727200, 2384968, 3052244, 3966664),
        (6859876, 14350024, 27291436, 48448912, 76432628, 108850520, 137280956),
        "L2W's and IMTA's 7-exit CIFAR MSDNet",
    ),
)
register_preset(
    "msdnet_imagenet_s4",
    Preset(
        MSDNetBackbone,
        dict(_MSDNET_IMAGENET, step=4),
        _IMAGENET,
        1000,
        MSDNET_PAPER,
        f"{_MSDNET_IMAGENET_COMMAND} --step 4",
        (4238504, 8772240, 13073272, 16748416, 23958440),
        (339902824, 685456720, 1008156120, 1254472688, 1360529624),
        "ImageNet MSDNet, 4 scales, step 4",
    ),
)
register_preset(
    "msdnet_imagenet_s6",
    Preset(
        MSDNetBackbone,
        dict(_MSDNET_IMAGENET, step=6),
        _IMAGENET,
        1000,
        MSDNET_PAPER,
        f"{_MSDNET_IMAGENET_COMMAND} --step 6",
        (4238504, 10775952, 17842936, 24581408, 38678920),
        (339902824, 924194832, 1517433848, 1991602432, 2194420840),
        "ImageNet MSDNet, 4 scales, step 6",
    ),
)
register_preset(
    "msdnet_imagenet_s7",
    Preset(
        MSDNetBackbone,
        dict(_MSDNET_IMAGENET, step=7),
        _IMAGENET,
        1000,
        MSDNET_PAPER,
        f"{_MSDNET_IMAGENET_COMMAND} --step 7",
        (4238504, 11889168, 20577208, 29158384, 47544824),
        (339902824, 1058266480, 1811878152, 2422156808, 2684443568),
        "ImageNet MSDNet, 4 scales, step 7",
    ),
)
register_preset(
    "ranet_cifar_c1",
    Preset(
        RANetBackbone,
        dict(),
        _CIFAR,
        100,
        RANET_PAPER,
        f"{_RANET_COMMAND} --scale-list 1-2-3 --grFactor 4-2-1 --bnFactor 4-2-1",
        (358660, 899880, 1304995, 1800711, 2188193, 2617261),
        (8372324, 21788360, 32878892, 41570192, 53283828, 58990680),
        "RANet Model-C-1 (CIFAR, 6 exits)",
    ),
)
register_preset(
    "ranet_cifar_c2",
    Preset(
        RANetBackbone,
        dict(scale_list=(1, 2, 2, 3), growth_factors=(4, 2, 2, 1), bottleneck_factors=(4, 2, 2, 1)),
        _CIFAR,
        100,
        RANET_PAPER,
        f"{_RANET_COMMAND} --scale-list 1-2-2-3 --grFactor 4-2-2-1 --bnFactor 4-2-2-1",
        (367940, 909160, 1314275, 1809991, 2717647, 3685779, 4462599, 5186987),
        (10739812, 24155848, 35246380, 43937680, 93068276, 114677336, 164023356, 175743648),
        "RANet Model-C-2 (CIFAR, 8 exits; L2W's description, bnFactor = grFactor assumed)",
    ),
)
register_preset(
    "multiexit_cnn",
    Preset(
        multiexit_cnn,
        dict(),
        _CIFAR,
        10,
        "",
        "",
        (2970, 17252, 52494, 117912),
        (2850986, 6414836, 8636382, 9672296),
        "keras-ee's small, fast CNN for tests and small datasets",
    ),
)
