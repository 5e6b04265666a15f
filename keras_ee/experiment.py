"""One training run, start to finish: `train(config, workdir)`.

`train` reads top to bottom: check every setting, lock the folder (`_train_locked`), restore
the newest backup and fit every phase (`_fit`, `fit_run`), write the model and the run's files
(`_write_artifacts`), then evaluate (`keras_ee.evaluation.evaluate_run`). Below them: the
run's settings (`prepare_workdir`, `canonical_config`, `resumed_optimizer`), its model
(`build_model`, `compile_phase`), its training data (`training_data`) and EMA. The run
folder's files are `keras_ee.run_folder`, its lock, backups and history `keras_ee.runs`, the
strategies `keras_ee.distribute`. What a run can rely on:

- Every file is written atomically (temporary name, fsync, rename): a kill or a full
  disk leaves the previous complete file, never a torn one.
- Interrupting `train` (Ctrl-C, kill -9, a crash) loses at most the current epoch:
  running the same command again restores the model, every optimizer, the method's
  state and the epoch counter from `backup/` (falling back to an older backup, or to a
  fresh start, if a backup is damaged, and saying which) and continues. The data order
  and augmentation of an epoch are a function of (seed, epoch), so the resumed run ends
  bit-identical to an uninterrupted one (on CPU). `history.csv` never lists an epoch twice.
  A method with phases (IMTA) counts epochs on through its phases; a resumed run is first
  configured for the phase of the backup's last epoch (its trainable set and optimizer),
  then continues in that phase or starts the next.
- The backup is deleted only after `model.keras` and `state.json` are safely in place.
- One command at a time: a second `train` on the same folder is refused while the first
  runs (an OS lock, released when the process ends however it ends).
- Every setting is checked before the first write; a folder whose run never started
  (config only) is not a run, so a corrected command can use it.

Under a `tf.distribute` strategy (`config.strategy`, see `keras_ee.distribute`) the model, its
method and every optimizer are built under `strategy.scope()` and `fit` distributes the
global batches, which the replicas share evenly (`check_batch_size`; an epoch's last, smaller
batch is dropped, `drops_remainder`). Under `multi_worker` only the chief (worker 0, or the `chief` task) writes
the run folder; every other worker trains in a temporary folder of its own that is deleted
when it ends, and resumes from the chief's `backup/` (so the run folder must be on a
filesystem all workers share, as for Keras' `BackupAndRestore`). `state.json` records the
strategy's replica count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from keras_ee import data, dumps, models, runs, training
from keras_ee._typing import StrPath
from keras_ee.atomic import MARKER, atomic_path, atomic_write_json, claim_out_folder
from keras_ee.callbacks import BudgetCallback, EpochProgress
from keras_ee.config import RecipeConfig, TrainConfig, keras_optimizer_name, optimizer_name_semantics
from keras_ee.costs import exit_costs
from keras_ee.distribute import (
    apply_multi_worker_fit_workaround,
    dtype_policy,
    is_chief,
    make_strategy,
    needs_multi_worker_fit_workaround,
)
from keras_ee.evaluation import compare_confidences, evaluate_run, predict_exit_logits, run_score_kinds
from keras_ee.optimizers import KERAS_AUXILIARY_OPTIMIZERS, make_optimizer, optimizer_semantics
from keras_ee.run_folder import (
    BACKUP_DIR,
    CONFIG_FILE,
    DUMP_DIR,
    HISTORY_FILE,
    LEGACY_MODEL_OPTIONS,
    LOCK_FILE,
    MODEL_FILE,
    RECORDED_MODEL_OPTIONS,
    RunFolder,
    check_out_folder,
    recorded_config,
    resume_settings,
    run_started,
    write_preprocessing,
    write_state,
)
from keras_ee.training.methods import phase_of_epoch, phase_starts

if TYPE_CHECKING:
    from keras_ee.data import DatasetSplits
    from keras_ee.training import Method, MultiExitModel, Phase


def train(
    config: TrainConfig,
    workdir: StrPath,
    verbose: int | str = "progress",
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> Path:
    """Train (or resume) a run in `workdir`, then dump logits and, if configured, evaluate.

    Everything is validated before the first write; the folder is locked for the whole
    call (see the module docstring for what a run folder guarantees).

    Args:
        config: the run's settings.
        workdir: the run folder (created; an existing one with the same settings resumes).
        verbose: "progress" (a compact bar and one line per epoch), or a Keras `fit`
            verbosity (0 silent, 1 Keras' bar, 2 one line per epoch).
        callbacks: extra Keras callbacks.

    Returns:
        The run folder.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"`config` must be a TrainConfig; received {type(config).__name__}.")
    config = canonical_config(resume_settings(config, workdir))  # refuse bad options before any write
    workdir = prepare_workdir(config, workdir, write=False)
    strategy = make_strategy(config.strategy)
    check_batch_size(config, 1 if strategy is None else strategy.num_replicas_in_sync)
    if not is_chief(strategy):
        _train_worker(config, workdir, strategy, callbacks)
        return workdir
    created = not workdir.exists()
    try:
        claim_out_folder(workdir, "run")  # marked as keras-ee's if new or empty
    except OSError as e:
        raise runs.RunWriteError(f"cannot create run folder {str(workdir)!r}: {runs.describe_os_error(e)}.") from None
    try:
        _train_locked(config, workdir, verbose, callbacks, strategy)
    except BaseException:
        if created and not run_started(workdir):  # refused before it started: leave no trace
            (workdir / LOCK_FILE).unlink(missing_ok=True)
            (workdir / CONFIG_FILE).unlink(missing_ok=True)
            (workdir / MARKER).unlink(missing_ok=True)
            try:
                workdir.rmdir()
            except OSError:
                pass
        raise
    if config.evaluate:
        try:
            evaluations = {config.confidence: evaluate_run(workdir, kind=config.confidence)}
            for kind in run_score_kinds(workdir):  # the method's own scores (gating: the gater's)
                evaluations[kind] = evaluate_run(workdir, kind=kind)
            if len(evaluations) > 1:
                print(f"wrote {compare_confidences(workdir, evaluations)} (the budget curve of each confidence)")
        except OSError as e:
            raise runs.RunWriteError(
                f"cannot write {str(e.filename or workdir / 'eval')!r}: {runs.describe_os_error(e)}; nothing was "
                f"lost: the run is complete, and `keras-ee evaluate {workdir}` writes the evaluation again."
            ) from None
    return workdir


