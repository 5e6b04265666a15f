"""Mixed precision: float32 logits and losses, bfloat16 steps close to float32, loss scaling
carried through the look-ahead, and a loss-scale overflow skipped cleanly (backbone and
auxiliary network unchanged, scale halved per skipped step, no iteration counted)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tiny_models import mlp_backbone, tiny_data  # noqa: E402

from keras_ee import training as T  # noqa: E402
from keras_ee.training import core  # noqa: E402

BATCH = 16

METHODS = {
    "baseline": lambda: T.Baseline(),
    "l2w": lambda: T.L2W(wpn_width=16),
    "gating": lambda: T.BudgetAwareGating(gater_width=16, gater_interval=1, gater_update="lookahead"),
    "hdkd": lambda: T.HDKD(),
}


def _auxiliary(method):
    """The method's own network (WPN, gater, gamma) and its optimizer, or (None, None)."""
    for net, opt in (("wpn", "wpn_optimizer"), ("gater", "gater_optimizer")):
        if hasattr(method, opt):
            return getattr(method, net).weights, getattr(method, opt)
    if hasattr(method, "gamma_optimizer"):
        return [method.gamma_raw], method.gamma_optimizer
    return None, None


@pytest.fixture
def build():
    """`build(policy, method, optimizer=None)`: a compiled model whose layers were built under the
    dtype policy `policy` (the BN-free `mlp_backbone`, seeded); the policy is float32 again afterwards."""

    def make(policy, method, optimizer=None):
        keras.config.set_dtype_policy(policy)
        try:
            keras.utils.set_random_seed(0)
            model = T.MultiExitModel(mlp_backbone(), method=METHODS[method]())
            model.compile(optimizer=optimizer or keras.optimizers.SGD(0.05, momentum=0.9))
        finally:
            keras.config.set_dtype_policy("float32")
        return model

    yield make
    keras.config.set_dtype_policy("float32")


def _data(model, batches):
    x, y = tiny_data(BATCH * batches)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    if not model.method.uses_meta_stream:
        return train
    x_m, y_m = tiny_data(BATCH * batches, seed=7)
    return tf.data.Dataset.zip((train, tf.data.Dataset.from_tensor_slices((x_m, y_m)).batch(BATCH)))


def _flat(variables):
    return np.concatenate([np.asarray(v.numpy(), np.float64).ravel() for v in variables])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bfloat16_steps_stay_finite_and_close_to_float32(build, method):
    # Tolerance: bfloat16 keeps 8 significant bits (rounding 2^-9, ~0.2%, per operation); on this
    # BN-free MLP four batches end a few percent (of the weights' change) away from float32
    # (`-s` prints it), so 10% leaves room for other kernels, while a wrong step (an update lost or
    # taken twice, a loss in half precision) is off by O(1). BatchNorm over 8-sample halves
    # is avoided: it divides by near-zero batch deviations and amplifies rounding by up to 1/sqrt(eps).
    ref, mixed = build("float32", method), build("mixed_bfloat16", method)
    assert mixed.backbone.layers[1].compute_dtype == "bfloat16"
    start = _flat(ref.backbone.trainable_variables)
    np.testing.assert_array_equal(start, _flat(mixed.backbone.trainable_variables))
    h_ref = ref.fit(_data(ref, 4), epochs=1, verbose=0, shuffle=False).history
    h_mixed = mixed.fit(_data(mixed, 4), epochs=1, verbose=0, shuffle=False).history
    w_ref, w_mixed = _flat(ref.backbone.trainable_variables), _flat(mixed.backbone.trainable_variables)
    assert np.all(np.isfinite(w_mixed))
    assert mixed.optimizer.iterations.numpy() == ref.optimizer.iterations.numpy() > 0
    relative = np.linalg.norm(w_mixed - w_ref) / np.linalg.norm(w_ref - start)
    print(f"{method}: bfloat16 weights {relative:.4f} of the float32 change away")  # shown with -s
    assert 0 < relative < 0.1, relative  # > 0: the mixed run did compute in bfloat16
    np.testing.assert_allclose(h_mixed["loss"], h_ref["loss"], rtol=0.02)
    aux_ref, _ = _auxiliary(ref.method)
    if aux_ref is not None:
        aux_mixed, _ = _auxiliary(mixed.method)
        assert all(v.dtype == "float32" for v in aux_mixed)
        a_ref, a_mixed = _flat(aux_ref), _flat(aux_mixed)
        assert np.all(np.isfinite(a_mixed))
        np.testing.assert_allclose(a_mixed, a_ref, atol=0.1 * np.abs(a_ref).max())


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_logits_losses_and_variables_are_float32_under_a_mixed_policy(build, policy):
    model = build(policy, "l2w")
    half = policy.split("_")[1]
    assert model.backbone.outputs[0].dtype == half  # the exits compute in half precision
    assert {v.dtype for v in model.backbone.variables} == {"float32"}
    assert {v.dtype for v in model.method.wpn.weights} == {"float32"}
    assert model.method.wpn.compute_dtype == "float32"
    x, y = tiny_data(BATCH)
    logits = model(x, training=False)
    assert [z.dtype for z in logits] == ["float32"] * model.num_exits
    assert {a.dtype for a in model.predict(x, verbose=0)} == {np.dtype("float32")}
    theta = [tf.convert_to_tensor(v) for v in model.backbone.trainable_variables]
    stateless, _ = core.stateless_forward(model.backbone, theta, x, training=False)
    assert [z.dtype for z in stateless] == ["float32"] * model.num_exits
    np.testing.assert_array_equal(stateless[0].numpy(), logits[0].numpy())
    assert core.per_exit_cross_entropy(y, logits).dtype == "float32"
    _, result = model.method.meta_gradients(model, x[:8], y[:8], x[8:], y[8:])
    assert result.outer_loss.dtype == "float32"
    assert [z.dtype for z in result.logits_meta] == ["float32"] * model.num_exits
    assert all(g.dtype == "float32" and np.all(np.isfinite(g.numpy())) for g in result.outer_gradients)


