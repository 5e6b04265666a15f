"""Forward-pass speed of msdnet_cifar_5 vs a plain conv stack of equal Mul-Adds.

The plain model uses standard Keras `Conv2D`/`BatchNormalization`/`ReLU`
layers; keras-ee models use the `ConvBNReLU` layer, which folds BN into the
conv at inference. Runs both models on the same batch of CIFAR-shaped images on CPU, in
inference mode inside a `tf.function`, alternating the two so that load
changes on the machine affect both alike, and prints the median times and
their ratio (target: MSDNet <= 1.5x the plain model). A third function runs
the same MSDNet with `ConvBNReLU`'s width packing of narrow convs turned off
(`keras_ee.models.layers.PACK_NARROW_CONVS`), to show that packing's share.

Fairness: both models get the same input tensor, the same number of warm-up
calls (which also trace the functions), `training=False`, the same compile
mode, and the median over interleaved runs. `--jit` compiles both with XLA
(`jit_compile=True`); it is off by default because on CPU XLA slows MSDNet
down (its many small convs and concats) while speeding up the plain stack,
measured 1.63 s vs 1.20 s and 0.76 s vs 0.90 s, so the default is the
faster mode for the model under test. Whether TensorFlow's oneDNN kernels are
on (`TF_ENABLE_ONEDNN_OPTS`, off by default on AMD CPUs) changes both
timings; the line "onednn" in the output says which was used.

Usage:
    python bench/models.py [--batch 256] [--repeats 7] [--model msdnet_cifar_5] [--jit]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_ee import costs, models  # noqa: E402
from keras_ee.models import layers as ee_layers  # noqa: E402


def plain_stack(num_layers, width, num_classes, input_shape=(32, 32, 3)):
    """Stem + `num_layers` 3x3 Conv2D/BatchNormalization/ReLU at full
    resolution + GAP + Dense: standard Keras layers, as a user would write."""
    inp = keras.Input(input_shape)
    x = inp
    for _ in range(num_layers + 1):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(num_classes)(x), name="plain")


def matched_plain(target, num_classes, width=32):
    """Plain stack whose reference Mul-Adds are closest to `target`."""
    best = None
    for n in range(1, 40):
        model = plain_stack(n, width, num_classes)
        ops = costs.exit_costs(model)["mul_adds"][-1]
        if best is None or abs(ops - target) < abs(best[1] - target):
            best = (model, ops)
        if ops > target:
            break
    return best


def timed(fn, x):
    start = time.perf_counter()
    out = fn(x)
    # Materialize every output so lazy execution cannot hide work.
    for o in tf.nest.flatten(out):
        o.numpy()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="msdnet_cifar_5")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--jit", action="store_true", help="XLA-compile both models")
    args = parser.parse_args()

    ee = models.create(args.model, num_classes=100)
    ee_ops = costs.exit_costs(ee)["mul_adds"][-1]
    plain, plain_ops = matched_plain(ee_ops, 100)
    x = tf.constant(np.random.default_rng(0).random((args.batch, 32, 32, 3), dtype=np.float32))

    fns = {
        args.model: tf.function(lambda t: ee(t, training=False), jit_compile=args.jit),
        "plain": tf.function(lambda t: plain(t, training=False), jit_compile=args.jit),
        "unpacked": tf.function(lambda t: ee(t, training=False), jit_compile=args.jit),
    }
    for name, fn in fns.items():
        # The packing switch is read while tracing, i.e. in the first call.
        ee_layers.PACK_NARROW_CONVS = name != "unpacked"
        for _ in range(args.warmup):
            timed(fn, x)
    ee_layers.PACK_NARROW_CONVS = True
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, x))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"threads: intra={tf.config.threading.get_intra_op_parallelism_threads()} "
        f"inter={tf.config.threading.get_inter_op_parallelism_threads()} cpus={os.cpu_count()} "
        f"onednn={ee_layers.tensorflow_uses_onednn()} jit={args.jit}"
    )
    print(f"batch {args.batch}, {args.repeats} runs after {args.warmup} warm-up, median seconds")
    print(f"{args.model:<16} Mul-Adds/img {ee_ops / 1e6:8.2f}M  {med[args.model]:.4f}s  ({len(ee.layers)} layers)")
    print(f"{'plain':<16} Mul-Adds/img {plain_ops / 1e6:8.2f}M  {med['plain']:.4f}s  ({len(plain.layers)} layers)")
    print(f"{'  unpacked convs':<16} same model, no width packing  {med['unpacked']:.4f}s")
    ratio = med[args.model] / med["plain"]
    print(
        f"ratio {args.model}/plain = {ratio:.2f}x (target <= 1.5x); "
        f"without packing {med['unpacked'] / med['plain']:.2f}x"
    )


if __name__ == "__main__":
    main()
