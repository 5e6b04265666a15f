"""keras-ee: early-exit (multi-exit) image classifiers for Keras 3.

Submodules (imported on first use, so `import keras_ee` does not start TensorFlow):

- `keras_ee.models`: MSDNet, RANet, a small multi-exit CNN, `attach_exits` for any backbone.
- `keras_ee.costs`: exact per-exit parameter and Mul-Add counts.
- `keras_ee.training`: `MultiExitModel` with pluggable methods (`Baseline`, `L2W`).
- `keras_ee.calibration`: the Rust budget calibrator (thresholds, budget sweeps).
- `keras_ee.inference`: `EarlyExitModel`, real early exit at inference (save, SavedModel export).
- `keras_ee.optimizers`: the papers' optimizers, `torch.optim`'s SGD, Adam and AdamW steps.
- `keras_ee.data`: datasets and tf.data pipelines; `keras_ee.dumps`: the logit dump format.
- `keras_ee.evaluation` (with `keras_ee.formatting`), `keras_ee.plots`, `keras_ee.callbacks`.
- `keras_ee.experiment`: `train(config, workdir)`, over `keras_ee.run_folder` (the run folder's
  files), `keras_ee.runs` (its lock, backups and history) and `keras_ee.distribute`; `keras_ee.cli`.
"""

import importlib
import os
import types

__version__ = "0.1.0"

# oneDNN keeps one compiled kernel (primitive) per convolution and input shape in an LRU cache
# of 1024 entries by default. The early-exit pass runs each stage on however many samples are
# left, so a server meets every survivor count up to its batch size: thousands of kernels,
# and with 1024 entries it rebuilds kernels all the time (bench/primitive_cache.py: serving
# fresh batches of 64, 1.07x (MSDNet) / 1.33x (RANet) slower than with 16384). oneDNN reads it once,
# when TensorFlow first runs a oneDNN kernel, so it is set here, before any model runs; a value
# the user set wins. docs/inference.md, "Serving many batch sizes".
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 16384
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))

_SUBMODULES = (
    "models",
    "costs",
    "training",
    "calibration",
    "data",
    "dumps",
    "evaluation",
    "formatting",
    "plots",
    "callbacks",
    "experiment",
    "run_folder",
    "runs",
    "distribute",
    "config",
    "cli",
    "inference",
    "optimizers",
)


def __getattr__(name: str) -> types.ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"keras_ee.{name}")
    raise AttributeError(f"module 'keras_ee' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SUBMODULES))
