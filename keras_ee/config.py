"""The settings of one training run, kept apart from the code that runs it.

A `TrainConfig` is what `keras_ee.experiment.train(config, workdir)` consumes and what a
run folder's `config.json` holds. It round-trips through JSON, and `--config FILE` on the
command line reads the same keys from a `.json` or `.toml` file.

Each setting is defined once, as a field: its type and default, and in its metadata
(`Flag`) the help and group of its `keras-ee train` flag (`keras_ee.cli` builds the parser
from the fields). Its checks are `keras_ee.validation`'s. The training recipe is a nested
field (`TrainConfig.recipe`, a `RecipeConfig`); its keys are flat in config.json, in a
`--config` file and on the command line, one namespace of setting names (`settings`, `setting_keys`).

Example:

    cfg = TrainConfig(dataset="cifar100", data_dir="~/datasets", model="msdnet_cifar_5",
                      method="l2w", method_options={"q": 0.75, "delta": 0.8}, epochs=300,
                      batch_size=64, recipe=RecipeConfig(mixup=0.8, ema=0.9999))
    cfg.to_json("cfg.json"); TrainConfig.from_file("cfg.json") == cfg  # True
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import sys
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from keras_ee import validation as v
from keras_ee._typing import StrPath

SCHEDULES = ("cosine", "constant", "step", "step_per_epoch", "cosine_per_batch")
# The schedules a warm-up can precede (`warmup_epochs`), and the one with a final rate.
WARMUP_SCHEDULES = ("cosine", "constant", "cosine_per_batch")
CONFIDENCES = ("max_softmax", "margin", "entropy")
# `sgd` and `adamw` take PyTorch's steps (`keras_ee.optimizers`, the papers'); `keras_sgd` and
# `keras_adamw` are Keras' own (decoupled weight decay, Keras' momentum and epsilon placement).
OPTIMIZERS = ("sgd", "adamw", "keras_sgd", "keras_adamw")
STRATEGIES = ("none", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")
DUMP_DTYPES = ("float32", "float16")
# Weight decay when the config does not set one: SGD as the papers (1e-4); AdamW as DeiT
# and the budget-aware paper on ImageNet (0.05).
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05, "keras_sgd": 1e-4, "keras_adamw": 0.05}


def optimizer_name_semantics(name: str) -> str:
    """`"keras"` for Keras' own optimizers (`keras_sgd`, `keras_adamw`), else `"pytorch"`."""
    return "keras" if name.startswith("keras_") else "pytorch"


def keras_optimizer_name(name: str) -> str:
    """The Keras-semantics optimizer of the same kind (`sgd` -> `keras_sgd`): a run made before
    keras-ee took PyTorch's steps resumes with the optimizer it started with."""
    return name if name.startswith("keras_") else f"keras_{name}"


# ------------------------------------------------------------------ command-line metadata

# The groups of `keras-ee train --help`, in order, with their descriptions.
FLAG_GROUPS: dict[str, str | None] = {
    "data": None,
    "model and method": None,
    "optimization": None,
    "training recipe": "The budget-aware early-exiting paper's recipe (timm's, with Keras' own layers), every "
    "part off by default and usable with every method. Augmentations draw from each batch's stateless seed, "
    "so a resumed run stays bit-identical. Validation, test and meta batches are never augmented.",
    "devices": "tf.distribute and mixed precision (see docs/distributed.md). Under a strategy --batch-size is "
    "the global batch, split evenly over the replicas; scale --lr with it (linear scaling).",
    "evaluation": None,
}
FLAG = "flag"  # the metadata key of a field's `Flag` (None: the setting has no flag)


@dataclasses.dataclass(frozen=True)
class MethodOptionFlag:
    """A shorthand flag for one method option (`--q Q` for `--method-option q=Q`)."""

    key: str
    type: Callable[[str], Any]
    help: str
    group: str


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a setting appears on `keras-ee train`'s command line (a field's metadata `"flag"`).

    An unset flag leaves the value of the `--config` file or the default. The argument type
    is the field's (`int`, `float`, `str`); a bool's flag sets the value that is not its
    default (`--nesterov`, `--no-evaluate`); a list's flag is repeatable (`parse` converts
    one item); a dict's is a repeatable `KEY=VALUE`; a nested settings field's flag picks a
    preset by name (`choices`), its own fields' flags override parts of it.

    Args:
        group: the help group (a key of `FLAG_GROUPS`).
        help: the help text, or a function that returns it (when it lists names that are
            registered at run time).
        name: the flag, default `--` and the field's name with dashes (`--no-` before it for
            a bool that defaults to true).
        metavar, choices: as argparse's.
        parse: a function from the text of one value to the value (raising `ValueError`).
        method_options: shorthand flags for method options, listed after this flag.
    """

    group: str
    help: str | Callable[[], str] | None = None
    name: str | None = None
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    method_options: tuple[MethodOptionFlag, ...] = ()


def flag(group: str, help: str | Callable[[], str] | None = None, **options: Any) -> dict[str, Flag]:
    """A field's metadata: its `Flag`."""
    return {FLAG: Flag(group, help, **options)}