def _lookahead(model, x_t, y_t, x_m, y_m):
    method = model.method
    if isinstance(method, T.L2W):
        return method.meta_gradients(model, x_t, y_t, x_m, y_m)[1]
    result = method.lookahead(model, x_t, y_t, None, x_m, y_m)
    return result[0] if isinstance(result, tuple) else result


@pytest.mark.parametrize("method", ["l2w", "gating", "hdkd"])
def test_a_loss_scaled_lookahead_equals_the_unscaled_one(build, method):
    """Float32, so nothing overflows: scaling by a power of two and unscaling is exact, and a
    scale left in (or missing from) any of the look-ahead's gradients would be off by 2^12."""
    plain = build("float32", method)
    scaled = build(
        "float32",
        method,
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), initial_scale=2.0**12),
    )
    rng = np.random.default_rng(0)
    for i, v in enumerate(plain.trainable_variables):  # the same non-zero momentum buffers in both
        m = rng.normal(size=v.shape).astype("float32") * 0.1
        plain.optimizer.momentums[i].assign(m)
        scaled.optimizer.inner_optimizer.momentums[i].assign(m)
    x, y = tiny_data(BATCH, seed=3)
    a, b = _lookahead(plain, x[:8], y[:8], x[8:], y[8:]), _lookahead(scaled, x[:8], y[:8], x[8:], y[8:])
    assert a.finite is None and bool(b.finite.numpy()) and bool(b.inner_finite.numpy())
    for za, zb in zip(a.logits_meta, b.logits_meta):  # the same theta_hat
        np.testing.assert_allclose(zb.numpy(), za.numpy(), rtol=1e-5, atol=1e-6)
    for ga, gb in zip(a.outer_gradients, b.outer_gradients):
        np.testing.assert_allclose(gb.numpy(), ga.numpy(), rtol=1e-4, atol=1e-7)
    coefficients = tf.ones_like(a.terms) / 8.0
    real_a = a.real_gradients(coefficients)
    real_b = b.real_gradients(scaled.scale_loss(coefficients))
    for ga, gb in zip(real_a, real_b):
        np.testing.assert_allclose(gb.numpy() / 2.0**12, ga.numpy(), rtol=1e-5, atol=1e-7)


def test_a_float16_meta_gradient_matches_float32_where_its_cotangents_would_underflow(build):
    """At a learning rate of 1e-6 the cotangents that reach the inner backward pass (lr * dL/dtheta_hat,
    ~1e-8 here) are below float16's normal range; the loss-scaled outer loss keeps them in it.
    With the scale cancelled on the way instead of passed straight through, this bound fails."""

    def optimizer():
        return keras.optimizers.SGD(1e-6)

    ref = build("float32", "l2w", optimizer())
    half = build("mixed_float16", "l2w", keras.optimizers.LossScaleOptimizer(optimizer(), initial_scale=2.0**12))
    x, y = tiny_data(BATCH, seed=3)
    g_ref, _ = ref.method.meta_gradients(ref, x[:8], y[:8], x[8:], y[8:])
    g_half, result = half.method.meta_gradients(half, x[:8], y[:8], x[8:], y[8:])
    assert bool(result.finite.numpy())
    g_ref, g_half = _flat(g_ref), _flat(g_half)
    relative = np.linalg.norm(g_half - g_ref) / np.linalg.norm(g_ref)
    print(f"float16 meta-gradient {relative:.4f} (relative) from float32")  # shown with -s
    assert relative < 0.02, relative


