"""The settings of one training run, kept apart from the code that runs it.

A `TrainConfig` is what `keras_ee.experiment.train(config, workdir)` consumes and what a
run folder's `config.json` holds. It round-trips through JSON, and `--config FILE` on the
command line reads the same keys from a `.json` or `.toml` file.

Example:

    cfg = TrainConfig(dataset="cifar100", data_dir="../shared/data", model="msdnet_cifar_5",
                      method="l2w", method_options={"q": 0.75, "delta": 0.8}, epochs=300,
                      batch_size=64)
    cfg.to_json("cfg.json"); TrainConfig.from_file("cfg.json") == cfg  # True
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

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


# The training recipe of "Balancing Accuracy and Efficiency in Budget-Aware Early-Exiting
# Neural Networks" (timm's DeiT-style recipe), as TrainConfig values: `--recipe budget-aware`.
RECIPES = {
    "budget-aware": {
        "mixup": 0.8,
        "cutmix": 1.0,
        "randaugment": 9.0,
        "randaugment_std": 0.5,
        "randaugment_ops": 2,
        "random_erasing": 0.25,
        "color_jitter": 0.4,
        "label_smoothing": 0.1,
        "ema": 0.9999,
    },
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


def recipe_values(name: str, dataset: str = "digits") -> dict:
    """The TrainConfig values a named recipe sets for `dataset` (ImageNet adds its optimizer)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; expected one of {sorted(RECIPES)}.")
    values: dict[str, object] = dict(RECIPES[name])
    if dataset == "imagenet":
        values.update(RECIPE_IMAGENET_OPTIMIZER.get(name, {}))
    return values


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run.

    Args:
        dataset: a name from `keras_ee.data.available()` or `npz:PATH`; default the
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

    dataset: str = "digits"
    data_dir: str | None = None
    val_size: int | None = None
    imbalance_factor: int | None = None
    train_size: int | None = None
    samples_per_class: int | None = None
    meta_split_size: int | None = None
    model: str = "multiexit_cnn"
    model_options: dict = dataclasses.field(default_factory=dict)
    method: str = "l2w"
    method_options: dict = dataclasses.field(default_factory=dict)
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float | None = None
    schedule: str = "cosine"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | None = None
    optimizer: str = "sgd"
    warmup_epochs: int = 0
    min_learning_rate: float = 0.0
    ema: float | None = None
    label_smoothing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0
    randaugment: float | None = None
    randaugment_std: float = 0.5
    randaugment_ops: int = 2
    random_erasing: float = 0.0
    color_jitter: float = 0.0
    seed: int = 0
    confidence: str = "max_softmax"
    budgets: list = dataclasses.field(default_factory=list)
    evaluate: bool = True
    dump_dtype: str = "float32"
    strategy: str = "none"
    precision: str = "float32"
    sync_batchnorm: bool = False

    def __post_init__(self) -> None:
        def bad(field: str, expected: str) -> None:
            value = getattr(self, field)
            raise ValueError(f"config `{field}` must be {expected}; received {value!r} ({type(value).__name__}).")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_number(v: object) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for field in (
            "dataset",
            "model",
            "method",
            "schedule",
            "confidence",
            "dump_dtype",
            "optimizer",
            "strategy",
            "precision",
        ):
            if not isinstance(getattr(self, field), str):
                bad(field, "a string")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            bad("data_dir", "a folder path (string) or None")
        for field in ("nesterov", "evaluate", "sync_batchnorm"):
            if not isinstance(getattr(self, field), bool):
                bad(field, "true or false")
        if not is_int(self.epochs) or self.epochs < 1:
            bad("epochs", "a positive integer")
        if not is_int(self.batch_size) or self.batch_size < 2:
            bad("batch_size", "an integer >= 2")
        if not is_int(self.seed):
            bad("seed", "an integer")
        for field in ("val_size", "train_size", "meta_split_size"):
            v = getattr(self, field)
            if v is not None and not (is_int(v) and v >= 1 or is_number(v) and isinstance(v, float) and 0 < v < 1):
                bad(field, "a positive integer count, a fraction in (0, 1), or None")
        if self.samples_per_class is not None and not (is_int(self.samples_per_class) and self.samples_per_class >= 1):
            bad("samples_per_class", "a positive integer (training images per class) or None")
        if self.samples_per_class is not None and self.train_size is not None:
            bad(
                "samples_per_class",
                f"None when `train_size` is set (received train_size={self.train_size!r}); use one of the two",
            )
        if self.imbalance_factor is not None and not (is_number(self.imbalance_factor) and self.imbalance_factor >= 1):
            bad("imbalance_factor", "a number >= 1 (200, 100, 50, 20) or None")
        if self.learning_rate is not None and not (is_number(self.learning_rate) and self.learning_rate > 0):
            bad("learning_rate", "a positive number or None")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {SCHEDULES}")
        if not is_number(self.momentum) or not 0 <= self.momentum < 1:
            bad("momentum", "a number in [0, 1)")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"one of {OPTIMIZERS}")
        if self.nesterov and self.momentum == 0 and self.optimizer == "sgd":
            bad("nesterov", "false when momentum is 0 (Nesterov needs momentum, as torch.optim.SGD)")
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "a number >= 0 (or None: 1e-4 for sgd, 0.05 for adamw)")
        if not is_int(self.warmup_epochs) or self.warmup_epochs < 0:
            bad("warmup_epochs", "an integer >= 0")
        if self.warmup_epochs and self.schedule not in WARMUP_SCHEDULES:
            bad(
                "warmup_epochs", f"0 with schedule {self.schedule!r} (warm-up works with {', '.join(WARMUP_SCHEDULES)})"
            )
        if not is_number(self.min_learning_rate) or self.min_learning_rate < 0:
            bad("min_learning_rate", "a number >= 0")
        if self.min_learning_rate and self.schedule != "cosine_per_batch":
            bad("min_learning_rate", f"0 with schedule {self.schedule!r} (a final rate is cosine_per_batch's)")
        if self.ema is not None and not (is_number(self.ema) and 0 < self.ema < 1):
            bad("ema", "a momentum in (0, 1), e.g. 0.9999, or None")
        if not is_number(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            bad("label_smoothing", "a number in [0, 1)")
        for field in ("mixup", "cutmix"):
            if not is_number(getattr(self, field)) or getattr(self, field) < 0:
                bad(field, "a Beta alpha >= 0 (0: off)")
        if self.randaugment is not None and not (is_number(self.randaugment) and 0 <= self.randaugment <= 10):
            bad("randaugment", "a magnitude in [0, 10] (timm's scale), or None")
        if not is_number(self.randaugment_std) or self.randaugment_std < 0:
            bad("randaugment_std", "a number >= 0")
        if not is_int(self.randaugment_ops) or self.randaugment_ops < 1:
            bad("randaugment_ops", "a positive integer")
        if not is_number(self.random_erasing) or not 0 <= self.random_erasing <= 1:
            bad("random_erasing", "a probability in [0, 1]")
        if not is_number(self.color_jitter) or not 0 <= self.color_jitter < 1:
            bad("color_jitter", "a strength in [0, 1) (0: off)")
        if self.confidence not in CONFIDENCES:
            bad("confidence", f"one of {CONFIDENCES}")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"one of {STRATEGIES}")
        if self.precision not in PRECISIONS:
            bad("precision", f"one of {PRECISIONS}")
        if self.dump_dtype not in ("float32", "float16"):
            bad("dump_dtype", "'float32' or 'float16'")
        if not isinstance(self.model_options, dict):
            bad("model_options", "a dict")
        if not isinstance(self.method_options, dict):
            bad("method_options", "a dict")
        if not isinstance(self.budgets, list) or any(not is_number(b) or b <= 0 for b in self.budgets):
            bad("budgets", "a list of positive, finite Mul-Add counts")

    @property
    def initial_learning_rate(self) -> float:
        """The learning rate after the warm-up: `learning_rate`, or the optimizer's rule."""
        if self.learning_rate is not None:
            return self.learning_rate
        if self.optimizer in ("adamw", "keras_adamw"):
            return 5e-4 * self.batch_size / 512
        return 0.1 * self.batch_size / 64

    @property
    def augmentation_recipe(self) -> dict:
        """The recipe keys that shape the training batches (for `keras_ee.data.recipe.Recipe`)."""
        return {
            k: getattr(self, k)
            for k in (
                "label_smoothing",
                "mixup",
                "cutmix",
                "randaugment",
                "randaugment_std",
                "randaugment_ops",
                "random_erasing",
                "color_jitter",
            )
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}.")
        return cls(**values)

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
