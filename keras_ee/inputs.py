"""The checks of what a user hands to inference (images and deadlines), and the one
normalisation of raw pixels (`Preprocessing`).

One definition of each rule, used by every entry point (`keras_ee.inference.EarlyExitModel`,
its compiled and exported passes, `keras-ee predict`):

- Pixels are real numbers: bool, complex, string and object arrays are refused.
- An image with a NaN or infinite pixel is refused where a caller can be told
  (`EarlyExitModel.predict`, eager calls, `keras-ee predict`), naming it. A compiled or
  exported pass cannot refuse one image of a request: there it gets no prediction (see
  `keras_ee.inference`: label -1, confidence NaN, at the last exit or the deadline's).
- Raw pixels become the model's input as the training pipeline makes them:
  `(pixels * pixel_scale - mean) / std` per channel (`Preprocessing`, read from a run's
  `preprocessing.json`; an `EarlyExitModel` with one applies it inside its pass, so
  `predict` and the exported SavedModel take pixels as the dataset stores them).
- Raw pixels lie in the range the run was trained on (`preprocessing.json`'s
  `pixel_range`, recorded at training time; 0..255 for an imported run): beyond it by more
  than `PIXEL_RANGE_TOLERANCE` of its width is refused (8-bit PNG files for a 0..16
  dataset), a smaller excess warns once (`PixelRangeWarning` from `EarlyExitModel.predict`).
- A deadline is an int stage in 1..K; compiled passes check it with a TensorFlow assertion
  (an `InvalidArgumentError` status from a SavedModel).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from keras_ee import run_folder
from keras_ee import validation as v
from keras_ee._typing import StrPath, Tensor

# How far (a fraction of the training range's width) raw pixels may stray beyond it with a
# warning only: rounding, a slightly brighter scan; farther is another pixel convention.
PIXEL_RANGE_TOLERANCE = 0.1
_SHOWN = 5  # images named in a message; the rest are counted


def _image_names(rows: np.ndarray, names: Sequence[object] | None, total: int) -> str:
    """'image 2' / 'images 1, 3, 4 (3 of 6)': rows named by `names` (file names), else by index."""
    shown = [str(names[i]) if names is not None else str(int(i)) for i in rows[:_SHOWN]]
    more = ", ..." if len(rows) > _SHOWN else ""
    count = f" ({len(rows)} of {total})" if len(rows) > 1 else ""
    return f"image{'s' if len(rows) > 1 else ''} {', '.join(shown)}{more}{count}"


def check_numeric(images: npt.ArrayLike, what: str = "images") -> np.ndarray:
    """`images` as an array of real numbers (ints or floats), or a ValueError naming `what`."""
    a = np.asarray(images)
    if a.dtype.kind not in "iuf":
        raise ValueError(
            f"{what} has dtype {a.dtype}; expected numeric pixels (integers or floats, not bool, complex, "
            "strings or objects)."
        )
    return a


def check_finite(images: npt.ArrayLike, names: Sequence[object] | None = None, what: str = "images") -> None:
    """Refuses images with a NaN or infinite pixel, naming them (by `names`, else by index)."""
    bad = v.non_finite_images(images)
    if bad.size:
        raise ValueError(
            f"{what}: {_image_names(bad, names, len(np.asarray(images)))} hold{'s' if len(bad) == 1 else ''} NaN or "
            "infinite pixels; expected finite pixel values."
        )


def check_pixel_range(
    images: npt.ArrayLike, trained: Sequence[float], names: Sequence[object] | None = None, what: str = "images"
) -> str | None:
    """Refuses raw pixels far outside the training range `trained = (lo, hi)`.

    Beyond it by more than `PIXEL_RANGE_TOLERANCE` of `hi - lo` (or of 1 for a constant
    range): a ValueError naming the first such image. A smaller excess: returns a warning
    text (one for the whole set) for the caller to show; None when every pixel is inside.
    """
    lo, hi = float(trained[0]), float(trained[1])
    a = np.asarray(images)
    if a.size == 0:
        return None
    flat = a.reshape(len(a), -1)
    mins, maxs = flat.min(axis=1).astype(np.float64), flat.max(axis=1).astype(np.float64)
    slack = PIXEL_RANGE_TOLERANCE * ((hi - lo) or 1.0)
    shown = f"[{lo:g}, {hi:g}]"
    far = np.flatnonzero((mins < lo - slack) | (maxs > hi + slack))
    if far.size:
        i = int(far[0])
        others = f" (and {far.size - 1} more of the {len(a)} images)" if far.size > 1 else ""
        raise ValueError(
            f"{what}: image {names[i] if names is not None else i} has pixels in [{mins[i]:g}, {maxs[i]:g}], "
            f"outside the training pixel range {shown}{others}; expected raw pixels as the dataset stores "
            f"them (an excess within {PIXEL_RANGE_TOLERANCE:.0%} of the range's width only warns)."
        )
    out = np.flatnonzero((mins < lo) | (maxs > hi))
    if out.size:
        return (
            f"{what}: {_image_names(out, names, len(a))} {'has' if out.size == 1 else 'have'} pixels in "
            f"[{mins[out].min():g}, {maxs[out].max():g}], slightly outside the training pixel range {shown}; "
            "their predictions may be less reliable."
        )
    return None


def deadline_error(num_exits: int | None, received: object) -> str:
    """The message of a deadline outside 1..num_exits (`check_deadline`, compiled passes)."""
    stages = f"in 1..{num_exits}" if num_exits is not None else ">= 1"
    tail = "" if received is None else f"; received {received!r}"
    return (
        f"deadline must be an int stage {stages} (1-based: samples still running after that stage take its exit){tail}."
    )


def check_deadline(deadline: object, num_exits: int | None = None) -> int:
    """`deadline` as an int in 1..num_exits (>= 1 when `num_exits` is None), or a ValueError."""
    if isinstance(deadline, np.ndarray) and deadline.ndim == 0:
        deadline = deadline[()]
    if (
        isinstance(deadline, (bool, np.bool_))
        or not isinstance(deadline, (int, np.integer))
        or deadline < 1
        or (num_exits is not None and deadline > num_exits)
    ):
        raise ValueError(deadline_error(num_exits, deadline))
    return int(deadline)


def assert_deadline(deadline: Tensor, num_exits: int) -> Tensor:
    """An int32 deadline tensor that fails (`InvalidArgumentError`) outside 1..num_exits when run:
    the check of a compiled or exported pass, which cannot raise a Python error."""
    import tensorflow as tf

    deadline = tf.convert_to_tensor(deadline, tf.int32)
    ok = tf.logical_and(deadline >= 1, deadline <= num_exits)
    with tf.control_dependencies([tf.debugging.Assert(ok, [deadline_error(num_exits, None), "received", deadline])]):
        return tf.identity(deadline)


class PixelRangeWarning(UserWarning):
    """Raw pixels slightly outside a run's training pixel range (`check_pixel_range`)."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How raw pixels become a model's input: `(pixels * pixel_scale - mean) / std` per channel,
    the normalisation of keras-ee's training pipelines (`keras_ee.data.pipeline`), in float32
    (the fields hold float32 values).

    Args:
        pixel_scale: multiplies the stored pixels (1/255 for 8-bit images).
        mean, std: one number per channel (std > 0), applied after the scale.
        pixel_range: `(min, max)` of the stored pixels the model was trained on (checked by
            `check_pixels`), or None (not checked).
    """

    pixel_scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        given = (
            f"pixel_scale={self.pixel_scale!r}, mean={self.mean!r}, std={self.std!r}, pixel_range={self.pixel_range!r}"
        )
        try:
            # Kept as the float32 numbers the pass computes with (preprocessing.json is read as float32).
            scale = float(np.float32(self.pixel_scale))
            mean = tuple(float(v) for v in np.asarray(self.mean, np.float32).reshape(-1))
            std = tuple(float(v) for v in np.asarray(self.std, np.float32).reshape(-1))
            prange = None if self.pixel_range is None else tuple(float(v) for v in self.pixel_range)
            ok = (
                math.isfinite(scale)
                and scale > 0
                and len(mean) >= 1
                and len(mean) == len(std)
                and all(math.isfinite(v) for v in mean)
                and all(math.isfinite(v) and v > 0 for v in std)
                and (
                    prange is None or (len(prange) == 2 and all(map(math.isfinite, prange)) and prange[0] <= prange[1])
                )
            )
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(
                "preprocessing must have pixel_scale > 0, mean and std of one finite number per channel "
                f"(std > 0) and pixel_range [min, max] or None; received {given}."
            )
        for name, value in (("pixel_scale", scale), ("mean", mean), ("std", std), ("pixel_range", prange)):
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (`preprocessing.json`'s keys; `pixel_range` only when known)."""
        out = {"pixel_scale": self.pixel_scale, "mean": list(self.mean), "std": list(self.std)}
        if self.pixel_range is not None:
            out["pixel_range"] = list(self.pixel_range)
        return out

    @classmethod
    def of(cls, value: Preprocessing | dict[str, Any] | None) -> Preprocessing | None:
        """A `Preprocessing` from itself, a dict of its fields (`preprocessing.json`), or None."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = set(value) - {"pixel_scale", "mean", "std", "pixel_range"}
            if unknown or not {"pixel_scale", "mean", "std"} <= set(value):
                raise ValueError(
                    "preprocessing must be a dict with pixel_scale, mean, std (and optionally pixel_range); "
                    f"received keys {sorted(value)}."
                )
            return cls(**value)
        raise TypeError(f"preprocessing must be a Preprocessing, a dict or None; received {type(value).__name__}.")

    @classmethod
    def of_run(cls, workdir: StrPath) -> Preprocessing:
        """A run folder's normalisation (`preprocessing.json`; a run from before it: its dataset's)."""
        scale, mean, std = run_folder.read_preprocessing(workdir)
        return cls(scale, tuple(mean.tolist()), tuple(std.tolist()), run_folder.read_pixel_range(workdir))

    @property
    def channels(self) -> int:
        return len(self.mean)

    def normalize(self, images: Tensor) -> Tensor:
        """`images` (numpy or tensor, any numeric dtype) as the model's float32 input tensor."""
        import tensorflow as tf

        x = tf.cast(tf.convert_to_tensor(images), tf.float32) * tf.constant(self.pixel_scale, tf.float32)
        mean = tf.constant(np.asarray(self.mean, np.float32))
        inv_std = tf.constant(1.0 / np.asarray(self.std, np.float32))  # as the training pipeline
        return (x - mean) * inv_std

    def check_pixels(
        self, images: npt.ArrayLike, names: Sequence[object] | None = None, what: str = "images"
    ) -> str | None:
        """`check_pixel_range` against `pixel_range` (nothing when it is unknown)."""
        if self.pixel_range is None:
            return None
        return check_pixel_range(images, self.pixel_range, names, what)