def _train_locked(
    config: TrainConfig,
    workdir: Path,
    verbose: int | str,
    callbacks: Sequence[keras.callbacks.Callback],
    strategy: Any = None,
) -> None:
    """The chief's run under the folder's lock: load the data, train (or load the finished model), write the files."""
    with runs.RunLock(workdir), dtype_policy(config.precision):
        prepare_workdir(config, workdir, write=False)  # again, now that no other command can write
        runs.remove_temporaries(workdir)  # left by a killed command
        keras.utils.set_random_seed(config.seed)
        splits = data.load_configured(config)
        check_splits(splits, config, 1 if strategy is None else strategy.num_replicas_in_sync)
        model, damage = runs.finished_model(workdir)
        if model is not None:
            print(f"[keras-ee] {workdir}: training already finished; loaded {MODEL_FILE}.")
        elif damage is not None:
            print(f"[keras-ee] {damage} Training it again from the backup, or from the start if none is left.")
            write_state(workdir, trained=False)
        if model is None:
            run_config = resumed_optimizer(config, workdir)
            model = build_model(
                run_config, splits, method=make_method(run_config.method, run_config.method_options), strategy=strategy
            )
            prepare_workdir(config, workdir)  # writes config.json: the run starts now
            logs = workdir / "tensorboard"
            new_logs = not logs.exists()
            try:
                _fit(run_config, splits, model, workdir, verbose, callbacks)
            except BaseException:
                if new_logs and not run_started(workdir):  # the logs of a first epoch that never ended
                    shutil.rmtree(logs, ignore_errors=True)
                raise
        try:
            _write_artifacts(config, splits, model, workdir)
        except OSError as e:
            raise runs.RunWriteError(
                f"cannot write {str(e.filename or workdir)!r}: {runs.describe_os_error(e)}; nothing was lost: the "
                f"trained model is in {str(workdir / MODEL_FILE)!r}, and rerunning the same command writes the "
                "rest without training again."
            ) from None


