"""`keras-ee import`: an authors' checkpoint as a run folder like a trained one.

The folder holds `model.keras` (a `MultiExitModel` with the `baseline` method, or for IMTA's phase-
II checkpoints the `imta` method in phase II with its teacher, for L2W-DEN's the `l2w` method with
its WPN, for gphi_MSDNet's the `gating` method with its gaters; loadable in safe mode), `costs.json`
(exact per-exit costs), `preprocessing.json` (the authors' input normalisation for the dataset),
`config.json` (a `TrainConfig` naming the preset, its options and the dataset), `state.json`
(`trained: true`, so `train` never overwrites the imported weights) and `import.json` (the source
file and its sha256, the serialisation, the architecture found, tensor counts, what was ignored).
Every file is written atomically under the run's lock.

`dump_imported_run` (`keras-ee evaluate RUN --dataset ... --data-dir ...`) then writes the run's
`dump/`: the logits of every exit on a hold-out of the dataset's training split and on its test set,
with the run's own normalisation (the authors'), and for a `gating` run the gaters' scores of that
dump (`scores/gater.npz`, `--confidence gater`), so that `evaluate`, `predict`,
`EarlyExitModel.from_run` and `export` work on it as on a trained run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keras_ee.run_folder import (
    CONFIG_FILE,
    MODEL_FILE,
    PREPROCESSING_FILE,
    RECORDED_MODEL_OPTIONS,
    STATE_FILE,
    RunFolder,
    check_out_folder,
    run_started,
)

if TYPE_CHECKING:
    from keras_ee.inputs import Preprocessing
    from keras_ee.interop.torch_import import ImportReport

# The authors' normalisation (torchvision ToTensor, i.e. pixels / 255, then Normalize).
AUTHORS_NORMALISATION = {
    "cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMPORT_FILE = "import.json"
WPN_FILE = "wpn.npz"  # an L2W-DEN checkpoint's WPN, as `L2W.save_wpn` writes it


def guess_dataset(report: ImportReport) -> str:
    """The dataset the authors' code trained a network of this layout on."""
    if report.model_options.get("stem") == "imagenet" or report.preset.startswith("msdnet_imagenet"):
        return "imagenet"
    if report.num_classes in (10, 100):
        return f"cifar{report.num_classes}"
    raise ValueError(
        f"cannot tell the dataset of a {report.num_classes}-class {report.family} checkpoint; pass --dataset "
        f"(one of {sorted(AUTHORS_NORMALISATION)})"
    )


