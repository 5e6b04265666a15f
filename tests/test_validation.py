"""keras_ee.validation: the one home of the argument checks, and what their messages say."""

import re
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_ee import validation as v
from keras_ee.training import HDKD, L2W, BudgetAwareGating, bilevel

PACKAGE = Path(v.__file__).parent


# --- numbers, counts, choices, bools ---------------------------------------------------


def test_check_number_names_the_interval_and_the_value():
    assert v.check_number("q", 2) == 2.0 and isinstance(v.check_number("q", np.float32(0.5)), float)
    with pytest.raises(ValueError, match=r"^`q` must be a finite number in \(0, inf\); received 0\.0\.$"):
        v.check_number("q", 0, low=0.0, low_open=True)
    with pytest.raises(ValueError, match=r"`momentum` must be a finite number in \[0, 1\); received 1\.0"):
        v.check_number("momentum", 1.0, low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number in \[0, 1\]; received 1\.5"):
        v.check_number("alpha", 1.5, low=0.0, high=1.0)
    with pytest.raises(ValueError, match=r"in \[0, inf\); received nan"):
        v.check_number("epsilon", float("nan"), low=0.0)
    with pytest.raises(ValueError, match=r"in \(-inf, inf\); received inf"):
        v.check_number("x", float("inf"))
    for bad in (True, "0.5", None, [1.0]):
        with pytest.raises(TypeError, match=r"`q` must be a number; received"):
            v.check_number("q", bad)
    with pytest.raises(ValueError, match=r"^MyLayer: `rate` must be a finite number in \[0, 1\); received 1\.0\.$"):
        v.check_fraction("rate", 1.0, 0.0, 1.0, where="MyLayer: ")


def test_int_counts_choices_and_bools():
    assert v.check_int("n", np.int64(3), 1) == 3 and type(v.check_int("n", np.int64(3))) is int
    with pytest.raises(TypeError, match=r"`n` must be an int, received 2\.0 of type float"):
        v.check_int("n", 2.0)
    with pytest.raises(TypeError, match="must be an int"):
        v.check_int("n", True)
    with pytest.raises(ValueError, match=r"^`depth` must be >= 1, received 0\.$"):
        v.check_counts(width=4, depth=0)
    with pytest.raises(ValueError, match=r"^phase 'p': `epochs` must be >= 1, received 0\.$"):
        v.check_counts(where="phase 'p': ", epochs=0)
    assert v.check_choice("teachers", "last", ("dense", "last")) == "last"
    with pytest.raises(ValueError, match=r"^`teachers` must be one of \['dense', 'last'\], received 'all'\.$"):
        v.check_choice("teachers", "all", ("dense", "last"))
    assert v.check_bool("nesterov", np.bool_(True)) is True
    with pytest.raises(TypeError, match=r"`nesterov` must be a bool, received 'yes'"):
        v.check_bool("nesterov", "yes")


# --- labels, logits, costs -------------------------------------------------------------


def test_check_labels_takes_integral_floats_and_names_the_first_bad_value():
    out = v.check_labels(np.array([0.0, 2.0, 1.0]), 3)
    assert out.dtype == np.int64 and out.tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match=r"`y` to hold class indices, but .* 1\.5 at index 1"):
        v.check_labels(np.array([0.0, 1.5]), 3, "y")
    with pytest.raises(TypeError, match="Received dtype bool"):
        v.check_labels(np.array([True, False]))
    with pytest.raises(ValueError, match=r"Expected `y` in \[0, 3\)\. Received a maximum of 3"):
        v.check_labels(np.array([0, 3]), 3, "y")
    with pytest.raises(ValueError, match="1-D vector"):
        v.check_labels(np.zeros((2, 2), int))


