"""Custom layers used by the keras-ee architectures.

All layers are registered with
`keras.saving.register_keras_serializable(package="keras_ee")` so that every
model built by `keras_ee.models` saves to `.keras` and loads back unchanged.
"""

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import keras
import numpy as np
from keras import ops

from keras_ee._typing import Tensor


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

    def __init__(self, scale: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
            raise TypeError(
                f"GradientScale: `scale` must be a real number, received {scale!r} of type {type(scale).__name__}."
            )
        if not np.isfinite(scale):
            raise ValueError(f"GradientScale: `scale` must be finite, received {scale!r}.")
        self.scale = float(scale)

    def call(self, inputs: Tensor) -> Tensor:
        if self.scale == 1.0:
            return inputs
        frozen = ops.stop_gradient(inputs)
        return frozen + self.scale * (inputs - frozen)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"scale": self.scale})
        return config


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
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
        raise ValueError(f"align_corners_matrix: sizes must be >= 1, received n_in={n_in}, n_out={n_out}.")
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

    def __init__(self, size: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if (
            not isinstance(size, (tuple, list))
            or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) for s in size)
            or min(size) < 1
        ):
            raise ValueError(
                f"AlignCornersResize: `size` must be a pair of positive ints (height, width), received {size!r}."
            )
        self.size = (int(size[0]), int(size[1]))

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if len(input_shape) != 4 or input_shape[1] is None or input_shape[2] is None:
            raise ValueError(
                "AlignCornersResize expects a 4D channels-last input with static "
                f"height and width, received shape {tuple(input_shape)}."
            )
        # Constants, not weights: they are derived from shapes and never trained.
        self._mh = align_corners_matrix(input_shape[1], self.size[0]).astype("float32")
        self._mw = align_corners_matrix(input_shape[2], self.size[1]).astype("float32")

    def call(self, inputs: Tensor) -> Tensor:
        if keras.backend.backend() == "tensorflow" and inputs.dtype in _TF_RESIZE_DTYPES:
            return _tf_align_corners_resize(inputs, self.size)
        mh = ops.cast(ops.convert_to_tensor(self._mh), inputs.dtype)
        mw = ops.cast(ops.convert_to_tensor(self._mw), inputs.dtype)
        x = ops.einsum("ph,nhwc->npwc", mh, inputs)
        return ops.einsum("qw,npwc->npqc", mw, x)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], self.size[0], self.size[1], input_shape[3])

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"size": list(self.size)})
        return config


# Float dtypes TensorFlow's kernels take; one switch per kernel, so a test
# can turn either path off on its own.
_TF_RESIZE_DTYPES = ("float32", "float16", "bfloat16")
_TF_FUSED_BN_DTYPES = _TF_RESIZE_DTYPES


