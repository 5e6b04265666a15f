"""Multi-exit architectures: presets, hooks, stage splitting, save/load."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny_models import SMALL_MSDNET, SMALL_RANET

from keras_ee import costs, models
from keras_ee.inference_snapshot import InferenceSnapshot
from keras_ee.models import AlignCornersResize, GradientScale
from keras_ee.models import layers as layers_module
from keras_ee.models.layers import ConvBNReLU, align_corners_matrix, width_packing

# Reduced configurations: same code paths as the presets, fast to run.


def _rand(shape, seed=0):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _as_list(out):
    return [np.asarray(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def _chain(stages, x):
    out = stages[0](x)
    logits = [out[0]]
    for stage in stages[1:]:
        out = stage(out[1:])
        # Every stage, the last included, returns a list [logits, *state].
        assert isinstance(out, list)
        logits.append(out[0])
    return [np.asarray(l) for l in logits]


def test_available_and_unknown_preset():
    names = models.list_presets()
    for n in [
        "msdnet_cifar_5",
        "msdnet_cifar_7",
        "msdnet_imagenet_s4",
        "msdnet_imagenet_s6",
        "msdnet_imagenet_s7",
        "ranet_cifar_c1",
        "ranet_cifar_c2",
        "multiexit_cnn",
    ]:
        assert n in names
    with pytest.raises(ValueError, match="msdnet_cifar_5"):
        models.create("resnet9000")


def test_bad_overrides_and_inputs():
    with pytest.raises(ValueError, match="unknown override"):
        models.create("msdnet_cifar_5", growthrate=3)
    with pytest.raises(ValueError, match="too small"):
        models.create("msdnet_cifar_5", input_shape=(4, 4, 3))
    with pytest.raises(ValueError, match="too small"):
        models.create("ranet_cifar_c1", input_shape=(4, 4, 3))
    with pytest.raises(ValueError, match=">= 8"):
        models.create("multiexit_cnn", input_shape=(7, 7, 1))
    with pytest.raises(ValueError, match="even"):
        models.create("msdnet_cifar_5", growth_rate=3, growth_factors=(1, 1, 1), bottleneck_factors=(1, 1, 1))
    with pytest.raises(TypeError):
        models.create("multiexit_cnn", num_classes="10")
    with pytest.raises(ValueError, match="scale_list"):
        models.create("ranet_cifar_c1", scale_list=(2, 3, 4))
    with pytest.raises(ValueError, match="input_shape"):
        models.create("multiexit_cnn", input_shape=(32, 32))


@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3)])
def test_multiexit_cnn_shapes(shape):
    model = models.create("multiexit_cnn", num_classes=7, input_shape=shape)
    assert model.output_names == ["exit_1", "exit_2", "exit_3", "exit_4"]
    out = model.predict_on_batch(_rand((2,) + shape))
    assert [o.shape for o in out] == [(2, 7)] * 4
    c = costs.exit_costs(model)["mul_adds"]
    assert all(b > a for a, b in zip(c, c[1:]))
    wide = models.create("multiexit_cnn", input_shape=shape, widths=(8, 8, 16))
    assert len(wide.outputs) == 3
    assert len(models.create("multiexit_cnn", input_shape=shape, num_exits=2).outputs) == 2


def test_preset_structure_msdnet_ranet():
    m = models.create("msdnet_cifar_5", num_classes=10)
    assert m.output_names == [f"exit_{k}" for k in range(1, 6)]
    # Heads read 88, 136, 104, 200, 208 channels (architectures.md 3.9).
    heads = [m.get_layer(f"exit_{k}_branch").output.shape[-1] for k in range(1, 6)]
    assert heads == [88, 136, 104, 200, 208]
    units = [l for l in m.layers if isinstance(l, ConvBNReLU)]
    # Stems, 3x3 units, merged 1x1 bottlenecks, transitions, head convs.
    assert len(units) > 90
    # 1x1 bottlenecks reading x_s are merged: scale s's own unit and scale
    # s+1's down unit (layer 1: 6 + 6 on the 16-channel finest map).
    assert m.get_layer("l1_x0_a").filters == 12
    assert m.get_layer("l1_x1_a").filters == 12 + 24
    assert m.get_layer("l1_x2_a").filters == 48
    assert all(u.epsilon == 1e-5 and u.momentum == 0.9 for u in units)
    assert not any(isinstance(l, (keras.layers.Conv2D, keras.layers.BatchNormalization)) for l in m.layers)
    r = models.create("ranet_cifar_c1")
    heads = [r.get_layer(f"exit_{k}_branch").output.shape[1:] for k in range(1, 7)]
    assert heads == [(8, 8, c) for c in (112, 208, 145, 241, 146, 218)]
    assert any(isinstance(l, AlignCornersResize) for l in r.layers)
    assert len(models.create("ranet_cifar_c2").outputs) == 8
    assert len(models.create("msdnet_cifar_7").outputs) == 7


def test_exit_structure_and_gradient_equilibrium():
    k_total = 4
    m = models.create("multiexit_cnn", input_shape=(8, 8, 1), gradient_equilibrium=True)
    s = models.exit_structure(m)
    assert s.num_exits == k_total
    assert s.names["features"] == [f"exit_{k}_features" for k in range(1, 5)]
    assert s.trunk[-1] is None and len(s.stage_states) == 3
    for k in range(1, k_total + 1):
        assert s.branch[k - 1].scale == pytest.approx(1 / (k_total - k + 1))
        if k < k_total:
            assert s.trunk[k - 1].scale == pytest.approx((k_total - k) / (k_total - k + 1))
    plain = models.exit_structure(models.create("multiexit_cnn", input_shape=(8, 8, 1)))
    assert all(b.scale == 1.0 for b in plain.branch)
    # The feature layer feeds the logits Dense.
    feat = m.get_layer("exit_2_features").output
    assert feat.shape == (None, 32)
    msd = models.exit_structure(models.MSDNetBackbone(gradient_equilibrium=True, **SMALL_MSDNET))
    assert msd.branch[0].scale == pytest.approx(1 / 3) and msd.trunk[0].scale == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="exit_1"):
        inp = keras.Input((4,))
        models.exit_structure(keras.Model(inp, [keras.layers.Dense(2)(inp)]))


def test_gradient_scale_layer():
    layer = GradientScale(0.25)
    x = tf.constant(_rand((3, 5)) * 7 - 3)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * tf.range(5, dtype=tf.float32))
    assert np.array_equal(y.numpy(), x.numpy())  # bit-exact identity
    np.testing.assert_allclose(tape.gradient(loss, x).numpy(), 0.25 * np.tile(np.arange(5), (3, 1)))
    clone = GradientScale.from_config(layer.get_config())
    assert clone.scale == 0.25
    with pytest.raises(TypeError):
        GradientScale("big")
    with pytest.raises(ValueError):
        GradientScale(float("nan"))


@pytest.mark.parametrize(
    "k,s,h,f",
    [
        (3, 2, 8, 6),  # stride 2, width-packed at inference (even output width)
        (3, 1, 7, 6),  # odd width: not packed
        (1, 1, 5, 6),  # 1x1
        (3, 2, 7, 6),  # odd input, even output width: packed
        (3, 1, 8, 12),  # stride 1, packed
        (5, 1, 6, 16),  # 5x5 kernel, packed
        (3, 2, 8, 12),  # stride 2 and 12 filters: not packed
        (3, 1, 8, 17),  # too wide to pack
        (5, 2, 9, 8),  # 5x5, stride 2, odd input: packed
    ],
)
def test_conv_bn_relu_matches_keras_layers(k, s, h, f, monkeypatch):
    rng = np.random.default_rng(1)
    x = _rand((4, h, h, 5))
    fused = ConvBNReLU(f, k, s, moving_variance_update="biased")  # Keras' moving variance
    fused.build(x.shape)
    fused.gamma.assign(rng.random(f) + 0.5)
    fused.beta.assign(rng.random(f) - 0.5)
    fused.moving_mean.assign(rng.random(f))
    fused.moving_variance.assign(rng.random(f) + 0.5)
    # Independent reference: PyTorch-style symmetric padding + Keras layers.
    pad = keras.layers.ZeroPadding2D((k - 1) // 2) if s > 1 else keras.layers.Identity()
    conv = keras.layers.Conv2D(f, k, strides=s, padding="valid" if s > 1 else "same", use_bias=False)
    bn = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)

    def ref(t, training):
        return np.asarray(keras.layers.ReLU()(bn(conv(pad(t)), training=training)))

    ref(x, False)
    conv.kernel.assign(fused.kernel)
    for a, b in [
        (bn.gamma, fused.gamma),
        (bn.beta, fused.beta),
        (bn.moving_mean, fused.moving_mean),
        (bn.moving_variance, fused.moving_variance),
    ]:
        a.assign(b)
    want = ref(x, False)
    # Inference: both kernel choices (packed convs for Eigen's kernels, plain
    # ones for oneDNN's), eagerly and in a graph, where grappler fuses.
    for onednn in (False, True):
        monkeypatch.setattr(layers_module, "_ONEDNN", onednn)
        np.testing.assert_allclose(np.asarray(fused(x, training=False)), want, atol=1e-5)
        graph = tf.function(lambda t: fused(t, training=False))
        np.testing.assert_allclose(graph(tf.constant(x)).numpy(), want, atol=1e-5)
        # A batch dimension unknown when traced.
        loose = tf.function(
            lambda t: fused(t, training=False),
            input_signature=[tf.TensorSpec((None,) + x.shape[1:], tf.float32)],
        )
        np.testing.assert_allclose(loose(tf.constant(x)).numpy(), want, atol=1e-5)
        # Unknown height (the width stays static, so packing still applies).
        tall = tf.function(
            lambda t: fused(t, training=False),
            input_signature=[tf.TensorSpec((None, None) + x.shape[2:], tf.float32)],
        )
        np.testing.assert_allclose(tall(tf.constant(x)).numpy(), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(fused(x, training=True)), ref(x, True), atol=1e-5)
    np.testing.assert_allclose(fused.moving_mean.numpy(), bn.moving_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), bn.moving_variance.numpy(), atol=1e-6)
    assert len(fused.trainable_weights) == 3
    # Training-mode gradients (fused BN kernel) equal the Keras layers' ones.
    xt = tf.constant(x)
    dy = tf.constant(_rand(tuple(fused(x, training=True).shape)))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(xt)
        got = tf.reduce_sum(fused(xt, training=True) * dy)
        want = tf.reduce_sum(keras.layers.ReLU()(bn(conv(pad(xt)), training=True)) * dy)
    for a, b in [(xt, xt), (fused.kernel, conv.kernel), (fused.gamma, bn.gamma), (fused.beta, bn.beta)]:
        np.testing.assert_allclose(
            np.asarray(tape.gradient(got, a)), np.asarray(tape.gradient(want, b)), rtol=1e-5, atol=1e-4
        )
    with pytest.raises(ValueError):
        ConvBNReLU(6, 2)


@pytest.mark.parametrize("graph", [False, True])
def test_conv_bn_relu_second_order_gradients_match_keras_layers(graph):
    """The fused BN's gradient of the gradient (L2W's and HDKD's meta-gradients) equals
    that of Conv2D + training-mode BN written out + ReLU: with respect to the incoming
    gradient's seed (the meta-gradient's path) and with respect to the input (a
    Hessian-vector product), in eager and in a traced function. The reference takes its
    moments without `tf.nn.moments`, whose `stop_gradient` on the mean (also in Keras'
    BatchNormalization) leaves out a term of the second derivative in the input."""
    rng = np.random.default_rng(3)
    x = tf.constant(_rand((4, 6, 6, 3), seed=1))
    fused = ConvBNReLU(5, 3, 2)
    fused.build(x.shape)
    fused.gamma.assign(rng.random(5) + 0.5)
    fused.beta.assign(rng.random(5) - 0.5)
    conv = keras.layers.Conv2D(5, 3, strides=2, padding="valid", use_bias=False)
    pad = keras.layers.ZeroPadding2D(1)
    gamma, beta = tf.Variable(fused.gamma.numpy()), tf.Variable(fused.beta.numpy())

    def reference(t):
        h = conv(pad(t))
        mean = tf.reduce_mean(h, axis=[0, 1, 2])
        var = tf.reduce_mean(tf.square(h - mean), axis=[0, 1, 2])
        return tf.nn.relu((h - mean) * tf.math.rsqrt(var + 1e-5) * gamma + beta)

    reference(x)
    conv.kernel.assign(fused.kernel)
    out_shape = tuple(reference(x).shape)
    w = tf.constant(_rand(out_shape, seed=2))
    seed = tf.constant(_rand(out_shape, seed=4))
    v = [tf.constant(_rand(tuple(t.shape), seed=5 + i)) for i, t in enumerate([x] + fused.trainable_weights)]

    def second_order(layer_fn, weights, x, seed):
        # seed plays the meta-gradient's coefficients: d/d seed and d/dx of <dL/d(x, w), v>.
        with tf.GradientTape(persistent=True) as outer:
            outer.watch([x, seed])
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(tf.square(layer_fn(x)) * w * seed)
            g = inner.gradient(loss, [x] + weights)
            z = tf.add_n([tf.reduce_sum(a * b) for a, b in zip(g, v)])
        return [outer.gradient(z, seed), outer.gradient(z, x)] + g

    def got_fn(x, seed):
        return second_order(lambda t: fused(t, training=True), fused.trainable_weights, x, seed)

    def want_fn(x, seed):
        return second_order(reference, [conv.kernel, gamma, beta], x, seed)

    got = (tf.function(got_fn) if graph else got_fn)(x, seed)
    want = (tf.function(want_fn) if graph else want_fn)(x, seed)
    for name, a, b in zip(["d seed", "d x (second order)", "dx", "dkernel", "dgamma", "dbeta"], got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4, err_msg=name)


def test_width_packing_rule(monkeypatch):
    monkeypatch.setattr(layers_module, "_ONEDNN", False)
    assert width_packing(3, 6, 1, 32) == 2
    assert width_packing(3, 16, 1, 32) == 2
    assert width_packing(5, 16, 1, 32) == 2
    assert width_packing(3, 17, 1, 32) == 1
    assert width_packing(3, 8, 2, 16) == 2
    assert width_packing(3, 12, 2, 16) == 1
    assert width_packing(1, 6, 1, 32) == 1  # 1x1: already a matmul
    assert width_packing(3, 6, 3, 8) == 1
    assert width_packing(3, 6, 1, 7) == 1  # odd width
    assert width_packing(3, 6, 1, None) == 1  # unknown width
    monkeypatch.setattr(layers_module, "_ONEDNN", True)
    assert width_packing(3, 6, 1, 32) == 1


def test_channel_concat_forward_and_higher_order_gradients():
    from keras_ee.models.layers import ChannelConcat

    parts = [tf.constant(_rand((2, 3, 3, c))) for c in (4, 1, 2)]
    layer = ChannelConcat()
    np.testing.assert_array_equal(np.asarray(layer(parts)), np.concatenate(parts, axis=-1))
    w = tf.constant(_rand((2, 3, 3, 7)))
    v = [tf.constant(_rand(tuple(p.shape))) for p in parts]

    def second_order(concat):
        # d/dw of <d<concat(parts)^2, w>/dparts, v>: exercises the gradient of the gradient.
        with tf.GradientTape() as outer:
            outer.watch(w)
            with tf.GradientTape() as inner:
                inner.watch(parts)
                y = tf.reduce_sum(tf.square(concat(parts)) * w)
            g = inner.gradient(y, parts)
            z = tf.add_n([tf.reduce_sum(a * b) for a, b in zip(g, v)])
        return [np.asarray(t) for t in g], np.asarray(outer.gradient(z, w))

    got_g, got_w = second_order(layer)
    want_g, want_w = second_order(lambda t: tf.concat(t, axis=-1))
    for a, b in zip(got_g, want_g):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-6)
    assert ChannelConcat.from_config(layer.get_config()).axis == -1
    with pytest.raises(ValueError, match="axis"):
        ChannelConcat(axis=1)


def test_shared_bottleneck_equals_separate_units():
    from keras_ee.models.blocks import conv_bn_relu, shared_bottleneck
    from keras_ee.models.layers import ChannelSplit

    inp = keras.Input((6, 6, 5))
    parts = shared_bottleneck(inp, [3, 4], "merged", "glorot_uniform")
    merged = keras.Model(inp, parts)
    big = merged.get_layer("merged")
    rng = np.random.default_rng(1)
    for w in big.weights:
        w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
    x = _rand((2, 6, 6, 5), seed=2) - 0.5
    for training in (False, True):
        got = _as_list(merged(x, training=training))
        for i, (lo, hi) in enumerate([(0, 3), (3, 7)]):
            single = keras.Model(inp, conv_bn_relu(inp, hi - lo, 1, 1, f"single{i}", "zeros"))
            layer = single.get_layer(f"single{i}")
            layer.kernel.assign(big.kernel[..., lo:hi])
            for name in ("gamma", "beta", "moving_mean", "moving_variance"):
                getattr(layer, name).assign(getattr(big, name)[lo:hi])
            want = np.asarray(single(x, training=training))
            np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="add up to"):
        ChannelSplit([3, 3])(keras.Input((4, 4, 7)))
    with pytest.raises(ValueError, match="positive ints"):
        ChannelSplit([3, 0])


def _matrix_resize(x, size):
    mh = align_corners_matrix(x.shape[1], size[0])
    mw = align_corners_matrix(x.shape[2], size[1])
    return np.einsum("qw,npwc->npqc", mw, np.einsum("ph,nhwc->npwc", mh, x))


def test_align_corners_resize_matches_interpolation_matrices():
    # The layer runs TensorFlow's ResizeBilinear kernel; the reference is the
    # PyTorch align_corners=True interpolation written as two matrices.
    x = _rand((2, 8, 6, 3))
    for size in [(16, 12), (4, 3), (8, 6), (5, 11)]:
        got = np.asarray(AlignCornersResize(size)(x))
        np.testing.assert_allclose(got, _matrix_resize(x.astype(np.float64), size), atol=1e-5)
        graph = tf.function(lambda t, size=size: AlignCornersResize(size)(t))
        np.testing.assert_allclose(graph(tf.constant(x)).numpy(), got, atol=1e-6)
    m = align_corners_matrix(8, 16)
    np.testing.assert_allclose(m.sum(axis=1), 1.0)
    assert m[0, 0] == 1.0 and m[-1, -1] == 1.0  # corners aligned
    with pytest.raises(ValueError):
        AlignCornersResize((0, 3))


@pytest.mark.parametrize("size", [(16, 12), (4, 3)])
def test_align_corners_resize_gradients_first_and_second_order(size):
    """Gradients through the kernel path equal those of the matrix einsums,
    including the second order that L2W's meta-gradient takes."""
    from keras import ops

    layer = AlignCornersResize(size)
    x = tf.constant(_rand((2, 8, 6, 3)))
    layer(x)
    mh, mw = tf.constant(layer._mh), tf.constant(layer._mw)

    def einsum_resize(t):
        return ops.einsum("qw,npwc->npqc", mw, ops.einsum("ph,nhwc->npwc", mh, t))

    w = tf.constant(_rand((2,) + tuple(size) + (3,)))

    def input_gradient(f, t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            value = f(t)
        return tape.gradient(value, t)

    def grads(resize):
        loss = lambda t: tf.reduce_sum(tf.sin(resize(t)) * w)  # noqa: E731
        meta = lambda t: tf.reduce_sum(tf.square(input_gradient(loss, t)))  # noqa: E731
        return input_gradient(loss, x), input_gradient(meta, x)

    for got, want in zip(grads(layer), grads(einsum_resize)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.create("multiexit_cnn", input_shape=(8, 8, 1)),
        lambda: models.MSDNetBackbone(num_classes=5, **SMALL_MSDNET),
        lambda: models.RANetBackbone(num_classes=5, **SMALL_RANET),
        lambda: models.MSDNetBackbone(
            num_classes=5,
            stem="imagenet",
            head_channels=None,
            input_shape=(64, 64, 3),
            num_blocks=2,
            channels=4,
            growth_rate=2,
            growth_factors=(1, 2, 4, 4),
            bottleneck_factors=(1, 2, 4, 4),
            step_mode="even",
            step=2,
            base=2,
        ),
    ],
    ids=["cnn", "msdnet", "ranet", "msdnet_imagenet_stem"],
)
def test_split_stages_chain_equals_full_model(build):
    model = build()
    x = _rand((3,) + tuple(model.inputs[0].shape[1:]))
    full = _as_list(model.predict_on_batch(x))
    stages = models.split_stages(model)
    assert len(stages) == len(model.outputs)
    chained = _chain(stages, x)
    for a, b in zip(full, chained):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The stages share the model's weights: changing one changes the other.
    dense = model.get_layer("exit_1")
    dense.bias.assign(dense.bias + 1.0)
    np.testing.assert_allclose(np.asarray(stages[0](x)[0]), full[0] + 1.0, rtol=1e-5, atol=1e-5)
    # Stage costs from the split agree with the counter's per-stage split.
    per_stage = costs.exit_costs(model)["stage_params"]
    assert sum(per_stage) == sum(int(np.prod(w.shape)) for w in model.trainable_weights)


