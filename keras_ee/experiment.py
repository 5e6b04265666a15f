"""One training run, start to finish: `train(config, workdir)` and `evaluate_run(workdir)`.

A run folder holds:

    config.json          the TrainConfig (a rerun with other settings is refused)
    model.keras          the trained MultiExitModel (custom objects registered)
    history.csv          per-epoch logs (loss and accuracy of every exit, WPN weight stats)
    tensorboard/         TensorBoard logs
    costs.json           per-exit cumulative params and Mul-Adds
    dump/                validation and test logits in the calibrator's dump format
    l2w_samples.npz      per-sample (loss, confidence, weight) of an L2W run (Figure 8)
    wpn.npz              an L2W run's WPN, to reuse frozen: --method-option weighting=frozen
                         --method-option wpn_weights_path=RUN/wpn.npz
    eval/                anytime.csv, budget.csv, budget.png (after evaluation)
    backup/              BackupAndRestore state while training; gone when training ends
    state.json           whether training finished, and how long it took

Interrupting `train` (Ctrl-C, a killed job) loses at most the current epoch: running the
same command again restores the model, both optimizers and the epoch counter from
`backup/` and continues.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from keras_ee.config import TrainConfig

STATE_FILE = "state.json"


def _read_state(workdir: Path) -> dict:
    f = workdir / STATE_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def _write_state(workdir: Path, **values) -> None:
    state = _read_state(workdir)
    state.update(values)
    (workdir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


def prepare_workdir(config: TrainConfig, workdir) -> Path:
    """Create the run folder, or check that an existing one holds the same run."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    saved = workdir / "config.json"
    if saved.is_file():
        previous = TrainConfig.from_file(saved)
        diff = previous.differences(config)
        if diff:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ValueError(
                f"{str(workdir)!r} already holds a run with other settings ({lines}). Use a new --out folder, "
                "or the same settings to resume it."
            )
    else:
        config.to_json(saved)
    return workdir


def build_model(config: TrainConfig, splits):
    """The backbone preset wrapped in a compiled `MultiExitModel` with the configured method."""
    import keras

    from keras_ee import models, training

    backbone = models.create(config.model, num_classes=splits.num_classes, input_shape=splits.input_shape,
                             **config.model_options)
    method = make_method(config.method, config.method_options)
    model = training.MultiExitModel(backbone, method=method)
    steps = config.epochs * _batches_per_epoch(splits, config) * method.optimizer_steps_per_batch
    model.compile(optimizer=keras.optimizers.SGD(
        learning_rate=make_schedule(config, steps), momentum=config.momentum, nesterov=config.nesterov,
        weight_decay=config.weight_decay or None))
    return model


def load_data(config: TrainConfig):
    """The configured dataset's splits."""
    from keras_ee import data

    return data.load(config.dataset, data_dir=config.data_dir, val_size=config.val_size, seed=config.seed,
                     imbalance_factor=config.imbalance_factor, train_size=config.train_size)


def make_method(name: str, options: dict):
    """The training method called `name` with keyword `options`."""
    from keras_ee import training

    methods = {"baseline": training.Baseline, "l2w": training.L2W}
    if name not in methods:
        raise ValueError(f"unknown training method {name!r}; available: {sorted(methods)}.")
    try:
        return methods[name](**options)
    except (TypeError, ValueError) as e:  # say which method refused which option
        raise ValueError(f"bad options for method {name!r}: {e}") from e


def _batches_per_epoch(splits, config: TrainConfig) -> int:
    return -(-splits.num_train // config.batch_size)


def make_schedule(config: TrainConfig, total_steps: int):
    """The learning-rate schedule over optimizer iterations."""
    import keras

    lr = config.initial_learning_rate
    if config.schedule == "constant":
        return lr
    if config.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, total_steps))
    bounds = [max(1, int(total_steps * 0.5)), max(2, int(total_steps * 0.75))]
    return keras.optimizers.schedules.PiecewiseConstantDecay(bounds, [lr, lr * 0.1, lr * 0.01])


