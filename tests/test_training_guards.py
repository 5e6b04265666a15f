"""Guards of a training run: a skipped mixed-precision step changes nothing, batch sizes that a
strategy's replicas cannot share are refused before anything is written, method options given
under two names are refused, a dump whose costs disagree with the model is refused."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from tiny_models import tiny_backbone, tiny_data  # noqa: E402

from keras_ee import training as T  # noqa: E402

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
    model.fit(data, epochs=1, verbose=0)
    after = _step_state(model)
    changed = [name for name in before if not np.array_equal(before[name], after[name])]
    assert not changed
    steps = model.method.optimizer_steps_per_batch
    assert optimizer.iterations.numpy() == 0 and optimizer.dynamic_scale.numpy() == 2.0**8 / 2**steps
