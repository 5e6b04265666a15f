"""Custom layers used by the keras-ee architectures.

All layers are registered with
`keras.saving.register_keras_serializable(package="keras_ee")` so that every
model built by `keras_ee.models` saves to `.keras` and loads back unchanged.
"""

import numpy as np
import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_ee")
class GradientScale(keras.layers.Layer):
    """Identity in the forward pass, gradient multiplied by `scale` backwards.

    This is IMTA's gradient-equilibrium operator `R(x; s)`. The forward value
    is computed as `stop_gradient(x) + s * (x - stop_gradient(x))`, which is
    bit-exactly `x` (the second term is an exact zero) while its derivative
    with respect to `x` is `s`. With `scale == 1.0` the layer is a plain
    identity and adds no ops to the graph.

    `scale` is a Python float read when the layer is traced: after changing
    it on a built model, re-trace (e.g. recompile) the training function.

    Args:
        scale: float. Factor applied to the incoming gradient.
        **kwargs: standard `keras.layers.Layer` arguments (e.g. `name`).

    Example:
    ```python
    x = keras.Input((8, 8, 16))
    y = GradientScale(scale=0.5, name="exit_1_branch")(x)
    ```
    """

    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        if isinstance(scale, bool) or not isinstance(
            scale, (int, float, np.integer, np.floating)
        ):
            raise TypeError(
                f"GradientScale: `scale` must be a real number, received "
                f"{scale!r} of type {type(scale).__name__}."
            )
        if not np.isfinite(scale):
            raise ValueError(
                f"GradientScale: `scale` must be finite, received {scale!r}."
            )
        self.scale = float(scale)

    def call(self, inputs):
        if self.scale == 1.0:
            return inputs
        frozen = ops.stop_gradient(inputs)
        return frozen + self.scale * (inputs - frozen)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"scale": self.scale})
        return config


def align_corners_matrix(n_in, n_out):
    """Bilinear interpolation matrix with `align_corners=True` semantics.

    Output index `o` samples the source coordinate `o * (n_in - 1) / (n_out - 1)`
    and interpolates linearly between its floor and floor + 1, exactly like
    PyTorch's `F.interpolate(..., mode="bilinear", align_corners=True)` along
    one axis.

    Args:
        n_in: int, input length (>= 1).
        n_out: int, output length (>= 1).

    Returns:
        A float64 numpy array of shape `(n_out, n_in)` whose rows sum to 1.
    """
    if int(n_in) < 1 or int(n_out) < 1:
        raise ValueError(
            f"align_corners_matrix: sizes must be >= 1, received n_in={n_in}, "
            f"n_out={n_out}."
        )
    n_in, n_out = int(n_in), int(n_out)
    matrix = np.zeros((n_out, n_in), dtype=np.float64)
    if n_out == 1 or n_in == 1:
        # PyTorch samples coordinate 0 when the output has a single element.
        matrix[:, 0] = 1.0
        return matrix
    ratio = (n_in - 1) / (n_out - 1)
    for o in range(n_out):
        src = o * ratio
        lo = min(int(np.floor(src)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        frac = src - lo
        matrix[o, lo] += 1.0 - frac
        matrix[o, hi] += frac
    return matrix


@keras.saving.register_keras_serializable(package="keras_ee")
class AlignCornersResize(keras.layers.Layer):
    """Bilinear resize with `align_corners=True`, as RANet uses it.

    Keras' own resizing uses half-pixel centres. This layer applies two fixed
    (non-trainable, non-weight) interpolation matrices along height and width,
    which reproduces PyTorch's align-corners bilinear interpolation exactly.
    Input must be channels-last `(batch, height, width, channels)` with static
    height and width.

    Args:
        size: tuple of 2 ints, output `(height, width)`.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    ```python
    x = keras.Input((8, 8, 32))
    y = AlignCornersResize((16, 16))(x)  # (None, 16, 16, 32)
    ```
    """

    def __init__(self, size, **kwargs):
        super().__init__(**kwargs)
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) for s in size)
            or min(size) < 1
        ):
            raise ValueError(
                "AlignCornersResize: `size` must be a pair of positive ints "
                f"(height, width), received {size!r}."
            )
        self.size = (int(size[0]), int(size[1]))

    def build(self, input_shape):
        if len(input_shape) != 4 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                "AlignCornersResize expects a 4D channels-last input with static "
                f"height and width, received shape {tuple(input_shape)}."
            )
        # Constants, not weights: they are derived from shapes and never trained.
        self._mh = align_corners_matrix(input_shape[1], self.size[0]).astype("float32")
        self._mw = align_corners_matrix(input_shape[2], self.size[1]).astype("float32")

    def call(self, inputs):
        mh = ops.cast(ops.convert_to_tensor(self._mh), inputs.dtype)
        mw = ops.cast(ops.convert_to_tensor(self._mw), inputs.dtype)
        x = ops.einsum("ph,nhwc->npwc", mh, inputs)
        return ops.einsum("qw,npwc->npqc", mw, x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size[0], self.size[1], input_shape[3])

    def get_config(self):
        config = super().get_config()
        config.update({"size": list(self.size)})
        return config
