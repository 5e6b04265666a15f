"""Guards of a training run: a skipped mixed-precision step changes nothing, batch sizes that a
strategy's replicas cannot share are refused before anything is written, method options given
under two names are refused, a dump whose costs disagree with the model is refused."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tiny_models import StopAt, mlp_backbone, tiny_backbone, tiny_data  # noqa: E402

from keras_ee import cli, data, distribute, experiment  # noqa: E402
from keras_ee import training as T  # noqa: E402
from keras_ee.config import TrainConfig  # noqa: E402

# --- a skipped mixed-precision step --------------------------------------------------------

SKIPPING_METHODS = {
    "baseline": lambda: T.Baseline(),
    "l2w": lambda: T.L2W(wpn_width=8),
    "gating": lambda: T.BudgetAwareGating(gater_width=8, gater_interval=1, gater_update="lookahead"),
    "hdkd": lambda: T.HDKD(),
}


def _step_state(model):
    """Every value a skipped step must leave alone: the backbone's weights and BatchNorm moving
    statistics, the method's networks and statistics, and its own optimizers' state."""
    method = model.method
    values = {v.path: v.numpy() for v in model.backbone.variables}
    values.update(
        {f"method/{v.path}": v.numpy() for v in method.variables if not v.path.endswith(("counter", "main_lr"))}
    )
    for optimizer in method.auxiliary_optimizers():
        values.update({f"{optimizer.name}/{v.path}": v.numpy() for v in optimizer.variables})
    return values


@pytest.mark.parametrize("method", sorted(SKIPPING_METHODS))
def test_a_step_skipped_for_overflow_changes_nothing(method):
    """Only the real step overflows (its gradients reach the LossScaleOptimizer non-finite; the
    look-ahead's are finite): the auxiliary step taken before it, the BatchNorm statistics of its
    forward and everything else stay as they were; the scale is halved per skipped step."""
    keras.utils.set_random_seed(0)
    model = T.MultiExitModel(tiny_backbone(), method=SKIPPING_METHODS[method]())
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.05, momentum=0.9), initial_scale=2.0**8)
    model.compile(optimizer=optimizer)
    apply_step = model.apply_step
    model.apply_step = lambda grads, per_exit, finite=None: apply_step(grads, per_exit, finite=tf.constant(False))
    x, y = tiny_data(16)
    data = tf.data.Dataset.from_tensors((x, y))
    if model.method.uses_meta_stream:
        data = tf.data.Dataset.zip((data, tf.data.Dataset.from_tensors(tiny_data(16, seed=7))))
    before = _step_state(model)
    model.fit(data, epochs=1, verbose=0, shuffle=False)
    after = _step_state(model)
    changed = [name for name in before if not np.array_equal(before[name], after[name])]
    assert not changed
    steps = model.method.optimizer_steps_per_batch
    assert optimizer.iterations.numpy() == 0 and optimizer.dynamic_scale.numpy() == 2.0**8 / 2**steps


# --- method options under two names ----------------------------------------------------------

TINY = dict(dataset="digits", model="multiexit_cnn", epochs=1, batch_size=32, val_size=100, train_size=64)


def test_two_names_of_one_option_are_refused_before_anything_is_written(tmp_path, capsys):
    argv = ["train", "--method", "gating", "--method-option", "lambda=2", "--method-option", "cost_weight=3"]
    argv += ["--dataset", "digits", "--train-size", "64", "--epochs", "1", "--no-evaluate"]
    assert cli.main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "lambda=2 and cost_weight=3 are two names of the option 'cost_weight'" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_config_json_stores_an_option_under_its_own_name(tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # an existing folder keeps the config of a run stopped before its first step
    config = TrainConfig(**TINY, method="gating", method_options={"lambda": 3})
    with pytest.raises(KeyboardInterrupt):
        experiment.train(config, run, verbose=0, callbacks=[StopAt(0)])
    assert json.loads((run / "config.json").read_text())["method_options"] == {"cost_weight": 3}


@pytest.mark.parametrize(
    "method, first, again, other",
    [
        ("l2w", {}, {"q": 0.75}, {"q": 0.5}),  # the default written out
        ("l2w", {"q": 0.75, "delta": 0.8}, {}, {"delta": 0.5}),
        ("gating", {"cost_weight": 3.0}, {"lambda": 3}, {"lambda": 2}),  # the alias, an int for the float
    ],
)
def test_resuming_with_the_same_options_written_otherwise_is_not_other_settings(tmp_path, method, first, again, other):
    experiment.prepare_workdir(TrainConfig(**TINY, method=method, method_options=first), tmp_path)
    (tmp_path / "history.csv").write_text("epoch,loss\n0,1.0\n")  # the run has started
    experiment.prepare_workdir(TrainConfig(**TINY, method=method, method_options=again), tmp_path, write=False)
    with pytest.raises(ValueError, match="other settings"):
        experiment.prepare_workdir(TrainConfig(**TINY, method=method, method_options=other), tmp_path)


# --- a dump whose exit costs are not the model's ----------------------------------------------


def test_from_run_refuses_a_dump_whose_costs_disagree_with_the_model(tmp_path):
    from keras_ee import costs, dumps, models
    from keras_ee.inference import EarlyExitModel

    backbone = models.create("multiexit_cnn", num_classes=3, input_shape=(8, 8, 1), widths=(4, 8), depth=1)
    T.MultiExitModel(backbone).save(tmp_path / "model.keras")
    own = costs.exit_costs(backbone)["mul_adds"]
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(own), 12, 3)).astype("float32")
    labels = rng.integers(0, 3, size=12)
    edited = list(range(1, len(own) + 1))  # an edited costs.json: 1, 2, ... Mul-Adds
    dumps.save_dump(tmp_path / "dump", logits, labels, logits, labels, costs={"mul_adds": edited})
    with pytest.raises(ValueError, match=r"gives the exits' Mul-Adds as \[1, 2\], but the model's own") as e:
        EarlyExitModel.from_run(tmp_path, budget=1.5, raw_pixels=False)  # a bare run: no preprocessing.json
    assert str(own) in str(e.value) and "\n" not in str(e.value)
    dumps.save_dump(tmp_path / "dump", logits, labels, logits, labels, costs={"mul_adds": own})
    ee = EarlyExitModel.from_run(tmp_path, budget=(own[0] + own[-1]) / 2, raw_pixels=False)
    assert ee.costs.tolist() == own


# --- batch sizes under a strategy, and strategies in one process ---------------------------------


def test_a_global_batch_the_replicas_cannot_share_is_refused_naming_share_and_smallest():
    uneven = TrainConfig(method="baseline", batch_size=7, strategy="mirrored")
    with pytest.raises(ValueError, match=r"--batch-size 7 is the global batch .* 2 replicas: 3.5 images each; "):
        experiment.check_batch_size(uneven, 2)
    with pytest.raises(ValueError, match=r"expected a multiple of 2, e.g. 6 or 8\.$"):
        experiment.check_batch_size(uneven, 2)
    small = TrainConfig(method="l2w", batch_size=2, strategy="mirrored")  # L2W's halves need 2 per replica
    with pytest.raises(ValueError, match=r"2 replicas: 1 image each; expected a multiple of 2 of at least 4 "):
        experiment.check_batch_size(small, 2)
    experiment.check_batch_size(TrainConfig(method="l2w", batch_size=4, strategy="mirrored"), 2)
    experiment.check_batch_size(TrainConfig(method="l2w", batch_size=3), 1)  # one device: any batch >= 2


def test_an_epoch_drops_a_last_batch_that_a_replica_or_the_method_cannot_train_on():
    splits = data.load_configured(TrainConfig(train_size=17, val_size=50))
    config = TrainConfig(batch_size=8)
    assert experiment.training_batches(config, splits, T.Baseline()) == 3  # one device keeps 8 + 8 + 1
    assert experiment.training_batches(config, splits, T.L2W()) == 2  # no halves in a batch of 1
    assert experiment.training_batches(config, splits, T.IMTA()) == 2  # transfer-path BN: n = 1
    assert experiment.training_batches(config, splits, T.Baseline(), replicas=2) == 2
    stream = experiment.training_data(config, splits, T.Baseline(), end_epoch=1, replicas=2)
    assert [int(x.shape[0]) for x, _ in stream] == [8, 8]
    with pytest.raises(ValueError, match="fewer than one global batch .* expected a --batch-size of at most 16"):
        experiment.check_splits(splits, TrainConfig(batch_size=18, strategy="mirrored"), replicas=2)


def test_a_run_stopped_in_its_first_epoch_leaves_no_folder(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        experiment.train(TrainConfig(**TINY, method="baseline"), run, verbose=0, callbacks=[StopAt(0, batch=0)])
    assert not run.exists()  # tensorboard/ included


# Under MirroredStrategy over the two logical CPUs of tests/conftest.py: (1) a global batch of 7 on
# 2 replicas is refused before anything is written; (2) 17 images at batch 8 (a last batch of 1: one
# replica would get none) train, the last batch dropped; (3) L2W then trains in the same process (a
# second strategy's collectives collided with the first's); (4) a model built under a second
# MirroredStrategy of the user's is refused in one line.
def test_two_replicas_refuse_an_uneven_batch_drop_a_last_one_and_train_runs_one_after_the_other(tmp_path):
    tiny = dict(
        model="multiexit_cnn",
        model_options={"widths": [4, 8], "depth": 1},
        epochs=1,
        train_size=17,
        val_size=51,
        strategy="mirrored",
        evaluate=False,
    )
    with pytest.raises(ValueError) as uneven:
        experiment.train(TrainConfig(**tiny, method="baseline", batch_size=7), tmp_path / "uneven", verbose=0)
    assert str(uneven.value).startswith("--batch-size 7 is the global batch of --strategy mirrored")
    assert not (tmp_path / "uneven").exists()
    for method in ("baseline", "l2w"):
        run = experiment.train(TrainConfig(**tiny, method=method, batch_size=8), tmp_path / method, verbose=0)
        state = json.loads((run / "state.json").read_text())
        assert state["trained"] and state["replicas"] == 2, state
    # The user's own MirroredStrategy numbers its collectives from the same base as the one that just
    # trained (as it would in a fresh process, where no test moved the base in between).
    trained = distribute.make_strategy("mirrored")
    base = tf.distribute.MirroredStrategy._collective_key_base
    tf.distribute.MirroredStrategy._collective_key_base = trained.extended._collective_key_base
    try:
        second = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    finally:
        tf.distribute.MirroredStrategy._collective_key_base = base
    with second.scope():
        model = T.MultiExitModel(mlp_backbone())
        model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="already trained under another MirroredStrategy"):
        model.fit(*tiny_data(8), epochs=1, verbose=0)