NO_FLAG: dict[str, None] = {FLAG: None}  # a setting of config files only


def _mul_adds(text: str) -> float:
    from keras_ee.costs import parse_mul_adds  # function-local: keras_ee.costs loads TensorFlow, config must not

    return parse_mul_adds(text)


def _method_help() -> str:
    from keras_ee.training import registry  # function-local: the methods load TensorFlow, config must not

    return (
        f"training method: {', '.join(registry.list_methods())} (see `keras-ee methods`), or "
        "package.module:Class for one outside keras-ee"
    )


# ------------------------------------------------------------------ the training recipe


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    """The training recipe: batch augmentation, soft targets and a weight average.

    The settings of "Balancing Accuracy and Efficiency in Budget-Aware Early-Exiting Neural
    Networks" (timm's DeiT-style recipe), every part off by default and usable with every
    method: `TrainConfig.recipe`. `keras_ee.data.recipe.BatchAugmentation` applies the batch
    part (all but `ema`, which is the optimizer's).

    Args:
        mixup, cutmix: Beta(alpha, alpha) of Keras' `MixUp` / `CutMix` on each training
            batch, 0 for off (paper: 0.8 and 1.0); with both on, each batch takes one of
            them with probability 1/2 (timm's switch).
        randaugment: magnitude M on timm's 0..10 scale for Keras' `RandAugment`, None for
            off (paper: 9); Keras' strength `factor` is the range (M -+ randaugment_std) / 10.
            Keras' ops are not timm's at equal strength (e.g. rotations up to factor x 360
            degrees, translations up to factor x the size, reflected fill).
        randaugment_std: spread of the magnitude (timm's mstd; paper 0.5).
        randaugment_ops: ops per image (timm's n; 2), chosen per image.
        random_erasing: probability of Keras' `RandomErasing` per image (paper: 0.25),
            after normalization, the patch filled with N(0, 1) noise clipped to [-1, 1].
        color_jitter: strength S of Keras' `RandomColorJitter` (timm's 0.4): brightness
            +-S of the range, contrast x(1 -+ S), saturation x(1 -+ S) (RGB only); 0 off.
            Pixel augmentations see the raw pixels in [0, 1], after the crop and flip and
            before normalization. Every training batch's augmentation is drawn from its
            stateless seed, a function of (seed, epoch, batch): resume stays exact.
        ema: momentum of an exponential moving average of the trainable weights (the
            optimizer's `use_ema`/`ema_momentum`; paper: 0.9999), None for none. The
            average is what validation during training, the saved model, the logit dump
            and the evaluation use; BatchNorm statistics are the trained ones (Keras
            averages trainable variables only). The average starts at the weights after
            the first step, so 0.9999 (a horizon of ~10,000 steps) over a short run keeps
            mostly the early weights. A method with phases (IMTA) ends each phase on its
            average and starts the next phase's (new) optimizer and average from it.
        label_smoothing: eps in [0, 1): training targets become (1 - eps) one-hot + eps / C
            (soft targets, in every method's loss); validation and test stay hard.
    """

    mixup: float = dataclasses.field(
        default=0.0,
        metadata=flag("training recipe", "Keras' MixUp with Beta(ALPHA, ALPHA) (0: off)", metavar="ALPHA"),
    )
    cutmix: float = dataclasses.field(
        default=0.0,
        metadata=flag(
            "training recipe",
            "Keras' CutMix with Beta(ALPHA, ALPHA) (0: off); with --mixup, one of the two per batch, "
            "probability 1/2 each",
            metavar="ALPHA",
        ),
    )
    randaugment: float | None = dataclasses.field(
        default=None,
        metadata=flag(
            "training recipe",
            "Keras' RandAugment at magnitude M of 10 (timm's scale; Keras' factor (M -+ std) / 10, its "
            "ops stronger than timm's at equal M), 2 ops chosen per image",
            metavar="M",
        ),
    )
    randaugment_std: float = dataclasses.field(
        default=0.5, metadata=flag("training recipe", "magnitude spread (default 0.5)", metavar="STD")
    )
    randaugment_ops: int = dataclasses.field(
        default=2, metadata=flag("training recipe", "ops per image (default 2)", metavar="N")
    )
    random_erasing: float = dataclasses.field(
        default=0.0,
        metadata=flag("training recipe", "Keras' RandomErasing with probability P per image", metavar="P"),
    )
    color_jitter: float = dataclasses.field(
        default=0.0,
        metadata=flag(
            "training recipe",
            "Keras' RandomColorJitter: brightness +-S, contrast and saturation x(1 -+ S) (timm: 0.4)",
            metavar="S",
        ),
    )
    label_smoothing: float = dataclasses.field(
        default=0.0,
        metadata=flag("training recipe", "soft training targets (1 - EPS) one-hot + EPS / C", metavar="EPS"),
    )
    ema: float | None = dataclasses.field(
        default=None,
        metadata=flag(
            "training recipe",
            "exponential moving average of the weights (optimizer use_ema), used for validation, the "
            "saved model, the logit dump and evaluation; 0.9999 averages over ~10,000 steps, so on a "
            "short run it keeps mostly the early weights",
            metavar="MOMENTUM",
        ),
    )

    def __post_init__(self) -> None:
        v.check_recipe_config(self)

    @property
    def active(self) -> bool:
        """Whether the recipe changes the training batches at all (`ema` does not)."""
        return bool(self.soft_labels or self.randaugment is not None or self.random_erasing or self.color_jitter)

    @property
    def soft_labels(self) -> bool:
        """Whether the training labels become (B, C) float32 targets."""
        return bool(self.label_smoothing or self.mixup or self.cutmix)

    @property
    def randaugment_level(self) -> float:
        """The largest op strength, a fraction of timm's maximum: (M + std) / 10, at most 1.

        timm draws each op's magnitude from N(M, std) (out of 10) with a random sign; here
        each op's strength is drawn uniformly (Keras' layers) up to this level, both signs.
        """
        if self.randaugment is None:
            raise ValueError("randaugment_level: this recipe has no RandAugment (`randaugment` is None).")
        m, sd = float(self.randaugment), float(self.randaugment_std)
        return min(max((m + sd) / 10, 0.0), 1.0)


