"""IMTA's and budget-aware gating's training steps against the authors' own code (no torch here).

The fixtures in tests/data/parity/ (imta_*, gating_*; how they were made:
tests/data/parity/README_imta_gating.md) hold the authors' initial checkpoints, their batches,
and their weights, BatchNorm statistics, gater weights, gradients and losses after their code
ran 1 and 3 iterations in float64 (1 in float32). keras-ee starts from the imported checkpoint
with the authors' settings (`reference="code"`, PyTorch's optimizers from `keras_ee.optimizers`),
takes its own training steps, and must end within 1e-6 (relative, float64) or 1e-3 (float32, one
iteration) of their weights.

Each run is made once per module and dtype: three iterations, kept after the first and the third.
keras-ee's `train_step` runs eagerly here (`run_eagerly=True`): the same step, without a graph
trace that costs 15-25 s per model on a CPU; the traced steps are tested in test_imta.py,
test_gating.py and test_reference_code.py.
"""

import functools
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ee import models, optimizers
from keras_ee.distribute import dtype_policy
from keras_ee.interop import torch_import
from keras_ee.training import IMTA, BudgetAwareGating, MultiExitModel
from keras_ee.training import gating as gating_module
from keras_ee.training import imta as imta_module

DATA = Path(__file__).parent / "data" / "parity"
ITERATIONS = 3  # the fixtures hold the authors' state after iterations 1 and 3
F64_RTOL = 1e-6
F32_RTOL = 1e-3
# kalviny/IMTA: SGD lr 0.1 (epoch 0 of the CIFAR multistep schedule), momentum 0.9, weight decay 1e-4,
# no Nesterov; T = 3, gamma = 0.9.
IMTA_SGD = {"learning_rate": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
# gphi_MSDNet: AdamW lr 4e-3 (constant: --min_lr 4e-3 --warmup_epochs 0), betas (0.9, 0.999), eps 1e-8,
# weight decay 1e-4 on every parameter of more than one dimension (optim_factory.get_parameter_groups).
GATING_ADAMW = {"learning_rate": 4e-3, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8, "weight_decay": 1e-4}
STATISTICS = ("moving_mean", "moving_variance")


@pytest.fixture(params=["float64"])
def float64():
    with dtype_policy("float64"):
        yield "float64"


@pytest.fixture
def float32():
    with dtype_policy("float32"):
        yield "float32"


# ---- the authors' settings


def imta_code(**kwargs):
    return IMTA(reference="code", **kwargs)


def gating_code(options):
    return BudgetAwareGating(reference="code", **options)


# ---- comparing weights


def weights_by_layer(model):
    """`{layer name: its weights}` over a model's layers that have weights; a `snapshot`'s as it is."""
    if isinstance(model, dict):
        return model
    return {layer.name: layer.weights for layer in model.layers if layer.weights}


def snapshot(model):
    """The backbone's weights by layer, and the gater's if the method has one, as float64 arrays."""
    out = {
        "backbone": {
            name: [np.asarray(w, np.float64) for w in weights]
            for name, weights in weights_by_layer(model.backbone).items()
        }
    }
    if getattr(model.method, "gater", None) is not None:
        out["gater"] = {v.path: np.asarray(v, np.float64) for v in model.method.gater.weights}
    return out


def relative_errors(trained, expected, statistics=False, only=None):
    """`{layer/weight: max|a - b| / max|b|}` over `expected`'s layers (trainable weights, or the
    BatchNorm statistics); `trained`: a model or a `snapshot(...)["backbone"]`. A keras-ee weight
    larger than the authors' (IMTA's phase-I classifier inside `Dense(2d -> C)`) is compared on its
    first rows. `only`: the `layer/weight` names to compare. A weight whose values are all below
    1e-9 (a gradient that is zero in exact arithmetic, as a Dense bias before training-mode
    BatchNorm) is compared in absolute terms."""
    got = weights_by_layer(trained)
    out = {}
    for name, weights in weights_by_layer(expected).items():
        assert name in got, f"{name} missing from keras-ee's model"
        assert len(got[name]) == len(weights), name
        for a, b in zip(got[name], weights, strict=True):
            key = f"{name}/{b.name}"
            if (b.name in STATISTICS) != statistics or (only is not None and key not in only):
                continue
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            a = a[tuple(slice(0, n) for n in b.shape)]
            out[key] = np.abs(a - b).max() / max(np.abs(b).max(), 1e-9)
    return out


def assert_close(errors, rtol, what):
    assert errors, what
    worst = sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    assert worst[0][1] <= rtol, f"{what}: worst relative errors {worst}"


def imported(name):
    return torch_import.read_checkpoint_into_model(DATA / name)


@functools.cache
def authors(name):
    """One of the authors' checkpoints (read only), imported once under the float64 policy."""
    with dtype_policy("float64"):
        return imported(name)


def batches(npz):
    x = np.transpose(npz["inputs_nchw"].astype(np.float64), (0, 1, 3, 4, 2))
    return x, npz["labels"].astype("int64")


def train(model, x, y, iterations, dtype):
    """keras-ee's steps on the first `iterations` batches: the logs, and a `snapshot` after 1 and `iterations`."""
    logs, snapshots = [], {}
    for i in range(iterations):
        logs.append(model.train_on_batch(x[i].astype(dtype), y[i], return_dict=True))
        if i + 1 in (1, iterations):
            snapshots[i + 1] = snapshot(model)
    return logs, snapshots


def gradient_by_step(model, x, y, dtype):
    """`p0 - p1` of one real train step with SGD(lr=1), no momentum, no decay: the step's gradient.
    Returns the `layer/weight` names of the trained variables (each now holds its gradient)."""
    before = {v.path: np.asarray(v) for v in model.trainable_variables}
    model.train_on_batch(x.astype(dtype), y)
    for v in model.trainable_variables:
        v.assign(before[v.path] - np.asarray(v))
    trained = {id(v) for v in model.trainable_variables}
    return {f"{layer.name}/{w.name}" for layer in model.backbone.layers for w in layer.weights if id(w) in trained}


# ---- IMTA phase I: gradient equilibrium, summed cross-entropy (models/msdnet_ge.py, main_GE.py)


def imta_phase1_model(optimizer):
    backbone = torch_import.load_torch_checkpoint(DATA / "imta_phase1_init.pth")
    model = MultiExitModel(backbone, method=imta_code())
    assert model.method.current_phase == 0 and model.method.gradient_equilibrium
    model.compile(optimizer=optimizer, run_eagerly=True)
    return model


@pytest.fixture(scope="module")
def imta_phase1_run():
    """Their SGD on their three batches in float64: the logs, and the model after iterations 1 and 3."""
    x, y = batches(np.load(DATA / "imta_phase1_io.npz"))
    with dtype_policy("float64"):
        return train(imta_phase1_model(optimizers.SGD(**IMTA_SGD)), x, y, ITERATIONS, "float64")


def test_imta_phase1_gradient_of_the_first_step(float64):
    x, y = batches(np.load(DATA / "imta_phase1_io.npz"))
    model = imta_phase1_model(keras.optimizers.SGD(1.0))
    trained = gradient_by_step(model, x[0], y[0], "float64")
    want, *_ = authors("imta_phase1_grad0_f64.pth")
    assert_close(relative_errors(model.backbone, want, only=trained), F64_RTOL, "IMTA phase I, gradient at step 0")


def test_imta_phase1_losses_and_weights_after_1_and_3_iterations(imta_phase1_run):
    logs, snapshots = imta_phase1_run
    io = np.load(DATA / "imta_phase1_io.npz")
    np.testing.assert_allclose([log["loss"] for log in logs], io["f64_losses"][:ITERATIONS], rtol=F64_RTOL)
    for it in (1, ITERATIONS):
        want, *_ = authors(f"imta_phase1_iter{it}_f64.pth")
        errors = relative_errors(snapshots[it]["backbone"], want)
        assert_close(errors, F64_RTOL, f"IMTA phase I, {it} iteration(s)")


def test_imta_phase1_batchnorm_statistics_after_1_and_3_iterations(imta_phase1_run):
    _, snapshots = imta_phase1_run
    for it in (1, ITERATIONS):
        want, *_ = authors(f"imta_phase1_iter{it}_f64.pth")
        errors = relative_errors(snapshots[it]["backbone"], want, statistics=True)
        assert_close(errors, F64_RTOL, f"IMTA phase I, BN statistics after {it} iteration(s)")


def test_imta_phase1_one_iteration_in_float32(float32):
    x, y = batches(np.load(DATA / "imta_phase1_io.npz"))
    model = imta_phase1_model(optimizers.SGD(**IMTA_SGD))
    train(model, x, y, 1, "float32")
    want, *_ = authors("imta_phase1_iter1_f64.pth")
    assert_close(relative_errors(model.backbone, want), F32_RTOL, "IMTA phase I in float32")


# ---- IMTA phase II: inline collaboration + one-for-all distillation over the frozen network (main_IMTA.py)


def imta_phase2_model(optimizer):
    _, report, imported_method, state = imported("imta_phase2_init.pth")
    widths = report.method_options.get("transfer_widths")
    method = imta_code(transfer_widths=widths)
    options = dict(report.model_options, input_shape=tuple(report.model_options["input_shape"]))
    backbone = method.transform_backbone(models.create(report.preset, **options))
    torch_import.import_torch_checkpoint(DATA / "imta_phase2_init.pth", model=backbone)
    method.current_phase = 1  # phase II, entered with the imported heads (no re-initialisation)
    model = MultiExitModel(backbone, method=method, transform_backbone=False)
    model.method.teacher_kernel.assign(state["teacher"][0])
    model.method.teacher_bias.assign(state["teacher"][1])
    model.compile(optimizer=optimizer, run_eagerly=True)
    return model


@pytest.fixture(scope="module")
def imta_phase2_run():
    """Their SGD on their three batches in float64: the logs, and the model after iterations 1 and 3."""
    x, y = batches(np.load(DATA / "imta_phase2_io.npz"))
    with dtype_policy("float64"):
        return train(imta_phase2_model(optimizers.SGD(**IMTA_SGD)), x, y, ITERATIONS, "float64")


def test_imta_reference_code_switches_the_authors_departures():
    method = IMTA(reference="code")
    assert (method.kl_reduction, method.detach_transfer, method.frozen_batchnorm, method.nesterov) == (
        "mean",
        False,
        "batch",
        False,
    )


def test_imta_phase2_loss_on_their_logits():
    """Their KDLoss.loss_fn_kd (KLDivLoss's element-wise mean) on their own logits and teacher."""
    io = np.load(DATA / "imta_phase2_io.npz")
    logits = [tf.constant(z) for z in io["f64_logits0"]]
    ce = tf.stack([tf.nn.sparse_softmax_cross_entropy_with_logits(io["labels"][0], z) for z in logits], axis=1)
    terms = imta_module.distillation_terms(
        ce, logits, tf.constant(io["f64_teacher0"]), float(io["T"]), float(io["gamma"]), reduction="mean"
    )
    loss = float(tf.reduce_sum(tf.reduce_mean(terms, axis=0)))
    assert abs(loss - io["f64_losses"][0]) <= F64_RTOL * abs(io["f64_losses"][0])
    batchmean = imta_module.distillation_terms(
        ce, logits, tf.constant(io["f64_teacher0"]), float(io["T"]), float(io["gamma"]), reduction="batchmean"
    )
    assert abs(float(tf.reduce_sum(tf.reduce_mean(batchmean, axis=0))) - loss) > 1e-3  # the reductions differ


def test_imta_phase2_gradient_of_the_first_step(float64):
    x, y = batches(np.load(DATA / "imta_phase2_io.npz"))
    model = imta_phase2_model(keras.optimizers.SGD(1.0))
    trained = gradient_by_step(model, x[0], y[0], "float64")
    assert len(trained) == 3 * 2 + 2 * 4  # the classifiers and the transfer paths (Dense, BatchNorm) only
    want, *_ = authors("imta_phase2_grad0_f64.pth")
    assert_close(relative_errors(model.backbone, want, only=trained), F64_RTOL, "IMTA phase II, gradient at step 0")


def test_imta_phase2_losses_and_weights_after_1_and_3_iterations(imta_phase2_run):
    logs, snapshots = imta_phase2_run
    io = np.load(DATA / "imta_phase2_io.npz")
    np.testing.assert_allclose([log["loss"] for log in logs], io["f64_losses"][:ITERATIONS], rtol=F64_RTOL)
    for it in (1, ITERATIONS):
        want, *_ = authors(f"imta_phase2_iter{it}_f64.pth")
        errors = relative_errors(snapshots[it]["backbone"], want)
        assert_close(errors, F64_RTOL, f"IMTA phase II, {it} iteration(s)")


def test_imta_phase2_batchnorm_statistics_after_1_and_3_iterations(imta_phase2_run):
    """Their frozen network's BatchNorm runs in training mode: its running statistics move."""
    _, snapshots = imta_phase2_run
    for it in (1, ITERATIONS):
        want, *_ = authors(f"imta_phase2_iter{it}_f64.pth")
        errors = relative_errors(snapshots[it]["backbone"], want, statistics=True)
        assert_close(errors, F64_RTOL, f"IMTA phase II, BN statistics after {it} iteration(s)")


def test_imta_phase2_one_iteration_in_float32(float32):
    x, y = batches(np.load(DATA / "imta_phase2_io.npz"))
    model = imta_phase2_model(optimizers.SGD(**IMTA_SGD))
    train(model, x, y, 1, "float32")
    want, *_ = authors("imta_phase2_iter1_f64.pth")
    assert_close(relative_errors(model.backbone, want), F32_RTOL, "IMTA phase II in float32")


# ---- budget-aware gating (gphi_MSDNet engine.train_one_epoch)


def test_gating_losses_on_their_logits():
    """compute_compulative_probs (log(P + 1e-5), log1p(-P + 1e-5), T = 0.5), compute_uncertainty and both
    losses of their loop on their own logits and gate probabilities."""
    io = np.load(DATA / "gating_io.npz")
    costs = io["costs"]
    for mode in ("train", "eval"):
        p = tf.constant(io[f"init_{mode}_P"])
        _, a = gating_module.exit_distribution(tf.math.log(p + 1e-5), tf.math.log1p(-p + 1e-5), 0.5)
        np.testing.assert_allclose(np.asarray(a), io[f"init_{mode}_A"], rtol=F64_RTOL, atol=1e-15)
    logits = [tf.constant(z) for z in io["init_train_logits"]]
    features = gating_module.confidence_features(logits[:-1], ("max_prob", "margin"))
    np.testing.assert_allclose(np.asarray(features), io["init_train_features"], rtol=F64_RTOL, atol=1e-15)
    half = len(io["labels"][0]) // 2
    ce = tf.stack([tf.nn.sparse_softmax_cross_entropy_with_logits(io["labels"][0][:half], z) for z in logits], axis=1)
    np.testing.assert_allclose(np.asarray(ce), io["init_train_ce"], rtol=F64_RTOL)
    inner = gating_module.inner_loss_terms(ce, tf.constant(io["init_train_A"]), costs, 0.1)
    assert abs(float(tf.reduce_sum(tf.reduce_mean(inner, axis=0))) - io["init_train_loss"]) <= 1e-12 * abs(
        io["init_train_loss"]
    )
    eval_logits = [tf.constant(z) for z in io["init_eval_logits"]]
    ce = tf.stack(
        [tf.nn.sparse_softmax_cross_entropy_with_logits(io["labels"][0][half:], z) for z in eval_logits], axis=1
    )
    outer = gating_module.outer_loss_terms(ce, tf.constant(io["init_eval_A"]), costs, 0.1)
    assert abs(float(tf.reduce_sum(tf.reduce_mean(outer, axis=0))) - io["init_gater_loss"]) <= 1e-12 * abs(
        io["init_train_loss"]
    )
    # the first recorded backward() of their loop is that backbone loss
    assert abs(io["f64_backward_losses"][0] - io["init_train_loss"]) <= 1e-12 * abs(io["init_train_loss"])


def gating_parts():
    """keras-ee's model, its imported gater and the method's options from gating_init.pth (float64 policy)."""
    backbone, report, method, state = imported("gating_init.pth")
    return backbone, dict(report.method_options), state["gater"]


def gating_model(method, gater, optimizer, decay_matrices_only=False):
    backbone, *_ = imported("gating_init.pth")
    model = MultiExitModel(backbone, method=method, transform_backbone=False)
    for variable, value in zip(model.method.gater.weights, gater.weights, strict=True):
        variable.assign(value)
    if decay_matrices_only:
        # their optim_factory.get_parameter_groups: no weight decay on one-dimensional parameters (biases,
        # BatchNorm); Keras' exclusion list, set before `compile` builds the optimizer.
        optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) == 1])
    model.compile(optimizer=optimizer, run_eagerly=True)
    return model


