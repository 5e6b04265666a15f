"""Fixtures shared by the tests."""

import keras
import pytest


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