def _train_worker(
    config: TrainConfig, workdir: Path, strategy: Any, callbacks: Sequence[keras.callbacks.Callback]
) -> None:
    """A multi-worker non-chief: the same training, from the chief's backup, into a temporary folder."""
    resolver = strategy.cluster_resolver
    own = Path(tempfile.mkdtemp(prefix=f"keras-ee-{resolver.task_type}{resolver.task_id}-"))
    try:
        with dtype_policy(config.precision):
            keras.utils.set_random_seed(config.seed)
            splits = data.load_configured(config)
            check_splits(splits, config, strategy.num_replicas_in_sync)
            if runs.finished_model(workdir)[0] is not None:
                return  # the chief loads the same model.keras and trains nothing either
            config = resumed_optimizer(config, workdir, quiet=True)
            model = build_model(
                config, splits, method=make_method(config.method, config.method_options), strategy=strategy
            )
            _fit(config, splits, model, own, 0, callbacks, restore_from=workdir)
    finally:
        shutil.rmtree(own, ignore_errors=True)


def _fit(
    config: TrainConfig,
    splits: DatasetSplits,
    model: MultiExitModel,
    workdir: Path,
    verbose: int | str,
    callbacks: Sequence[keras.callbacks.Callback],
    restore_from: Path | None = None,
) -> None:
    """Restore the newest intact backup, train the remaining epochs, save the final model.

    `restore_from`: a multi-worker non-chief's run folder (the chief's), whose backup it
    restores; it then writes only its own temporary `workdir` and saves no model.
    """
    phases = run_phases(config, model.method)
    configured = [0]  # the phase the model is compiled for (build_model: phase 1)

    def configure_for_backup(epochs_done: int) -> None:
        # A backup after `epochs_done` epochs holds the state of the phase of its last
        # epoch (its trainable set and optimizer): configure that phase before loading.
        index = phase_of_epoch(phases, epochs_done - 1) if epochs_done else 0
        if index != configured[0]:
            compile_phase(model, config, splits, index, fresh=False)
            configured[0] = index

    backup = runs.RunBackup(workdir / BACKUP_DIR)
    source = backup if restore_from is None else runs.RunBackup(restore_from / BACKUP_DIR)
    with model.distribute_strategy.scope():  # an optimizer built here must be mirrored too
        first_epoch = source.restore(model, prepare=configure_for_backup)
    if first_epoch == 0 and configured[0] != 0:  # every backup was damaged: start over from phase 1
        compile_phase(model, config, splits, 0, fresh=False)
        configured[0] = 0
    history = runs.HistoryLog(workdir / HISTORY_FILE)
    history.truncate(first_epoch)
    val_ds = splits.val_dataset(config.batch_size)
    cbs: list[keras.callbacks.Callback] = []
    if config.budgets:
        cbs.append(BudgetCallback(val_ds, budgets=config.budgets))
    # The history row of an epoch is written before its backup: a kill between the two
    # leaves a row that the resume drops (truncate) and trains again.
    if config.recipe.ema:  # validate on the weight average (the backups keep the trained weights)
        cbs.append(ema_validation_callback())
    cbs += [
        history,
        backup,
        keras.callbacks.TensorBoard(str(workdir / "tensorboard"), write_graph=False),
        *model.method.callbacks(),
        *callbacks,
    ]
    progress = None
    if verbose == "progress":
        progress = EpochProgress()
        cbs.append(progress)
        verbose = 0
    start = time.perf_counter()
    fit_run(
        config,
        splits,
        model,
        cbs,
        verbose=verbose,
        first_epoch=first_epoch,
        configured=configured[0],
        progress=progress,
        validation_data=val_ds,
    )
    if restore_from is not None:
        return
    try:
        runs.check_free_space(workdir, int(runs.variable_bytes(model) * 1.5) + (4 << 20), MODEL_FILE)
        with atomic_path(workdir / MODEL_FILE) as tmp:
            model.save(tmp)
    except OSError as e:
        raise runs.RunWriteError(
            f"cannot write {str(workdir / MODEL_FILE)!r}: {runs.describe_os_error(e)}; "
            "nothing was lost: the backup of the last epoch is kept, so rerunning the same "
            "command finishes the run without training again."
        ) from None
    write_state(
        workdir,
        trained=True,
        train_seconds=round(time.perf_counter() - start, 1),
        resumed_at_epoch=first_epoch,
        strategy=config.strategy,
        replicas=model.distribute_strategy.num_replicas_in_sync,
        optimizer_semantics=optimizer_semantics(model.optimizer),
    )
    backup.remove()  # only now: model.keras and state.json are in place