def test_lookahead_step_mirrors_the_wrapped_optimizer():
    variables = [keras.Variable(np.array([1.0, -2.0], np.float32))]
    inner = keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)
    wrapped = keras.optimizers.LossScaleOptimizer(inner)
    wrapped.build(variables)
    inner.momentums[0].assign([0.5, 0.25])
    grads = [tf.constant([0.3, -0.7])]
    values = [tf.convert_to_tensor(variables[0])]
    np.testing.assert_array_equal(
        core.lookahead_step(wrapped, variables, values, grads)[0].numpy(),
        core.lookahead_step(inner, variables, values, grads)[0].numpy(),
    )
    assert core.check_lookahead_support(wrapped) == "SGD"
    with pytest.raises(ValueError, match="received optimizer RMSprop"):
        core.check_lookahead_support(keras.optimizers.LossScaleOptimizer(keras.optimizers.RMSprop()))


@pytest.mark.parametrize("method", ["baseline", "l2w", "gating", "hdkd"])
def test_a_loss_scale_overflow_skips_the_step_cleanly_then_a_normal_step_proceeds(build, method):
    # mixed_float16 on CPU (Dense layers; TensorFlow's CPU kernels also run float16 convolutions).
    # A scale of 2^100 makes every float16 gradient inf.
    model = build(
        "mixed_float16",
        method,
        keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), initial_scale=2.0**100),
    )
    opt, steps = model.optimizer, model.method.optimizer_steps_per_batch
    assert model.backbone.layers[1].compute_dtype == "float16"
    aux, aux_opt = _auxiliary(model.method)
    aux = aux or []
    weights = _flat(model.backbone.trainable_variables)
    aux_weights, aux_state = (_flat(aux), _flat(aux_opt.variables)) if aux else (None, None)
    data = list(_data(model, 2))
    history = model.fit(
        tf.data.Dataset.from_tensors(data[0]), epochs=1, verbose=0, shuffle=False
    ).history  # no fault raised
    assert np.isfinite(history["loss"][0])
    np.testing.assert_array_equal(_flat(model.backbone.trainable_variables), weights)
    assert opt.iterations.numpy() == 0 and opt.step_counter.numpy() == 0
    assert opt.dynamic_scale.numpy() == 2.0**100 / 2**steps  # halved per skipped step
    if aux:
        np.testing.assert_array_equal(_flat(aux), aux_weights)
        np.testing.assert_array_equal(_flat(aux_opt.variables), aux_state)  # iterations and buffers
    assert model.faults.take() is None

    opt.dynamic_scale.assign(2.0**8)
    model.fit(tf.data.Dataset.from_tensors(data[1]), epochs=1, verbose=0, shuffle=False)
    after = _flat(model.backbone.trainable_variables)
    assert np.all(np.isfinite(after)) and not np.array_equal(after, weights)
    assert opt.iterations.numpy() == opt.step_counter.numpy() == steps
    assert opt.dynamic_scale.numpy() == 2.0**8
    if aux:
        assert not np.array_equal(_flat(aux), aux_weights) and np.all(np.isfinite(_flat(aux)))
        assert aux_opt.iterations.numpy() == steps


def test_apply_step_skips_finite_gradients_when_the_lookahead_overflowed(build):
    model = build(
        "float32", "baseline", keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05), initial_scale=4.0)
    )
    opt, variables = model.optimizer, model.trainable_variables
    grads = [tf.ones_like(v) for v in variables]
    before = _flat(variables)
    model.apply_step(grads, tf.zeros((model.num_exits,)), finite=tf.constant(False))
    np.testing.assert_array_equal(_flat(variables), before)
    assert (opt.iterations.numpy(), opt.dynamic_scale.numpy()) == (0, 2.0)
    model.apply_step(grads, tf.zeros((model.num_exits,)), finite=tf.constant(True))
    np.testing.assert_allclose(_flat(variables), before - 0.05 / 2.0, rtol=1e-6)
    assert (opt.iterations.numpy(), opt.dynamic_scale.numpy()) == (1, 2.0)
    assert model.faults.take() is None


@pytest.mark.parametrize("method", ["l2w", "gating"])
def test_an_overflow_under_mirrored_strategy_skips_on_every_replica_then_a_normal_step_proceeds(method):
    """Two logical CPUs (tests/conftest.py), tests/mixed_precision_check.py."""
    import mixed_precision_check

    out = mixed_precision_check.overflow_check(method)
    steps, skipped, normal = out["steps_per_batch"], out["overflow"], out["normal"]
    assert (skipped["backbone_moved"], skipped["auxiliary_moved"], skipped["iterations"]) == (0.0, 0.0, 0)
    assert skipped["scale"] == 2.0**100 / 2**steps and skipped["finite"]
    assert normal["backbone_moved"] > 0 and normal["auxiliary_moved"] > 0 and normal["finite"]
    assert (normal["iterations"], normal["scale"]) == (steps, 2.0**8)
    assert skipped["replica_difference"] == normal["replica_difference"] == 0.0