# The named recipes of `--recipe NAME`: "budget-aware" is the paper's (above).
RECIPES = {
    "budget-aware": RecipeConfig(
        mixup=0.8,
        cutmix=1.0,
        randaugment=9.0,
        randaugment_std=0.5,
        randaugment_ops=2,
        random_erasing=0.25,
        color_jitter=0.4,
        label_smoothing=0.1,
        ema=0.9999,
    ),
}
# ... and on ImageNet its optimizer: AdamW, weight decay 0.05, 20 warm-up epochs, and its code's
# schedule (gphi_MSDNet's per-iteration `utils.cosine_scheduler` arrays: linspace warm-up, cosine
# to `--min_lr` 1e-6); on CIFAR the paper keeps the papers' SGD, which is this package's default.
RECIPE_IMAGENET_OPTIMIZER = {
    "budget-aware": {
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "warmup_epochs": 20,
        "schedule": "cosine_per_batch",
        "min_learning_rate": 1e-6,
    }
}


def recipe_values(name: str, dataset: str = "digits") -> dict[str, Any]:
    """The settings (flat keys) a named recipe sets for `dataset` (ImageNet adds its optimizer)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}.")
    values: dict[str, Any] = dataclasses.asdict(RECIPES[name])
    if dataset == "imagenet":
        values.update(RECIPE_IMAGENET_OPTIMIZER.get(name, {}))
    return values


def _recipe_help() -> str:
    """`--recipe`'s help: each named recipe spelled out as the flags it stands for."""
    flags = {s.key: s.flag_name for s in settings()}

    def spelled(values: dict[str, Any]) -> str:
        return " ".join(
            f"{flags[key]} {value:g}" if isinstance(value, float) else f"{flags[key]} {value}"
            for key, value in values.items()
        )

    recipes = [
        f"{name}: {spelled(dataclasses.asdict(recipe))}"
        + (f", and on ImageNet {spelled(RECIPE_IMAGENET_OPTIMIZER[name])}" if name in RECIPE_IMAGENET_OPTIMIZER else "")
        for name, recipe in RECIPES.items()
    ]
    return "; ".join(recipes) + "; the flags below override it, config.json stores the resolved values"