def fit_run(
    config: TrainConfig,
    splits: DatasetSplits,
    model: MultiExitModel,
    callbacks: Sequence[keras.callbacks.Callback],
    verbose: int | str = 0,
    first_epoch: int = 0,
    configured: int = 0,
    progress: EpochProgress | None = None,
    validation_data: Any = None,
) -> keras.callbacks.History | None:
    """Train every phase of the run from epoch `first_epoch` (counted over all phases).

    Each phase that starts here is configured and compiled with its own optimizer
    (`compile_phase`); the model must be compiled for phase `configured` already (a
    fresh `build_model`: 0; a restored backup: the phase of its last epoch).

    Returns:
        The `History` of the last `fit` (None if nothing was left to train).
    """
    phases = run_phases(config, model.method)
    starts, _ = phase_starts(phases)
    history = None
    for index, (phase, begin) in enumerate(zip(phases, starts)):
        end = begin + phase.epochs
        if first_epoch >= end:
            if index == configured:
                # Restored from the backup of this phase's last epoch: its `fit` has not ended
                # in this process, so write its weight average (EMA) as that `fit` would have.
                finalize_ema(model)
            continue
        if index != configured:  # a new phase starts now
            compile_phase(model, config, splits, index, fresh=True)
            configured = index
        if progress is not None and len(phases) > 1:
            progress.label = f"{phase.name} ({index + 1}/{len(phases)})"
        initial = max(first_epoch, begin)
        replicas = model.distribute_strategy.num_replicas_in_sync
        history = model.fit(
            training_data(config, splits, model.method, initial, end, replicas=replicas),
            validation_data=validation_data,
            epochs=end,
            initial_epoch=initial,
            steps_per_epoch=training_batches(config, splits, model.method, replicas),
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,
        )  # the pipeline shuffles, by (seed, epoch)
    return history


def _write_artifacts(config: TrainConfig, splits: DatasetSplits, model: MultiExitModel, workdir: Path) -> None:
    """costs.json, the logit dump and the method's files, each written atomically."""
    costs = exit_costs(model.backbone)
    atomic_write_json(workdir / "costs.json", costs)
    write_preprocessing(workdir, splits)
    dtype = np.dtype(config.dump_dtype)
    val_logits, val_labels = predict_exit_logits(model, splits.val_dataset(256))
    test_logits, test_labels = predict_exit_logits(model, splits.test_dataset(256))
    dumps.save_dump(
        workdir / DUMP_DIR,
        val_logits.astype(dtype),
        val_labels,
        test_logits.astype(dtype),
        test_labels,
        costs={**costs, "rule": "reference"},
    )
    model.method.save_artifacts(model, splits, RunFolder(workdir))


def prepare_workdir(config: TrainConfig, workdir: StrPath, write: bool = True) -> Path:
    """Create the run folder, or check that an existing one holds the same run.

    A folder that holds only the config of a run that never started (a command refused
    after writing it, by older versions) is not a run: its config is replaced.
    `write=False` only checks (nothing is created).
    """
    workdir = check_out_folder(workdir)
    saved = workdir / CONFIG_FILE
    if saved.is_file() and run_started(workdir):
        try:
            previous = recorded_config(TrainConfig.from_file(saved))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"{str(workdir)!r} holds a run whose config.json cannot be read ({e}); use a new --out folder."
            ) from None
        # A recorded model option that `config` leaves out is the run's (`resume_settings`).
        unset = {k: v for k, v in previous.model_options.items() if k in LEGACY_MODEL_OPTIONS}
        diff = previous.differences(dataclasses.replace(config, model_options={**unset, **config.model_options}))
        if "method_options" in diff and same_method_options(previous, config):
            del diff["method_options"]  # the same options, an alias or a default written out or not
        if diff:
            lines = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
            raise ValueError(
                f"{str(workdir)!r} already holds a run with other settings ({lines}). Use a new --out folder, "
                "or the same settings to resume it."
            )
    elif write:
        claim_out_folder(workdir, "run")
        config.to_json(saved)
    return workdir


