"""Why MSDNet's forward pass costs more than its arithmetic: four measurements.

    PYTHONPATH=. .venv/bin/python bench/forward_breakdown.py [--skip-chunked]

(a) 3x3 conv + bias + ReLU at 32x32, batch 256, for several channel widths: the
    GMAC/s TensorFlow's CPU kernels reach (MSDNet's finest scale has 6-channel convs).
(a2) Every conv shape of msdnet_cifar_5 at batch 256: a plain `tf.nn.conv2d` +
    bias + ReLU against what `ConvBNReLU` runs at inference (narrow convs
    width-packed, see `keras_ee.models.layers.width_packing`), with the count
    of such convs in the model and the summed time.
(b) Channel concatenation of a C-channel map with two 3-channel maps (one MSDNet
    dense layer at the finest scale) against an elementwise `x + x` over the
    C-channel map: both are memory-bound.
(c) msdnet_cifar_5 and the plain stack of `bench/models.py` on 256 images, whole
    and in chunks of 64/32/16 inside one `tf.function`: the ratio per chunk size.

(d) Every `AlignCornersResize` shape of ranet_cifar_c1 at batch 256: the two
    einsums over the interpolation matrices (the layer's portable path) against
    TensorFlow's `ResizeBilinear` kernel (its TensorFlow path), and their
    largest difference.

Times are the best of 5 (a, a2, b, d) or the median of 5 interleaved runs (c).
"""

import math
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from models import matched_plain  # noqa: E402  (bench/models.py)

from keras_ee import costs, models  # noqa: E402


def best_ms(fn, *args, rep=10):
    fn(*args)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(rep):
            out = fn(*args)
        out.numpy()
        best = min(best, (time.perf_counter() - start) / rep)
    return best * 1e3


def conv_efficiency(n=256, h=32):
    print("(a) 3x3 conv + bias + ReLU, 32x32, batch 256")
    for cin, cout in [(6, 6), (8, 8), (16, 6), (16, 16), (32, 32)]:
        x = tf.random.normal((n, h, h, cin))
        w = tf.random.normal((3, 3, cin, cout))
        b = tf.zeros(cout)
        fn = tf.function(lambda x, w: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, w, 1, "SAME"), b)))
        ms = best_ms(fn, x, w)
        gmac = n * h * h * cin * cout * 9 / ms / 1e6
        print(f"    {cin:2d} -> {cout:2d} channels  {ms:7.2f} ms  {gmac:6.1f} GMAC/s")


def layers_by_shape(model, layer_class, key):
    """{key(layer): [layers]} over the model's layers of `layer_class`."""
    groups = {}
    for layer in model.layers:
        if isinstance(layer, layer_class):
            groups.setdefault(key(layer), []).append(layer)
    return groups


def conv_shapes(n=256):
    print("(a2) msdnet_cifar_5's conv shapes, batch 256: plain conv2d vs ConvBNReLU at inference")
    from keras_ee.models.layers import ConvBNReLU, width_packing

    groups = layers_by_shape(
        models.create("msdnet_cifar_5", num_classes=100),
        ConvBNReLU,
        lambda l: tuple(l.input.shape[1:]) + (l.kernel_size, l.strides, l.filters),
    )
    totals = [0.0, 0.0]
    rows = []
    for (h, w, cin, k, s, f), members in groups.items():
        layer = members[0]
        x = tf.random.normal((n, h, w, cin))
        pad = (k - 1) // 2
        padding = [[0, 0], [pad, pad], [pad, pad], [0, 0]] if s > 1 else "SAME"
        kernel, bias = tf.random.normal((k, k, cin, f)), tf.zeros(f)
        plain = tf.function(lambda x: tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(x, kernel, s, padding), bias)))
        ours = tf.function(lambda x, layer=layer: layer(x, training=False))
        t_plain, t_ours = best_ms(plain, x, rep=3), best_ms(ours, x, rep=3)
        totals[0] += t_plain * len(members)
        totals[1] += t_ours * len(members)
        how = f"packed x{width_packing(k, f, s, (w - 1) // s + 1)}"
        rows.append(
            (
                t_plain * len(members),
                f"    {h:2d}x{w:<2d} {cin:3d}->{f:3d} k{k} s{s}  x{len(members):2d}  "
                f"conv2d {t_plain:6.2f} ms  ConvBNReLU {t_ours:6.2f} ms ({how}, "
                f"{t_plain / t_ours:4.2f}x)",
            )
        )
    for _, line in sorted(rows, reverse=True):
        print(line)
    print(
        f"    all {sum(len(m) for m in groups.values())} convs: conv2d {totals[0]:.1f} ms, "
        f"ConvBNReLU {totals[1]:.1f} ms ({totals[0] / totals[1]:.2f}x)"
    )


