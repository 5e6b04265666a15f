"""Training multi-exit networks with `model.fit`.

Example:
>>> import keras, keras_ee
>>> model = keras_ee.training.MultiExitModel(
...     backbone, method=keras_ee.training.L2W(q=0.75, delta=0.8))
>>> model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
>>> model.fit(train_ds, validation_data=val_ds, epochs=10)
"""

from keras_ee.training import bilevel
from keras_ee.training import core
from keras_ee.training.allocation import allocate_by_confidence
from keras_ee.training.allocation import allocate_by_confidence_numpy
from keras_ee.training.allocation import exit_fractions
from keras_ee.training.bilevel import MLP
from keras_ee.training.bilevel import LookAhead
from keras_ee.training.bilevel import LookAheadResult
from keras_ee.training.core import exit_confidence
from keras_ee.training.core import lookahead_step
from keras_ee.training.core import per_exit_cross_entropy
from keras_ee.training.core import split_halves
from keras_ee.training.core import stateless_forward
from keras_ee.training.gating import BudgetAwareGating
from keras_ee.training.gating import ExitGater
from keras_ee.training.hdkd import DBT
from keras_ee.training.hdkd import HDBT
from keras_ee.training.hdkd import HDKD
from keras_ee.training.hdkd import HMSDNet
from keras_ee.training.hdkd import NaiveDKD
from keras_ee.training.imta import IMTA
from keras_ee.training.imta import CollaborationGate
from keras_ee.training.imta import distillation_terms
from keras_ee.training.l2w import L2W
from keras_ee.training.l2w_imta import L2WIMTA
from keras_ee.training.l2w import WeightPredictionNetwork
from keras_ee.training.l2w import zero_sum_weights
from keras_ee.training.methods import Baseline
from keras_ee.training.methods import Method
from keras_ee.training.methods import Phase
from keras_ee.training.model import MultiExitModel
from keras_ee.training.model import NonFiniteLossError
from keras_ee.training.model import NonFiniteLossGuard
from keras_ee.training.model import fit_phases
from keras_ee.training.registry import SearchChoice
from keras_ee.training.registry import SearchRange
from keras_ee.training.registry import available_methods
from keras_ee.training.registry import get_method
from keras_ee.training.registry import methods_table
from keras_ee.training.registry import register_method

__all__ = [
    "Baseline",
    "BudgetAwareGating",
    "CollaborationGate",
    "DBT",
    "ExitGater",
    "HDBT",
    "HDKD",
    "HMSDNet",
    "IMTA",
    "L2W",
    "L2WIMTA",
    "LookAhead",
    "LookAheadResult",
    "MLP",
    "Method",
    "MultiExitModel",
    "NaiveDKD",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "Phase",
    "SearchChoice",
    "SearchRange",
    "WeightPredictionNetwork",
    "allocate_by_confidence",
    "allocate_by_confidence_numpy",
    "available_methods",
    "bilevel",
    "core",
    "distillation_terms",
    "exit_confidence",
    "exit_fractions",
    "fit_phases",
    "get_method",
    "lookahead_step",
    "methods_table",
    "per_exit_cross_entropy",
    "register_method",
    "split_halves",
    "stateless_forward",
    "zero_sum_weights",
]