def _tf_align_corners_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TensorFlow's own bilinear kernel with `align_corners=True` (the
    interpolation `align_corners_matrix` defines, up to float rounding), with
    gradients of every order on TensorFlow's kernels too.

    The two einsums over the interpolation matrices cost many times more
    than the `ResizeBilinear` kernel, most when downsampling wide maps (per
    RANet shape: `bench/forward_breakdown.py`, part d). The resize is
    linear, so its gradient is the transposed resize (`ResizeBilinearGrad`)
    and that one's gradient is the resize again; TensorFlow registers no
    gradient for `ResizeBilinearGrad`, which second-order methods (L2W) need.
    """
    import tensorflow as tf

    dtype = x.dtype

    @tf.custom_gradient
    def resize(t: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        def grad(dy: Tensor) -> Tensor:
            return resize_transposed(dy, t)

        out = tf.raw_ops.ResizeBilinear(images=t, size=list(size), align_corners=True, half_pixel_centers=False)
        return tf.cast(out, dtype), grad

    @tf.custom_gradient
    def resize_transposed(dy: Tensor, like: Tensor) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, None]]]:
        def grad(ddx: Tensor) -> tuple[Tensor, None]:
            return resize(ddx), None  # `like` only lends its shape

        dx = tf.raw_ops.ResizeBilinearGrad(
            grads=tf.cast(dy, tf.float32),
            original_image=like,
            align_corners=True,
            half_pixel_centers=False,
        )
        return tf.cast(dx, dtype), grad

    return resize(x)


def _tf_fused_batch_norm_train(
    x: Tensor, scale: Tensor, offset: Tensor, epsilon: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm over NHWC `x` as TensorFlow's fused kernels, to every order.

    Returns `(y, batch_mean, biased_batch_variance)`; the statistics feed only the moving
    averages and carry no gradient. The first-order gradient is the `FusedBatchNormGradV3`
    kernel, as TensorFlow's own. Its gradient (what L2W's and HDKD's meta-gradients take
    through the look-ahead's backward pass) is where this differs: TensorFlow registers an
    unfused re-derivation (about fifteen elementwise passes and reductions per layer), while
    the part that meta-gradients need, the one with respect to the incoming gradient `dy`,
    is the same kernel again plus one multiply-add, because `dy -> dx` is a symmetric map
    (`scale / sigma` times the projection removing the channel mean and the `x_hat`
    component). The parts with respect to `x` and `scale` (for Hessian-vector products in
    the weights) come from the unfused formula; a graph that does not use them prunes them.
    """
    import tensorflow as tf

    n = tf.cast(tf.reduce_prod(tf.shape(x)[:3]), tf.float32)

    def unfused_backward(dy: Tensor, x: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # dx, dscale, doffset of training-mode BN, as TensorFlow's reference gradient.
        dy32, x32 = tf.cast(dy, tf.float32), tf.cast(x, tf.float32)
        mean, var = tf.nn.moments(x32, axes=[0, 1, 2])
        rstd = tf.math.rsqrt(var + epsilon)
        xhat = (x32 - mean) * rstd
        dscale = tf.reduce_sum(dy32 * xhat, axis=[0, 1, 2])
        doffset = tf.reduce_sum(dy32, axis=[0, 1, 2])
        dx = scale * rstd * (dy32 - doffset / n - xhat * dscale / n)
        return tf.cast(dx, x.dtype), dscale, doffset

    @tf.custom_gradient
    def batch_norm(
        x: Tensor, scale: Tensor, offset: Tensor
    ) -> tuple[tuple[Tensor, Tensor, Tensor], Callable[..., Any]]:
        out = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=scale,
            offset=offset,
            mean=tf.zeros([0]),
            variance=tf.zeros([0]),
            epsilon=epsilon,
            exponential_avg_factor=1.0,
            data_format="NHWC",
            is_training=True,
        )
        reserves = dict(
            reserve_space_1=out.reserve_space_1,
            reserve_space_2=out.reserve_space_2,
            reserve_space_3=out.reserve_space_3,
        )
        # The kernel returns the Bessel-corrected variance n/(n-1) (n/1 for
        # n = 1); the moving average of Keras' BN uses the biased one.
        variance = out.batch_variance * tf.maximum(n - 1.0, 1.0) / n
        mean = out.batch_mean

        def kernel_backward(dy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            dx, dscale, doffset, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                y_backprop=dy, x=x, scale=scale, epsilon=epsilon, data_format="NHWC", is_training=True, **reserves
            )
            return dx, dscale, doffset

        @tf.custom_gradient
        def backward(dy: Tensor, x: Tensor, scale: Tensor) -> tuple[tuple[Tensor, Tensor, Tensor], Callable[..., Any]]:
            def grad_of_grad(g_dx: Tensor, g_dscale: Tensor, g_doffset: Tensor) -> tuple[Tensor, Tensor, Tensor]:
                g_dscale = tf.zeros_like(scale) if g_dscale is None else g_dscale
                g_doffset = tf.zeros_like(scale) if g_doffset is None else g_doffset
                # d/d dy: the symmetric dy -> dx map on g_dx (the same kernel), plus the
                # transposes of dscale = sum(dy * x_hat) and doffset = sum(dy).
                a = kernel_backward(tf.zeros_like(dy) if g_dx is None else tf.cast(g_dx, dy.dtype))[0]
                coef = g_dscale * tf.math.rsqrt(variance + epsilon)
                d_dy = a + tf.cast(tf.cast(x, tf.float32) * coef + (g_doffset - mean * coef), dy.dtype)
                with tf.GradientTape() as tape:
                    tape.watch([x, scale])
                    ref = unfused_backward(tf.stop_gradient(dy), x, scale)
                d_x, d_scale = tape.gradient(
                    ref,
                    [x, scale],
                    output_gradients=[
                        tf.zeros_like(x) if g_dx is None else tf.cast(g_dx, x.dtype),
                        g_dscale,
                        g_doffset,
                    ],
                )
                return d_dy, d_x, d_scale

            return kernel_backward(dy), grad_of_grad

        def grad(dy: Tensor, d_mean: Tensor = None, d_variance: Tensor = None) -> Any:
            return backward(dy, x, scale)

        return (out.y, mean, variance), grad

    y, mean, variance = batch_norm(x, scale, offset)
    return y, tf.stop_gradient(mean), tf.stop_gradient(variance)


