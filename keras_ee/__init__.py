"""keras-ee: early-exit (multi-exit) image classifiers for Keras 3."""

__version__ = "0.1.0"
