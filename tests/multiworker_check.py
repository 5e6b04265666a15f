"""Run by tests/test_distribute_multiworker.py in fresh processes (TensorFlow must not have started).

python tests/multiworker_check.py worker METHOD OUT_NPZ
    One worker of a two-worker MultiWorkerMirroredStrategy (TF_CONFIG set by the caller, CPU
    only): builds and compiles the model under the strategy's scope, trains METHOD for one
    epoch of 4 global batches of 16 and writes the final backbone weights (the initial ones,
    L2W's WPN, the logged loss) to OUT_NPZ. Both workers build the same global
    `tf.data.Dataset`; Keras' `fit` distributes it with `strategy.
    experimental_distribute_dataset`, which shards it across the workers (auto-shard policy
    AUTO, DATA for an in-memory dataset): worker r gets rows [8r, 8r + 8) of each global batch.
    Keras 3 needs two workarounds for this (`distribute.apply_multi_worker_fit_workaround`).

python tests/multiworker_check.py experiment OUT_DIR OUT_NPZ [STOP_AT_EPOCH]
    One worker of a two-worker cluster (TF_CONFIG set by the caller) running
    `experiment.train` with `strategy="multi_worker"` (what `keras-ee train --strategy
    multi_worker` runs) on digits, every worker with the same OUT_DIR: a small multiexit_cnn
    with synchronized BN, baseline, 2 epochs of 2 global batches of 32. Writes the final
    backbone weights (BN moving statistics included) to OUT_NPZ when a training ends. With
    STOP_AT_EPOCH, every worker is interrupted at the start of that epoch; the same command
    then resumes (the non-chief from the chief's backup).

python tests/multiworker_check.py single METHOD OUT_NPZ
    The same training on one device, on the global batches in one-device order (the reference).

python tests/multiworker_check.py resume METHOD BACKUP_DIR
    Two logical CPU devices, MirroredStrategy: trains METHOD for 3 epochs uninterrupted,
    then again from the same initial weights for 1 epoch, interrupted at the start of epoch 1
    (`StopAt`), and resumed with `keras.callbacks.BackupAndRestore` on the same backup dir
    for the remaining epochs. Prints one JSON line with the largest weight differences.
    tests/test_distribute_multiworker.py calls `resume` in its own process, whose two logical
    CPUs tests/conftest.py made.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

GLOBAL_BATCH, STEPS, DIM, CLASSES = 16, 4, 5, 4
# As in tests/distributed_check.py: worker r gets rows [8r, 8r + 8) of each global batch, so with
# the batch fed in this order the global halves of L2W's half-batch exchange (each replica's first
# half, then its second half) are the one-device halves (rows 0-7, then 8-15).
PERMUTATION = np.array([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])


def backbone(keras):
    from tiny_models import mlp_backbone  # tests/ is this script's folder

    return mlp_backbone(num_classes=CLASSES, dim=DIM)


def dataset(permute=False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, DIM)).astype("float32")
    y = rng.integers(0, CLASSES, size=GLOBAL_BATCH * STEPS).astype("int32")
    if permute:
        order = (np.arange(STEPS)[:, None] * GLOBAL_BATCH + PERMUTATION[None, :]).reshape(-1)
        x, y = x[order], y[order]
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH, drop_remainder=True)


def worker(method_name, out_path, single=False):
    """One worker of the cluster; with `single`, the same training on one device (the reference)."""
    if single:
        strategy = tf.distribute.get_strategy()  # the default strategy: one device
    else:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()  # before any other TensorFlow op
    import keras

    from keras_ee import distribute, training

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = training.MultiExitModel(backbone(keras), method=training.get_method(method_name).cls())
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    if not single:  # Keras 3's multi-worker fit bug (keras-team/keras#20585), as experiment.train does
        assert distribute.needs_multi_worker_fit_workaround(strategy)
        distribute.apply_multi_worker_fit_workaround(model, strategy)
    initial = [np.asarray(w) for w in model.backbone.get_weights()]
    history = model.fit(dataset(permute=not single), epochs=1, verbose=0, shuffle=False)
    loss = history.history["loss"][-1]
    final = model.backbone.get_weights()
    aux = getattr(model.method, "wpn", None)
    aux = [np.asarray(v.numpy()) for v in aux.weights] if aux is not None else []
    np.savez(
        out_path,
        replicas=strategy.num_replicas_in_sync,
        loss=loss,
        **{f"w{i}": w for i, w in enumerate(final)},
        **{f"i{i}": w for i, w in enumerate(initial)},
        **{f"a{i}": w for i, w in enumerate(aux)},
    )


def resume(method_name, backup_dir):
    """The `resume` mode: returns the dict it prints."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_models import StopAt, fresh_collective_keys, two_logical_cpus

    two_logical_cpus()
    import keras

    from keras_ee import training

    fresh_collective_keys()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    keras.utils.set_random_seed(0)
    initial = backbone(keras).get_weights()

    def build():
        keras.utils.set_random_seed(1)  # the same auxiliary networks (WPN, ...) in every build
        with strategy.scope():
            model = training.MultiExitModel(backbone(keras), method=training.get_method(method_name).cls())
            model.backbone.set_weights(initial)
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        return model

    def aux(model):
        for name in ("wpn", "gater"):
            if getattr(model.method, name, None) is not None:
                return [np.asarray(v.numpy()) for v in getattr(model.method, name).weights]
        return []

    full = build()
    full.fit(dataset(), epochs=3, verbose=0, shuffle=False)
    expected, expected_aux = full.backbone.get_weights(), aux(full)

    first = build()
    interrupted = False
    try:
        first.fit(
            dataset(),
            epochs=3,
            verbose=0,
            shuffle=False,
            callbacks=[keras.callbacks.BackupAndRestore(backup_dir), StopAt(1)],
        )
    except KeyboardInterrupt:
        interrupted = True
    after_one = first.backbone.get_weights()
    backed_up = sorted(os.listdir(backup_dir)) if os.path.isdir(backup_dir) else []

    second = build()
    epochs_run = []
    epoch_logger = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs=None: epochs_run.append(e))
    second.fit(
        dataset(),
        epochs=3,
        verbose=0,
        shuffle=False,
        callbacks=[keras.callbacks.BackupAndRestore(backup_dir), epoch_logger],
    )
    got, got_aux = second.backbone.get_weights(), aux(second)

    def largest(a, b):
        return max((float(np.max(np.abs(x - y))) for x, y in zip(a, b)), default=0.0)

    out = {
        "replicas": strategy.num_replicas_in_sync,
        "interrupted": interrupted,
        "backed_up": backed_up,
        "resumed_epochs": epochs_run,
        "moved": largest(expected, initial),
        "moved_in_epoch_0": largest(after_one, initial),
        "max_difference": largest(expected, got),
        "optimizer_iterations": [int(full.optimizer.iterations.numpy()), int(second.optimizer.iterations.numpy())],
    }
    if expected_aux:
        out.update(aux_difference=largest(expected_aux, got_aux), aux_moved=largest(expected_aux, aux(build())))
    return out


