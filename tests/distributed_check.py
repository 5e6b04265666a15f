"""Run by tests/test_distribute.py in a fresh process: two logical CPU devices must be set before
TensorFlow starts, which pytest's process has already done.

    python tests/distributed_check.py METHOD [OPTIONS_JSON]   ->  prints one JSON line
    python tests/distributed_check.py allocation              ->  prints one JSON line

METHOD: trains the method (with the options, e.g. '{"gater_interval": 2}') for one epoch of 4
global batches of 16 on a multi-exit MLP without BatchNorm, once on one device and once under a
two-replica MirroredStrategy, from the same initial weights (backbone and auxiliary network) and
with the same batches, and prints the largest weight differences. Replica r of the strategy gets
rows [8r, 8r + 8) of each global batch; the global batch is fed permuted so that the global
halves of a half-batch exchange (each replica's first half, then its second half) are the
one-device halves (rows 0-7, then 8-15) in the same order.

`allocation`: `allocate_by_confidence_across_replicas` on two replicas of unequal sizes against
`allocate_by_confidence` on the concatenated batch.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

from keras_ee import training  # noqa: E402
from keras_ee.training import allocation  # noqa: E402
from tiny_models import mlp_backbone  # noqa: E402  (tests/ is this script's folder)

GLOBAL_BATCH, STEPS, DIM, CLASSES = 16, 4, 5, 4
# Rows of a global batch so that replica 0 holds one-device rows 0-3 | 8-11, replica 1 rows 4-7 | 12-15.
PERMUTATION = np.array([0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15])


def backbone():
    return mlp_backbone(num_classes=CLASSES, dim=DIM)


def auxiliary_variables(method):
    """The auxiliary network's variables: L2W's WPN, the gater, HDKD's gamma (none otherwise)."""
    for name in ("wpn", "gater"):
        if getattr(method, name, None) is not None:
            return list(getattr(method, name).weights)
    if getattr(method, "gamma_raw", None) is not None:
        return [method.gamma_raw]
    return []


def data(permute):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, DIM)).astype("float32")
    y = rng.integers(0, CLASSES, size=GLOBAL_BATCH * STEPS).astype("int32")
    xm = rng.normal(size=(GLOBAL_BATCH * STEPS, DIM)).astype("float32")
    ym = rng.integers(0, CLASSES, size=GLOBAL_BATCH * STEPS).astype("int32")
    if permute:
        order = (np.arange(STEPS)[:, None] * GLOBAL_BATCH + PERMUTATION[None, :]).reshape(-1)
        x, y, xm, ym = x[order], y[order], xm[order], ym[order]
    return x, y, xm, ym


def train(method_name, options, strategy, initial, aux_initial, permute):
    with strategy.scope():
        model = training.MultiExitModel(backbone(), method=training.get_method(method_name).cls(**options))
        model.backbone.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        aux = auxiliary_variables(model.method)
        if aux_initial is not None:
            for v, value in zip(aux, aux_initial):
                v.assign(value)
    x, y, xm, ym = data(permute)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    if model.method.uses_meta_stream:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.from_tensor_slices((xm, ym)).batch(GLOBAL_BATCH)))
    history = model.fit(ds, epochs=1, verbose=0)
    # Every replica's copy of each auxiliary variable.
    aux_replicas = [[np.asarray(r) for r in strategy.experimental_local_results(v.value)] for v in aux]
    return model.backbone.get_weights(), aux_replicas, history.history["loss"][-1]


def method_check(method_name, options):
    keras.utils.set_random_seed(0)
    initial = backbone().get_weights()
    with tf.distribute.get_strategy().scope():
        probe = training.MultiExitModel(backbone(), method=training.get_method(method_name).cls(**options))
        probe.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
        aux_initial = [np.asarray(v.numpy()) for v in auxiliary_variables(probe.method)]
    one, aux_one, loss_one = train(method_name, options, tf.distribute.get_strategy(), initial, aux_initial, False)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    two, aux_two, loss_two = train(method_name, options, mirrored, initial, aux_initial, True)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(one, initial))
    diff = max(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-6))) for a, b in zip(one, two))
    absolute = max(float(np.max(np.abs(a - b))) for a, b in zip(one, two))
    out = {"replicas": mirrored.num_replicas_in_sync, "max_relative_difference": diff,
           "max_difference": absolute, "difference_over_moved": absolute / moved,
           "moved": moved, "loss_one": float(loss_one), "loss_two": float(loss_two)}
    if aux_initial:
        aux_moved = max(float(np.max(np.abs(r[0] - a))) for r, a in zip(aux_one, aux_initial))
        aux_diff = max(float(np.max(np.abs(r1[0] - r2[0]))) for r1, r2 in zip(aux_one, aux_two))
        out.update(aux_moved=aux_moved, aux_difference=aux_diff,
                   aux_difference_over_moved=aux_diff / aux_moved if aux_moved else None,
                   aux_replica_spread=max(float(np.max(np.abs(r[0] - r[-1]))) for r in aux_two),
                   aux_replicas=len(aux_two[0]))
    print(json.dumps(out))


def allocation_check():
    """Replicas of 5 and 7 samples, confidences with ties; q < 1 and q = 1."""
    rng = np.random.default_rng(1)
    conf = rng.uniform(size=(12, 3)).astype("float32")
    conf[3, 0] = conf[9, 0]  # a tie across replicas: the lower global index first
    sizes = [5, 7]
    parts = [conf[:5], conf[5:]]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
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
        results[str(q)] = {"equal": bool(np.array_equal(got, expected)), "shapes": [t.shape[0] for t in local],
                           "per_exit": expected.sum(axis=0).tolist(),
                           "alone_differs": bool(not np.array_equal(alone, expected))}
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "sizes": sizes, "results": results}))


def main():
    if sys.argv[1] == "allocation":
        allocation_check()
        return
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    method_check(sys.argv[1], options)


if __name__ == "__main__":
    main()
