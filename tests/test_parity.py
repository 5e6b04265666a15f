"""Parity of keras-ee's training steps with the authors' own PyTorch training code (issue 30).

The fixtures in tests/data/parity/ were made by running the authors' training iterations
(kalviny/MSDNet-PyTorch `main.py`'s `train`, LeapLabTHU/L2W-DEN `tools/main_cifar_DDP.py`'s
`train`) on a small MSDNet, in float64 and float32 (README.md there says how). Here keras-ee
starts from the same checkpoint, with the same hyper-parameters, under the float64 dtype policy,
and takes its own training steps on the same batches; its weights, BatchNorm statistics and
WPN must end within 1e-6 of the authors' float64 ones (1e-3 in float32 after one iteration).

Errors are measured relative to the authors' *update* of each tensor (`max|k - t| / max|t - t0|`),
which is stricter than relative to the weight: a step that is 1% wrong fails, however small the
learning rate. No torch here: the authors' tensors are mapped onto keras-ee's variables by
`keras_ee.interop`'s own key mapping (the one `keras-ee import` uses).

Each run is made once per module and dtype, three iterations kept after the first and the third.
keras-ee's `train_step` runs eagerly here (`run_eagerly=True`): the same step, without a graph
trace that costs 15-20 s for L2W on an MSDNet on a CPU; the traced steps are tested in
test_training.py and test_l2w_pinned.py.
"""

import math
import os
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_ee import training as T  # noqa: E402
from keras_ee.calibration import geometric_fractions  # noqa: E402
from keras_ee.distribute import dtype_policy
from keras_ee.interop.torch_import import (  # noqa: E402
    StateDict,
    msdnet_assignments,
    plan_fill,
    read_checkpoint_into_model,
)

FIXTURES = Path(__file__).parent / "data" / "parity"
ITERATIONS = 3
# The authors' hyper-parameters (README.md of the fixtures).
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
L2W_OPTIONS = dict(
    q=0.75,  # --target_p_index 15: p = 15 / 20
    delta=0.8,  # --epsilon 0.8
    wpn_depth=1,
    wpn_width=8,
    wpn_input="loss",
    constraint="col",
    meta_interval=1,
    wpn_learning_rate=1e-4,
    wpn_weight_decay=1e-4,
)
L2W_EPOCHS, L2W_BATCHES = 2, 3  # --epochs 2 over 3 batches: their per-iteration cosine, T = 6
# Their WPN's tensors, in the order of keras-ee's `WeightPredictionNetwork.weights` (depth 1).
WPN_KEYS = ("first_hidden_layer.fc.weight", "first_hidden_layer.fc.bias", "output_layer.weight", "output_layer.bias")
# Tolerances: relative to the authors' update of each tensor; the floor (relative to the tensor's
# magnitude) keeps a tensor the step barely moves from asking more than the dtype can hold: errors
# under 1e-15 (float64) and 1e-6 (float32: a sum over 16k activations) of the tensor always pass.
TOLERANCE = {"float64": (1e-6, 1e-9), "float32": (1e-3, 1e-3)}
TIE = 1e-9  # confidences closer than this at an allocation's cut are a tie within rounding


# --------------------------------------------------------------------------- helpers


def load(name):
    with np.load(FIXTURES / name) as data:
        return dict(data)


def images(arrays, i):
    """Batch `i` as keras-ee's NHWC input (the fixtures store NCHW, float16-exact values)."""
    return arrays["x_nchw"][i].transpose(0, 2, 3, 1).astype(np.float32)  # exact: the model casts them


def authors_values(backbone, arrays, prefix, fill_from=None):
    """The authors' tensors `prefix<torch key>` as keras-ee variable values `{variable.path: array}`.

    `fill_from` supplies the keys that `prefix` lacks (gradients have no running statistics).
    """
    sd = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    if fill_from is not None:
        sd = {**{k[len(fill_from) :]: v for k, v in arrays.items() if k.startswith(fill_from)}, **sd}
    sd = StateDict(sd)
    plan, _used, _filled, _dead = plan_fill(backbone, sd, msdnet_assignments(sd), "the parity fixture")
    values = {}
    for variable, value in plan:
        if isinstance(value, list):  # the channel slices of a merged 1x1 bottleneck
            merged = np.empty(tuple(variable.shape))
            for start, piece in value:
                merged[..., start : start + piece.shape[-1]] = piece
            value = merged
        values[variable.path] = np.asarray(value, np.float64)
    return values


def update_error(actual, expected, initial, floor):
    """`max|actual - expected|` relative to the authors' update `max|expected - initial|`."""
    update = max(np.abs(expected - initial).max(), floor * np.abs(expected).max(), 1e-300)
    return float(np.abs(np.asarray(actual, np.float64) - expected).max() / update)