def tensorflow_uses_onednn() -> bool:
    """Whether TensorFlow runs its oneDNN CPU kernels (`TF_ENABLE_ONEDNN_OPTS`; cached)."""
    global _ONEDNN
    if _ONEDNN is None:
        _ONEDNN = _ask_tensorflow_onednn()
    return _ONEDNN


def _ask_tensorflow_onednn() -> bool:
    # TensorFlow has no public API for this: its private `_pywrap_util_port` binding is the one
    # place that knows (TensorFlow's own tests read it). A private module may move or vanish in a
    # release, so without it we read the documented switch, `TF_ENABLE_ONEDNN_OPTS`; unset, its
    # default depends on the CPU, and False (no packing decision relies on oneDNN) is the safe guess.
    try:
        from tensorflow.python.util import _pywrap_util_port

        return bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() in ("1", "true")


_ONEDNN: bool | None = None

# Set to False to turn width packing off (read when a model's inference
# function is traced); `bench/models.py` does so to measure its gain.
PACK_NARROW_CONVS = True


def width_packing(kernel_size: int, filters: int, strides: int, out_width: int | None) -> int:
    """How many output columns `ConvBNReLU` computes per conv position at
    inference on TensorFlow: 2 for narrow 3x3 (or larger) convs, else 1.

    TensorFlow's default (Eigen) CPU conv kernels block over output channels,
    and with 6 or 12 of them most of each block sits idle. Narrow convs
    (<= 16 output channels, <= 8 at stride 2) run up to 2.3x faster as one
    conv with twice the output channels over half the columns, though the
    wider kernel does 4/3 (3x3) or 5/3 (3x3, stride 2) of the Mul-Adds; wider
    convs do not gain, and a 1x1 conv already runs as a matmul (measured per
    shape by `bench/forward_breakdown.py`). oneDNN's kernels handle narrow
    convs themselves and get 1. Needs stride 1 or 2 and a static, even
    output width.
    """
    if not PACK_NARROW_CONVS or kernel_size == 1 or strides > 2:
        return 1
    if out_width is None or out_width % 2:
        return 1
    if filters > (16 if strides == 1 else 8) or tensorflow_uses_onednn():
        return 1
    return 2


NONLINEARITIES = ("relu", "gelu")

# How a BatchNorm layer's moving variance takes in each training batch's variance: "unbiased",
# the batch variance times n / (n - 1) (n values per channel; PyTorch's running_var, and so the
# papers' code), or "biased", the batch variance itself (Keras' BatchNormalization). The
# normalisation uses the biased variance either way. A layer saved before this choice existed
# (no `moving_variance_update` in its config) updated with the biased one and loads so.
MOVING_VARIANCE_UPDATES = ("unbiased", "biased")
LEGACY_MOVING_VARIANCE_UPDATE = "biased"


def check_moving_variance_update(value: Any, owner: str) -> str:
    """`value` if it is one of `MOVING_VARIANCE_UPDATES`, else a `ValueError` naming `owner`."""
    if not isinstance(value, str) or value not in MOVING_VARIANCE_UPDATES:
        raise ValueError(
            f"{owner}: `moving_variance_update` must be one of {list(MOVING_VARIANCE_UPDATES)}, received {value!r}."
        )
    return value


def batch_moments(x: Tensor, axes: Sequence[int], synchronized: bool = False) -> tuple[Tensor, Tensor, Any]:
    """`(mean, biased variance, n)` of `x` over `axes`; n, the values per channel, is an int
    where the shape tells it, else a float32 tensor.

    `synchronized` (TensorFlow): statistics of the global batch under a `tf.distribute`
    strategy, as Keras' `ops.moments(synchronized=True)` computes them (the same sums and
    all-reduces), with n the global count (PyTorch's SyncBatchNorm corrects by it too).
    """
    axes = [a % len(x.shape) for a in axes]
    if synchronized and keras.backend.backend() == "tensorflow":
        return _tf_synchronized_moments(x, axes)
    mean, variance = ops.moments(x, axes=axes)
    return mean, variance, values_per_channel(x, axes)


def values_per_channel(x: Tensor, axes: Sequence[int]) -> Any:
    """The number of values the statistics over `axes` take in: an int where the shape
    tells it, else a float32 tensor."""
    sizes = [x.shape[a] for a in axes]
    if None not in sizes:
        return int(np.prod(sizes))
    shape = ops.shape(x)
    count = ops.convert_to_tensor(1.0, "float32")
    for a in axes:
        count = count * ops.cast(shape[a], "float32")
    return count