@pytest.mark.parametrize(
    "build",
    [
        lambda: models.create("multiexit_cnn", input_shape=(8, 8, 1), gradient_equilibrium=True),
        lambda: models.MSDNetBackbone(num_classes=5, gradient_equilibrium=True, **SMALL_MSDNET),
        lambda: models.RANetBackbone(num_classes=5, **SMALL_RANET),
    ],
    ids=["cnn", "msdnet", "ranet"],
)
def test_save_load_roundtrip(build, tmp_path):
    model = build()
    x = _rand((2,) + tuple(model.inputs[0].shape[1:]))
    before = _as_list(model.predict_on_batch(x))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    after = _as_list(loaded.predict_on_batch(x))
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert loaded.output_names == model.output_names
    s = models.exit_structure(loaded)
    assert [b.scale for b in s.branch] == [b.scale for b in models.exit_structure(model).branch]
    assert costs.exit_costs(loaded) == costs.exit_costs(model)
    chained = _chain(models.split_stages(loaded), x)
    for a, b in zip(before, chained):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _tiny_residual_backbone():
    inp = keras.Input((16, 16, 3))
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="a")(inp)
    b = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="b")(a)
    c = keras.layers.Add(name="add")([a, b])  # skip connection across exit 1
    d = keras.layers.Conv2D(16, 3, strides=2, padding="same", name="d")(c)
    e = keras.layers.GlobalAveragePooling2D(name="gap")(d)
    return keras.Model(inp, keras.layers.Dense(4, name="top")(e), name="tiny")