def test_logits_and_their_labels():
    logits = np.zeros((2, 4, 3), np.float32)
    v.check_exit_logits(logits, "`val_logits`")
    with pytest.raises(ValueError, match=r"`val_logits` must have shape \(num_exits, num_samples, num_classes\)"):
        v.check_exit_logits(np.zeros((4, 3), np.float32), "`val_logits`")
    with pytest.raises(TypeError, match="float16, float32 or float64; received dtype int64"):
        v.check_exit_logits(np.zeros((2, 4, 3), np.int64), "`val_logits`")
    with pytest.raises(ValueError, match=r"class-count mismatch: a has shape \(2, 4, 3\) \(3 classes\) but b"):
        v.check_logits_pair(logits, np.zeros((2, 4, 5), np.float32), "a", "b")
    with pytest.raises(ValueError, match="exit-count mismatch"):
        v.check_logits_pair(logits, np.zeros((3, 4, 3), np.float32), "a", "b")
    v.check_labels_of_logits(np.array([0, 1, 2, 0]), logits.shape, "`val_labels`", "val")
    with pytest.raises(ValueError, match=r"`val_labels` must have shape \(4,\) to match the val logits"):
        v.check_labels_of_logits(np.array([0, 1]), logits.shape, "`val_labels`", "val")
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\) .*first bad label 7 at index 2"):
        v.check_labels_of_logits(np.array([0, 1, 7, 0]), logits.shape, "`val_labels`", "val")


def test_exit_costs_are_finite_non_negative_and_cumulative():
    assert v.check_exit_costs([1, np.float32(0.2) + 1, 3], "mul_adds", 3, "costs") == [1, 1.2, 3.0]
    with pytest.raises(ValueError, match=r"costs: `mul_adds` must have one entry per exit \(3, as in the logits\)"):
        v.check_exit_costs([1, 2], "mul_adds", 3, "costs")
    with pytest.raises(ValueError, match=r"`mul_adds` decreases at exit_2 \(1 < 5 of exit_1\)"):
        v.check_exit_costs([5, 1], "mul_adds", 2, "costs")
    with pytest.raises(ValueError, match=r"`params` of exit_1 is nan; expected a finite number >= 0"):
        v.check_exit_costs([float("nan")], "params", 1, "costs")
    with pytest.raises(TypeError, match=r"`params` of exit_1 is 'x' \(str\); expected a number"):
        v.check_exit_costs(["x"], "params", 1, "costs")
    with pytest.raises(ValueError, match="must be a list with one number per exit"):
        v.check_exit_costs("12", "params", 1, "costs", ValueError)


# --- one home ---------------------------------------------------------------------------


def test_no_module_keeps_its_own_copy_of_a_shared_check():
    """The generic checks that lived in bilevel, gating, hdkd, dumps, splits, cifar, schedules
    and the optimizers are defined once, in keras_ee/validation.py."""
    names = "number|counts|positive|choice|labels|logits|pair|costs|num_classes|rate|nonnegative"
    shared = rf"def (_?check_({names})|_positive_int)\("
    found = [
        f"{path.relative_to(PACKAGE)}: {m.group(1)}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "validation.py"
        for m in re.finditer(shared, path.read_text())
    ]
    assert found == []


@pytest.mark.parametrize(
    "method, follows_only",
    [
        (L2W(), L2W(weighting="rising")),
        (HDKD(), HDKD(learn_weights=False)),
        (BudgetAwareGating(gater_update="lookahead"), BudgetAwareGating(gater_update="alternate")),
    ],
    ids=["l2w", "hdkd", "gating"],
)
def test_one_check_optimizer_for_the_methods_with_a_look_ahead(method, follows_only):
    assert type(method).check_optimizer is bilevel.FollowsMainOptimizer.check_optimizer
    with pytest.raises(ValueError, match="mirrors only .* received optimizer RMSprop"):
        method.check_optimizer(keras.optimizers.RMSprop(0.1))
    optimizer = keras.optimizers.RMSprop(0.1)  # no look-ahead: any optimizer, whose schedule it follows
    follows_only.check_optimizer(optimizer)
    assert follows_only._main_optimizer() is optimizer