def same_method_options(a: TrainConfig, b: TrainConfig) -> bool:
    """Whether two configs of one method build it with the same options (`MethodSpec.resolved`)."""
    if a.method != b.method:
        return False
    try:
        spec = training.get_method(a.method)
        return spec.resolved(a.method_options) == spec.resolved(b.method_options)
    except ValueError:  # options one of them cannot build: they differ as written
        return False


def canonical_config(config: TrainConfig) -> TrainConfig:
    """`config` with its method options under their own names (`MethodSpec.canonical`), after the
    method has checked them, and the model options that every run records (`RECORDED_MODEL_OPTIONS`)
    written out: what config.json stores. A `ValueError` names a bad option."""
    make_method(config.method, config.method_options)
    options = training.get_method(config.method).canonical(config.method_options)
    model_options = {**RECORDED_MODEL_OPTIONS, **config.model_options}
    if options == config.method_options and model_options == config.model_options:
        return config
    return dataclasses.replace(config, method_options=options, model_options=model_options)


def resumed_optimizer(config: TrainConfig, workdir: Path, quiet: bool = False) -> TrainConfig:
    """`config` with the optimizer semantics of the run's backup, which a resume must keep.

    Runs made before keras-ee took PyTorch's steps (`keras_ee.optimizers`) recorded none and
    used Keras' optimizers: their `sgd` / `adamw` resume as `keras_sgd` / `keras_adamw`, and
    a method's auxiliary optimizer (L2W's WPN Adam, the gater's) as Keras' too, the
    optimizers whose state the backup holds. config.json is left as it is.
    """
    if runs.RunBackup(workdir / BACKUP_DIR).optimizer_semantics() != "keras":
        return config
    changes: dict[str, Any] = {}
    if optimizer_name_semantics(config.optimizer) == "pytorch":
        changes["optimizer"] = keras_optimizer_name(config.optimizer)
    spec = training.get_method(config.method)
    options = spec.resolved(config.method_options)
    method_options = dict(config.method_options)
    for option, keras_names in KERAS_AUXILIARY_OPTIMIZERS.items():
        if option in spec.options and options[option] in keras_names:
            method_options[option] = keras_names[options[option]]  # (neither option has an alias)
            changes["method_options"] = method_options
    if not changes:
        return config
    if not quiet:
        names = [f"--optimizer {changes['optimizer']}"] if "optimizer" in changes else []
        names += [f"{k}={v}" for k, v in changes.get("method_options", {}).items() if k in KERAS_AUXILIARY_OPTIMIZERS]
        what = ", ".join(names)
        print(
            f"[keras-ee] {workdir}: the run started with Keras' optimizers (before keras-ee took PyTorch's "
            f"steps); it resumes with them ({what})."
        )
    return dataclasses.replace(config, **changes)


def build_model(
    config: TrainConfig, splits: DatasetSplits, method: Method | None = None, strategy: Any = None
) -> MultiExitModel:
    """The backbone preset wrapped in a `MultiExitModel` with the configured method, compiled for phase 1.

    With a `tf.distribute` `strategy`, backbone, method and optimizer are created under
    `strategy.scope()` (mirrored variables); `config.sync_batchnorm` builds every BatchNorm
    of the backbone (and of the method's own layers) with synchronized statistics.
    """
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    # The backbone's BatchNorm options also reach the layers the method adds (IMTA's transfer paths).
    model_options = dict(config.model_options)
    if config.sync_batchnorm:
        model_options["synchronized_batchnorm"] = True
    with scope:
        backbone = models.create(
            config.model, num_classes=splits.num_classes, input_shape=splits.input_shape, **model_options
        )
        if method is None:
            method = make_method(config.method, config.method_options)
        model = training.MultiExitModel(backbone, method=method)
        compile_phase(model, config, splits, 0)
    if needs_multi_worker_fit_workaround(strategy):
        apply_multi_worker_fit_workaround(model, strategy)
    return model


