"""Type aliases shared by the package's annotations (no runtime behaviour)."""

import os
from typing import Any, TypeAlias

# A file system path as the public functions accept it: a str or a pathlib.Path.
StrPath: TypeAlias = str | os.PathLike[str]

# A backend tensor (a `tf.Tensor` on TensorFlow) or a symbolic `keras.KerasTensor`.
# Keras and TensorFlow ship no type information, so this is `Any` to the checker.
Tensor: TypeAlias = Any
