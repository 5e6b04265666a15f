"""Inference-implementation variants of msdnet_cifar_5, timed side by side.

    PYTHONPATH=. .venv/bin/python bench/forward_variants.py [--repeats 9]

Builds msdnet_cifar_5 (and, for the last variant, a second instance with
separate bottleneck convs), traces one `tf.function` per variant, checks that
every variant's logits match the unpacked model's, then times all of them
alternately (in a shuffled order each round) on a batch of 256 and prints the medians. Variants:

- `packed`: the shipped `ConvBNReLU` (width packing by `width_packing`);
- `unpacked`: packing off (`PACK_NARROW_CONVS = False`);
- `packed <= 8 channels`: packing only convs with at most 8 output channels;
- `packed x4 at stride 2`: four output columns per position for the packed
  stride-2 convs;
- `BN folded to constants`: the folded kernels and biases computed once in
  numpy and baked in as constants (what per-call BN folding costs);
- `separate bottlenecks`: MSDNet built with one 1x1 conv per consumer at the
  16x16 and 8x8 scales instead of one merged conv + split (different weights,
  same shapes; timing only).
"""

import argparse
import importlib
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.get_logger().setLevel("ERROR")  # one trace per variant is the point, not a retracing bug

from keras_ee import models  # noqa: E402
from keras_ee.models import layers as L  # noqa: E402
from keras_ee.models.blocks import conv_bn_relu  # noqa: E402

msdnet_module = importlib.import_module("keras_ee.models.msdnet")
shipped_packing = L.width_packing
shipped_call = L.ConvBNReLU.call
shipped_bottleneck = msdnet_module.shared_bottleneck


def packing_le8(kernel_size, filters, strides, out_width):
    return shipped_packing(kernel_size, filters, strides, out_width) if filters <= 8 else 1


def packing_x4_stride2(kernel_size, filters, strides, out_width):
    pack = shipped_packing(kernel_size, filters, strides, out_width)
    return 4 if pack == 2 and strides == 2 and out_width % 4 == 0 else pack


def constant_bn_call(self, inputs, training=None):
    with tf.init_scope():  # folded (and packed) once, eagerly, then embedded as graph constants
        kernel, shift, pack = self.inference_weights(inputs.dtype, inputs.shape[2])
        kernel, shift = kernel.numpy(), shift.numpy()
    return self._tf_fused(inputs, tf.constant(kernel), tf.constant(shift), pack)


def coarse_separate_bottleneck(x, widths, name, init, options):
    if x.shape[1] >= 32:
        return shipped_bottleneck(x, widths, name, init, options)
    return [conv_bn_relu(x, w, 1, 1, f"{name}{i}", init, options) for i, w in enumerate(widths)]


def traced(model, x, packing=shipped_packing, call=shipped_call):
    """A forward `tf.function` traced (first call) under the given patches."""
    L.width_packing, L.ConvBNReLU.call = packing, call
    try:
        fn = tf.function(lambda t: model(t, training=False))
        fn(x)
    finally:
        L.width_packing, L.ConvBNReLU.call = shipped_packing, shipped_call
    return fn


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    x = tf.constant(np.random.default_rng(0).random((args.batch, 32, 32, 3), dtype=np.float32))
    ee = models.create("msdnet_cifar_5", num_classes=100)
    msdnet_module.shared_bottleneck = coarse_separate_bottleneck
    try:
        separate = models.create("msdnet_cifar_5", num_classes=100)
    finally:
        msdnet_module.shared_bottleneck = shipped_bottleneck

    fns = {
        "packed": traced(ee, x),
        "unpacked": traced(ee, x, packing=lambda *a: 1),
        "packed <= 8 channels": traced(ee, x, packing=packing_le8),
        "packed x4 at stride 2": traced(ee, x, packing=packing_x4_stride2),
        "BN folded to constants": traced(ee, x, call=constant_bn_call),
        "separate bottlenecks": traced(separate, x),
    }
    reference = [o.numpy() for o in fns["unpacked"](x)]
    for name, fn in fns.items():
        if name == "separate bottlenecks":
            continue
        diff = max(float(np.abs(a.numpy() - b).max()) for a, b in zip(fn(x), reference))
        assert diff < 1e-4, (name, diff)
    for fn in fns.values():
        fn(x)
    times = {k: [] for k in fns}
    order = list(fns)
    rng = np.random.default_rng(0)
    for _ in range(args.repeats):
        rng.shuffle(order)  # no variant always runs right after the same one
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            [o.numpy() for o in fn(x)]
            times[name].append(time.perf_counter() - start)
    print(f"msdnet_cifar_5 forward, batch {args.batch}, median of {args.repeats} shuffled rounds")
    base = statistics.median(times["packed"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<24} {med * 1e3:7.1f} ms  ({med / base:.3f}x packed)")


if __name__ == "__main__":
    main()
