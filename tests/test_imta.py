"""IMTA and L2W + IMTA: gradient equilibrium, distillation, inline collaboration, the phases."""

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf
from tiny_models import SMALL_MSDNET, TWO_EXIT_CNN, StopAt

from keras_ee import costs, experiment, models, runs, training
from keras_ee.config import TrainConfig
from keras_ee.models.layers import GradientScale
from keras_ee.training import core

# Four exits, one conv unit each (the preset's default has two): IMTA's paths between four exits.
CNN = dict(input_shape=(8, 8, 1), num_classes=4, widths=(8, 8, 16, 16), depth=1)


def _cnn(seed=0):
    keras.utils.set_random_seed(seed)
    return models.create("multiexit_cnn", **CNN)


def _batch(n=16, shape=(8, 8, 1), classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *shape)).astype("float32"), rng.integers(0, classes, n).astype("int32")


def _compile(model, lr=0.1):
    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9))


# --- gradient equilibrium ---------------------------------------------------------


def _probed_gradients(model, x, y, exit_index=None):
    """Gradient of the loss (one exit's CE, or their sum) reaching each branch point tensor.

    Every `exit_k_branch` / `exit_k_trunk` GradientScale gets a zero "probe" added to its
    input: the probe's gradient is what reaches the branch point along that path, so the
    branch's plus the trunk's is the whole gradient reaching the exit's branch point.
    """
    structure = models.exit_structure(model.backbone)
    layers = [l for l in (*structure.branch, *structure.trunk) if l is not None]
    probes = {l.name: None for l in layers}
    original = GradientScale.call

    def call(self, inputs):
        if self.name in probes:
            probe = tf.zeros_like(inputs)
            tape.watch(probe)
            probes[self.name] = probe
            inputs = inputs + probe
        return original(self, inputs)

    GradientScale.call = call
    try:
        with tf.GradientTape(persistent=True) as tape:
            logits = model(x, training=True)
            ce = core.per_exit_cross_entropy(y, logits)
            per_exit = tf.reduce_mean(ce, axis=0)
            loss = tf.reduce_sum(per_exit) if exit_index is None else per_exit[exit_index]
        out = {}
        for k in range(1, structure.num_exits + 1):
            total = 0.0
            for part in ("branch", "trunk"):
                probe = probes.get(f"exit_{k}_{part}")
                if probe is not None:
                    g = tape.gradient(loss, probe)
                    total = total + (0.0 if g is None else g.numpy())
            out[k] = np.asarray(total)
        return logits, out
    finally:
        GradientScale.call = original


@pytest.mark.parametrize("builder", ["msdnet", "cnn"])
def test_gradient_equilibrium_is_identity_forward_and_scales_every_loss_reaching_an_exit(builder):
    if builder == "msdnet":
        keras.utils.set_random_seed(0)
        backbone = models.MSDNetBackbone(num_classes=5, **SMALL_MSDNET)
        x, y = _batch(8, (16, 16, 3), 5)
    else:
        backbone = _cnn()
        x, y = _batch()
    model = training.MultiExitModel(backbone, method=training.IMTA(inline_collaboration=False, distillation=False))
    structure = models.exit_structure(model.backbone)
    k_total = structure.num_exits
    for k in range(1, k_total + 1):  # the reference's scales
        assert structure.branch[k - 1].scale == pytest.approx(1 / (k_total - k + 1))
        if structure.trunk[k - 1] is not None:
            assert structure.trunk[k - 1].scale == pytest.approx((k_total - k) / (k_total - k + 1))
    ge_logits, ge_total = _probed_gradients(model, x, y)
    ge_each = [_probed_gradients(model, x, y, j)[1] for j in range(k_total)]
    for layer in (*structure.branch, *structure.trunk):
        if layer is not None:
            layer.scale = 1.0
    plain_logits, plain_total = _probed_gradients(model, x, y)
    plain_each = [_probed_gradients(model, x, y, j)[1] for j in range(k_total)]
    for a, b in zip(ge_logits, plain_logits):
        np.testing.assert_array_equal(a.numpy(), b.numpy())  # exact identity forward
    for i in range(1, k_total + 1):
        scale = 1.0 / (k_total - i + 1)
        # Every later exit's loss reaches exit i's branch point scaled by 1/(K-i+1) (eq. 5) ...
        for j in range(i - 1, k_total):
            np.testing.assert_allclose(ge_each[j][i], scale * plain_each[j][i], rtol=1e-4, atol=1e-7)
        # ... so the total is the scaled sum of the plain per-exit gradients.
        expected = scale * sum(plain_each[j][i] for j in range(i - 1, k_total))
        np.testing.assert_allclose(ge_total[i], expected, rtol=1e-4, atol=1e-7)
        assert np.abs(plain_total[i]).max() > 0
    if builder == "msdnet":
        # Finer scales carry no GradientScale: the only scaled tensors are the exits'
        # branch points, each on its block's coarsest scale (tests/test_models.py).
        scaled = [l for l in model.backbone.layers if isinstance(l, GradientScale) and "collab" not in l.name]
        assert {l.name for l in scaled} == {l.name for l in (*structure.branch, *structure.trunk) if l is not None}