def test_gating_costs_are_the_fixtures(float64):
    """Their loop ran with keras-ee's relative Mul-Adds of this network as `costs` (their fvcore count
    needs packages the fixture's machine lacked): the method must compute the same."""
    io = np.load(DATA / "gating_io.npz")
    _, options, gater = gating_parts()
    model = gating_model(BudgetAwareGating(**options), gater, keras.optimizers.SGD(0.1))
    np.testing.assert_allclose(model.method.relative_costs, io["costs"], rtol=1e-12)
    assert options["cost_weight"] == 0.1 and options["features"] == ["max_prob", "margin"]


def test_gating_gater_probabilities_on_their_features(float64):
    io = np.load(DATA / "gating_io.npz")
    _, options, gater = gating_parts()
    z = gater(tf.constant(io["init_train_features"]))
    np.testing.assert_allclose(np.asarray(tf.sigmoid(z)), io["init_train_P"], rtol=F64_RTOL)


def test_gating_backbone_loss_and_gradient_of_the_first_half_step(float64):
    """Their first backbone step: loss (A + 1)(CE + lambda Cost) on the first half of batch 0, training mode."""
    io = np.load(DATA / "gating_io.npz")
    x, y = batches(io)
    half = x.shape[1] // 2
    _, options, gater = gating_parts()
    model = gating_model(gating_code(options), gater, keras.optimizers.SGD(0.1))
    with tf.GradientTape() as tape:
        logits = model(x[0][:half], training=True)
        loss, *_ = model.method.inner_loss(tf.constant(y[0][:half]), logits)
    grads = tape.gradient(loss, model.trainable_variables)
    assert abs(float(loss) - io["init_train_loss"]) <= F64_RTOL * io["init_train_loss"]
    for v, g in zip(model.trainable_variables, grads, strict=True):
        v.assign(g)
    want, *_ = authors("gating_grads_first_steps_f64.pth")
    assert_close(relative_errors(model.backbone, want), F64_RTOL, "gating, backbone gradient of the first step")