def _tf_synchronized_moments(x: Tensor, axes: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    # Keras' `_compute_moments_sync` (keras/src/backend/tensorflow/nn.py), which keeps the
    # global count to itself: the same ops, so the statistics are bit-identical to it.
    import tensorflow as tf

    dtype = x.dtype
    if dtype in (tf.float16, tf.bfloat16):
        x = tf.cast(x, tf.float32)
    replica_ctx = tf.distribute.get_replica_context()
    if not replica_ctx:
        mean, variance = tf.nn.moments(x, axes=axes)
        count = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), axes)), tf.float32)
    else:
        local_sum = tf.reduce_sum(x, axis=axes, keepdims=True)
        local_squared_sum = tf.reduce_sum(tf.square(x), axis=axes, keepdims=True)
        local_count = tf.reduce_sum(tf.ones_like(x, name="count"), axis=axes, keepdims=True)
        y_sum = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_sum)
        y_squared_sum = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_squared_sum)
        count_sum = replica_ctx.all_reduce(tf.distribute.ReduceOp.SUM, local_count)
        mean = tf.math.divide_no_nan(y_sum, count_sum)
        variance = tf.maximum(tf.math.divide_no_nan(y_squared_sum, count_sum) - tf.square(mean), 0.0)
        mean, variance = tf.squeeze(mean, axes), tf.squeeze(variance, axes)
        count = tf.reshape(count_sum, [-1])[0]
    if dtype in (tf.float16, tf.bfloat16):
        mean = tf.cast(tf.clip_by_value(mean, tf.float16.min, tf.float16.max), dtype)
        variance = tf.cast(tf.clip_by_value(variance, tf.float16.min, tf.float16.max), dtype)
    return mean, variance, count


def moving_variance_sample(variance: Tensor, count: Any, update: str, layer_name: str) -> Tensor:
    """The batch variance that enters the moving average: `variance` (biased) itself, or
    times n / (n - 1) for `"unbiased"` (see `MOVING_VARIANCE_UPDATES`).

    With one value per channel (n = 1) the unbiased estimate is undefined: PyTorch refuses
    such a batch in training ("Expected more than 1 value per channel"), and so does this, a
    `ValueError` when the shape tells n, else an error when the step runs (no NaN in silence).
    """
    if update == "biased":
        return variance
    message = (
        f"BatchNorm layer {layer_name!r}: training needs more than 1 value per channel (batch x height x "
        "width) for the unbiased moving variance, as in PyTorch; use a larger batch, or "
        "moving_variance_update='biased'."
    )
    if isinstance(count, (int, np.integer)):
        if count < 2:
            raise ValueError(message + f" Received n = {count}.")
        return variance * (count / (count - 1.0))
    count = ops.cast(count, variance.dtype)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.control_dependencies([tf.debugging.assert_greater(count, tf.cast(1, count.dtype), message=message)]):
            count = tf.identity(count)
    return variance * (count / (count - 1.0))