def test_gradient_equilibrium_off_sets_every_scale_to_one():
    backbone = models.create("multiexit_cnn", gradient_equilibrium=True, **CNN)
    model = training.MultiExitModel(backbone, method=training.IMTA(gradient_equilibrium=False))
    structure = models.exit_structure(model.backbone)
    assert all(l.scale == 1.0 for l in (*structure.branch, *structure.trunk) if l is not None)


# --- one-for-all distillation -----------------------------------------------------


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_distillation_terms_match_numpy_and_send_nothing_to_the_teacher(reduction):
    rng = np.random.default_rng(1)
    b, c, k, t, g = 6, 5, 3, 3.0, 0.9
    logits = [rng.normal(size=(b, c)).astype("float64") * 2 for _ in range(k)]
    teacher = rng.normal(size=(b, c)) * 2
    y = rng.integers(0, c, b)
    ce = np.stack([-_log_softmax(z)[np.arange(b), y] for z in logits], axis=1)
    expected = np.zeros((b, k))
    log_pt = _log_softmax(teacher / t)
    for i in range(k - 1):
        kl = (np.exp(log_pt) * (log_pt - _log_softmax(logits[i] / t))).sum(axis=-1)
        if reduction == "mean":
            kl = kl / c
        expected[:, i] = (1 - g) * ce[:, i] + g * t * t * kl
    expected[:, k - 1] = ce[:, k - 1]
    tl = [tf.constant(z) for z in logits]
    tt = tf.constant(teacher)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(tt)
        tape.watch(tl)
        terms = training.distillation_terms(tf.constant(ce), tl, tt, t, g, reduction)
        loss = tf.reduce_sum(tf.reduce_mean(terms, axis=0))
    np.testing.assert_allclose(terms.numpy(), expected, rtol=1e-10)
    assert tape.gradient(loss, tt) is None  # the teacher is detached
    assert np.abs(tape.gradient(loss, tl[0]).numpy()).max() > 0
    # The loss as the formula states it, with the batch mean: sum_i<K ... + CE_K.
    np.testing.assert_allclose(float(loss), expected.mean(axis=0).sum(), rtol=1e-10)


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="kl_reduction"):
        training.IMTA(kl_reduction="sum")
    with pytest.raises(ValueError, match="frozen_batchnorm"):
        training.IMTA(frozen_batchnorm="train")
    with pytest.raises(ValueError, match="phase2_epochs"):
        training.IMTA(phase2_epochs=0)
    with pytest.raises(ValueError, match="temperature"):
        training.IMTA(temperature=0)
    with pytest.raises(TypeError, match="distillation"):
        training.IMTA(distillation="yes")
    with pytest.raises(ValueError, match="keras-ee multi-exit backbone"):
        from tiny_models import tiny_backbone

        training.MultiExitModel(tiny_backbone(), method=training.IMTA())


# --- phases -----------------------------------------------------------------------


