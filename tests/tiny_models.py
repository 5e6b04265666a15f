"""What the training tests share: a tiny Dense+BN multi-exit backbone, random data, a fit interrupter."""

import keras
import tensorflow as tf

# A multiexit_cnn for the tests that train whole runs: three exits, one conv unit per stage. Tracing
# a training step costs in proportion to the layers (the default preset has eight conv units, this
# one three), and what those tests check (resume, backups, logs, dumps) does not depend on the size.
SMALL_CNN = {"widths": [8, 16, 16], "depth": 1}
# The same as `keras-ee train` flags.
SMALL_CNN_ARGS = ["--model-option", "widths=[8,16,16]", "--model-option", "depth=1"]
# Two exits, two conv units: for the tests of a whole run or search that do not look inside the exits
# (resume across phases, tuning); the bilevel steps of L2W and IMTA trace a third faster than on three.
TWO_EXIT_CNN = {"widths": [8, 16], "depth": 1}
# MSDNet and RANet on 16x16 images with few channels: every kind of block of the presets, a
# fraction of their layers and multiply-adds.
SMALL_MSDNET = dict(input_shape=(16, 16, 3), num_blocks=3, channels=4, growth_rate=2, head_channels=8)
SMALL_RANET = dict(input_shape=(16, 16, 3), channels=4, growth_rate=4, step=1, head_channels=8)


def two_logical_cpus():
    """Splits the CPU into two logical devices, "/cpu:0" and "/cpu:1", for a MirroredStrategy of two
    replicas on one machine. Only possible before TensorFlow initialises its runtime: tests/conftest.py
    calls it before any test runs (ops without a device run on the first, as on a plain machine)."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) != 2:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


def fresh_collective_keys():
    """Call before making a MirroredStrategy in a process that made one before: each strategy numbers
    its collectives from the same base key, and the process remembers the collectives it ran, so a
    second strategy would meet the first one's under the same keys ("Collective instance 101 expected
    type 0 ... but got type 2"). TensorFlow's own tests move the base for each strategy the same way."""
    tf.distribute.MirroredStrategy._collective_key_base += 100000


def tiny_backbone(num_exits=3, num_classes=4, dim=5, width=6, seed=0, nan_exit=None):
    """Dense+BN blocks with a head named exit_k after each block.

    With `nan_exit=k`, exit k's logits are multiplied by exp(1000 * x[:, 0])
    so a sample with x[:, 0] = 1 makes only that exit's loss non-finite.
    """
    keras.utils.set_random_seed(seed)
    inp = keras.Input((dim,))
    h = inp
    outs = []
    for k in range(num_exits):
        h = keras.layers.Dense(width)(h)
        h = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)(h)
        h = keras.layers.ReLU()(h)
        z = keras.layers.Dense(num_classes, name=f"exit_{k + 1}" if nan_exit != k + 1 else "logits_raw")(h)
        if nan_exit == k + 1:
            gate = keras.layers.Lambda(lambda t: tf.exp(1000.0 * t[:, :1]))(inp)
            z = keras.layers.Multiply(name=f"exit_{k + 1}")([z, gate])
        outs.append(z)
    return keras.Model(inp, outs)


def mlp_backbone(num_exits=3, num_classes=4, dim=5, width=8):
    """Dense+ReLU blocks with a head `exit_k` after each, no BatchNorm (per-replica BN statistics
    would make a distributed run differ from one device)."""
    inp = keras.Input((dim,))
    h, outs = inp, []
    for k in range(num_exits):
        h = keras.layers.Dense(width, activation="relu")(h)
        outs.append(keras.layers.Dense(num_classes, name=f"exit_{k + 1}")(h))
    return keras.Model(inp, outs)


class StopAt(keras.callbacks.Callback):
    """Interrupts fit at the start of `epoch`, or after its batch `batch` (inside it)."""

    def __init__(self, epoch, batch=None):
        super().__init__()
        self.epoch, self.batch, self._epoch = epoch, batch, None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if self.batch is None and epoch == self.epoch:
            raise KeyboardInterrupt

    def on_train_batch_end(self, batch, logs=None):
        if self.batch is not None and self._epoch == self.epoch and batch == self.batch:
            raise KeyboardInterrupt


def tiny_data(n=16, dim=5, classes=4, seed=1, dtype="float32"):
    """Random inputs `(n, dim)` and integer labels `(n,)` for `tiny_backbone`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)).astype(dtype), rng.integers(0, classes, size=n).astype("int32")
