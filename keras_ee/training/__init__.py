"""Training multi-exit networks with `model.fit`.

Example:
>>> import keras, keras_ee
>>> model = keras_ee.training.MultiExitModel(
...     backbone, method=keras_ee.training.L2W(q=0.75, delta=0.8))
>>> model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
>>> model.fit(train_ds, validation_data=val_ds, epochs=10)
"""

from keras_ee.training import bilevel, core
from keras_ee.training.allocation import allocate_by_confidence, allocate_by_confidence_numpy
from keras_ee.training.bilevel import MLP, LookAhead, LookAheadResult
from keras_ee.training.core import (
    exit_confidence,
    lookahead_step,
    per_exit_cross_entropy,
    split_halves,
    stateless_forward,
)
from keras_ee.training.gating import BudgetAwareGating, ExitGater
from keras_ee.training.hdkd import DBT, HDBT, HDKD, HMSDNet, NaiveDKD
from keras_ee.training.imta import IMTA, CollaborationGate, distillation_terms
from keras_ee.training.l2w import L2W, WeightPredictionNetwork, zero_sum_weights
from keras_ee.training.l2w_imta import L2WIMTA
from keras_ee.training.methods import Baseline, Method, Phase
from keras_ee.training.model import MultiExitModel, NonFiniteLossError, NonFiniteLossGuard, fit_phases
from keras_ee.training.registry import (
    SearchChoice,
    SearchRange,
    get_method,
    list_methods,
    methods_table,
    register_method,
)

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
    "bilevel",
    "core",
    "distillation_terms",
    "exit_confidence",
    "fit_phases",
    "get_method",
    "list_methods",
    "lookahead_step",
    "methods_table",
    "per_exit_cross_entropy",
    "register_method",
    "split_halves",
    "stateless_forward",
    "zero_sum_weights",
]