def test_phases_follow_the_paper_ratio_and_the_override():
    assert [(p.name, p.epochs) for p in training.IMTA().phases(300)] == [("phase_1", 300), ("phase_2", 180)]
    assert [p.epochs for p in training.IMTA().phases(1)] == [1, 1]  # at least 1
    assert [p.epochs for p in training.IMTA(phase2_epochs=7).phases(3)] == [3, 7]
    assert [p.epochs for p in training.IMTA(inline_collaboration=False, distillation=False).phases(3)] == [3]
    assert training.IMTA().phases(3)[0].optimizer_options == {"nesterov": True}
    assert training.IMTA(nesterov=False).phases(3)[1].optimizer_options == {"nesterov": False}
    with pytest.raises(ValueError, match="epochs"):
        training.Phase("p", 0)
    with pytest.raises(ValueError, match="unknown optimizer options"):
        training.Phase("p", 1, {"beta": 1})


def _frozen_and_heads(model):
    heads = model.method._phase2_layer_names(model.num_exits)
    frozen = [v for l in model.backbone.layers if l.name not in heads for v in l.weights]
    trained = [v for l in model.backbone.layers if l.name in heads for v in l.weights]
    return frozen, trained


@pytest.mark.parametrize("bn", ["inference", "batch"])
def test_phase2_trains_only_the_new_classifiers_and_transfer_paths(bn):
    model = training.MultiExitModel(_cnn(), method=training.IMTA(frozen_batchnorm=bn))
    x, y = _batch(32)
    _compile(model)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # phase I
    model.enter_phase(1)
    _compile(model)
    frozen, trained = _frozen_and_heads(model)
    assert {v.path for v in model.trainable_variables} == {v.path for v in trained if "moving" not in v.path}
    before_frozen = [v.numpy().copy() for v in frozen]
    before_trained = [v.numpy().copy() for v in trained]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for v, old in zip(frozen, before_frozen):
        if "moving_" in v.path and bn == "batch":
            continue
        np.testing.assert_array_equal(v.numpy(), old, err_msg=v.path)  # bit-identical
    stats_moved = [not np.array_equal(v.numpy(), old) for v, old in zip(frozen, before_frozen) if "moving_" in v.path]
    assert stats_moved and (all(stats_moved) if bn == "batch" else not any(stats_moved))
    assert any(not np.array_equal(v.numpy(), old) for v, old in zip(trained, before_trained))
    # The teacher is the phase-I last exit, detached: a snapshot taken when phase II began.
    last = model.backbone.get_layer(f"exit_{model.num_exits}")
    assert not np.array_equal(model.method.teacher_kernel.numpy(), last.kernel.numpy()[: last.kernel.shape[0] // 2])


def test_phase1_is_the_original_network_exactly():
    """Without GE, phase I trains like Baseline: the closed transfer paths add exact zeros."""
    x, y = _batch(32)
    plain = training.MultiExitModel(_cnn(), method=training.Baseline())
    imta = training.MultiExitModel(_cnn(), method=training.IMTA(gradient_equilibrium=False))
    for m in (plain, imta):
        _compile(m)
    for a, b in zip(plain(x), imta(x)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)
    keras.utils.set_random_seed(3)
    plain.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    keras.utils.set_random_seed(3)
    imta.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    for a, b in zip(plain(x), imta(x)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    # The transfer rows of every classifier stayed zero.
    for k in range(2, imta.num_exits + 1):
        kernel = imta.backbone.get_layer(f"exit_{k}").kernel.numpy()
        np.testing.assert_array_equal(kernel[kernel.shape[0] // 2 :], 0.0)


@pytest.mark.parametrize("detach", [True, False])
def test_inline_collaboration_detached_path_sends_no_gradient_to_the_previous_exit(detach):
    model = training.MultiExitModel(_cnn(), method=training.IMTA(detach_transfer=detach, phase2_init="random"))
    model.enter_phase(1)
    _compile(model)
    x, y = _batch()
    prev = model.backbone.get_layer("exit_2")
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
        loss = tf.reduce_mean(core.per_exit_cross_entropy(y, logits)[:, 2])  # exit 3's CE
    g_prev, g_own = tape.gradient(loss, [prev.kernel, model.backbone.get_layer("exit_3").kernel])
    assert np.abs(g_own.numpy()).max() > 0
    if detach:
        assert g_prev is None or np.abs(g_prev.numpy()).max() == 0
    else:
        assert np.abs(g_prev.numpy()).max() > 0


def test_costs_count_the_transfer_paths_and_the_stages_chain():
    original = _cnn()
    before = costs.exit_costs(original)
    model = training.MultiExitModel(_cnn(), method=training.IMTA())
    after = costs.exit_costs(model.backbone)
    c = CNN["num_classes"]
    for k in range(2, model.num_exits + 1):
        d = int(model.backbone.get_layer(f"exit_{k}_features").output.shape[-1])
        # transfer Dense C->d (+ bias) and its ReLU, and d*C more in the classifier
        extra_ops = (c * d + d) + d + d * c
        extra_params = (c * d + d) + 2 * d + d * c  # + the BatchNorm's gamma and beta
        assert after["stage_mul_adds"][k - 1] - before["stage_mul_adds"][k - 1] == extra_ops
        assert after["stage_params"][k - 1] - before["stage_params"][k - 1] == extra_params
    assert after["stage_mul_adds"][0] == before["stage_mul_adds"][0]
    model.enter_phase(1)  # frozen layers still count their parameters
    assert costs.exit_costs(model.backbone) == after
    stages = models.split_stages(model.backbone)
    x, _ = _batch()
    out = stages[0](x)
    chained = [out[0]]
    for stage in stages[1:]:
        out = stage(out[1:])
        chained.append(out[0])
    for a, b in zip(chained, model(x, training=False)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_a_saved_phase2_model_loads_in_phase2_with_identical_outputs(tmp_path):
    model = training.MultiExitModel(_cnn(), method=training.IMTA())
    x, y = _batch(32)
    _compile(model)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.enter_phase(1)
    _compile(model)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert loaded.method.current_phase == 1
    assert [v.path for v in loaded.trainable_variables] == [v.path for v in model.trainable_variables]
    for a, b in zip(model.predict(x, verbose=0), loaded.predict(x, verbose=0)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.method.teacher_kernel.numpy(), model.method.teacher_kernel.numpy())
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0)  # and it trains on in phase II


def test_fit_phases_runs_every_phase_with_plain_fit():
    model = training.MultiExitModel(_cnn(), method=training.IMTA(phase2_epochs=1))
    x, y = _batch(32)
    made = []

    def make_optimizer(phase, index):
        made.append((phase.name, index))
        return keras.optimizers.SGD(0.05, momentum=0.9, nesterov=phase.optimizer_options["nesterov"])

    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        histories = training.fit_phases(model, batches, epochs=2, make_optimizer=make_optimizer, verbose=0)
    # a tf.data pipeline shuffles itself: no Keras warning about its ignored shuffle=True
    assert not [w for w in caught if "shuffle" in str(w.message)]
    assert made == [("phase_1", 0), ("phase_2", 1)]
    assert [len(h.history["loss"]) for h in histories] == [2, 1]
    assert model.method.current_phase == 1


# --- runs: both phases, resume across the boundary --------------------------------

TINY = dict(
    dataset="digits",
    model="multiexit_cnn",
    model_options=TWO_EXIT_CNN,
    epochs=1,
    batch_size=128,
    val_size=200,
    evaluate=False,
    train_size=300,
)


def _run_weights(run):
    model = runs.load_run_model(run / "model.keras")
    return model, [v.numpy() for v in model.variables] + [v.numpy() for v in model.optimizer.variables]


@pytest.mark.parametrize("method", ["imta", "l2w_imta"])
def test_a_run_resumed_across_the_phase_boundary_equals_an_uninterrupted_one(method, tmp_path, capsys, eager_steps):
    cfg = TrainConfig(**TINY, method=method, method_options={"phase2_epochs": 1})
    straight = tmp_path / "straight"
    experiment.train(cfg, straight, verbose="progress")
    printed = capsys.readouterr().out
    assert "phase_1 (1/2) epoch 1/1" in printed and "phase_2 (2/2) epoch 2/2" in printed
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(cfg, run, verbose=0, callbacks=[StopAt(1)])  # phase II's first epoch
    assert runs.RunBackup(run / "backup").backups() == [1]
    experiment.train(cfg, run, verbose=0)
    (ma, a), (mb, b) = _run_weights(straight), _run_weights(run)
    assert ma.method.current_phase == mb.method.current_phase == 1
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    with open(run / "history.csv") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["0", "1"]


def test_a_resume_inside_phase2_loads_the_phase2_state(tmp_path, eager_steps):
    cfg = TrainConfig(**{**TINY, "epochs": 1}, method="imta", method_options={"phase2_epochs": 2})
    straight = tmp_path / "straight"
    experiment.train(cfg, straight, verbose=0)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(cfg, run, verbose=0, callbacks=[StopAt(2)])  # after phase II's first epoch
    assert runs.RunBackup(run / "backup").backups() == [2]
    experiment.train(cfg, run, verbose=0)
    for x, y in zip(_run_weights(straight)[1], _run_weights(run)[1]):
        np.testing.assert_array_equal(x, y)


def test_l2w_imta_meta_learns_in_both_phases_and_keeps_the_network_frozen():
    method = training.L2WIMTA(phase2_epochs=1)
    model = training.MultiExitModel(_cnn(), method=method)
    x, y = _batch(32)
    _compile(model)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    model.enter_phase(1)
    _compile(model)
    frozen, _ = _frozen_and_heads(model)
    before = [v.numpy().copy() for v in frozen]
    wpn = [v.numpy().copy() for v in method.wpn.weights]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    for v, old in zip(frozen, before):
        np.testing.assert_array_equal(v.numpy(), old, err_msg=v.path)
    assert any(not np.array_equal(v.numpy(), old) for v, old in zip(method.wpn.weights, wpn))
    assert math.isfinite(float(model.evaluate(x, y, verbose=0, return_dict=True)["loss"]))


def test_registry_and_cli_know_both_methods():
    from keras_ee import cli

    spec = training.get_method("l2w_imta")
    assert {"q", "delta", "distillation", "phase2_epochs", "frozen_batchnorm"} <= set(spec.options)
    assert spec.convert({"phase2_epochs": 3, "q": 0.5})["phase2_epochs"] == 3
    args = cli.build_parser().parse_args(["train", "--method", "imta", "--epochs", "5", "--phase2-epochs", "2"])
    cfg = cli._config_from_args(args)
    assert cfg.method_options == {"phase2_epochs": 2}
    assert [p.epochs for p in experiment.make_method(cfg.method, cfg.method_options).phases(cfg.epochs)] == [5, 2]
    with pytest.raises(ValueError, match="phase2_epochs"):
        experiment.make_method("imta", {"phase2_epochs": "x"})


def test_transfer_widths_set_each_transfer_path_and_are_checked():
    model = training.MultiExitModel(_cnn(), method=training.IMTA(transfer_widths=[1, 3, 5, 7]))
    for k, w in ((2, 3), (3, 5), (4, 7)):
        d = int(model.backbone.get_layer(f"exit_{k}_features").output.shape[-1])
        assert model.backbone.get_layer(f"exit_{k}_collab_dense").units == w
        assert tuple(model.backbone.get_layer(f"exit_{k}").kernel.shape) == (d + w, CNN["num_classes"])
    with pytest.raises(ValueError, match="transfer_widths"):
        training.MultiExitModel(_cnn(), method=training.IMTA(transfer_widths=[1, 2]))
    with pytest.raises(ValueError, match="transfer_widths"):
        training.IMTA(transfer_widths=[0, 1])


def test_fit_after_enter_phase_without_compile_is_a_clear_error():
    model = training.MultiExitModel(_cnn(), method=training.IMTA())
    _compile(model)
    model.enter_phase(1)
    x, y = _batch()
    with pytest.raises(ValueError, match="not compiled since"):
        model.fit(x, y, epochs=1, verbose=0)
    _compile(model)
    model.fit(x, y, epochs=1, verbose=0)