def run_phases(config: TrainConfig, method: Method) -> list[Phase]:
    """The method's phases for this run (`Method.phases(config.epochs)`)."""
    return method.phases(config.epochs)


def compile_phase(
    model: MultiExitModel, config: TrainConfig, splits: DatasetSplits, index: int, fresh: bool = True
) -> None:
    """Configure `model` for phase `index` and compile it with that phase's new optimizer.

    The optimizer is the run's (`make_optimizer`: SGD or AdamW, with the phase's
    `optimizer_options`, the warm-up and EMA settings) and its learning-rate schedule spans
    the phase's optimizer steps, or the phase's own `make_optimizer`.
    """
    phase = run_phases(config, model.method)[index]
    # A later phase's optimizer must be mirrored as the first one (a no-op without a strategy).
    with model.distribute_strategy.scope():
        model.enter_phase(index, fresh=fresh)
        replicas = model.distribute_strategy.num_replicas_in_sync
        per_batch = model.method.optimizer_steps_per_batch
        batches = training_batches(config, splits, model.method, replicas) * per_batch
        steps = phase.epochs * batches
        if phase.make_optimizer is not None:
            optimizer = phase.make_optimizer(steps)
        else:
            optimizer = make_optimizer(
                config,
                steps,
                model.trainable_variables,
                phase.optimizer_options,
                warmup_steps=min(config.warmup_epochs * batches, steps),
                steps_per_epoch=batches,
                steps_per_batch=per_batch,
            )
        model.compile(optimizer=optimizer)


def make_method(name: str, options: dict) -> Method:
    """The training method called `name` (registered, or `package.module:Class`) with `options`.

    Options are converted to the types the method declares (command-line values arrive
    as JSON or strings); an unknown option or a bad value is a `ValueError` listing the
    valid options with their types.
    """
    return training.get_method(name).create(options)


def training_data(
    config: TrainConfig,
    splits: DatasetSplits,
    method: Method,
    first_epoch: int = 0,
    end_epoch: int | None = None,
    replicas: int = 1,
) -> tf.data.Dataset:
    """The batches of epochs `first_epoch .. end_epoch - 1`, each a function of (seed, epoch).

    `end_epoch` defaults to the end of the run (`config.epochs` for a one-phase method;
    epochs are counted over all phases). A method with a meta stream
    (`Method.uses_meta_stream`) gets `((x, y), (x_meta, y_meta))` per step, the meta
    batch from `splits.meta_dataset` (the calibration hold-out unless
    `config.meta_split_size` holds out a split of its own). `replicas`: those of the
    strategy the model trains under (whether an epoch's last, smaller batch is dropped:
    `drops_remainder`). Fit with `steps_per_epoch=training_batches(config, splits, method,
    replicas)`. The config's augmentation
    recipe (`training_recipe`) shapes the training batches only: they carry float32 soft
    targets (B, C) when it smooths or mixes labels; the meta stream stays sparse and plain.
    """
    if end_epoch is None:
        end_epoch = sum(p.epochs for p in run_phases(config, method))
    extra: dict[str, Any] = {}
    recipe = training_recipe(config)
    if recipe is not None:  # only then: a DatasetSplits of another package may not take it
        extra["recipe"] = recipe
    if drops_remainder(config, splits, method, replicas):  # only then: as for the recipe
        extra["drop_remainder"] = True
    train_ds = splits.train_dataset(
        config.batch_size, seed=config.seed, first_epoch=first_epoch, epochs=end_epoch, **extra
    )
    if not method.uses_meta_stream:
        return train_ds
    meta = splits.meta_dataset(
        config.batch_size,
        training_batches(config, splits, method, replicas),
        seed=config.seed,
        first_epoch=first_epoch,
        epochs=end_epoch,
    )
    return tf.data.Dataset.zip((train_ds, meta))


