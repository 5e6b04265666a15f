"""`keras-ee import`: an authors' checkpoint as a run folder like a trained one.

The folder holds `model.keras` (a `MultiExitModel` with the `baseline` method, loadable in safe
mode), `costs.json` (exact per-exit costs), `preprocessing.json` (the authors' input
normalisation for the dataset), `config.json` (a `TrainConfig` naming the preset, its options and
the dataset), `state.json` (`trained: true`, so `train` never overwrites the imported weights)
and `import.json` (the source file and its sha256, the serialisation, the architecture found,
tensor counts, what was ignored). Every file is written atomically under the run's lock.
"""

from __future__ import annotations

from pathlib import Path

# The authors' normalisation (torchvision ToTensor, i.e. pixels / 255, then Normalize).
AUTHORS_NORMALISATION = {
    "cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
IMPORT_FILE = "import.json"


def guess_dataset(report) -> str:
    """The dataset the authors' code trained a network of this layout on."""
    if report.model_options.get("stem") == "imagenet" or report.preset.startswith("msdnet_imagenet"):
        return "imagenet"
    if report.num_classes in (10, 100):
        return f"cifar{report.num_classes}"
    raise ValueError(
        f"cannot tell the dataset of a {report.num_classes}-class {report.family} checkpoint; pass --dataset "
        f"(one of {sorted(AUTHORS_NORMALISATION)})"
    )


def import_run(checkpoint, out, model=None, model_options=None, dataset=None) -> Path:
    """Writes the run folder `out` for the checkpoint (see the module docstring).

    Args:
        checkpoint: a `torch.save` file of MSDNet or RANet (see `import_torch_checkpoint`).
        out: a new run folder (or an empty one).
        model: None to infer the architecture, or a preset name that `model_options` override.
        model_options: dict of builder arguments.
        dataset: `cifar10`, `cifar100` or `imagenet` (the normalisation); default from the
            checkpoint (ImageNet stem, or 10 / 100 classes).

    Returns:
        The run folder.
    """
    from keras_ee import costs, experiment, runs, training
    from keras_ee.atomic import atomic_path, atomic_write_json
    from keras_ee.config import TrainConfig
    from keras_ee.interop.torch_import import import_torch_checkpoint

    out = experiment.check_out_folder(out)
    if experiment.run_started(out):
        raise ValueError(f"--out {str(out)!r} already holds a run; import into a new folder")
    if dataset is not None and dataset not in AUTHORS_NORMALISATION:
        raise ValueError(
            f"--dataset {dataset!r}: the authors' normalisation is known for {sorted(AUTHORS_NORMALISATION)}"
        )
    backbone, report = import_torch_checkpoint(checkpoint, model, **dict(model_options or {}))
    dataset = dataset or guess_dataset(report)
    options = {k: v for k, v in report.model_options.items() if k not in ("num_classes", "input_shape")}
    config = TrainConfig(dataset=dataset, model=report.preset, model_options=options)
    mean, std = AUTHORS_NORMALISATION[dataset]
    model_wrapped = training.MultiExitModel(backbone, method=training.Baseline())
    model_wrapped.compile(optimizer="sgd")
    exit_costs = costs.exit_costs(backbone)
    out.mkdir(parents=True, exist_ok=True)
    with runs.RunLock(out):
        if experiment.run_started(out):  # another command got there first
            raise ValueError(f"--out {str(out)!r} already holds a run; import into a new folder")
        runs.check_free_space(out, int(runs.variable_bytes(model_wrapped) * 1.5) + (4 << 20), experiment.MODEL_FILE)
        with atomic_path(out / experiment.MODEL_FILE) as tmp:
            model_wrapped.save(tmp)
        atomic_write_json(out / "costs.json", exit_costs)
        atomic_write_json(
            out / experiment.PREPROCESSING_FILE, {"pixel_scale": 1.0 / 255.0, "mean": list(mean), "std": list(std)}
        )
        config.to_json(out / experiment.CONFIG_FILE)
        atomic_write_json(out / IMPORT_FILE, {**report.to_json(), "dataset": dataset})
        atomic_write_json(out / experiment.STATE_FILE, {"trained": True, "imported": True})
    return out