@keras.saving.register_keras_serializable(package="keras_ee")
class ConvBNReLU(keras.layers.Layer):
    """Conv (no bias) -> BatchNorm -> ReLU as one layer, BN folded at inference.

    Mathematically the same as `Conv2D(use_bias=False)`,
    `BatchNormalization(epsilon, momentum)` and `ReLU` in sequence, with
    PyTorch's symmetric zero padding `(k-1)//2`. In training it runs exactly
    those steps (batch statistics, moving-average updates as PyTorch's BN by
    default, or as Keras': `moving_variance_update`). At
    inference it folds the BN scale into the kernel and the shift into a bias,
    so the backend runs one fused conv+bias+ReLU kernel instead of four passes
    over the activations; MSDNet/RANet have hundreds of these small units,
    and this is what keeps them close to the speed of their arithmetic. At
    inference on TensorFlow, narrow convs (6-16 output channels) also run
    width-packed, two output columns per conv position (see
    `width_packing`): the same outputs up to float rounding. Training keeps
    the plain conv: packed, L2W's second-order step at batch 64 took 3.4 s
    instead of 1.9 s (`bench/train_step.py`).

    Trainable weights: `kernel` (kh, kw, cin, cout), `gamma`, `beta`;
    non-trainable: `moving_mean`, `moving_variance`.

    Args:
        filters: int, output channels.
        kernel_size: int, odd square kernel size.
        strides: int.
        activation: bool, apply the nonlinearity (default True).
        nonlinearity: `"relu"` (default) or `"gelu"` (exact, erf-based, as
            PyTorch's `nn.GELU()`; the budget-aware paper's MSDNet). Parameter
            and Mul-Add counts do not depend on it.
        epsilon: float, BN epsilon (PyTorch default 1e-5).
        momentum: float, BN moving-average momentum in Keras' convention
            (0.9 = PyTorch's 0.1).
        kernel_initializer: initializer for the kernel.
        synchronized: bool, as Keras' `BatchNormalization(synchronized=True)`: in
            training under a `tf.distribute` strategy, the batch statistics are
            all-reduced over the replicas (those of the global batch). Default False.
        moving_variance_update: `"unbiased"` (default; PyTorch's running variance, the
            batch variance times n / (n - 1)) or `"biased"` (Keras'); see
            `MOVING_VARIANCE_UPDATES`. A layer saved without it loads as `"biased"`.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    ```python
    y = ConvBNReLU(32, 3, strides=2, name="stem")(keras.Input((32, 32, 3)))
    ```
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int,
        strides: int = 1,
        activation: bool = True,
        epsilon: float = 1e-5,
        momentum: float = 0.9,
        kernel_initializer: Any = "he_normal",
        nonlinearity: str = "relu",
        synchronized: bool = False,
        moving_variance_update: str = "unbiased",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(synchronized, bool):
            raise ValueError(f"ConvBNReLU: `synchronized` must be True or False, received {synchronized!r}.")
        self.synchronized = synchronized
        self.moving_variance_update = check_moving_variance_update(moving_variance_update, "ConvBNReLU")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(
                f"ConvBNReLU: `nonlinearity` must be one of {list(NONLINEARITIES)}, received {nonlinearity!r}."
            )
        self.nonlinearity = nonlinearity
        for arg, val in (("filters", filters), ("kernel_size", kernel_size), ("strides", strides)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"ConvBNReLU: `{arg}` must be a positive int, received {val!r}.")
        if kernel_size % 2 == 0:
            raise ValueError(f"ConvBNReLU: `kernel_size` must be odd, received {kernel_size}.")
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.activation = bool(activation)
        self.epsilon = float(epsilon)
        self.momentum = float(momentum)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        cin = input_shape[-1]
        if cin is None:
            raise ValueError("ConvBNReLU needs a known number of input channels.")
        k = self.kernel_size
        self.kernel = self.add_weight(
            name="kernel", shape=(k, k, cin, self.filters), initializer=self.kernel_initializer
        )
        self.gamma = self.add_weight(name="gamma", shape=(self.filters,), initializer="ones")
        self.beta = self.add_weight(name="beta", shape=(self.filters,), initializer="zeros")
        self.moving_mean = self.add_weight(
            name="moving_mean", shape=(self.filters,), initializer="zeros", trainable=False
        )
        self.moving_variance = self.add_weight(
            name="moving_variance", shape=(self.filters,), initializer="ones", trainable=False
        )

    def _conv(self, x: Tensor, kernel: Tensor) -> Tensor:
        pad = (self.kernel_size - 1) // 2
        if self.strides > 1 and pad:
            x = ops.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
            padding = "valid"
        else:
            padding = "same"  # symmetric at stride 1 with an odd kernel
        return ops.conv(x, kernel, strides=self.strides, padding=padding)

    def call(self, inputs: Tensor, training: bool | None = None) -> Tensor:
        # As Keras' BatchNormalization: a frozen layer (trainable=False) runs in
        # inference mode, with its moving statistics, and does not update them.
        if training and self.trainable:
            y = self._conv(inputs, ops.cast(self.kernel, inputs.dtype))
            # The fused kernel cannot all-reduce its statistics: synchronized BN takes moments.
            fused = keras.backend.backend() == "tensorflow" and y.dtype in _TF_FUSED_BN_DTYPES
            if fused and not self.synchronized:
                # One FusedBatchNormV3 kernel (and one for its gradient) instead of about ten
                # elementwise passes for moments + normalisation: the same math, and what keeps
                # training-mode BN cheap in MSDNet/RANet's many narrow units and in the
                # meta-gradients' second-order passes.
                y, mean, variance = _tf_fused_batch_norm_train(
                    y, ops.cast(self.gamma, "float32"), ops.cast(self.beta, "float32"), self.epsilon
                )
                count = values_per_channel(y, [0, 1, 2])
            else:
                mean, variance, count = batch_moments(y, axes=[0, 1, 2], synchronized=self.synchronized)
                y = ops.batch_normalization(
                    y,
                    mean,
                    variance,
                    axis=-1,
                    offset=ops.cast(self.beta, y.dtype),
                    scale=ops.cast(self.gamma, y.dtype),
                    epsilon=self.epsilon,
                )
            m = self.momentum
            sample = moving_variance_sample(
                ops.cast(variance, self.moving_variance.dtype), count, self.moving_variance_update, self.name
            )
            self.moving_mean.assign(self.moving_mean * m + ops.cast(mean, self.moving_mean.dtype) * (1.0 - m))
            self.moving_variance.assign(self.moving_variance * m + sample * (1.0 - m))
        else:
            folded = _snapshot_entry(self, inputs)
            kernel, shift, pack = (
                folded if folded is not None else self.inference_weights(inputs.dtype, inputs.shape[2])
            )
            if keras.backend.backend() == "tensorflow":
                return self._tf_fused(inputs, kernel, shift, pack)
            y = self._conv(inputs, kernel) + shift
        return self._act(y) if self.activation else y

    def _out_size(self, size: int | None) -> int | None:
        """Output height or width for an input `size` (None if unknown): PyTorch's symmetric padding."""
        return None if size is None else (size - 1) // self.strides + 1

    def inference_weights(self, dtype: Any, width: int | None) -> tuple[Tensor, Tensor, int]:
        """`(kernel, shift, pack)` of the inference conv: BatchNorm's scale folded into the
        kernel and its shift into a bias, cast to `dtype`, and (TensorFlow) width-packed
        `pack` output columns per conv position for an input `width` columns wide (see
        `width_packing`). Computed on every inference call unless a snapshot
        (`keras_ee.inference_snapshot.InferenceSnapshot`) is active."""
        inv = self.gamma * ops.rsqrt(self.moving_variance + self.epsilon)
        kernel = ops.cast(self.kernel * inv, dtype)
        shift = ops.cast(self.beta - self.moving_mean * inv, dtype)
        if keras.backend.backend() != "tensorflow":
            return kernel, shift, 1
        pack = width_packing(self.kernel_size, self.filters, self.strides, self._out_size(width))
        if pack == 1:
            return kernel, shift, 1
        import tensorflow as tf

        # The packed kernel: output channel group `a` holds the kernel shifted right by
        # `strides * a` columns (zeros elsewhere), so one conv computes `pack` columns.
        k, s = self.kernel_size, self.strides
        window = s * (pack - 1) + k
        kernel = tf.concat(
            [tf.pad(kernel, [[0, 0], [s * a, window - k - s * a], [0, 0], [0, 0]]) for a in range(pack)], axis=3
        )
        return kernel, tf.tile(shift, [pack]), pack

    def _act(self, y: Tensor, tf_native: bool = False) -> Tensor:
        # The TensorFlow inference paths keep tf.nn.relu: Conv2D + BiasAdd + Relu is the
        # pattern grappler fuses (GELU runs unfused there).
        if self.nonlinearity == "gelu":
            return ops.gelu(y, approximate=False)
        if tf_native:
            import tensorflow as tf

            return tf.nn.relu(y)
        return ops.relu(y)

    def _tf_fused(self, inputs: Tensor, kernel: Tensor, shift: Tensor, pack: int) -> Tensor:
        # Conv2D (explicit symmetric padding) + BiasAdd + Relu is the pattern
        # TensorFlow's grappler remapper rewrites into one _FusedConv2D kernel.
        import tensorflow as tf

        pad = (self.kernel_size - 1) // 2
        if pack > 1:
            return self._tf_fused_packed(inputs, kernel, shift, pack)
        if self.strides > 1 and pad:
            padding: str | list[list[int]] = [[0, 0], [pad, pad], [pad, pad], [0, 0]]
        else:
            padding = "SAME"
        y = tf.nn.conv2d(inputs, kernel, strides=self.strides, padding=padding)
        y = tf.nn.bias_add(y, shift)
        return self._act(y, tf_native=True) if self.activation else y

    def _tf_fused_packed(self, inputs: Tensor, kernel: Tensor, shift: Tensor, pack: int) -> Tensor:
        # The same conv computed `pack` output columns at a time (`inference_weights`
        # built the kernel): one conv with `pack * filters` output channels, horizontal
        # stride `pack * strides` and a kernel `strides * (pack - 1)` columns wider. In
        # channels-last layout, its output (N, H, W / pack, pack * filters) is
        # bit-for-bit the layout of (N, H, W, filters), so a free reshape restores it.
        # CPU conv kernels block over output channels; with 6 or 12 of them
        # most of each block is idle, and packing fills it (see
        # `bench/forward_breakdown.py` for the measured gain per shape).
        import tensorflow as tf

        k, s = self.kernel_size, self.strides
        pad = (k - 1) // 2
        window = s * (pack - 1) + k
        out_width = cast(int, self._out_size(inputs.shape[2]))  # static: only known widths are packed
        groups = out_width // pack
        # Right padding so that the last window (starting at
        # s*pack*(groups-1) - pad) ends exactly at the padded edge.
        right = s * pack * (groups - 1) + window - pad - inputs.shape[2]
        y = tf.nn.conv2d(
            inputs,
            kernel,
            strides=[1, s, s * pack, 1],
            padding=[[0, 0], [pad, pad], [pad, right], [0, 0]],
        )
        y = tf.nn.bias_add(y, shift)
        if self.activation:
            y = self._act(y, tf_native=True)
        height = y.shape[1] if y.shape[1] is not None else tf.shape(y)[1]
        return tf.reshape(y, [-1, height, out_width, self.filters])

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return (input_shape[0], self._out_size(input_shape[1]), self._out_size(input_shape[2]), self.filters)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "activation": self.activation,
                "nonlinearity": self.nonlinearity,
                "epsilon": self.epsilon,
                "momentum": self.momentum,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "synchronized": self.synchronized,
                "moving_variance_update": self.moving_variance_update,
            }
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ConvBNReLU":
        # Saved before the choice existed: the biased update it trained with.
        return super().from_config({"moving_variance_update": LEGACY_MOVING_VARIANCE_UPDATE, **config})