def import_run(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    model: str | None = None,
    model_options: dict[str, Any] | None = None,
    dataset: str | None = None,
    wpn_input: str | None = None,
) -> Path:
    """Writes the run folder `out` for the checkpoint (see the module docstring).

    Args:
        checkpoint: a `torch.save` file of MSDNet or RANet (see `import_torch_checkpoint`).
        out: a new run folder (or an empty one).
        model: None to infer the architecture, or a preset name that `model_options` override.
        model_options: dict of builder arguments.
        dataset: `cifar10`, `cifar100` or `imagenet` (the normalisation); default from the
            checkpoint (ImageNet stem, or 10 / 100 classes).
        wpn_input: an L2W-DEN checkpoint's WPN input, `"loss"` (default) or `"confidence"`.

    Returns:
        The run folder.
    """
    from keras_ee import costs, inputs, runs, training
    from keras_ee.atomic import atomic_path, atomic_write_json
    from keras_ee.config import TrainConfig
    from keras_ee.interop.torch_import import read_checkpoint_into_model

    out = check_out_folder(out)
    if run_started(out):
        raise ValueError(f"--out {str(out)!r} already holds a run; import into a new folder")
    if dataset is not None and dataset not in AUTHORS_NORMALISATION:
        raise ValueError(
            f"--dataset {dataset!r}: the authors' normalisation is known for {sorted(AUTHORS_NORMALISATION)}"
        )
    backbone, report, method, method_state = read_checkpoint_into_model(
        checkpoint, model, wpn_input=wpn_input, **dict(model_options or {})
    )
    dataset = dataset or guess_dataset(report)
    options = {k: v for k, v in report.model_options.items() if k not in ("num_classes", "input_shape")}
    options = {**RECORDED_MODEL_OPTIONS, **options}  # as a run records them (the authors' BN: unbiased)
    config = TrainConfig(
        dataset=dataset,
        model=report.preset,
        model_options=options,
        method=report.method,
        method_options=dict(report.method_options),
    )
    mean, std = AUTHORS_NORMALISATION[dataset]
    # IMTA: the phase-II model (its transform is already in `backbone`), with the phase-I last
    # classifier as the distillation teacher, so that a run could continue phase II.
    model_wrapped = training.MultiExitModel(backbone, method=method or training.Baseline(), transform_backbone=False)
    teacher = method_state.get("teacher")
    if teacher is not None and getattr(model_wrapped.method, "distillation", False):
        model_wrapped.method.teacher_kernel.assign(teacher[0])
        model_wrapped.method.teacher_bias.assign(teacher[1])
    # L2W-DEN: the imported WPN in the run's L2W (and as wpn.npz, `L2W(wpn_weights_path=...)`'s file).
    imported_wpn = method_state.get("wpn")
    if imported_wpn is not None:
        for variable, value in zip(model_wrapped.method.wpn.weights, imported_wpn.weights, strict=True):
            variable.assign(value)
    # gphi_MSDNet: the imported gaters in the run's BudgetAwareGating (saved with it in model.keras).
    imported_gater = method_state.get("gater")
    if imported_gater is not None:
        for variable, value in zip(model_wrapped.method.gater.weights, imported_gater.weights, strict=True):
            variable.assign(value)
    model_wrapped.compile(optimizer="sgd")
    exit_costs = costs.exit_costs(backbone)
    out.mkdir(parents=True, exist_ok=True)
    with runs.RunLock(out):
        if run_started(out):  # another command got there first
            raise ValueError(f"--out {str(out)!r} already holds a run; import into a new folder")
        runs.check_free_space(out, int(runs.variable_bytes(model_wrapped) * 1.5) + (4 << 20), MODEL_FILE)
        with atomic_path(out / MODEL_FILE) as tmp:
            model_wrapped.save(tmp)
        atomic_write_json(out / "costs.json", exit_costs)
        if imported_wpn is not None:
            with atomic_path(out / WPN_FILE) as tmp:
                model_wrapped.method.save_wpn(tmp)
        # The authors' pipelines read 8-bit images (torchvision's ToTensor divides by 255): raw pixels
        # 0..255, the range `keras-ee predict` and EarlyExitModel check raw images against.
        preprocessing = inputs.Preprocessing(1.0 / 255.0, mean, std, pixel_range=(0.0, 255.0))
        atomic_write_json(out / PREPROCESSING_FILE, preprocessing.to_dict())
        config.to_json(out / CONFIG_FILE)
        atomic_write_json(out / IMPORT_FILE, {**report.to_json(), "dataset": dataset})
        atomic_write_json(out / STATE_FILE, {"trained": True, "imported": True})
    return out


def is_imported_run(run: str | os.PathLike[str]) -> bool:
    """Whether `run` is a folder written by `keras-ee import` (it holds `import.json`)."""
    return (Path(run) / IMPORT_FILE).is_file()


def _normalise_like_the_run(splits: Any, preprocessing: Preprocessing, dataset: str) -> None:
    """Makes `splits`' pipelines normalise as the run does (the authors' constants), after checking
    that the dataset stores pixels as the run expects them."""
    import numpy as np

    from keras_ee.data import imagenet
    from keras_ee.data.base import ArraySplits

    if isinstance(splits, imagenet.ImageNetSplits):
        same = np.allclose(preprocessing.mean, imagenet.MEAN, atol=1e-6) and np.allclose(
            preprocessing.std, imagenet.STD, atol=1e-6
        )
        if not same or abs(preprocessing.pixel_scale * 255.0 - 1.0) > 1e-6:
            raise ValueError(
                f"dataset {dataset!r}: keras-ee's ImageNet pipeline normalises with mean {imagenet.MEAN.tolist()} "
                f"and std {imagenet.STD.tolist()} of pixels / 255; the run's normalisation is "
                f"{preprocessing.to_dict()}"
            )
        return
    if not isinstance(splits, ArraySplits):
        raise ValueError(f"dataset {dataset!r}: an imported run is evaluated on in-memory datasets or ImageNet")
    if abs(splits.pixel_scale / preprocessing.pixel_scale - 1.0) > 1e-6:
        raise ValueError(
            f"dataset {dataset!r} stores pixels that are scaled by {splits.pixel_scale:g}; the run's normalisation "
            f"expects pixels scaled by {preprocessing.pixel_scale:g} (8-bit images, 0..255)"
        )
    if preprocessing.channels != splits.input_shape[-1]:
        raise ValueError(
            f"dataset {dataset!r} has {splits.input_shape[-1]} channels; the run's normalisation has "
            f"{preprocessing.channels}"
        )
    for part in ("val", "test"):
        warning = preprocessing.check_pixels(getattr(splits, f"_x_{part}"), what=f"dataset {dataset!r} ({part})")
        if warning:
            print(f"[keras-ee] warning: {warning}")
    splits.mean = np.asarray(preprocessing.mean, np.float32)
    splits.std = np.asarray(preprocessing.std, np.float32)