def concat_bandwidth(n=256, h=32):
    print("(b) concat([x (C ch), a (3), b (3)]) vs elementwise x + x, 32x32, batch 256")
    for c in (16, 40, 80):
        x = tf.random.normal((n, h, h, c))
        a = tf.random.normal((n, h, h, 3))
        b = tf.random.normal((n, h, h, 3))
        cat = best_ms(tf.function(lambda x, a, b: tf.concat([x, a, b], -1)), x, a, b)
        add = best_ms(tf.function(lambda x: x + x), x)
        moved = 2 * n * h * h * (c + 6) * 4
        print(f"    C={c:2d}  concat {cat:6.2f} ms ({moved / cat / 1e6:5.1f} GB/s read+write)  x + x {add:6.2f} ms")


def chunked_forward(batch=256, chunks=(256, 64, 32, 16), repeats=5):
    print("(c) forward of 256 images, whole and in chunks inside one tf.function")
    ee = models.create("msdnet_cifar_5", num_classes=100)
    plain, _ = matched_plain(costs.exit_costs(ee)["mul_adds"][-1], 100)
    x = tf.constant(np.random.default_rng(0).random((batch, 32, 32, 3), dtype=np.float32))

    def chunked(model, size):
        def fn(t):
            outs = [tf.nest.flatten(model(t[i : i + size], training=False)) for i in range(0, batch, size)]
            return [tf.concat(parts, 0) for parts in zip(*outs)]

        return tf.function(fn)

    concat_bytes = sum(
        4 * batch * math.prod(layer.output.shape[1:]) for layer in ee.layers if isinstance(layer, models.ChannelConcat)
    )
    print(f"    msdnet_cifar_5's concatenations write {concat_bytes / 1e9:.2f} GB per forward at batch {batch}")
    fns = {(name, c): chunked(m, c) for c in chunks for name, m in (("msdnet", ee), ("plain", plain))}
    for fn in fns.values():
        for _ in range(2):
            [o.numpy() for o in fn(x)]
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            [o.numpy() for o in fn(x)]
            times[k].append(time.perf_counter() - start)
    for c in chunks:
        e = statistics.median(times[("msdnet", c)])
        p = statistics.median(times[("plain", c)])
        print(f"    chunk {c:3d}  msdnet {e:.4f} s  plain {p:.4f} s  ratio {e / p:.2f}x")


def resize_shapes(n=256):
    print("(d) ranet_cifar_c1's align-corners resizes, batch 256: einsum vs ResizeBilinear")
    from keras import ops

    from keras_ee.models.layers import AlignCornersResize

    groups = layers_by_shape(
        models.create("ranet_cifar_c1", num_classes=100),
        AlignCornersResize,
        lambda l: (tuple(l.input.shape[1:]), l.size),
    )
    totals = [0.0, 0.0]
    for (shape, size), members in sorted(groups.items(), key=lambda kv: -kv[0][0][2]):
        count = len(members)
        layer = AlignCornersResize(size)
        x = tf.random.normal((n,) + shape)
        layer(x)  # builds the matrices

        def einsum(t, layer=layer):
            t = ops.einsum("ph,nhwc->npwc", tf.constant(layer._mh), t)
            return ops.einsum("qw,npwc->npqc", tf.constant(layer._mw), t)

        kernel = tf.function(lambda t, layer=layer: layer(t))
        diff = float(tf.reduce_max(tf.abs(einsum(x) - kernel(x))))
        t_einsum, t_kernel = best_ms(tf.function(einsum), x, rep=3), best_ms(kernel, x, rep=3)
        totals[0] += t_einsum * count
        totals[1] += t_kernel * count
        print(
            f"    {shape[0]:2d}x{shape[1]:<2d} x{shape[2]:3d} ch -> {size[0]:2d}x{size[1]:<2d} x{count:2d}  "
            f"einsum {t_einsum:6.2f} ms  ResizeBilinear {t_kernel:5.2f} ms  max diff {diff:.1e}"
        )
    print(f"    all: einsum {totals[0]:.1f} ms, ResizeBilinear {totals[1]:.1f} ms")


if __name__ == "__main__":
    conv_efficiency()
    conv_shapes()
    concat_bandwidth()
    resize_shapes()
    if "--skip-chunked" not in sys.argv[1:]:
        chunked_forward()