def experiment_worker(out_dir, out_path, stop_at=None):
    """One worker of `experiment.train(config(strategy="multi_worker"), out_dir)`, 2 epochs.

    With `stop_at`, every worker is interrupted at the start of that epoch (`StopAt`).
    """
    import keras

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from tiny_models import StopAt

    from keras_ee import experiment
    from keras_ee.config import TrainConfig

    class SaveWeights(keras.callbacks.Callback):
        def on_train_end(self, logs=None):
            np.savez(out_path, **{f"w{i}": w for i, w in enumerate(self.model.backbone.get_weights())})

    config = TrainConfig(
        model="multiexit_cnn",
        model_options={"widths": [4, 8], "depth": 1},
        method="baseline",
        epochs=2,
        train_size=64,
        batch_size=32,
        strategy="multi_worker",
        evaluate=False,
        sync_batchnorm=True,
    )  # else each worker keeps its own BN moving statistics
    stop = [StopAt(int(stop_at))] if stop_at is not None else []
    try:
        experiment.train(config, out_dir, verbose=0, callbacks=[SaveWeights(), *stop])
    except KeyboardInterrupt:
        print("interrupted")


def main():
    mode, method_name, path = sys.argv[1:4]
    if mode == "experiment":
        experiment_worker(method_name, path, *sys.argv[4:5])
    elif mode in ("worker", "single"):
        worker(method_name, path, single=mode == "single")
    elif mode == "resume":
        print(json.dumps(resume(method_name, path)))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
