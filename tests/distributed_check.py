"""The tf.distribute checks of tests/test_distribute.py: each returns a dict (run as a script, it
prints it as one JSON line). They need two logical CPU devices, made before TensorFlow initialises
(`tiny_models.two_logical_cpus`): tests/conftest.py makes them in the test process.

    python tests/distributed_check.py METHOD [OPTIONS_JSON] [--sync-batchnorm]   ->  one JSON line
    python tests/distributed_check.py allocation                                 ->  one JSON line
    python tests/distributed_check.py experiment OUT_DIR                         ->  one JSON line

METHOD (`method_check`): trains the method (with the options, e.g. '{"gater_interval": 2}') for one
epoch of 4 global batches of 16 on a multi-exit MLP without BatchNorm, once on one device and once
under a two-replica MirroredStrategy, from the same initial weights (backbone and auxiliary network)
and with the same batches, and reports the largest weight differences. Replica r of the strategy gets
rows [8r, 8r + 8) of each global batch; the global batch is fed permuted so that the global
halves of a half-batch exchange (each replica's first half, then its second half) are the
one-device halves (rows 0-7, then 8-15) in the same order.

A method with two phases (IMTA, L2W+IMTA) trains on an `attach_exits` MLP (IMTA's hooks:
branch/trunk gradient scales, `exit_k_features`), one epoch per phase, phase II with a new SGD.
`--sync-batchnorm` builds the model with synchronized BatchNorm (the MLP gets one after its first
block, and IMTA builds its transfer paths' BatchNorm as the backbone's). METHOD `sync_bn` is
Baseline on a small `multiexit_cnn` (8x8x1 inputs, a conv-BN-ReLU unit per stage): the
differences then include the BN moving statistics.

`allocation`: `allocate_by_confidence_across_replicas` on two replicas of unequal sizes against
`allocate_by_confidence` on the concatenated batch.

`experiment`: `experiment.train` with `strategy="mirrored"` on digits (a small `multiexit_cnn`,
L2W, 2 epochs), once uninterrupted and once interrupted after epoch 1 and resumed by the same
call; reports the replica count recorded in `state.json` and the largest difference between the
two final models.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tiny_models import StopAt, fresh_collective_keys, mlp_backbone, two_logical_cpus  # noqa: E402  (tests/ is here)

two_logical_cpus()

import keras  # noqa: E402

from keras_ee import models, runs, training  # noqa: E402
from keras_ee.models import blocks  # noqa: E402
from keras_ee.training import allocation  # noqa: E402

GLOBAL_BATCH, STEPS, DIM, CLASSES = 16, 4, 5, 4
# Rows of a global batch so that replica 0 holds one-device rows 0-3 | 8-11, replica 1 rows 4-7 | 12-15.
PERMUTATION = np.array([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])


PHASED = ("imta", "l2w_imta")
IMAGE = (8, 8, 1)  # the inputs of `sync_bn`


def mirrored_strategy():
    fresh_collective_keys()
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def backbone(method_name="baseline", sync_bn=False):
    if method_name == "sync_bn":  # conv-BN-ReLU units (`ConvBNReLU`) as the presets build them
        return models.multiexit_cnn(
            num_classes=CLASSES, input_shape=IMAGE, widths=(4, 8), depth=1, synchronized_batchnorm=sync_bn
        )
    if method_name not in PHASED:
        return mlp_backbone(num_classes=CLASSES, dim=DIM)
    inp = keras.Input((DIM,))
    h = inp
    for k in range(3):
        h = keras.layers.Dense(8, activation="relu", name=f"block_{k + 1}")(h)
        if sync_bn and k == 0:  # IMTA builds its transfer paths' BatchNorm as the backbone's
            h = blocks.batch_normalization("block_1_bn", blocks.UnitOptions(synchronized_batchnorm=True))(h)
    return models.attach_exits(
        keras.Model(inp, h),
        ["block_1", "block_2", "block_3"],
        num_classes=CLASSES,
        head=lambda x, k: keras.layers.Dense(8, activation="relu", name=f"head_{k}")(x),
    )


def auxiliary_variables(method):
    """The method's own variables: L2W's WPN, the gater, HDKD's gamma, IMTA's teacher (none otherwise)."""
    out = []
    for name in ("wpn", "gater"):
        if getattr(method, name, None) is not None:
            out = list(getattr(method, name).weights)
            break
    if getattr(method, "gamma_raw", None) is not None:
        out = [method.gamma_raw]
    return out + [getattr(method, n) for n in ("teacher_kernel", "teacher_bias") if hasattr(method, n)]


def moving_statistics(backbone):
    """The BatchNorm moving means and variances (not every non-trainable weight: IMTA freezes others)."""
    return [np.asarray(v.numpy()) for v in backbone.weights if "moving_" in v.path]


def make_model(method_name, options, sync_bn=False):
    method = training.Baseline() if method_name == "sync_bn" else training.get_method(method_name).cls(**options)
    return training.MultiExitModel(backbone(method_name, sync_bn), method=method)


def data(permute, shape=(DIM,)):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, *shape)).astype("float32")
    y = rng.integers(0, CLASSES, size=GLOBAL_BATCH * STEPS).astype("int32")
    xm = rng.normal(size=(GLOBAL_BATCH * STEPS, DIM)).astype("float32")
    ym = rng.integers(0, CLASSES, size=GLOBAL_BATCH * STEPS).astype("int32")
    if permute:
        order = (np.arange(STEPS)[:, None] * GLOBAL_BATCH + PERMUTATION[None, :]).reshape(-1)
        x, y, xm, ym = x[order], y[order], xm[order], ym[order]
    return x, y, xm, ym


def train(method_name, options, strategy, initial, aux_initial, permute, sync_bn):
    with strategy.scope():
        model = make_model(method_name, options, sync_bn)
        model.backbone.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        aux = auxiliary_variables(model.method)
        if aux_initial is not None:
            for v, value in zip(aux, aux_initial):
                v.assign(value)
    x, y, xm, ym = data(permute, IMAGE if method_name == "sync_bn" else (DIM,))
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    if model.method.uses_meta_stream:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices((xm, ym)).batch(GLOBAL_BATCH)))
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    for phase in range(1, len(model.method.phases(1))):  # IMTA: phase II, with a new optimizer
        with strategy.scope():
            model.enter_phase(phase)
            model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        history = model.fit(ds, epochs=1, verbose=0, shuffle=False)
    # Every replica's copy of each auxiliary variable.
    aux_replicas = [[np.asarray(r) for r in strategy.experimental_local_results(v.value)] for v in aux]
    stats = moving_statistics(model.backbone)
    return model.backbone.get_weights(), aux_replicas, history.history["loss"][-1], stats


def method_check(method_name, options, sync_bn=False):
    keras.utils.set_random_seed(0)
    start = make_model(method_name, options, sync_bn).backbone  # IMTA's network: transformed
    initial, stats_initial = start.get_weights(), moving_statistics(start)
    with tf.distribute.get_strategy().scope():
        probe = make_model(method_name, options, sync_bn)
        probe.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        aux_initial = [np.asarray(v.numpy()) for v in auxiliary_variables(probe.method)]
    one, aux_one, loss_one, stats_one = train(
        method_name, options, tf.distribute.get_strategy(), initial, aux_initial, False, sync_bn
    )
    mirrored = mirrored_strategy()
    two, aux_two, loss_two, stats_two = train(method_name, options, mirrored, initial, aux_initial, True, sync_bn)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(one, initial))
    diff = max(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-6))) for a, b in zip(one, two))
    absolute = max(float(np.max(np.abs(a - b))) for a, b in zip(one, two))
    out = {
        "replicas": mirrored.num_replicas_in_sync,
        "max_relative_difference": diff,
        "max_difference": absolute,
        "difference_over_moved": absolute / moved,
        "moved": moved,
        "loss_one": float(loss_one),
        "loss_two": float(loss_two),
    }
    if stats_one:
        out.update(
            stats_difference=max(float(np.max(np.abs(a - b))) for a, b in zip(stats_one, stats_two)),
            stats_moved=max(float(np.max(np.abs(a - b))) for a, b in zip(stats_one, stats_initial)),
        )
    if aux_initial:
        aux_moved = max(float(np.max(np.abs(r[0] - a))) for r, a in zip(aux_one, aux_initial))
        aux_diff = max(float(np.max(np.abs(r1[0] - r2[0]))) for r1, r2 in zip(aux_one, aux_two))
        out.update(
            aux_moved=aux_moved,
            aux_difference=aux_diff,
            aux_difference_over_moved=aux_diff / aux_moved if aux_moved else None,
            aux_replica_spread=max(float(np.max(np.abs(r[0] - r[-1]))) for r in aux_two),
            aux_replicas=len(aux_two[0]),
        )
    return out


def allocation_check():
    """Replicas of 5 and 7 samples, confidences with ties; q < 1 and q = 1."""
    rng = np.random.default_rng(1)
    conf = rng.uniform(size=(12, 3)).astype("float32")
    conf[3, 0] = conf[9, 0]  # a tie across replicas: the lower global index first
    sizes = [5, 7]
    parts = [conf[:5], conf[5:]]
    strategy = mirrored_strategy()
    results = {}
    for q in (0.5, 0.75, 1.0):
        expected = allocation.allocate_by_confidence(tf.constant(conf), q).numpy()

        @tf.function
        def step(q=q):
            def fn():
                ctx = tf.distribute.get_replica_context()
                r = ctx.replica_id_in_sync_group
                c = tf.cond(tf.equal(r, 0), lambda: tf.constant(parts[0]), lambda: tf.constant(parts[1]))
                return allocation.allocate_by_confidence_across_replicas(c, q)

            return strategy.run(fn)

        local = [np.asarray(t) for t in strategy.experimental_local_results(step())]
        got = np.concatenate(local, axis=0)
        # What each replica would allocate on its own part (the gather must matter here).
        alone = np.concatenate([allocation.allocate_by_confidence(tf.constant(p), q).numpy() for p in parts])
        results[str(q)] = {
            "equal": bool(np.array_equal(got, expected)),
            "shapes": [t.shape[0] for t in local],
            "per_exit": expected.sum(axis=0).tolist(),
            "alone_differs": bool(not np.array_equal(alone, expected)),
        }
    return {"replicas": strategy.num_replicas_in_sync, "sizes": sizes, "results": results}


def experiment_check(out):
    """`experiment.train` under `strategy="mirrored"`: an interrupted run resumes to the uninterrupted one."""
    from keras_ee import experiment
    from keras_ee.config import TrainConfig

    config = TrainConfig(
        model="multiexit_cnn",
        model_options={"widths": [4, 8], "depth": 1},
        method="l2w",
        epochs=2,
        train_size=64,
        batch_size=32,
        strategy="mirrored",
        evaluate=False,
    )

    def train(folder, callbacks=()):
        fresh_collective_keys()  # each call makes its own MirroredStrategy
        experiment.train(config, f"{out}/{folder}", verbose=0, callbacks=list(callbacks))

    train("full")
    interrupted = False
    try:
        train("resumed", [StopAt(1)])
    except KeyboardInterrupt:
        interrupted = True
    train("resumed")
    full, resumed = (runs.load_run_model(f"{out}/{name}/model.keras") for name in ("full", "resumed"))
    states = [json.load(open(f"{out}/{name}/state.json")) for name in ("full", "resumed")]
    history = open(f"{out}/resumed/history.csv").read().strip().splitlines()
    return {
        "interrupted": interrupted,
        "replicas": [s.get("replicas") for s in states],
        "strategy": [s.get("strategy") for s in states],
        "resumed_at_epoch": states[1].get("resumed_at_epoch"),
        "history_rows": len(history) - 1,
        "dtype_policy": keras.config.dtype_policy().name,
        "max_difference": max(float(np.max(np.abs(a - b))) for a, b in zip(full.get_weights(), resumed.get_weights())),
    }


def main():
    if sys.argv[1] == "allocation":
        out = allocation_check()
    elif sys.argv[1] == "experiment":
        out = experiment_check(sys.argv[2])
    else:
        args = [a for a in sys.argv[2:] if a != "--sync-batchnorm"]
        out = method_check(sys.argv[1], json.loads(args[0]) if args else {}, sync_bn="--sync-batchnorm" in sys.argv)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
