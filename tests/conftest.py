"""Fixtures shared by the tests, and the two logical CPUs of the tf.distribute tests."""

import keras
import pytest
from tiny_models import two_logical_cpus

# Before any test runs TensorFlow: the MirroredStrategy checks (tests/distributed_check.py) then run
# in this process instead of a fresh one each, which would import TensorFlow again.
two_logical_cpus()


@pytest.fixture
def float64():
    """Keras in float64 for the test (finite-difference checks); the default dtype policy is cached
    from floatx on first use, so both are set, and restored afterwards."""
    old, old_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield
    keras.config.set_floatx(old)
    keras.config.set_dtype_policy(old_policy)


@pytest.fixture
def eager_steps():
    """`tf.function`s run eagerly for the test: for tests about what a run takes, records and resumes
    rather than the step itself (a trace of a bilevel step costs 3-4 s a run; the traced steps
    have their own tests)."""
    import warnings

    import tensorflow as tf

    before = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(True)
    try:
        with warnings.catch_warnings():  # TensorFlow's notice that tf.data's functions stay traced
            warnings.filterwarnings("ignore", "Even though the `tf.config.experimental_run_functions_eagerly`")
            yield
    finally:
        tf.config.run_functions_eagerly(before)