def test_gating_gater_loss_and_gradient_at_the_initial_weights(float64):
    """Their gater step's loss and gradient (backbone in eval mode, no gradient into it) on the second half of
    batch 0 at the initial weights."""
    io = np.load(DATA / "gating_io.npz")
    x, y = batches(io)
    half = x.shape[1] // 2
    _, options, gater = gating_parts()
    model = gating_model(gating_code(options), gater, keras.optimizers.SGD(0.1))
    grads, per_exit = model.method.gater_gradients(model, tf.constant(x[0][half:]), tf.constant(y[0][half:]))
    assert abs(float(tf.reduce_sum(per_exit)) - io["init_gater_loss"]) <= F64_RTOL * io["init_gater_loss"]
    _, _, _, state = authors("gating_gater_grad_at_init_f64.pth")
    errors = {}
    for v, g, w in zip(model.method.gater.weights, grads, state["gater"].weights, strict=True):
        w = np.asarray(w)
        errors[v.path] = np.abs(np.asarray(g) - w).max() / np.abs(w).max()
    assert_close(errors, F64_RTOL, "gating, gater gradient at the initial weights")


def gater_errors(gater, state):
    """`{path: max|a - b| / max|b|}` of keras-ee's gater weights (a `snapshot`'s) against the authors'."""
    errors = {}
    for (path, a), w in zip(gater.items(), state["gater"].weights, strict=True):
        w = np.asarray(w, np.float64)
        errors[path] = np.abs(a - w).max() / np.abs(w).max()
    return errors


