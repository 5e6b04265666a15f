"""Numerical checks of the L2W building blocks (look-ahead, meta-gradient,
allocation, zero-sum weights) against independent references."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tiny_models import tiny_backbone, tiny_data  # noqa: E402

from keras_ee import optimizers as ee_optimizers  # noqa: E402
from keras_ee import training as T  # noqa: E402

_data = tiny_data


# --- allocation ------------------------------------------------------------


def _brute_allocation(conf, q):
    """Independent reference: plain loops, no sorting helpers."""
    n, k = conf.shape
    w = [q ** (j + 1) for j in range(k)]
    f = [v / sum(w) for v in w]
    exit_of = [k - 1] * n
    left = set(range(n))
    for j in range(k - 1):
        count = int(np.floor(n * f[j]))
        for _ in range(count):
            best = None
            for i in sorted(left):
                if best is None or conf[i, j] > conf[best, j]:
                    best = i
            exit_of[best] = j
            left.remove(best)
    return np.array(exit_of)


def test_allocation_checks_q():
    conf = np.zeros((4, 3))
    for q, error in [(0.0, ValueError), (float("inf"), ValueError), (True, TypeError), ("0.5", TypeError)]:
        with pytest.raises(error, match="q"):
            T.allocate_by_confidence_numpy(conf, q)
        with pytest.raises(error, match="q"):
            T.allocate_by_confidence(tf.constant(conf), q)


@pytest.mark.parametrize("q", [0.5, 0.75, 1.0, 1.7])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_allocation_matches_brute_force(q, n):
    rng = np.random.default_rng(n)
    conf = rng.uniform(size=(n, 4))
    conf[: n // 3, 1] = 0.5  # ties
    expected = _brute_allocation(conf, q)
    mask = T.allocate_by_confidence(tf.constant(conf), q).numpy()
    assert mask.shape == (n, 4)
    np.testing.assert_array_equal(mask.sum(axis=1), 1)
    np.testing.assert_array_equal(mask.argmax(axis=1), expected)
    np.testing.assert_array_equal(T.allocate_by_confidence_numpy(conf, q), expected)


# --- zero-sum weights -------------------------------------------------------


@pytest.mark.parametrize("constraint", ["col", "row", "mat"])
def test_zero_sum_constraint(constraint):
    u = np.tanh(np.random.default_rng(0).normal(size=(9, 4)))
    w = T.zero_sum_weights(tf.constant(u), 0.8, constraint).numpy()
    pert = (w - 1.0) / 0.8
    axis = {"col": 1, "row": 0, "mat": None}[constraint]
    np.testing.assert_allclose(pert.sum(axis=axis), 0.0, atol=1e-12)
    ref = u - (u.mean(axis=axis, keepdims=True) if axis is not None else u.mean())
    np.testing.assert_allclose(w, 1 + 0.8 * ref, rtol=1e-12)
    with pytest.raises(ValueError):
        T.zero_sum_weights(tf.constant(u), 0.8, "diag")


# --- exact look-ahead -------------------------------------------------------


def _random_grads(variables, rng):
    return [tf.constant(rng.normal(size=v.shape).astype(v.dtype)) for v in variables]


OPTIMIZERS = {
    "sgd_momentum_wd": lambda: keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov_cosine": lambda: keras.optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(0.1, decay_steps=7), momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "sgd_plain_clip": lambda: keras.optimizers.SGD(0.05, clipnorm=0.5),
    "adam_wd": lambda: keras.optimizers.Adam(1e-2, weight_decay=1e-2),
    "adamw_amsgrad_schedule": lambda: keras.optimizers.AdamW(
        keras.optimizers.schedules.ExponentialDecay(1e-2, 3, 0.5), amsgrad=True
    ),
    # The papers' (PyTorch-semantics) optimizers, keras_ee.optimizers.
    "papers_sgd_momentum_wd": lambda: ee_optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-2),
    "papers_sgd_nesterov_cosine_clip": lambda: ee_optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(0.1, decay_steps=7),
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-2,
        clipnorm=0.5,
    ),
    "papers_sgd_plain": lambda: ee_optimizers.SGD(0.05, weight_decay=1e-2),
    "papers_adam_wd": lambda: ee_optimizers.Adam(1e-2, weight_decay=1e-2),
    "papers_adamw_amsgrad_schedule": lambda: ee_optimizers.AdamW(
        keras.optimizers.schedules.ExponentialDecay(1e-2, 3, 0.5), weight_decay=0.05, amsgrad=True
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lookahead_equals_real_step(name):
    model = tiny_backbone()
    variables = model.trainable_variables
    opt = OPTIMIZERS[name]()
    opt.build(variables)
    rng = np.random.default_rng(0)
    for _ in range(3):  # non-zero momentum / Adam buffers, schedule moved
        opt.apply(_random_grads(variables, rng), variables)
    before_opt = [v.numpy().copy() for v in opt.variables]
    before = [v.numpy().copy() for v in variables]
    grads = _random_grads(variables, rng)
    theta_hat = T.lookahead_step(opt, variables, [tf.convert_to_tensor(v) for v in variables], grads)
    # Nothing changed: parameters, buffers, iteration counter.
    for v, b in zip(variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    for v, b in zip(opt.variables, before_opt):
        np.testing.assert_array_equal(v.numpy(), b)
    opt.apply(grads, variables)
    for v, t in zip(variables, theta_hat):
        np.testing.assert_allclose(t.numpy(), v.numpy(), rtol=1e-5, atol=1e-7)
    # The step is not trivial.
    assert any(not np.allclose(v.numpy(), b) for v, b in zip(variables, before))


def test_lookahead_rejects_unsupported_optimizer():
    model = tiny_backbone()
    opt = keras.optimizers.RMSprop()
    opt.build(model.trainable_variables)
    with pytest.raises(ValueError, match="RMSprop"):
        T.lookahead_step(
            opt, model.trainable_variables, list(model.trainable_variables), list(model.trainable_variables)
        )
    acc = keras.optimizers.SGD(gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="gradient_accumulation"):
        T.core.check_lookahead_support(acc)


# --- meta-gradient ----------------------------------------------------------


def _l2w_model(method, optimizer, seed=0):
    model = T.MultiExitModel(tiny_backbone(seed=seed), method=method)
    model.compile(optimizer=optimizer)
    return model


def _warm_up(model, x, y, steps=2):
    """A few real steps so momentum buffers are non-zero."""
    variables = model.trainable_variables
    for _ in range(steps):
        with tf.GradientTape() as tape:
            ce = T.per_exit_cross_entropy(y, model(x, training=True))
            loss = tf.reduce_sum(tf.reduce_mean(ce, axis=0))
        model.optimizer.apply(tape.gradient(loss, variables), variables)


def _fd_meta_loss(model, method, x_t, y_t, x_m, y_m):
    """Independent meta loss: a REAL optimizer step, then restore."""
    saved_model = [v.numpy().copy() for v in model.variables]
    saved_opt = [v.numpy().copy() for v in model.optimizer.variables]
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        logits = model(x_t, training=True)
        ce = T.per_exit_cross_entropy(y_t, logits)
        w = tf.stop_gradient(method.sample_weights(ce, T.exit_confidence(logits)))
        loss = tf.reduce_sum(tf.reduce_mean(w * ce, axis=0))
    model.optimizer.apply(tape.gradient(loss, variables), variables)
    logits_m = model(x_m, training=True)
    meta, _ = method.meta_loss(T.per_exit_cross_entropy(y_m, logits_m), T.exit_confidence(logits_m))
    for v, s in zip(model.variables, saved_model):
        v.assign(s)
    for v, s in zip(model.optimizer.variables, saved_opt):
        v.assign(s)
    return float(meta)


def _keras_sgd():
    return keras.optimizers.SGD(0.5, momentum=0.9, nesterov=True, weight_decay=1e-2)


@pytest.mark.parametrize(
    "options, make_optimizer",
    [
        (dict(), _keras_sgd),
        (dict(wpn_input="both", constraint="row", meta_objective="vanilla"), _keras_sgd),
        (dict(constraint="mat", wpn_depth=2), _keras_sgd),
        # The papers' optimizers: the look-ahead is their step (coupled decay, PyTorch's Adam).
        (dict(), lambda: ee_optimizers.SGD(0.5, momentum=0.9, nesterov=True, weight_decay=1e-2)),
        (dict(), lambda: ee_optimizers.AdamW(0.05, weight_decay=0.05)),
        (dict(), lambda: ee_optimizers.Adam(0.05, weight_decay=1e-2)),
    ],
    ids=["keras_sgd", "keras_sgd_row", "keras_sgd_mat", "papers_sgd", "papers_adamw", "papers_adam"],
)
def test_meta_gradient_matches_finite_differences(float64, options, make_optimizer):
    method = T.L2W(wpn_width=5, **options)
    opt = make_optimizer()
    model = _l2w_model(method, opt)
    x, y = _data(n=24, dtype="float64")
    _warm_up(model, x, y)
    x_t, y_t, x_m, y_m = x[:12], y[:12], x[12:], y[12:]
    grads, _ = method.meta_gradients(model, x_t, y_t, x_m, y_m)
    rng = np.random.default_rng(3)
    eps = 1e-6
    checked = 0
    for var, g in zip(method.wpn.weights, grads):
        g = g.numpy()
        flat_idx = rng.choice(
            var.shape.num_elements() if hasattr(var.shape, "num_elements") else int(np.prod(var.shape)),
            size=2,
            replace=False,
        )
        for fi in flat_idx:
            idx = np.unravel_index(fi, var.shape)
            base = var.numpy().copy()
            plus = base.copy()
            plus[idx] += eps
            var.assign(plus)
            lp = _fd_meta_loss(model, method, x_t, y_t, x_m, y_m)
            minus = base.copy()
            minus[idx] -= eps
            var.assign(minus)
            lm = _fd_meta_loss(model, method, x_t, y_t, x_m, y_m)
            var.assign(base)
            fd = (lp - lm) / (2 * eps)
            np.testing.assert_allclose(g[idx], fd, rtol=1e-4, atol=1e-9)
            checked += 1
    assert checked >= 4
    # The meta-gradient is not identically zero.
    assert any(np.abs(g.numpy()).max() > 1e-8 for g in grads)


def test_meta_step_leaves_model_and_optimizer_untouched():
    method = T.L2W(wpn_width=8)
    model = _l2w_model(method, keras.optimizers.SGD(0.1, momentum=0.9))
    x, y = _data(n=16)
    _warm_up(model, x, y)
    before = [v.numpy().copy() for v in model.backbone.variables]
    opt_before = [v.numpy().copy() for v in model.optimizer.variables]
    bn = [v for v in model.backbone.non_trainable_variables if "moving" in v.path]
    assert bn, "the backbone must have BatchNorm moving statistics"
    grads, la = method.meta_gradients(model, x[:8], y[:8], x[8:], y[8:])
    assert all(g is not None for g in grads)
    for v, b in zip(model.backbone.variables, before):
        np.testing.assert_array_equal(v.numpy(), b)
    for v, b in zip(model.optimizer.variables, opt_before):
        np.testing.assert_array_equal(v.numpy(), b)
    # The forward pass did compute new statistics (they were discarded).
    moved = [
        nv.numpy() for v, nv in zip(model.backbone.non_trainable_variables, la.non_trainable) if "moving" in v.path
    ]
    assert any(not np.allclose(m, v.numpy()) for m, v in zip(moved, bn))


def test_reused_forward_real_gradients_match_tape():
    method = T.L2W(wpn_width=8)
    model = _l2w_model(method, keras.optimizers.SGD(0.1, momentum=0.9))
    x, y = _data(n=16)
    _, la = method.meta_gradients(model, x[:8], y[:8], x[8:], y[8:])
    coeff = tf.constant(np.random.default_rng(0).uniform(size=(8, 3)).astype("float32"))
    grads = la.real_gradients(coeff)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        ce = T.per_exit_cross_entropy(y[:8], model(x[:8], training=True))
        loss = tf.reduce_sum(coeff * ce)
    ref = tape.gradient(loss, variables)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g.numpy(), r.numpy(), rtol=1e-5, atol=1e-6)


def _conv_backbone(seed=0):
    """Two stages of ConvBNReLU + ChannelConcat (MSDNet's building blocks), two exits."""
    from keras_ee.models.layers import ChannelConcat, ConvBNReLU

    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 3))
    h = ConvBNReLU(4, 3)(inp)
    outs = []
    for k in range(2):
        h = ChannelConcat()([h, ConvBNReLU(3, 3)(ConvBNReLU(4, 1)(h))])
        outs.append(keras.layers.Dense(4, name=f"exit_{k + 1}")(keras.layers.GlobalAveragePooling2D()(h)))
    return keras.Model(inp, outs)


def test_meta_gradients_through_fused_batch_norm_and_channel_concat(monkeypatch):
    # The second-order gradient runs through TensorFlow's FusedBatchNormGradV3
    # gradient and ChannelConcat's split gradient; it must equal the one
    # through the plain (composite) BatchNorm and Concatenate.
    from keras_ee.models import layers as L

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 6, 6, 3)).astype("float32")
    y = rng.integers(0, 4, size=16).astype("int32")

    def meta_grads():
        method = T.L2W(wpn_width=8)
        model = T.MultiExitModel(_conv_backbone(), method=method)
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9, weight_decay=1e-4))
        _warm_up(model, x, y)
        grads, la = method.meta_gradients(model, x[:8], y[:8], x[8:], y[8:])
        return [g.numpy() for g in grads], [v.numpy() for v in la.non_trainable]

    fused, fused_stats = meta_grads()
    monkeypatch.setattr(L, "_TF_FUSED_BN_DTYPES", ())
    monkeypatch.setattr(L.ChannelConcat, "call", keras.layers.Concatenate.call)
    plain, plain_stats = meta_grads()
    assert any(np.abs(g).max() > 1e-6 for g in plain)
    for a, b in zip(fused, plain):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)
    for a, b in zip(fused_stats, plain_stats):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
