"""Builds and trains the tiny float64 L2W models whose weights `test_l2w_pinned.py` pins.

`python tests/l2w_pinned.py` rewrites `tests/data/l2w_pinned.npz` (only when L2W's
behaviour is meant to change; say so in the commit). The fixture was made by commit
bb5e0a5, before the training methods became plug-ins (issue 11).
"""

import os
import sys

import numpy as np

OPTION_SETS = {
    "default": {},
    "both_row": {"wpn_input": "both", "constraint": "row", "delta": 0.5, "q": 1.2},
    "confidence_mat_interval2": {"wpn_input": "confidence", "constraint": "mat", "meta_interval": 2},
    "vanilla_objective": {"meta_objective": "vanilla", "wpn_depth": 2, "wpn_width": 7},
    "selection": {"weighting": "selection"},
    "rising": {"weighting": "rising"},
}
OPTIMIZERS = ("sgd_nesterov_wd", "adam")
STEPS = 3


def _optimizer(name):
    import keras

    if name == "adam":
        return keras.optimizers.Adam(1e-2)
    return keras.optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(0.1, decay_steps=20), momentum=0.9, nesterov=True, weight_decay=1e-3
    )


def trained_weights(options, optimizer):
    """The backbone's and the method's variables (WPN, counters) after STEPS loaded batches."""
    import keras

    from keras_ee import training

    keras.utils.set_random_seed(7)
    inp = keras.Input((6,), dtype="float64")
    h = keras.layers.Dense(8, activation="relu", dtype="float64", name="d1")(inp)
    h = keras.layers.BatchNormalization(dtype="float64", name="bn")(h)
    e1 = keras.layers.Dense(3, dtype="float64", name="exit_1")(h)
    h2 = keras.layers.Dense(8, activation="relu", dtype="float64", name="d2")(h)
    e2 = keras.layers.Dense(3, dtype="float64", name="exit_2")(h2)
    e3 = keras.layers.Dense(3, dtype="float64", name="exit_3")(keras.layers.Dense(5, dtype="float64")(h2))
    # Keras' Adam for the WPN, as at bb5e0a5 (the default became PyTorch's step, keras_ee.optimizers.Adam,
    # which tests/test_optimizers.py checks against torch): this fixture pins the algorithm.
    method = training.L2W(**{"wpn_optimizer": "keras_adam", **options})
    model = training.MultiExitModel(keras.Model(inp, [e1, e2, e3]), method=method)
    model.compile(optimizer=_optimizer(optimizer))
    rng = np.random.default_rng(3)
    x = rng.normal(size=(STEPS * 16, 6))
    y = rng.integers(0, 3, STEPS * 16)
    for s in range(STEPS):
        model.train_on_batch(x[16 * s : 16 * (s + 1)], y[16 * s : 16 * (s + 1)])
    values = {}  # the backbone's and the method's (WPN, counters): not the model's bookkeeping
    for i, v in enumerate(list(model.backbone.weights) + list(model.method.weights)):
        values[f"{i:03d}"] = np.asarray(v.numpy(), dtype=np.float64)
    return values


def all_cases():
    for name, options in OPTION_SETS.items():
        for opt in OPTIMIZERS:
            yield f"{name}-{opt}", options, opt


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = {}
    for case, options, opt in all_cases():
        for key, value in trained_weights(options, opt).items():
            out[f"{case}/{key}"] = value
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "l2w_pinned.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path}: {len(out)} arrays")