def gating_run(iterations, dtype):
    """Their AdamW over `iterations` batches (iteration 0 a gater iteration): `train`'s logs and snapshots."""
    x, y = batches(np.load(DATA / "gating_io.npz"))
    _, options, gater = gating_parts()
    model = gating_model(gating_code(options), gater, optimizers.AdamW(**GATING_ADAMW), decay_matrices_only=True)
    return train(model, x, y, iterations, dtype)


@pytest.fixture(scope="module")
def gating_run64():
    with dtype_policy("float64"):
        return gating_run(ITERATIONS, "float64")


def test_gating_weights_after_1_and_3_iterations(gating_run64):
    """One iteration: backbone steps on both halves, gater steps on the opposite halves (iteration 0 is
    a gater iteration); iterations 2 and 3 backbone steps only."""
    _, snapshots = gating_run64
    for it in (1, ITERATIONS):
        want, _, _, state = authors(f"gating_iter{it}_f64.pth")
        trained = snapshots[it]
        assert_close(relative_errors(trained["backbone"], want), F64_RTOL, f"gating backbone, {it} iteration(s)")
        assert_close(
            relative_errors(trained["backbone"], want, statistics=True), F64_RTOL, f"gating BN statistics, {it}"
        )
        assert_close(gater_errors(trained["gater"], state), F64_RTOL, f"gater, {it} iteration(s)")


def test_gating_one_iteration_in_float32(float32):
    _, snapshots = gating_run(1, "float32")
    want, _, _, state = authors("gating_iter1_f64.pth")
    assert_close(relative_errors(snapshots[1]["backbone"], want), F32_RTOL, "gating backbone in float32")
    assert_close(gater_errors(snapshots[1]["gater"], state), F32_RTOL, "gater in float32")
