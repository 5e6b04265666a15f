"""Training multi-exit networks with `model.fit`.

Example:
>>> import keras, keras_ee
>>> model = keras_ee.training.MultiExitModel(
...     backbone, method=keras_ee.training.L2W(q=0.75, delta=0.8))
>>> model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
>>> model.fit(train_ds, validation_data=val_ds, epochs=10)
"""

from keras_ee.training import core
from keras_ee.training.allocation import allocate_by_confidence
from keras_ee.training.allocation import allocate_by_confidence_numpy
from keras_ee.training.allocation import exit_fractions
from keras_ee.training.core import LookAhead
from keras_ee.training.core import exit_confidence
from keras_ee.training.core import lookahead_step
from keras_ee.training.core import per_exit_cross_entropy
from keras_ee.training.core import split_halves
from keras_ee.training.core import stateless_forward
from keras_ee.training.l2w import L2W
from keras_ee.training.l2w import WeightPredictionNetwork
from keras_ee.training.l2w import zero_sum_weights
from keras_ee.training.methods import Baseline
from keras_ee.training.methods import Method
from keras_ee.training.model import MultiExitModel
from keras_ee.training.model import NonFiniteLossError
from keras_ee.training.model import NonFiniteLossGuard

__all__ = [
    "Baseline",
    "L2W",
    "LookAhead",
    "Method",
    "MultiExitModel",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "WeightPredictionNetwork",
    "allocate_by_confidence",
    "allocate_by_confidence_numpy",
    "core",
    "exit_confidence",
    "exit_fractions",
    "lookahead_step",
    "per_exit_cross_entropy",
    "split_halves",
    "stateless_forward",
    "zero_sum_weights",
]