def drops_remainder(config: TrainConfig, splits: DatasetSplits, method: Method, replicas: int = 1) -> bool:
    """Whether the training stream drops an epoch's last, smaller batch.

    Under a strategy of several replicas, always: every step's global batch is then full, so
    each replica trains on `batch_size / replicas` images (`check_batch_size`), never on an
    uneven share or on none. On one device, only a last batch smaller than the method trains
    on (`Method.min_batch_per_replica`: a batch of 1 image under L2W's half-batch exchange).
    The epochs are shuffled by (seed, epoch), so each drops other images.
    """
    if replicas > 1:
        return True
    return 0 < splits.num_train % config.batch_size < method.min_batch_per_replica


def training_batches(config: TrainConfig, splits: DatasetSplits, method: Method, replicas: int = 1) -> int:
    """Batches per epoch of `training_data(config, splits, method, replicas=replicas)`."""
    return splits.train_batches(config.batch_size, drop_remainder=drops_remainder(config, splits, method, replicas))


def check_batch_size(config: TrainConfig, replicas: int) -> None:
    """Refuse a global batch that `replicas` cannot share evenly, or that gives each fewer images
    than the method trains on (`Method.min_batch_per_replica`), before anything is written."""
    need = training.get_method(config.method).cls.min_batch_per_replica
    batch, smallest = config.batch_size, replicas * need
    if batch % replicas == 0 and batch >= smallest:
        return
    below, above = (batch // replicas) * replicas, -(-batch // replicas) * replicas
    nearest = " or ".join(map(str, sorted({max(smallest, below), max(smallest, above)})))
    share = batch / replicas
    floor = (
        f" of at least {smallest} ({config.method} trains each replica on at least {need} images)" if need > 1 else ""
    )
    raise ValueError(
        f"--batch-size {batch} is the global batch of --strategy {config.strategy}, shared by its {replicas} "
        f"replicas: {share:g} image{'' if share == 1 else 's'} each; expected a multiple of {replicas}{floor}, "
        f"e.g. {nearest}."
    )


def training_recipe(config: TrainConfig) -> RecipeConfig | None:
    """The config's recipe when it augments the training batches, else None."""
    return config.recipe if config.recipe.active else None


def ema_validation_callback() -> keras.callbacks.Callback:
    """Keras' `SwapEMAWeights` for validation during `fit`, swapping exactly.

    It puts the optimizer's weight average into the model for each validation pass
    (`on_test_begin`) and the trained weights back after it. Keras' TensorFlow path swaps
    with additions and subtractions (`a + b - b`), which changes the trained weights by
    float rounding at every swap; this one copies (as Keras' other backends do), so a run
    with validation trains exactly as one without. Prediction hooks are left alone.
    """

    class ExactSwapEMAWeights(keras.callbacks.SwapEMAWeights):
        _tf_swap_variables = keras.callbacks.SwapEMAWeights._backend_swap_variables

        def on_predict_begin(self, logs: dict[str, Any] | None = None) -> None:
            pass

        def on_predict_end(self, logs: dict[str, Any] | None = None) -> None:
            pass

    return ExactSwapEMAWeights()


def finalize_ema(model: keras.Model) -> None:
    """Write the optimizer's weight average into the model, as Keras' `fit` does when it ends."""
    optimizer = model.optimizer
    if isinstance(optimizer, keras.optimizers.Optimizer) and getattr(optimizer, "use_ema", False):
        optimizer.finalize_variable_values(model.trainable_weights)


def check_splits(splits: DatasetSplits, config: TrainConfig, replicas: int = 1) -> None:
    """Refuse data a run cannot use before anything is trained (`replicas`: the strategy's)."""
    for part in ("val", "test"):
        if getattr(splits, f"num_{part}") == 0:
            raise ValueError(
                f"dataset {config.dataset!r} has no {part} images; a run calibrates on validation "
                "and scores on test images, so both must be non-empty."
            )
    if splits.num_train < 2:
        raise ValueError(f"dataset {config.dataset!r} has {splits.num_train} training image(s); expected at least 2.")
    if replicas > 1 and splits.num_train < config.batch_size:  # no full global batch (drops_remainder)
        raise ValueError(
            f"dataset {config.dataset!r} has {splits.num_train} training images, fewer than one global batch "
            f"(--batch-size {config.batch_size}); under --strategy {config.strategy} every step takes a full "
            f"global batch: expected a --batch-size of at most {splits.num_train - splits.num_train % replicas}."
        )
