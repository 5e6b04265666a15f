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
