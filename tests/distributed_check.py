"""Run by tests/test_distribute.py in a fresh process: two logical CPU devices must be set before
TensorFlow starts, which pytest's process has already done.

    python tests/distributed_check.py METHOD   ->  prints one JSON line

Trains METHOD for one epoch of 4 global batches of 16 on a multi-exit MLP without BatchNorm, once
on one device and once under a two-replica MirroredStrategy, from the same initial weights and
with the same batches, and prints the largest relative weight difference.
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

GLOBAL_BATCH, STEPS, DIM, CLASSES = 16, 4, 5, 4


def backbone():
    inp = keras.Input((DIM,))
    h, outs = inp, []
    for k in range(3):
        h = keras.layers.Dense(8, activation="relu")(h)
        outs.append(keras.layers.Dense(CLASSES, name=f"exit_{k + 1}")(h))
    return keras.Model(inp, outs)


def train(method_name, strategy, initial):
    with strategy.scope():
        model = training.MultiExitModel(backbone(), method=training.get_method(method_name).cls())
        model.backbone.set_weights(initial)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, DIM)).astype("float32")
    y = rng.integers(0, CLASSES, size=GLOBAL_BATCH * STEPS).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
    history = model.fit(ds, epochs=1, verbose=0)
    return model.backbone.get_weights(), history.history["loss"][-1]


def main():
    method_name = sys.argv[1]
    keras.utils.set_random_seed(0)
    initial = backbone().get_weights()
    one, loss_one = train(method_name, tf.distribute.get_strategy(), initial)
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    two, loss_two = train(method_name, mirrored, initial)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(one, initial))
    diff = max(float(np.max(np.abs(a - b) / (np.abs(a) + 1e-6))) for a, b in zip(one, two))
    print(json.dumps({"replicas": mirrored.num_replicas_in_sync, "max_relative_difference": diff,
                      "moved": moved, "loss_one": float(loss_one), "loss_two": float(loss_two)}))


if __name__ == "__main__":
    main()
