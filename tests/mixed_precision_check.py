"""The check of tests/test_mixed_precision.py under a two-replica MirroredStrategy: mixed_float16.
It needs two logical CPU devices, made before TensorFlow initialises (`tiny_models.two_logical_cpus`):
tests/conftest.py makes them in the test process.

    python tests/mixed_precision_check.py METHOD   ->  one JSON line

METHOD (`l2w`, or `gating` with the look-ahead update) trains the BN-free multi-exit MLP with
a `LossScaleOptimizer` of initial scale 2^100 on one global batch of 16 (every float16 gradient
overflows: the step is skipped), then with the scale set to 2^8 on a second batch (a normal
step), and reports what moved after each, the optimizer's counters and scale, and the largest
difference between the replicas' copies of the auxiliary network.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tiny_models import fresh_collective_keys, mlp_backbone, tiny_data, two_logical_cpus  # noqa: E402  (tests/ is here)

two_logical_cpus()

import keras  # noqa: E402

from keras_ee import training  # noqa: E402


def overflow_check(name):
    """A skipped (overflowing) step, then a normal one, under MirroredStrategy: the dict of the docstring."""
    fresh_collective_keys()
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    keras.config.set_dtype_policy("mixed_float16")
    try:
        with strategy.scope():
            keras.utils.set_random_seed(0)
            method = (
                training.L2W(wpn_width=16)
                if name == "l2w"
                else training.BudgetAwareGating(gater_width=16, gater_interval=1, gater_update="lookahead")
            )
            model = training.MultiExitModel(mlp_backbone(), method=method)
            model.compile(
                optimizer=keras.optimizers.LossScaleOptimizer(
                    keras.optimizers.SGD(0.05, momentum=0.9), initial_scale=2.0**100
                )
            )
    finally:
        keras.config.set_dtype_policy("float32")
    aux = (model.method.wpn if name == "l2w" else model.method.gater).weights
    opt = model.optimizer

    def flat(variables):
        return np.concatenate([np.asarray(v.numpy(), np.float64).ravel() for v in variables])

    def state():
        return flat(model.backbone.trainable_variables), flat(aux)

    x, y = tiny_data(32)
    out = {"steps_per_batch": model.method.optimizer_steps_per_batch}
    for phase, rows in (("overflow", slice(0, 16)), ("normal", slice(16, 32))):
        if phase == "normal":
            opt.dynamic_scale.assign(2.0**8)
        backbone, auxiliary = state()
        model.fit(x[rows], y[rows], batch_size=16, epochs=1, verbose=0, shuffle=False)
        backbone_after, auxiliary_after = state()
        replicas = [[np.asarray(r) for r in strategy.experimental_local_results(v.value)] for v in aux]
        out[phase] = {
            "backbone_moved": float(np.abs(backbone_after - backbone).max()),
            "auxiliary_moved": float(np.abs(auxiliary_after - auxiliary).max()),
            "finite": bool(np.all(np.isfinite(backbone_after)) and np.all(np.isfinite(auxiliary_after))),
            "iterations": int(opt.iterations.numpy()),
            "scale": float(opt.dynamic_scale.numpy()),
            "replica_difference": max(float(np.abs(r[0] - r[1]).max()) for r in replicas),
        }
    return out


if __name__ == "__main__":
    print(json.dumps(overflow_check(sys.argv[1])))
