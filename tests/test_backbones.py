"""MSDNetBackbone / RANetBackbone: `.keras` files written before them still load and predict the same."""

import pathlib

import keras
import numpy as np
import pytest

from keras_ee import models  # noqa: F401  (registers keras-ee's layers for loading)

LEGACY = pathlib.Path(__file__).parent / "data" / "legacy_models"


@pytest.fixture(scope="module")
def legacy_predictions():
    with np.load(LEGACY / "predictions.npz") as data:
        return dict(data)


@pytest.mark.parametrize("family", ["msdnet", "ranet"])
def test_legacy_keras_files_load_and_predict_the_same(family, legacy_predictions):
    model = keras.saving.load_model(LEGACY / f"tiny_{family}.keras")
    logits = model.predict(legacy_predictions["input"], verbose=0)
    expected = [legacy_predictions[k] for k in sorted(legacy_predictions) if k.startswith(f"{family}_exit_")]
    assert len(logits) == len(expected) > 1
    assert model.output_names == [f"exit_{k}" for k in range(1, len(expected) + 1)]
    for got, want in zip(logits, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The hooks training methods and the staged runtime read survive too.
    stages = models.split_stages(model)
    out = stages[0](legacy_predictions["input"])
    np.testing.assert_allclose(np.asarray(out[0]), expected[0], rtol=1e-5, atol=1e-5)