def train(config: TrainConfig, workdir, verbose: int | str = "progress", callbacks=()) -> Path:
    """Train (or resume) a run in `workdir`, then dump logits and, if configured, evaluate.

    Args:
        config: the run's settings.
        workdir: the run folder (created; an existing one with the same settings resumes).
        verbose: "progress" (a compact bar and one line per epoch), or a Keras `fit`
            verbosity (0 silent, 1 Keras' bar, 2 one line per epoch).
        callbacks: extra Keras callbacks.

    Returns:
        The run folder.
    """
    import keras

    from keras_ee import callbacks as ee_callbacks
    from keras_ee import costs as ee_costs
    from keras_ee import dumps

    workdir = prepare_workdir(config, workdir)
    keras.utils.set_random_seed(config.seed)
    splits = load_data(config)
    state = _read_state(workdir)
    if state.get("trained") and (workdir / "model.keras").is_file():
        print(f"[keras-ee] {workdir}: training already finished; loading model.keras.")
        from keras_ee import models, training  # noqa: F401  (registers the custom classes for loading)

        model = keras.saving.load_model(workdir / "model.keras")
    else:
        model = build_model(config, splits)
        val_ds = splits.val_dataset(config.batch_size)
        cbs = []
        if config.budgets:
            cbs.append(ee_callbacks.BudgetCallback(val_ds, budgets=config.budgets))
        cbs += [
            keras.callbacks.BackupAndRestore(str(workdir / "backup")),
            keras.callbacks.CSVLogger(str(workdir / "history.csv"), append=True),
            keras.callbacks.TensorBoard(str(workdir / "tensorboard"), write_graph=False),
            *callbacks,
        ]
        if verbose == "progress":
            cbs.append(ee_callbacks.EpochProgress())
            verbose = 0
        start = time.perf_counter()
        model.fit(splits.train_dataset(config.batch_size, seed=config.seed), validation_data=val_ds,
                  epochs=config.epochs, callbacks=cbs, verbose=verbose, shuffle=False)  # the pipeline shuffles
        model.save(workdir / "model.keras")
        _write_state(workdir, trained=True, train_seconds=round(time.perf_counter() - start, 1))

    backbone = model.backbone
    exit_costs = ee_costs.exit_costs(backbone)
    (workdir / "costs.json").write_text(json.dumps(exit_costs, indent=2) + "\n")
    dtype = np.dtype(config.dump_dtype)
    val_logits, val_labels = ee_callbacks.predict_exit_logits(model, splits.val_dataset(256))
    test_logits, test_labels = ee_callbacks.predict_exit_logits(model, splits.test_dataset(256))
    dumps.save_dump(workdir / "dump", val_logits.astype(dtype), val_labels, test_logits.astype(dtype),
                    test_labels, costs={**exit_costs, "rule": "reference"})
    if getattr(model.method, "uses_wpn", False):  # for the frozen-WPN ablation: weighting="frozen"
        model.method.save_wpn(workdir / "wpn.npz")
    if hasattr(model.method, "sample_statistics"):
        stats = model.method.sample_statistics(model, splits.train_dataset(256, augment=False, shuffle=False))
        np.savez_compressed(workdir / "l2w_samples.npz", **stats)
    if config.evaluate:
        evaluate_run(workdir, kind=config.confidence)
    return workdir


def evaluate_run(workdir, kind: str = "max_softmax", qs=None, mode: str = "geometric", echo: bool = True):
    """Anytime accuracy and budget sweep of a run's dump into `workdir/eval/`; prints the tables."""
    from keras_ee import dumps, evaluation

    workdir = Path(workdir)
    dump = dumps.load_dump(workdir / "dump")
    ev = evaluation.evaluate_dump(dump, kind=kind, qs=qs, mode=mode, name=workdir.name)
    paths = evaluation.write_evaluation(ev, workdir / "eval", title=_title(workdir))
    if echo:
        print(f"\nAnytime prediction (each exit on the whole test set), {workdir}:")
        print(evaluation.format_anytime(ev))
        print(f"\nBudgeted batch classification (thresholds calibrated on validation, {kind}):")
        print(evaluation.format_budget(ev, every=2))
        print(f"\nwrote {paths['anytime']}, {paths['budget']}, {paths['plot']}")
    return ev


def _title(workdir: Path) -> str | None:
    cfg = workdir / "config.json"
    if not cfg.is_file():
        return None
    c = TrainConfig.from_file(cfg)
    return f"{c.model} / {c.method} on {c.dataset}"