def dump_imported_run(
    run: str | os.PathLike[str],
    dataset: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    val_size: int | None = None,
    batch_size: int = 256,
) -> Path:
    """Writes an imported run's `dump/`: every exit's logits on a hold-out and on the test set.

    The hold-out is keras-ee's validation split of the dataset's training split (the one a
    trained run calibrates on; the authors may have trained on those images, so thresholds
    calibrated there can be optimistic). Images are normalised as the run's
    `preprocessing.json` says (the authors' constants), not with the dataset's statistics.
    `config.json` then names the dataset, `data_dir` and `val_size` the dump was made from.

    Args:
        run: a folder written by `keras-ee import`.
        dataset: a `keras_ee.data.load` name (default: the run's, from `config.json`).
        data_dir: where its files are (default: the run's, else the usual search folders).
        val_size: the hold-out's size (default: the dataset's).
        batch_size: images per forward pass.

    Returns:
        The dump folder.
    """
    import dataclasses

    from keras_ee import data, dumps, evaluation, inputs, runs
    from keras_ee.config import TrainConfig
    from keras_ee.training import BudgetAwareGating

    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder {str(run)!r} does not exist")
    if not is_imported_run(run):
        raise ValueError(
            f"{str(run)!r} is not a run written by `keras-ee import` (no {IMPORT_FILE}); a trained run is evaluated "
            "on the dump its training wrote, so --dataset, --data-dir and --val-size apply only to imported runs"
        )
    config = TrainConfig.from_file(run / CONFIG_FILE)
    config = dataclasses.replace(
        config,
        dataset=dataset or config.dataset,
        data_dir=config.data_dir if data_dir is None else str(data_dir),
        val_size=config.val_size if val_size is None else val_size,
    )
    preprocessing = inputs.Preprocessing.of_run(run)
    splits = data.load(config.dataset, data_dir=config.data_dir, val_size=config.val_size, seed=config.seed)
    _normalise_like_the_run(splits, preprocessing, config.dataset)
    with runs.RunLock(run):
        model = runs.load_run_model(run / MODEL_FILE)
        backbone = getattr(model, "backbone", model)
        shape = tuple(int(d) for d in backbone.inputs[0].shape[1:])
        classes = int(backbone.outputs[0].shape[-1])
        if tuple(splits.input_shape) != shape or splits.num_classes != classes:
            raise ValueError(
                f"dataset {config.dataset!r} has {splits.num_classes} classes of {tuple(splits.input_shape)} images; "
                f"the imported model takes {shape} images and has {classes} classes"
            )
        exit_costs = json.loads((run / "costs.json").read_text())
        val_logits, val_labels = evaluation.predict_exit_logits(model, splits.val_dataset(batch_size))
        test_logits, test_labels = evaluation.predict_exit_logits(model, splits.test_dataset(batch_size))
        out = dumps.save_dump(
            run / "dump", val_logits, val_labels, test_logits, test_labels, costs={**exit_costs, "rule": "reference"}
        )
        if isinstance(getattr(model, "method", None), BudgetAwareGating):  # gphi_MSDNet's gaters
            model.method.save_artifacts(model, splits, RunFolder(run))  # scores/gater.npz, for `--confidence gater`
        config.to_json(run / CONFIG_FILE)
    return out