# ------------------------------------------------------------------ the run's settings


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run.

    Args:
        dataset: a name from `keras_ee.data.list_datasets()` or `npz:PATH`; default the
            built-in `digits` (no download).
        data_dir: folder with local copies of the data (official formats).
        val_size: held-out validation images for calibration (default: the loader's).
        imbalance_factor: long-tailed CIFAR (200, 100, 50, 20); None for balanced.
        train_size: train on a stratified subset of this many training images
            (smaller-scale runs); None uses the whole training split.
        samples_per_class: train on X images of every class (the HDKD paper's low-data
            CIFAR(X)), a stratified, seeded choice from the training split after the
            validation (and meta) hold-out; an error if a class has fewer; None uses
            every training image. Not together with `train_size`.
        meta_split_size: for methods with a meta stream (outer steps on held-out
            batches, e.g. HDKD): None (default) feeds them the validation split, as
            the HDKD paper does; the thresholds calibrated on it are then
            optimistic. A count or fraction holds out a separate split of that
            size from the training images instead.
        model: a preset of `keras_ee.models.list_presets()`.
        model_options: keyword overrides for the preset (widths, blocks, ...).
        method: a registered training method (`keras-ee methods`) or
            `package.module:Class` for one outside keras-ee.
        method_options: the method's options (see `keras-ee methods`).
        epochs, batch_size: as in `model.fit` (L2W takes two half-batch steps per batch). For a
            method with phases, `epochs` is phase I (IMTA: phase II adds `phase2_epochs`).
        optimizer: `sgd` (the papers', default: `torch.optim.SGD`'s step, L2 weight decay
            added to the gradient before momentum on every variable, see
            `keras_ee.optimizers.SGD`) or `adamw` (`torch.optim.AdamW`'s step, epsilon 1e-8
            after the bias correction, betas (0.9, 0.999); biases and BatchNorm scales and
            shifts, i.e. every variable of rank <= 1, get no weight decay, as timm does);
            `keras_sgd` and `keras_adamw` are Keras' own (decoupled weight decay). A run
            folder made before keras-ee took PyTorch's steps resumes with Keras' optimizer.
        learning_rate: initial learning rate (after the warm-up); None means the rule of
            the optimizer: SGD 0.1 * batch_size / 64 (the papers'), AdamW
            5e-4 * batch_size / 512 (DeiT's; 1e-3 at the budget-aware paper's batch 1024).
        schedule: the learning rate over each phase (`keras_ee.schedules`):
            `cosine_per_batch`: `0.5 lr (1 + cos(pi t / T))` at loaded batch t of T, every
            optimizer step of a batch at its rate, as L2W-DEN's code and MSDNet-PyTorch's
            `--lr-type cosine` (after a warm-up, gphi_MSDNet's per-iteration arrays: the
            budget-aware code); `step_per_epoch`: x0.1 from epoch 0.5 E and x0.01 from 0.75 E,
            constant within an epoch, as MSDNet-PyTorch's and IMTA's `--lr-type multistep`
            (their CIFAR default); `cosine` (default): Keras' `CosineDecay` over optimizer
            steps (the same as `cosine_per_batch` for one step per batch without warm-up);
            `step`: x0.1 after 50% and 75% of the optimizer steps (mid-epoch); `constant`.
        warmup_epochs: epochs of linear learning-rate warm-up from 0 before the schedule,
            which then spans the remaining steps; with `cosine` or `constant` Keras'
            `CosineDecay` warm-up over optimizer steps (epochs x batches x the method's
            optimizer steps per batch, `lr * s / W`), with `cosine_per_batch` gphi_MSDNet's
            (`np.linspace(0, lr, W)` over W batches). A method with phases warms up each phase.
        min_learning_rate: the rate `cosine_per_batch` ends at (gphi_MSDNet's `--min_lr`,
            1e-6); default 0.
        momentum, nesterov: SGD settings (papers: 0.9, False); not used by AdamW.
        weight_decay: None (default) resolves to the optimizer's default, 1e-4 for SGD and
            0.05 for AdamW, and is stored resolved.
        recipe: the training recipe (`RecipeConfig`: label smoothing, MixUp, CutMix,
            RandAugment, random erasing, colour jitter, EMA), all off by default; its keys are
            flat in config.json and on the command line (`mixup`, `--mixup`).
        seed: seeds data splits, shuffling, augmentation and initialization.
        confidence: confidence measure for calibration (`max_softmax`, `margin`, `entropy`).
        budgets: Mul-Add budgets logged by `BudgetCallback` each epoch (e.g. [15e6]).
        evaluate: run the budget evaluation after training.
        dump_dtype: dtype of the saved logits (`float32` or `float16`).
        strategy: the `tf.distribute` strategy of the training: `none` (default, one
            device), `mirrored` (`MirroredStrategy`, every visible GPU), `multi_worker`
            (`MultiWorkerMirroredStrategy`, the cluster in `TF_CONFIG`) or `tpu`
            (`TPUStrategy`). `batch_size` is the global batch, split over the replicas.
        precision: the Keras dtype policy the model is built under: `float32` (default),
            `mixed_float16` (Keras' compile adds a `LossScaleOptimizer`) or `mixed_bfloat16`.
        sync_batchnorm: build the backbone's BatchNorm with synchronized (all-reduced)
            batch statistics, so that under a strategy the global batch is normalised as
            on one device (a collective per layer); default False (per-replica statistics).
    """

    # data
    dataset: str = dataclasses.field(
        default="digits", metadata=flag("data", "dataset name or npz:PATH (default: built-in digits)")
    )
    data_dir: str | None = dataclasses.field(
        default=None, metadata=flag("data", "folder with local copies of the data")
    )
    val_size: int | None = dataclasses.field(
        default=None, metadata=flag("data", "held-out validation images for calibration")
    )
    imbalance_factor: int | None = dataclasses.field(
        default=None, metadata=flag("data", "long-tailed CIFAR: 200, 100, 50 or 20")
    )
    train_size: int | None = dataclasses.field(
        default=None, metadata=flag("data", "train on a stratified subset of this many images")
    )
    samples_per_class: int | None = dataclasses.field(
        default=None,
        metadata=flag(
            "data",
            "low-data CIFAR(X) of the HDKD paper: train on X seeded images of every class, taken after "
            "the validation hold-out",
            metavar="X",
        ),
    )
    meta_split_size: int | None = dataclasses.field(default=None, metadata=NO_FLAG)
    # model and method
    model: str = dataclasses.field(
        default="multiexit_cnn", metadata=flag("model and method", "architecture preset (see `keras-ee models`)")
    )
    model_options: dict = dataclasses.field(
        default_factory=dict,
        metadata=flag(
            "model and method",
            "a keyword override of the preset (widths, blocks, ...), VALUE read as JSON where it parses (repeatable)",
            name="--model-option",
            metavar="KEY=VALUE",
        ),
    )
    method: str = dataclasses.field(
        default="l2w",
        metadata=flag(
            "model and method",
            _method_help,
            method_options=(
                MethodOptionFlag(
                    "q",
                    float,
                    "shorthand for --method-option q=Q (L2W's meta-data allocation budget)",
                    "model and method",
                ),
                MethodOptionFlag(
                    "delta",
                    float,
                    "shorthand for --method-option delta=DELTA (L2W's weight perturbation)",
                    "model and method",
                ),
            ),
        ),
    )
    method_options: dict = dataclasses.field(
        default_factory=dict,
        metadata=flag(
            "model and method",
            "an option of the method, converted to its declared type (repeatable); reference=code: the "
            "authors' code's settings (see `keras-ee methods`)",
            name="--method-option",
            metavar="KEY=VALUE",
        ),
    )
    # optimization
    epochs: int = dataclasses.field(
        default=20,
        metadata=flag(
            "optimization",
            "epochs (of phase I for a method with phases, e.g. IMTA)",
            method_options=(
                MethodOptionFlag(
                    "phase2_epochs",
                    int,
                    "shorthand for --method-option phase2_epochs=N (IMTA's phase II; default 0.6 x --epochs)",
                    "optimization",
                ),
            ),
        ),
    )
    batch_size: int = dataclasses.field(
        default=64, metadata=flag("optimization", "the batch of one step; under --strategy the global batch")
    )
    optimizer: str = dataclasses.field(
        default="sgd",
        metadata=flag(
            "optimization",
            "sgd (default, the papers': torch.optim.SGD's step, L2 weight decay added to the "
            "gradient before momentum, on every variable) or adamw (torch.optim.AdamW's step, epsilon "
            "1e-8, no weight decay on biases and BatchNorm parameters); keras_sgd and keras_adamw are "
            "Keras' own (decoupled weight decay). A run made before keras-ee took PyTorch's steps "
            "resumes with Keras' optimizer",
        ),
    )
    learning_rate: float | None = dataclasses.field(
        default=None,
        metadata=flag(
            "optimization",
            "learning rate after the warm-up; default sgd: 0.1 * batch_size / 64, adamw: 5e-4 * "
            "batch_size / 512 (DeiT's rule)",
            name="--lr",
        ),
    )
    schedule: str = dataclasses.field(
        default="cosine",
        metadata=flag(
            "optimization",
            "the learning rate over each phase: cosine_per_batch (per loaded batch, all of its optimizer "
            "steps at one rate: L2W-DEN's code, MSDNet-PyTorch's --lr-type cosine; after a warm-up the "
            "budget-aware code's arrays), step_per_epoch (x0.1 from epoch 0.5E, x0.01 from 0.75E: "
            "MSDNet-PyTorch's and IMTA's --lr-type multistep), cosine (default: Keras' CosineDecay over "
            "optimizer steps), step (x0.1 after 50%% and 75%% of the optimizer steps) or constant",
            choices=SCHEDULES,
        ),
    )
    warmup_epochs: int = dataclasses.field(
        default=0,
        metadata=flag(
            "optimization",
            "linear warm-up from 0 over N epochs, then the schedule (cosine, constant or cosine_per_batch; default 0)",
            metavar="N",
        ),
    )
    min_learning_rate: float = dataclasses.field(
        default=0.0,
        metadata=flag(
            "optimization",
            "the rate cosine_per_batch ends at (the budget-aware code's --min_lr 1e-6; default 0)",
            name="--min-lr",
        ),
    )
    momentum: float = dataclasses.field(default=0.9, metadata=flag("optimization", "SGD momentum (default 0.9)"))
    nesterov: bool = dataclasses.field(
        default=False, metadata=flag("optimization", "Nesterov momentum (SGD; needs a momentum > 0)")
    )
    weight_decay: float | None = dataclasses.field(
        default=None, metadata=flag("optimization", "default sgd: 1e-4, adamw: 0.05")
    )
    seed: int = dataclasses.field(
        default=0, metadata=flag("optimization", "seeds the data splits, shuffling, augmentation and initialization")
    )
    # the training recipe: flat keys on the command line and in config.json (`setting_keys`)
    recipe: RecipeConfig = dataclasses.field(
        default_factory=RecipeConfig,
        metadata=flag(
            "training recipe",
            _recipe_help,
            choices=tuple(sorted(RECIPES)),
        ),
    )
    # devices
    strategy: str = dataclasses.field(
        default="none",
        metadata=flag(
            "devices",
            "none (default: one device), mirrored (MirroredStrategy: every GPU of this machine), "
            "multi_worker (MultiWorkerMirroredStrategy: the cluster in TF_CONFIG; only the chief writes "
            "--out) or tpu (TPUStrategy)",
            choices=STRATEGIES,
        ),
    )
    precision: str = dataclasses.field(
        default="float32",
        metadata=flag(
            "devices",
            "Keras dtype policy of the model (default float32); mixed_float16 adds loss scaling",
            choices=PRECISIONS,
        ),
    )
    sync_batchnorm: bool = dataclasses.field(
        default=False,
        metadata=flag(
            "devices",
            "BatchNorm statistics of the global batch (all-reduced over the replicas) instead of each replica's own",
        ),
    )
    # evaluation
    confidence: str = dataclasses.field(
        default="max_softmax",
        metadata=flag("evaluation", "confidence score of the calibrated thresholds", choices=CONFIDENCES),
    )
    budgets: list = dataclasses.field(
        default_factory=list,
        metadata=flag(
            "evaluation",
            "log validation accuracy at this Mul-Add budget every epoch (repeatable)",
            name="--budget",
            parse=_mul_adds,
        ),
    )
    evaluate: bool = dataclasses.field(
        default=True, metadata=flag("evaluation", "skip the budget evaluation after training")
    )
    dump_dtype: str = dataclasses.field(default="float32", metadata=NO_FLAG)

    def __post_init__(self) -> None:
        v.check_train_config(self)
        if self.weight_decay is None:  # stored resolved
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]

    @property
    def initial_learning_rate(self) -> float:
        """The learning rate after the warm-up: `learning_rate`, or the optimizer's rule."""
        if self.learning_rate is not None:
            return self.learning_rate
        if self.optimizer in ("adamw", "keras_adamw"):
            return 5e-4 * self.batch_size / 512
        return 0.1 * self.batch_size / 64

    def to_dict(self) -> dict[str, Any]:
        """The settings under their flat keys (`setting_keys`): what config.json holds."""
        return {
            s.key: copy.deepcopy(getattr(self if s.parent is None else getattr(self, s.parent), s.key))
            for s in settings()
            if not s.nested
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from flat keys (`to_dict`, a config file); an unknown key is refused, naming the known."""
        by_key = {s.key: s for s in settings() if not s.nested}
        unknown = sorted(set(values) - set(by_key))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(by_key)}.")
        own: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {s.key: {} for s in settings() if s.nested}
        for key, value in values.items():
            parent = by_key[key].parent
            (own if parent is None else nested[parent])[key] = value
        types = {s.key: s.type for s in settings() if s.nested}
        return cls(**own, **{name: types[name](**fields) for name, fields in nested.items()})

    def to_json(self, path: StrPath) -> None:
        from keras_ee.atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_file(cls, path: StrPath) -> TrainConfig:
        """Read a `.json` or `.toml` config file."""
        values = cls.read_values(path)
        try:
            return cls.from_dict(values)
        except (ValueError, TypeError) as e:
            raise ValueError(f"config file {str(path)!r}: {e}") from None

    @classmethod
    def read_values(cls, path: StrPath) -> dict:
        """The settings a `.json` or `.toml` config file holds, as written (not validated)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist.")
        try:
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not a text file ({e.reason}).") from None
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # tomllib is new in Python 3.11; tomli is the same parser for 3.10
                import tomli as tomllib

            try:
                values = tomllib.loads(text)
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"config file {str(path)!r} is not valid TOML ({e}).") from None
        else:
            try:
                values = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"config file {str(path)!r} is not valid JSON ({e}); use .json or .toml.") from None
        if not isinstance(values, dict):
            raise ValueError(
                f"config file {str(path)!r} must hold a mapping of settings; received {type(values).__name__}."
            )
        return values

    def differences(self, other: TrainConfig) -> dict:
        """Keys whose values differ: {key: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


# ------------------------------------------------------------------ the settings as a flat namespace


@dataclasses.dataclass(frozen=True)
class Setting:
    """One field of `TrainConfig`, or of a settings dataclass nested in it (the recipe).

    Args:
        key: the field's name: its key in config.json and a config file, the flag's dest.
        type: the value's type without None: `int`, `float`, `str`, `bool`, `list`, `dict`,
            or the nested dataclass (`RecipeConfig`) for a nested field.
        default: its default value.
        flag: its command line (`Flag`), None for none.
        parent: the nested field that holds it (`"recipe"`), None for `TrainConfig`'s own.
    """

    key: str
    type: type
    default: Any
    flag: Flag | None
    parent: str | None = None

    @property
    def nested(self) -> bool:
        """Whether this is a nested settings field (its own fields are the settings)."""
        return dataclasses.is_dataclass(self.type)

    @property
    def flag_name(self) -> str | None:
        """The flag: `Flag.name`, else `--` and the key with dashes (`--no-` before a bool that defaults to true)."""
        if self.flag is None:
            return None
        negated = "no-" if self.type is bool and self.default else ""
        return self.flag.name or f"--{negated}{self.key.replace('_', '-')}"


@functools.cache
def settings() -> tuple[Setting, ...]:
    """Every field in `TrainConfig`'s order, a nested field followed by its own fields."""

    def of(cls: type, parent: str | None) -> Iterator[Setting]:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] or [hints[f.name]]
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            setting = Setting(f.name, typing.get_origin(kinds[0]) or kinds[0], default, f.metadata[FLAG], parent)
            yield setting
            if setting.nested:
                yield from of(setting.type, f.name)

    return tuple(of(TrainConfig, None))


def setting_keys() -> tuple[str, ...]:
    """The flat keys of config.json and config files: every setting but the nested fields themselves."""
    return tuple(s.key for s in settings() if not s.nested)