@keras.saving.register_keras_serializable(package="keras_ee")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras' `BatchNormalization` whose moving variance takes in the unbiased batch
    variance (times n / (n - 1)) by default, as PyTorch's BatchNorm, or Keras' biased one.

    Everything else is Keras' layer: the normalisation (with the biased variance), the
    frozen layer (`trainable=False`) in inference mode, `synchronized` statistics (with n
    the global count). `renorm` and masks are not supported with `"unbiased"`.

    Args:
        moving_variance_update: `"unbiased"` (default) or `"biased"` (see
            `MOVING_VARIANCE_UPDATES`). A layer saved without it loads as `"biased"`.
        **kwargs: `keras.layers.BatchNormalization` arguments.

    Example:
    ```python
    y = BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn")(keras.Input((16,)))
    ```
    """

    def __init__(self, moving_variance_update: str = "unbiased", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.moving_variance_update = check_moving_variance_update(moving_variance_update, "BatchNormalization")
        if self.renorm and self.moving_variance_update == "unbiased":
            raise ValueError("BatchNormalization: `renorm=True` needs moving_variance_update='biased'.")

    def call(self, inputs: Tensor, training: bool | None = None, mask: Tensor | None = None) -> Tensor:
        if not (training and self.trainable) or self.moving_variance_update == "biased":
            return super().call(inputs, training=training, mask=mask)
        if mask is not None:
            raise ValueError(f"BatchNormalization {self.name!r}: masked inputs need moving_variance_update='biased'.")
        # Keras' training branch (keras/src/layers/normalization/batch_normalization.py)
        # with the moving variance's sample from `moving_variance_sample`.
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance, count = batch_moments(x, self._reduction_axes, synchronized=self.synchronized)
        sample = moving_variance_sample(
            ops.cast(variance, self.moving_variance.dtype), count, self.moving_variance_update, self.name
        )
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + ops.cast(mean, self.moving_mean.dtype) * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + sample * (1.0 - m))
        outputs = ops.batch_normalization(
            x=x,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=ops.cast(self.beta, x.dtype) if self.center else None,
            scale=ops.cast(self.gamma, x.dtype) if self.scale else None,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["moving_variance_update"] = self.moving_variance_update
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BatchNormalization":
        # Saved before the choice existed: the biased update it trained with.
        return super().from_config({"moving_variance_update": LEGACY_MOVING_VARIANCE_UPDATE, **config})


@keras.saving.register_keras_serializable(package="keras_ee")
class ChannelSplit(keras.layers.Layer):
    """Splits the last (channel) axis into consecutive parts of given sizes.

    Used after a merged 1x1 conv (see `keras_ee.models.blocks.shared_bottleneck`):
    several 1x1 convs that read the same map are run as one wider conv, and
    this layer hands each consumer its own channels. Weight-free, so the cost
    counter gives it 0 ops.

    Args:
        sizes: list of positive ints, channels of each part in order; they
            must add up to the input's channel count.
        **kwargs: standard `keras.layers.Layer` arguments.

    Called on a tensor, it returns a list of `len(sizes)` tensors.

    Example:
    ```python
    a, b = ChannelSplit([6, 12])(keras.Input((8, 8, 18)))
    ```
    """

    def __init__(self, sizes: Sequence[int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if (
            not isinstance(sizes, (list, tuple))
            or not sizes
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in sizes)
        ):
            raise ValueError(f"ChannelSplit: `sizes` must be a non-empty list of positive ints, received {sizes!r}.")
        self.sizes = [int(s) for s in sizes]

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        if input_shape[-1] != sum(self.sizes):
            raise ValueError(
                f"ChannelSplit: sizes {self.sizes} add up to {sum(self.sizes)} but the "
                f"input has {input_shape[-1]} channels (shape {tuple(input_shape)})."
            )

    def call(self, inputs: Tensor) -> list[Tensor]:
        if len(self.sizes) == 1:
            return [inputs]
        bounds = np.cumsum(self.sizes)[:-1].tolist()
        return ops.split(inputs, bounds, axis=-1)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> list[tuple[int | None, ...]]:
        return [tuple(input_shape[:-1]) + (s,) for s in self.sizes]

    def compute_output_spec(self, inputs: keras.KerasTensor) -> list[keras.KerasTensor]:
        return [keras.KerasTensor(tuple(inputs.shape[:-1]) + (s,), dtype=inputs.dtype) for s in self.sizes]

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update({"sizes": list(self.sizes)})
        return config


@keras.saving.register_keras_serializable(package="keras_ee")
class ChannelConcat(keras.layers.Concatenate):
    """`keras.layers.Concatenate` on the channel axis, with a split gradient.

    The same forward as `Concatenate(axis=-1)`. On the TensorFlow backend its
    gradient is one `split` of the incoming gradient (whose own gradient is
    one `concat`), where TensorFlow's default is one strided slice per input,
    whose gradient is a zero-padded full-size copy per input plus their sum.
    The dense connectivity of MSDNet and RANet concatenates at every layer,
    and the second-order gradients of meta-learning methods (L2W) pay that
    difference once per layer and step.

    Args:
        **kwargs: standard `keras.layers.Layer` arguments (`axis` is -1).

    Example:
    ```python
    y = ChannelConcat(name="cat")([keras.Input((8, 8, 6)), keras.Input((8, 8, 4))])
    ```
    """

    def __init__(self, **kwargs: Any) -> None:
        axis = kwargs.pop("axis", -1)
        if axis != -1:
            raise ValueError(f"ChannelConcat: `axis` must be -1 (channels), received {axis!r}.")
        super().__init__(axis=-1, **kwargs)

    def call(self, inputs: Sequence[Tensor]) -> Tensor:
        sizes = [t.shape[-1] for t in inputs]
        if keras.backend.backend() != "tensorflow" or None in sizes:
            return super().call(inputs)
        return _tf_concat_split_grad(list(inputs), sizes)


def _tf_concat_split_grad(tensors: list[Tensor], sizes: list[int]) -> Tensor:
    import tensorflow as tf

    @tf.custom_gradient
    def concat(*xs: Tensor) -> tuple[Tensor, Callable[[Tensor], list[Tensor]]]:
        def grad(dy: Tensor) -> list[Tensor]:
            return tf.split(dy, sizes, axis=-1)

        return tf.concat(xs, axis=-1), grad

    return concat(*tensors)


# The folded kernels of the active inference snapshots (`keras_ee.inference_snapshot`), innermost
# last: `ConvBNReLU` reads them here so that models never import the inference code above them.
_ACTIVE_FOLDED_KERNELS = threading.local()


@contextlib.contextmanager
def folded_kernels_scope(entries: "dict[tuple[int, int | None], tuple[Any, Any, int]]") -> Iterator[None]:
    """Inside it, inference calls of a `ConvBNReLU` held in `entries` (`(id(layer), input width)
    -> (kernel, shift, pack)`) use those kernels instead of folding its BatchNorm again."""
    stack = getattr(_ACTIVE_FOLDED_KERNELS, "stack", None)
    if stack is None:
        stack = _ACTIVE_FOLDED_KERNELS.stack = []
    stack.append(entries)
    try:
        yield
    finally:
        stack.pop()


def _snapshot_entry(layer: keras.layers.Layer, inputs: Tensor) -> tuple[Tensor, Tensor, int] | None:
    """The active snapshot's `(kernel, shift, pack)` for `layer` called on `inputs`, or None
    (no snapshot active, or a layer or input width it does not hold)."""
    stack = getattr(_ACTIVE_FOLDED_KERNELS, "stack", None)
    if not stack:
        return None
    entry = stack[-1].get((id(layer), inputs.shape[2]))
    if entry is None:
        return None
    kernel, shift, pack = entry
    if kernel.dtype != inputs.dtype:
        return ops.cast(kernel, inputs.dtype), ops.cast(shift, inputs.dtype), pack
    return kernel, shift, pack