def wpn_values(arrays, prefix):
    """The authors' WPN tensors in keras-ee's layout (Linear weights transposed)."""
    return [arrays[prefix + k].T if arrays[prefix + k].ndim == 2 else arrays[prefix + k] for k in WPN_KEYS]


def papers_sgd(learning_rate=LR):
    """The authors' optimizer: PyTorch's SGD (coupled L2 decay, `v <- mu v + g`, `p <- p - lr v`)."""
    from keras_ee.optimizers import SGD  # issue 30 (helper optim30)

    return SGD(learning_rate=learning_rate, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=False)


class PerBatchCosine(keras.optimizers.schedules.LearningRateSchedule):
    """L2W-DEN's `adjust_learning_rate`: `0.5 lr (1 + cos(pi t / T))` for loaded batch t of T, the same
    for both halves of a batch (keras-ee's optimizer takes two steps per loaded batch)."""

    def __call__(self, step):
        batch = tf.cast(step // 2, "float64")  # the model casts it to its dtype
        return 0.5 * LR * (1.0 + tf.cos(math.pi * batch / (L2W_EPOCHS * L2W_BATCHES)))

    def get_config(self):
        return {}


def imported(checkpoint):
    """The checkpoint in keras-ee (under the current dtype policy), and its WPN if it has one."""
    backbone, _report, _method, state = read_checkpoint_into_model(FIXTURES / checkpoint)
    return backbone, state.get("wpn")


def l2w_model(backbone, wpn, optimizer, **options):
    model = T.MultiExitModel(backbone, method=T.L2W(**{**L2W_OPTIONS, **options}))
    model.compile(optimizer=optimizer, run_eagerly=True)
    for variable, value in zip(model.method.wpn.weights, wpn.weights, strict=True):
        variable.assign(value)
    return model


def run(model, arrays, iterations):
    """keras-ee's own train step on the fixture's batches; snapshots after 1 and `iterations`."""
    snapshots = {}
    for i in range(iterations):
        model.train_on_batch(images(arrays, i), arrays["y"][i])
        if i + 1 in (1, iterations):
            snapshots[i + 1] = {v.path: np.asarray(v.numpy(), np.float64) for v in model.backbone.weights}
            if isinstance(model.method, T.L2W):
                snapshots[i + 1]["wpn"] = [np.asarray(v.numpy(), np.float64) for v in model.method.wpn.weights]
    return snapshots


def check(snapshot, backbone, arrays, it, trainable, dtype, authors=None):
    """Asserts that keras-ee's variables (`trainable` or BatchNorm statistics) after iteration `it`
    are the authors' float64 ones (`authors`: another run of theirs from the same start)."""
    rtol, floor = TOLERANCE[dtype]
    initial = authors_values(backbone, arrays, "init/")
    expected = authors_values(backbone, arrays if authors is None else authors, f"after{it}/")
    errors = sorted(
        (update_error(snapshot[v.path], expected[v.path], initial[v.path], floor), v.path)
        for v in backbone.weights
        if v.trainable == trainable
    )
    worst, path = errors[-1]
    what = "weights" if trainable else "BatchNorm moving statistics"
    assert worst <= rtol, f"{what} after {it} iteration(s), {dtype}: {path} is {worst:.2e} of the authors' update away"


# --------------------------------------------------------------------------- fixtures

# What each run needs, made once per module (the steps trace once per model).


@pytest.fixture(scope="module")
def baseline64():
    return load("baseline_float64.npz")


@pytest.fixture(scope="module")
def l2w64():
    return load("l2w_float64.npz")


@pytest.fixture(scope="module")
def baseline_run64(baseline64):
    with dtype_policy("float64"):
        backbone, _ = imported("baseline_msdnet_init.pth")
        model = T.MultiExitModel(backbone, method=T.Baseline())
        model.compile(optimizer=papers_sgd(), run_eagerly=True)
        return backbone, run(model, baseline64, ITERATIONS)


@pytest.fixture(scope="module")
def baseline_run32(baseline64):
    with dtype_policy("float32"):
        backbone, _ = imported("baseline_msdnet_init.pth")
        model = T.MultiExitModel(backbone, method=T.Baseline())
        model.compile(optimizer=papers_sgd(), run_eagerly=True)
        return backbone, run(model, baseline64, 1)


@pytest.fixture(scope="module")
def l2w_run64(l2w64):
    with dtype_policy("float64"):
        backbone, wpn = imported("l2w_msdnet_init.pth")
        model = l2w_model(backbone, wpn, papers_sgd(PerBatchCosine()), reference="code")
        return backbone, run(model, l2w64, ITERATIONS)


@pytest.fixture(scope="module")
def l2w_run32(l2w64):
    with dtype_policy("float32"):
        backbone, wpn = imported("l2w_msdnet_init.pth")
        model = l2w_model(backbone, wpn, papers_sgd(PerBatchCosine()), reference="code")
        return backbone, run(model, l2w64, 1)


# --------------------------------------------------------------------------- baseline


def test_baseline_loss_and_gradient_at_step_0(baseline64):
    """Summed cross-entropy over the exits and its gradient, on the authors' first batch (train mode)."""
    with dtype_policy("float64"):
        backbone, _ = imported("baseline_msdnet_init.pth")
        x, y = images(baseline64, 0), baseline64["y"][0]
        with tf.GradientTape() as tape:
            logits = backbone(x, training=True)
            ce = T.per_exit_cross_entropy(y, logits)
            loss = tf.reduce_sum(tf.reduce_mean(ce, axis=0))
        grads = tape.gradient(loss, backbone.trainable_variables)
        np.testing.assert_allclose(tf.reduce_mean(ce, axis=0).numpy(), baseline64["losses"][0], rtol=1e-12)
        expected = authors_values(backbone, baseline64, "grad/", fill_from="init/")
        for v, g in zip(backbone.trainable_variables, grads, strict=True):
            scale = np.abs(expected[v.path]).max()
            error = np.abs(g.numpy() - expected[v.path]).max() / max(scale, 1e-300)
            assert error <= 1e-9, f"gradient of {v.path}: {error:.2e} relative"


def test_baseline_with_keras_sgd_is_theirs_at_one_step_only(baseline64):
    """The comparison can fail: Keras' SGD (decoupled weight decay) takes PyTorch's first step (no
    momentum yet, a constant learning rate), and three steps later is far from the authors' weights."""
    with dtype_policy("float64"):
        backbone, _ = imported("baseline_msdnet_init.pth")
        model = T.MultiExitModel(backbone, method=T.Baseline())
        model.compile(
            optimizer=keras.optimizers.SGD(LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY), run_eagerly=True
        )
        snapshots = run(model, baseline64, ITERATIONS)
    # Keras' learning rate is a float32 variable (0.1 is 0.1 + 1.5e-9): 1.5e-8 of the update.
    check(snapshots[1], backbone, baseline64, 1, True, "float64")
    with pytest.raises(AssertionError, match="after 3 iteration"):
        check(snapshots[ITERATIONS], backbone, baseline64, ITERATIONS, True, "float64")


@pytest.mark.parametrize("it", [1, ITERATIONS])
def test_baseline_weights(baseline_run64, baseline64, it):
    backbone, snapshots = baseline_run64
    check(snapshots[it], backbone, baseline64, it, True, "float64")


@pytest.mark.parametrize("it", [1, ITERATIONS])
def test_baseline_batchnorm_statistics(baseline_run64, baseline64, it):
    """PyTorch's running variance takes the unbiased batch variance (issue 30, helper bn30)."""
    backbone, snapshots = baseline_run64
    check(snapshots[it], backbone, baseline64, it, False, "float64")


@pytest.mark.parametrize("authors", ["float64", "float32"])
@pytest.mark.parametrize("trainable", [True, False], ids=["weights", "batchnorm"])
def test_baseline_float32_one_iteration(baseline_run32, baseline64, trainable, authors):
    """keras-ee in float32 against the authors' float64 run (the oracle) and their own float32 run."""
    backbone, snapshots = baseline_run32
    other = None if authors == "float64" else load("baseline_float32.npz")
    check(snapshots[1], backbone, baseline64, 1, trainable, "float32", other)


# --------------------------------------------------------------------------- L2W: the parts


def test_l2w_wpn_and_weights_on_their_losses(l2w64):
    """The imported WPN gives their WPN's outputs on their per-sample losses, and keras-ee's forward
    pass (train mode) gives those losses; the zero-sum weights follow (`col`, delta 0.8)."""
    with dtype_policy("float64"):
        backbone, wpn = imported("l2w_msdnet_init.pth")
        x, y = images(l2w64, 0), l2w64["y"][0]
        half = x.shape[0] // 2
        ce = T.per_exit_cross_entropy(y[:half], backbone(x[:half], training=True)).numpy()
        np.testing.assert_allclose(ce, l2w64["wpn_in_pseudo"][0], rtol=1e-12)
        u = wpn(l2w64["wpn_in_pseudo"][0]).numpy()
        np.testing.assert_allclose(u, l2w64["wpn_out_pseudo"][0], rtol=1e-12, atol=1e-15)
        w = T.zero_sum_weights(tf.constant(u), 0.8, "col").numpy()
        np.testing.assert_allclose(w, 1 + 0.8 * (u - u.mean(axis=1, keepdims=True)), rtol=1e-14)


def allocation_margin(confidence, counts):
    """The smallest confidence gap at a cut of their allocation: exit j takes its `counts[j]` most
    confident samples among those left; a gap within rounding makes the ranking a coin toss."""
    left = np.arange(confidence.shape[0])
    margin = np.inf
    for j, count in enumerate(counts[:-1]):
        order = left[np.argsort(-confidence[left, j], kind="stable")]
        if 0 < count < len(order):
            margin = min(margin, confidence[order[count - 1], j] - confidence[order[count], j])
        left = order[count:]
    return margin


def test_l2w_allocation_of_the_meta_half(l2w64):
    """keras-ee's q-allocation (q 0.75, 3 exits) of every meta half of the authors' run equals
    their ranking and counts (`calc_target_probs` at `--target_p_index 15`)."""
    np.testing.assert_allclose(geometric_fractions(0.75, 3), l2w64["target_probs"], rtol=1e-7)
    # The tie detector sees a tie: exit 1 takes 1 of two equally confident samples.
    assert allocation_margin(np.array([[0.5, 0.1], [0.5, 0.2]]), [1, 1]) == 0.0
    for h, (confidence, mask) in enumerate(zip(l2w64["meta_confidence"], l2w64["meta_mask"], strict=True)):
        ours = T.allocate_by_confidence(tf.constant(confidence), 0.75).numpy().astype(bool)
        np.testing.assert_array_equal(ours.sum(axis=0), mask.sum(axis=0))
        margin = allocation_margin(confidence, mask.sum(axis=0))
        if margin < TIE:
            warnings.warn(
                f"meta half {h}: the allocation's ranking is within rounding of a tie ({margin:.1e})", stacklevel=2
            )
            continue
        np.testing.assert_array_equal(ours, mask, err_msg=f"meta half {h} (smallest gap at a cut {margin:.1e})")


def test_l2w_meta_gradient_of_the_first_half(l2w64):
    """The look-ahead (first step: no momentum yet, where Keras' SGD is PyTorch's), the meta half
    through it, the allocated meta loss and the WPN's gradient, against their double backward."""
    with dtype_policy("float64"):
        backbone, wpn = imported("l2w_msdnet_init.pth")
        # Their schedule: a float64 learning rate (a plain 0.1 would be Keras' float32 variable).
        optimizer = keras.optimizers.SGD(PerBatchCosine(), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        model = l2w_model(backbone, wpn, optimizer)
        optimizer.build(model.trainable_variables)
        x, y = images(l2w64, 0), l2w64["y"][0]
        half = x.shape[0] // 2
        grads, result = model.method.meta_gradients(model, x[:half], y[:half], x[half:], y[half:])
        np.testing.assert_allclose(result.logits_meta[0].numpy(), l2w64["meta_logits_1"][0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(result.outer_aux.numpy(), l2w64["meta_ce"][0], rtol=1e-10)
        for v, g, expected in zip(model.method.wpn.weights, grads, wpn_values(l2w64, "meta_grad0/"), strict=True):
            error = np.abs(g.numpy() - expected).max() / np.abs(expected).max()
            assert error <= 1e-9, f"meta-gradient of {v.path}: {error:.2e} relative"


# --------------------------------------------------------------------------- L2W: whole iterations


@pytest.mark.parametrize("it", [1, ITERATIONS])
def test_l2w_weights(l2w_run64, l2w64, it):
    backbone, snapshots = l2w_run64
    check(snapshots[it], backbone, l2w64, it, True, "float64")


@pytest.mark.parametrize("it", [1, ITERATIONS])
def test_l2w_wpn(l2w_run64, l2w64, it):
    """The WPN after their `Adam(lr 1e-4, weight_decay 1e-4)` steps (PyTorch's epsilon placement)."""
    _, snapshots = l2w_run64
    rtol, floor = TOLERANCE["float64"]
    for ours, expected, initial, key in zip(
        snapshots[it]["wpn"],
        wpn_values(l2w64, f"after{it}_wpn/"),
        wpn_values(l2w64, "init_wpn/"),
        WPN_KEYS,
        strict=True,
    ):
        error = update_error(ours, expected, initial, floor)
        assert error <= rtol, f"WPN {key} after {it} iteration(s): {error:.2e} of the authors' update away"


@pytest.mark.parametrize("it", [1, ITERATIONS])
def test_l2w_batchnorm_statistics(l2w_run64, l2w64, it):
    backbone, snapshots = l2w_run64
    check(snapshots[it], backbone, l2w64, it, False, "float64")


@pytest.mark.parametrize("authors", ["float64", "float32"])
@pytest.mark.parametrize("trainable", [True, False], ids=["weights", "batchnorm"])
def test_l2w_float32_one_iteration(l2w_run32, l2w64, trainable, authors):
    """keras-ee in float32 against the authors' float64 run (the oracle) and their own float32 run."""
    backbone, snapshots = l2w_run32
    other = None if authors == "float64" else load("l2w_float32.npz")
    check(snapshots[1], backbone, l2w64, 1, trainable, "float32", other)