def test_attach_exits_tiny_residual():
    backbone = _tiny_residual_backbone()
    model = models.attach_exits(backbone, ["b", "d"], num_classes=3)
    assert model.output_names == ["exit_1", "exit_2"]
    x = _rand((2, 16, 16, 3))
    out = _as_list(model.predict_on_batch(x))
    # Independent reference: the backbone's own layers applied by hand.
    feats_b = backbone.get_layer("b")(backbone.get_layer("a")(x))
    ref1 = model.get_layer("exit_1")(tf.reduce_mean(feats_b, axis=(1, 2)))
    np.testing.assert_allclose(out[0], np.asarray(ref1), rtol=1e-5, atol=1e-5)
    # Stage 1 hands on both `a` (for the skip) and `b`.
    s = models.exit_structure(model)
    assert len(s.stage_states[0]) == 2
    np.testing.assert_allclose(_chain(models.split_stages(model), x)[1], out[1], rtol=1e-5, atol=1e-5)
    c = costs.exit_costs(model)
    conv_a = 9 * 3 * 8 * 256 + 8 * 256
    conv_b = 9 * 8 * 8 * 256 + 8 * 256
    assert c["mul_adds"][0] == conv_a + conv_b + 8 * 256 + 8 * 3 + 3
    custom = models.attach_exits(
        backbone,
        ["b", "d"],
        num_classes=3,
        head=lambda t, k: keras.layers.Flatten(name=f"flat_{k}")(t),
    )
    assert custom.get_layer("exit_2_features").output.shape == (None, 8 * 8 * 16)
    with pytest.raises(ValueError, match="Valid names"):
        models.attach_exits(backbone, ["nope"], num_classes=3)
    with pytest.raises(ValueError, match="execution order"):
        models.attach_exits(backbone, ["d", "b"], num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        models.attach_exits(backbone, ["b"])


def test_attach_exits_mobilenet(tmp_path):
    backbone = keras.applications.MobileNetV3Small(
        input_shape=(32, 32, 3), include_top=False, weights=None, include_preprocessing=False
    )
    names = [l.name for l in backbone.layers]
    picks = ["expanded_conv_2_add", "expanded_conv_5_add", names[-1]]
    assert all(p in names for p in picks)
    model = models.attach_exits(backbone, picks, num_classes=10, gradient_equilibrium=True)
    x = _rand((2, 32, 32, 3))
    out = _as_list(model.predict_on_batch(x))
    assert [o.shape for o in out] == [(2, 10)] * 3
    np.testing.assert_allclose(_chain(models.split_stages(model), x)[2], out[2], rtol=1e-4, atol=1e-4)
    c = costs.exit_costs(model)["mul_adds"]
    assert all(b > a for a, b in zip(c, c[1:]))
    path = str(tmp_path / "mb.keras")
    model.save(path)
    np.testing.assert_array_equal(_as_list(keras.saving.load_model(path).predict_on_batch(x))[1], out[1])


@pytest.mark.parametrize("onednn", [False, True], ids=["packed", "onednn"])
def test_inference_snapshot_matches_per_call_folding_and_refreshes(onednn, monkeypatch):
    """InferenceSnapshot: the same outputs as folding on every call (packed and plain convs, a
    stride-2 unit, a nested model, a unit called at two widths), stale after a weight change
    until refresh(), inactive outside its context."""
    monkeypatch.setattr(layers_module, "_ONEDNN", onednn)
    rng = np.random.default_rng(3)
    shared = ConvBNReLU(6, 3, name="shared")  # 6 filters at width 16 and 8: packed on Eigen's kernels
    inner_in = keras.Input((8, 8, 6))
    inner = keras.Model(inner_in, ConvBNReLU(12, 3, name="inner_unit")(inner_in), name="inner")
    inp = keras.Input((16, 16, 3))
    a = shared(ConvBNReLU(3, 1, name="pointwise")(inp))
    b = ConvBNReLU(6, 3, strides=2, name="down")(a)
    out = inner(shared(b))
    model = keras.Model(inp, [a, out])
    for layer in [l for l in model.layers if isinstance(l, ConvBNReLU)] + [inner.layers[-1]]:
        f = layer.filters
        layer.gamma.assign(rng.random(f) + 0.5)
        layer.beta.assign(rng.random(f) - 0.5)
        layer.moving_mean.assign(rng.random(f))
        layer.moving_variance.assign(rng.random(f) + 0.5)
    snapshot = InferenceSnapshot(model)
    assert len(snapshot) == 5  # pointwise, shared at widths 16 and 8, down, inner_unit
    if not onednn:  # the snapshot holds the shared unit's packed kernel at both widths
        assert {p for (_, _, p) in snapshot._entries.values()} == {1, 2}
    x = tf.constant(_rand((3, 16, 16, 3), seed=4))
    spec = [tf.TensorSpec((None, 16, 16, 3), tf.float32)]
    plain = tf.function(lambda t: model(t, training=False), input_signature=spec)

    def snapped(t):
        with snapshot.active():
            return model(t, training=False)

    on_snapshot = tf.function(snapped, input_signature=spec)

    def check(want, got):
        for w, g in zip(want, got):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)

    check(plain(x), on_snapshot(x))
    check(plain(x), snapped(x))  # eager too
    # A weight change: per-call folding sees it at once, the snapshot only after refresh().
    before = [np.asarray(o) for o in on_snapshot(x)]
    inner.layers[-1].moving_variance.assign(inner.layers[-1].moving_variance * 4.0)
    shared.gamma.assign(shared.gamma * 0.5)
    check(before, on_snapshot(x))
    assert not np.allclose(np.asarray(plain(x)[1]), before[1])
    snapshot.refresh()
    check(plain(x), on_snapshot(x))
    # Outside the context, and for an input width it does not hold, the layer folds as usual.
    with snapshot.active():
        wide = shared(tf.constant(_rand((2, 24, 24, 3), seed=5)), training=False)
    np.testing.assert_allclose(
        np.asarray(wide),
        np.asarray(shared(tf.constant(_rand((2, 24, 24, 3), seed=5)), training=False)),
        rtol=1e-6,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="expects a built Keras model; received ConvBNReLU"):
        InferenceSnapshot(shared)
