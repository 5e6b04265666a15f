"""BudgetCallback: the logged keys and values equal calling the calibrator by hand."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_ee import calibration, evaluation
from keras_ee.callbacks import BudgetCallback
from keras_ee.evaluation import predict_exit_logits


def _model(k=3, c=5, d=8):
    x = keras.Input((d,))
    h, outs = x, []
    for i in range(k):
        h = keras.layers.Dense(16, activation="relu")(h)
        outs.append(keras.layers.Dense(c, name=f"exit_{i + 1}")(h))
    return keras.Model(x, outs)


def _data(n=300, c=5, d=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.integers(0, c, n).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(64), x, y


def test_logged_values_equal_the_calibrator_by_hand():
    model = _model()
    ds, x, y = _data()
    costs = [100.0, 200.0, 400.0]
    cb = BudgetCallback(ds, budgets=[150, 300], costs=costs)
    cb.set_model(model)
    logs = {"loss": 1.0}
    cb.on_epoch_end(0, logs)
    assert set(logs) >= {"val_budget_acc@150", "val_budget_acc@300", "val_budget_auc", "val_anytime_acc_1"}

    logits = np.stack([np.asarray(o) for o in model(x, training=False)])
    scores, pred = calibration.exit_scores(logits)
    correct = pred == y[None]
    sweep = calibration.budget_sweep(scores, correct, scores, correct, np.array(costs))
    xs, acc = sweep["mean_cost"], sweep["val_accuracy"]
    expect = evaluation.accuracy_at(xs, acc, [150, 300])
    assert logs["val_budget_acc@150"] == pytest.approx(expect[0], nan_ok=True)
    assert logs["val_budget_acc@300"] == pytest.approx(expect[1], nan_ok=True)
    assert logs["val_budget_auc"] == pytest.approx(evaluation.mean_accuracy_over(xs, acc, xs.min(), xs.max()))
    np.testing.assert_allclose([logs[f"val_anytime_acc_{k}"] for k in (1, 2, 3)], correct.mean(axis=1))


def test_every_skips_epochs_and_works_inside_fit(tmp_path):
    from keras_ee.training import Baseline, MultiExitModel

    model = MultiExitModel(_model(), method=Baseline())
    model.compile(keras.optimizers.SGD(0.01))
    ds, _, _ = _data()
    cb = BudgetCallback(ds, budgets=[250], costs=[100, 200, 400], every=2)
    hist = model.fit(
        ds, epochs=2, verbose=0, shuffle=False, callbacks=[cb, keras.callbacks.CSVLogger(str(tmp_path / "h.csv"))]
    )
    auc = hist.history["val_budget_auc"]
    assert len(auc) == 2 and np.isnan(auc[0]) and 0 <= auc[1] <= 1  # computed at epoch 2 only
    assert "val_budget_auc" in open(tmp_path / "h.csv").readline()


def test_predict_exit_logits_shapes():
    ds, x, y = _data(n=130)
    logits, labels = predict_exit_logits(_model(), ds)
    assert logits.shape == (3, 130, 5) and logits.dtype == np.float32
    np.testing.assert_array_equal(labels, y)


@pytest.mark.parametrize(
    "kwargs, match", [({"every": 0}, "every"), ({"budgets": [-5]}, "budgets"), ({"budgets": [float("nan")]}, "budgets")]
)
def test_bad_arguments(kwargs, match):
    ds, _, _ = _data()
    with pytest.raises(ValueError, match=match):
        BudgetCallback(ds, **kwargs)


def test_cost_count_mismatch_is_refused():
    ds, _, _ = _data()
    cb = BudgetCallback(ds, costs=[1, 2])
    cb.set_model(_model())
    with pytest.raises(ValueError, match="2 exit costs for a model with 3 exits"):
        cb.on_epoch_end(0, {})
