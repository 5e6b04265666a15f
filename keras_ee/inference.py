"""Real early exit at inference: run the stages in order and stop each sample at its exit.

Budgeted batch classification (Huang et al., "Multi-Scale Dense Networks for Resource
Efficient Image Classification", ICLR 2018, arXiv:1703.09844) calibrates one threshold
per exit on validation data; `keras_ee.calibration` simulates the rule on logits of
every exit. `EarlyExitModel` applies it for real: it runs the stage sub-models of
`keras_ee.models.split_stages` one after the other, and after exit k keeps only the
samples whose calibrated confidence is below `T_k`, so later stages see only them.

    from keras_ee import inference
    ee = inference.EarlyExitModel.from_run("runs/msd-l2w", budget="15M")
    out = ee.predict(images, batch_size=64)   # {"label", "exit", "confidence"}, numpy
    ee.set_budget("10M")                      # new thresholds from the saved validation data
    ee.save("msd-l2w-15M.keras")              # keras.saving.load_model reads it back
    ee.export("serving/")                     # a SavedModel that needs only TensorFlow

The rule is exactly `calibration.simulate`'s: a sample leaves at its first exit k with
`score_k >= T_k` (`T_K = -inf`: the last exit takes the rest), where `score_k` is the
same confidence (`max_softmax`, `margin` or `entropy` of `softmax(logits / t_k)`) that
calibrated the thresholds, computed in the graph in float32 as the Rust kernel does
(max-shifted, clamped at `exp(-87.34)`, summed in float64). The two can differ in the
last float32 bit, so a sample whose score lies within ~1e-7 of a threshold may take a
neighbouring exit; away from thresholds the decisions are identical.

Mechanics (eager, inside `tf.function` with an unknown batch size, and in the exported
SavedModel alike): survivor positions come from `tf.where`, every carried state tensor
is cut with `tf.gather` (or handed on uncut when nobody left at that exit), results are
written back into input order by one `tf.dynamic_stitch` per output, and a `tf.cond` per
stage skips it (and so every later stage) once no sample is left.
The stages run on a snapshot of the backbone's BatchNorm-folded conv kernels
(`keras_ee.inference_snapshot.InferenceSnapshot`) instead of folding them on every call;
`predict`, `export`, `serving_function` and eager calls refresh it from the weights.

Conventions: exits are numbered 1..K (as the `exit_k` layers and the tables); costs and
budgets are cumulative Mul-Adds per sample (`keras_ee.costs.exit_costs`); a budget is a
number or a string such as `"15M"` (`keras_ee.costs.parse_mul_adds`). Inputs: a model with a
`preprocessing` (`from_run` gives it its run's `preprocessing.json`; `from_model` takes one)
normalises inside its pass, so `predict`, its calls and the exported SavedModel take images as
the dataset stores them (raw pixels; `keras_ee.inputs.Preprocessing`); without one, images must
be preprocessed as in training.

Anytime prediction (`deadline=k`, Huang et al.'s "anytime" setting): the same rule, but
every sample still running after stage k takes exit k's prediction, so no sample costs
more than exit k's Mul-Adds.

Bad input (`keras_ee.inputs`): `predict` and eager calls refuse non-numeric arrays, images
with a NaN or infinite pixel and deadlines outside 1..K; a compiled or exported pass, which
cannot refuse one image of a request, gives such an image no prediction (label -1,
confidence NaN, at the last exit or the deadline's: `_score`) and fails on a bad deadline
with an `InvalidArgumentError`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import numpy.typing as npt
import tensorflow as tf

from keras_ee import calibration, inputs, models, run_folder, runs
from keras_ee import validation as v
from keras_ee._typing import StrPath, Tensor
from keras_ee.atomic import MARKER, atomic_path
from keras_ee.costs import parse_mul_adds
from keras_ee.formatting import budget_label
from keras_ee.inference_snapshot import InferenceSnapshot

__all__ = ["EarlyExitModel", "OUTPUT_KEYS"]

OUTPUT_KEYS = ("label", "exit", "confidence")
# exp(EXP_LOWEST) is float32's smallest normal number: the Rust kernel clamps there.
_EXP_LOWEST = np.float32(-87.33654)
_SWEEP_KEYS: tuple[Literal["q", "thresholds", "val_mean_cost", "val_accuracy"], ...] = (
    "q",
    "thresholds",
    "val_mean_cost",
    "val_accuracy",
)


def _fmt(mul_adds: float) -> str:
    return budget_label(float(mul_adds))


def _thresholds_array(thresholds: npt.ArrayLike, num_exits: int, what: str = "thresholds") -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if t.shape != (num_exits,):
        raise ValueError(
            f"EarlyExitModel: {what} has {t.size} values; the model has {num_exits} exits "
            f"(one threshold per exit, -inf at the last)."
        )
    if np.isnan(t).any():
        raise ValueError(f"EarlyExitModel: {what} holds NaN at exit {int(np.argmax(np.isnan(t))) + 1}.")
    if t[-1] != -np.inf:
        raise ValueError(
            f"EarlyExitModel: the last threshold must be -inf (the last exit takes every sample "
            f"left); received {t[-1]}."
        )
    return t


def _costs_array(costs: npt.ArrayLike, num_exits: int) -> np.ndarray:
    c = np.asarray(costs, dtype=np.float64).reshape(-1)
    if c.shape != (num_exits,):
        raise ValueError(
            f"EarlyExitModel: costs has {c.size} values; the model has {num_exits} exits (the "
            "cumulative Mul-Adds of each exit)."
        )
    if not np.isfinite(c).all() or (c < 0).any() or (np.diff(c) < 0).any():
        raise ValueError(
            f"EarlyExitModel: costs must be finite, >= 0 and non-decreasing (cumulative Mul-Adds); "
            f"received {c.tolist()}."
        )
    return c


def _temperatures(temperature: npt.ArrayLike, num_exits: int) -> np.ndarray:
    t = np.asarray(temperature, dtype=np.float64).reshape(-1)
    if t.size == 1:
        t = np.repeat(t, num_exits)
    if t.shape != (num_exits,) or not np.isfinite(t).all() or (t <= 0).any():
        raise ValueError(
            f"EarlyExitModel: temperature must be a positive number or {num_exits} positive numbers "
            f"(one per exit); received {temperature!r}."
        )
    return t


def _backbone_of(model: keras.Model) -> keras.Model:
    """The functional multi-exit model (a training `MultiExitModel` hands over its backbone)."""
    inner = getattr(model, "backbone", None)
    if isinstance(inner, keras.Model) and getattr(inner, "outputs", None):
        return inner
    return model


class _Stages:
    """Holds the stage models (and compiled functions of them) and the backbone's folded
    inference kernels outside Keras' attribute tracking: they share or derive from the
    backbone's weights, which are saved once, with the backbone."""

    def __init__(self, stages: list[keras.Model], snapshot: InferenceSnapshot) -> None:
        self.stages = stages
        self.snapshot = snapshot  # refreshed at every entry point that reads the weights
        self.pool_steps: dict[tuple[int, bool], Any] = {}  # predict(pooled=True)'s compiled stages, by (stage, final)


@keras.saving.register_keras_serializable(package="keras_ee")
class EarlyExitModel(keras.Model):
    """A multi-exit model that really stops each sample at its calibrated exit.

    Build it with `from_run` or `from_model` (they calibrate the thresholds for a budget
    on validation logits), or directly from thresholds.

    Args:
        backbone: a keras-ee multi-exit model (`keras_ee.models.create`,
            `attach_exits`, a builder) with stage markers; a training
            `MultiExitModel` is unwrapped to its backbone.
        thresholds: `(K,)` exit thresholds, `-inf` at the last exit (as from
            `calibration.calibrate`).
        costs: `(K,)` cumulative Mul-Adds of each exit.
        kind: the confidence score the thresholds were calibrated with.
        temperature: softmax temperature, one number or one per exit.
        budget: the Mul-Add budget the thresholds were picked for (information; None
            for hand-made thresholds).
        sweep: the validation sweep they came from: a dict with `q` (B,), `thresholds`
            (B, K), `val_mean_cost` (B,), `val_accuracy` (B,), and `mode`, `shortfall`,
            plus the solved `q` and `val_mean_cost` of the current thresholds.
        val_scores: float32 `(K, N)` validation confidences: kept (in the `.keras` file)
            so that `set_budget` can solve for a new budget.
        preprocessing: None (images come preprocessed as in training), or a
            `keras_ee.inputs.Preprocessing` (or its dict, `preprocessing.json`'s keys): the
            pass normalises raw pixels itself, and `predict` and eager calls check them
            against its `pixel_range`.
        name: model name.

    Calling the model (`ee(images)`, `ee(images, deadline=k)`) returns a dict of
    tensors: `label` (int32, the exit's argmax), `exit` (int32, 1..K) and `confidence`
    (float32, the score at that exit); `predict` does it in batches on numpy arrays.
    The pass runs on folded kernels refreshed at each entry point (see `refresh`).
    """

    def __init__(
        self,
        backbone: keras.Model,
        thresholds: npt.ArrayLike,
        costs: npt.ArrayLike,
        kind: str = "max_softmax",
        temperature: npt.ArrayLike = 1.0,
        budget: float | None = None,
        sweep: dict[str, Any] | None = None,
        val_scores: npt.ArrayLike | None = None,
        preprocessing: inputs.Preprocessing | dict[str, Any] | None = None,
        name: str | None = None,
        **kwargs: Any,
    ) -> None:
        backbone = _backbone_of(backbone)
        if not isinstance(backbone, keras.Model) or not getattr(backbone, "outputs", None):
            raise TypeError(
                f"EarlyExitModel expects a built functional keras-ee multi-exit model; received "
                f"{type(backbone).__name__}."
            )
        try:
            stages = models.split_stages(backbone)
        except ValueError as e:
            raise ValueError(
                f"EarlyExitModel needs a keras-ee multi-exit model with stage markers "
                f"(keras_ee.models.create, attach_exits or a builder): {e}"
            ) from None
        num_exits = len(stages)
        super().__init__(name=name or f"{backbone.name}_early_exit", **kwargs)
        v.check_choice("kind", kind, calibration.SCORE_KINDS, where="EarlyExitModel: ")
        self.backbone = backbone
        self._runtime = _Stages(stages, InferenceSnapshot(backbone))
        self.num_exits = num_exits
        self.kind = kind
        self.costs = _costs_array(costs, num_exits)
        self.temperature = _temperatures(temperature, num_exits)
        self._inv_t = [np.float32(1.0 / t) for t in self.temperature]  # as the Rust kernel: 1/t in float32
        self.budget = None if budget is None else float(budget)
        self.sweep = self._check_sweep(sweep)
        t = _thresholds_array(thresholds, num_exits)
        self._thresholds = self.add_weight(
            name="thresholds",
            shape=(num_exits,),
            dtype="float64",
            trainable=False,
            initializer=keras.initializers.Constant(0.0),
        )
        self._thresholds.assign(t)
        self._val_scores: keras.Variable | None = None
        if val_scores is not None:
            vs = np.asarray(val_scores, dtype=np.float32)
            if vs.ndim != 2 or vs.shape[0] != num_exits or vs.shape[1] < 1:
                raise ValueError(
                    f"EarlyExitModel: val_scores must be (K={num_exits}, N) confidences; received shape {vs.shape}."
                )
            self._val_scores = self.add_weight(
                name="val_scores", shape=vs.shape, dtype="float32", trainable=False, initializer="zeros"
            )
            self._val_scores.assign(vs)
        self.input_shape_hw = tuple(int(d) for d in backbone.inputs[0].shape[1:])
        self.preprocessing = inputs.Preprocessing.of(preprocessing)
        if self.preprocessing is not None and self.preprocessing.channels != self.input_shape_hw[-1]:
            raise ValueError(
                f"EarlyExitModel: the normalisation has {self.preprocessing.channels} channels; the model takes "
                f"{self.input_shape_hw[-1]}."
            )
        self._serve: tuple[Any, Any] | None = None  # the compiled pass, without and with a deadline
        self.built = True

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_model(
        cls,
        model: keras.Model,
        val_logits: npt.ArrayLike,
        val_labels: npt.ArrayLike,
        budget: float | str,
        costs: Sequence[float] | np.ndarray | None = None,
        kind: str = "max_softmax",
        temperature: npt.ArrayLike = 1.0,
        mode: calibration.SplitMode = "geometric",
        shortfall: calibration.Shortfall = "reference",
        qs: npt.ArrayLike | None = None,
        name: str | None = None,
        preprocessing: inputs.Preprocessing | dict[str, Any] | None = None,
    ) -> EarlyExitModel:
        """Calibrates thresholds for `budget` on validation logits and wraps `model`.

        Args:
            model: a keras-ee multi-exit model (or a training `MultiExitModel`).
            val_logits: `(K, N, C)` validation logits of `model`.
            val_labels: `(N,)` their labels (for the sweep's validation accuracy).
            budget: mean Mul-Adds per sample, a number or a string like `"15M"`, in
                `[costs[0], costs[-1]]`.
            costs: `(K,)` cumulative Mul-Adds; default `keras_ee.costs.exit_costs(model)`.
            kind, temperature: the confidence score (as `calibration.exit_scores`).
            mode, shortfall, qs: as `calibration.budget_sweep` (the saved sweep).
            name: model name.
            preprocessing: the normalisation of raw pixels (a `keras_ee.inputs.Preprocessing`
                or a dict with `pixel_scale`, `mean`, `std`, optionally `pixel_range`), applied
                inside the model; None: images come preprocessed as in training.

        Returns:
            `EarlyExitModel`.
        """
        from keras_ee import costs as ee_costs
        from keras_ee.evaluation import scores_and_correct

        backbone = _backbone_of(model)
        if costs is None:
            costs = ee_costs.exit_costs(backbone)["mul_adds"]
        val_logits = np.asarray(val_logits)
        if val_logits.ndim != 3 or val_logits.shape[0] != len(backbone.outputs):
            raise ValueError(
                f"EarlyExitModel.from_model: val_logits must be (K={len(backbone.outputs)}, N, C); "
                f"received shape {val_logits.shape}."
            )

        val_labels = np.asarray(val_labels)
        v.check_labels_of_logits(val_labels, val_logits.shape, "EarlyExitModel.from_model: `val_labels`", "validation")
        scores, correct = scores_and_correct(val_logits, val_labels, kind, temperature, "the validation logits")
        sw = calibration.budget_sweep(scores, correct, scores, correct, costs, qs=qs, mode=mode, shortfall=shortfall)
        sweep: dict[str, Any] = {key: np.asarray(sw[key]).tolist() for key in _SWEEP_KEYS}
        sweep.update(mode=mode, shortfall=shortfall)
        ee = cls(
            model,
            thresholds=[0.0] * (len(costs) - 1) + [-np.inf],
            costs=costs,
            kind=kind,
            temperature=temperature,
            sweep=sweep,
            val_scores=scores,
            preprocessing=preprocessing,
            name=name,
        )
        ee.set_budget(budget)
        return ee

    @classmethod
    def from_run(
        cls,
        path: StrPath,
        budget: float | str,
        kind: str | None = None,
        temperature: npt.ArrayLike = 1.0,
        mode: calibration.SplitMode = "geometric",
        shortfall: calibration.Shortfall = "reference",
        qs: npt.ArrayLike | None = None,
        raw_pixels: bool = True,
    ) -> EarlyExitModel:
        """Loads a finished run folder (`model.keras`, `dump/`) and calibrates for `budget`.

        Args:
            path: the run folder of `keras-ee train` (or `keras-ee import`, once
                `keras-ee evaluate` has dumped its logits).
            budget: mean Mul-Adds per sample, a number or a string like `"15M"`.
            kind: confidence score; default the run's `confidence` setting.
            temperature, mode, shortfall, qs: as `from_model`.
            raw_pixels: True (default): the model applies the run's `preprocessing.json`
                itself, so it takes images as the dataset stores them (and checks them
                against the training pixel range); False: images preprocessed as in training.

        Returns:
            `EarlyExitModel`.

        Raises:
            FileNotFoundError: the folder lacks `model.keras` or `dump/`.
            ValueError: a bad budget, a damaged model, a confidence that is not a
                built-in score, exit costs in `dump/costs.json` other than the model's.
        """
        from keras_ee import costs as ee_costs
        from keras_ee import dumps

        path = Path(path)
        for need in (run_folder.MODEL_FILE, "dump"):
            if not (path / need).exists():
                raise FileNotFoundError(
                    f"{str(path)!r} is not a finished run folder: it has no {need} (train it "
                    f"first with `keras-ee train --out {path}`)."
                )
        if kind is None:
            try:
                kind = json.loads((path / run_folder.CONFIG_FILE).read_text()).get("confidence", "max_softmax")
            except (OSError, ValueError):
                kind = "max_softmax"
        if kind not in calibration.SCORE_KINDS:
            raise ValueError(
                f"real early exit needs a built-in confidence score {calibration.SCORE_KINDS}; received {kind!r}."
            )
        preprocessing = inputs.Preprocessing.of_run(path) if raw_pixels else None
        dump = dumps.load_dump(path / "dump")
        model = runs.load_run_model(path / run_folder.MODEL_FILE)
        # `keras-ee train` records the reference rule's costs.
        costs = ee_costs.check_recorded_costs(
            _backbone_of(model), dump.mul_adds, repr(str(path / "dump" / "costs.json"))
        )
        channels = int(_backbone_of(model).inputs[0].shape[-1])
        if preprocessing is not None and preprocessing.channels != channels:
            raise ValueError(
                f"{str(path / run_folder.PREPROCESSING_FILE)!r}: its normalisation has {preprocessing.channels} "
                f"channels; the model takes {channels}."
            )
        return cls.from_model(
            model,
            np.asarray(dump.val_logits),
            np.asarray(dump.val_labels),
            budget,
            costs=costs,
            kind=kind,
            temperature=temperature,
            mode=mode,
            shortfall=shortfall,
            qs=qs,
            name=f"{path.name}_early_exit",
            preprocessing=preprocessing,
        )

    @staticmethod
    def load(path: StrPath) -> EarlyExitModel:
        """Loads a `.keras` file written by `save` (a clear error for a missing or damaged file)."""

        ee = runs.load_run_model(path)
        if not isinstance(ee, EarlyExitModel):
            raise ValueError(f"{str(path)!r} holds a {type(ee).__name__}, not an EarlyExitModel.")
        return ee

    def _check_sweep(self, sweep: object) -> dict[str, Any] | None:
        if sweep is None:
            return None
        if not isinstance(sweep, dict) or any(key not in sweep for key in _SWEEP_KEYS):
            raise ValueError(
                f"EarlyExitModel: sweep must be a dict with {list(_SWEEP_KEYS)}; received "
                f"{sorted(sweep) if isinstance(sweep, dict) else type(sweep).__name__}."
            )
        out: dict[str, Any] = {key: np.asarray(sweep[key], dtype=np.float64).tolist() for key in _SWEEP_KEYS}
        if np.asarray(out["thresholds"]).ndim != 2 or np.asarray(out["thresholds"]).shape[1] != self.num_exits:
            raise ValueError(
                f"EarlyExitModel: the sweep's thresholds must be (B, K={self.num_exits}); received "
                f"shape {np.asarray(out['thresholds']).shape}."
            )
        out["mode"] = sweep.get("mode", "geometric")
        out["shortfall"] = sweep.get("shortfall", "reference")
        for key in ("solved_q", "solved_val_mean_cost"):
            if sweep.get(key) is not None:
                out[key] = float(sweep[key])
        return out

    # ------------------------------------------------------------------ budget

    @property
    def thresholds(self) -> np.ndarray:
        """The current `(K,)` thresholds (float64, -inf at the last exit)."""
        return np.asarray(self._thresholds.numpy(), dtype=np.float64)

    @property
    def val_scores(self) -> np.ndarray | None:
        """The saved `(K, N)` validation confidences, or None."""
        return None if self._val_scores is None else np.asarray(self._val_scores.numpy())

    def set_thresholds(self, thresholds: npt.ArrayLike) -> None:
        """Sets `(K,)` thresholds directly (`-inf` at the last exit); the budget becomes unknown."""
        self._thresholds.assign(_thresholds_array(thresholds, self.num_exits))
        self.budget = None

    def set_budget(self, mul_adds: float | str) -> dict[str, float]:
        """Re-picks the thresholds for a new mean Mul-Add budget from the saved validation data.

        Solves for the budget parameter q whose validation mean cost meets the budget
        (`calibration.solve_budget`: bracketed on the saved sweep's q grid, bisected in
        ln q) and calibrates the thresholds there.

        Args:
            mul_adds: a number or a string like `"15M"`, between the first exit's cost
                and the last exit's.

        Returns:
            dict with the solved `q` and the validation mean cost `val_mean_cost` of the
            new thresholds (at most the budget).

        Raises:
            ValueError: a budget outside `[costs[0], costs[-1]]` or not a Mul-Add count;
                a model without saved validation scores and sweep.
        """
        budget = parse_mul_adds(mul_adds)
        first, last = float(self.costs[0]), float(self.costs[-1])
        if budget < first:
            raise ValueError(
                f"budget {_fmt(budget)} ({budget:g} Mul-Adds) is below the first exit's cost "
                f"{_fmt(first)} ({first:g}): no early exit can meet it; choose a budget in "
                f"[{_fmt(first)}, {_fmt(last)}]."
            )
        if budget > last:
            raise ValueError(
                f"budget {_fmt(budget)} ({budget:g} Mul-Adds) is above the last exit's cost "
                f"{_fmt(last)} ({last:g}): every sample already runs the whole network; choose a "
                f"budget in [{_fmt(first)}, {_fmt(last)}]."
            )
        if self._val_scores is None or self.sweep is None:
            raise ValueError(
                "set_budget needs the validation scores and sweep the thresholds came from; this model "
                "was built from thresholds alone (use EarlyExitModel.from_model or from_run)."
            )
        sol = calibration.solve_budget(
            self._val_scores.numpy(),
            self.costs,
            budget,
            qs=self.sweep["q"],
            mode=self.sweep["mode"],
            shortfall=self.sweep["shortfall"],
        )
        self._thresholds.assign(_thresholds_array(sol["thresholds"], self.num_exits))
        self.budget = budget
        self.sweep["solved_q"] = float(sol["q"])
        self.sweep["solved_val_mean_cost"] = float(sol["val_mean_cost"])
        return {"q": float(sol["q"]), "val_mean_cost": float(sol["val_mean_cost"])}

    # ------------------------------------------------------------------ the runtime

    def _score(self, logits: Tensor, k: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(score float32, prediction int32) of exit k (0-based), as `calibration.exit_scores`.

        The no-prediction rule, the one place for it: a sample whose image is not `valid`
        (it has a NaN or infinite pixel) or whose logits here are not all finite gets score
        NaN and prediction -1. A NaN score never meets a threshold (`_leaves`), so the sample
        runs on to the last exit (or the deadline's) and leaves there with label -1 and
        confidence NaN, whatever the kernels made of the NaN on the way (oneDNN's ReLU and
        max-pooling can turn it into finite numbers, differently at other batch sizes).
        """
        x = tf.cast(logits, tf.float32)
        m = tf.reduce_max(x, axis=-1, keepdims=True)
        inv_t = self._inv_t[k]
        d = x - m if inv_t == 1.0 else (x - m) * inv_t
        d = tf.maximum(d, _EXP_LOWEST)
        e = tf.exp(d)
        total = tf.reduce_sum(tf.cast(e, tf.float64), axis=-1)
        if self.kind == "max_softmax":
            score = 1.0 / total
        elif self.kind == "margin":
            top2 = tf.math.top_k(x, k=2, sorted=True).values
            d2 = top2[:, 1] - m[:, 0]
            d2 = d2 if inv_t == 1.0 else d2 * inv_t
            e2 = tf.cast(tf.exp(tf.maximum(d2, _EXP_LOWEST)), tf.float64)
            score = (1.0 - e2) / total
        else:
            w = tf.reduce_sum(tf.cast(e * d, tf.float64), axis=-1)
            num_classes = float(x.shape[-1]) if x.shape[-1] is not None else tf.cast(tf.shape(x)[-1], tf.float64)
            plogp = w / total - tf.math.log(total)
            score = tf.clip_by_value(1.0 + plogp / tf.math.log(tf.cast(num_classes, tf.float64)), 0.0, 1.0)
        ok = tf.reduce_all(tf.math.is_finite(x), axis=-1)
        if valid is not None:
            ok = tf.logical_and(ok, valid)
        score = tf.where(ok, tf.cast(score, tf.float32), tf.constant(np.nan, tf.float32))
        return score, tf.where(ok, tf.argmax(x, axis=-1, output_type=tf.int32), -1)

    @staticmethod
    def _finite_images(images: Tensor) -> Tensor:
        """(B,) bool: the images without a NaN or infinite pixel (the others get no prediction, `_score`)."""
        images = tf.convert_to_tensor(images)
        return tf.reduce_all(tf.math.is_finite(images), axis=list(range(1, images.shape.rank)))

    @staticmethod
    def _leaves(score: Tensor, thresholds: Tensor, k: int) -> Tensor:
        """Whether each sample leaves at exit k (0-based): `score >= T_k` in float64, the rule of
        `calibration.simulate`; one definition for every pass. A NaN score (no prediction,
        see `_score`) never leaves early: said explicitly, because Grappler rewrites
        `not(score >= T)` into `score < T`, which is false for NaN too (the pooled pass's
        steps let a NaN score leave at exit 1 that way)."""
        return tf.logical_and(tf.logical_not(tf.math.is_nan(score)), tf.cast(score, tf.float64) >= thresholds[k])

    @staticmethod
    def _rows(state: list[Tensor], stay: Tensor, all_stay: Tensor) -> list[Tensor]:
        """The rows `stay` of every carried tensor in `state`; when every sample stays
        (`all_stay`), the tensors uncut instead of a copy of them all (MSDNet carries 20-60K
        floats a sample; bench/inference.py, stage steps apart at batch 256: +18% -> +7%)."""
        return tf.cond(all_stay, lambda: [tf.identity(t) for t in state], lambda: [tf.gather(t, stay) for t in state])

    def _stage_or_empty(
        self, k: int, state: list[Tensor], stay: Tensor, alive: Tensor, all_stay: Tensor
    ) -> list[Tensor]:
        """Stage k's outputs `[logits_k, *state_k]` on the samples `stay` of the carried `state`
        (all of them for stage 1), or empty (batch 0) tensors when nobody is left.

        One `tf.cond` per stage, side by side rather than nested: lowered to Switch/Merge,
        a cond gets one Switch per tensor its branches capture, and a nested cond running
        the rest of the network would capture the variables of every later stage at every
        exit (about 15% of a batch-1 pass of msdnet_cifar_5); here each stage's variables
        are captured once. oneDNN convolutions reject a batch of 0, so an empty stage must
        be skipped, not run. The carried tensors are cut inside the branch, so a stage that
        nobody reaches copies nothing; when every sample stays (`all_stay`) an inner cond (`_rows`)
        over the carried tensors only hands them on uncut, saving a copy of the whole state.
        """
        stage = self._runtime.stages[k]

        def run() -> list[Tensor]:
            if k == 0:
                return list(stage(state[0], training=False))
            return list(stage(self._rows(state, stay, all_stay), training=False))

        def empty() -> list[Tensor]:
            return [tf.zeros((0,) + tuple(t.shape[1:]), t.dtype) for t in stage.outputs]

        return tf.cond(alive, run, empty)

    def early_exit(self, images: Tensor, deadline: int | Tensor | None = None) -> dict[str, Tensor]:
        """The early-exit pass on one batch of tensors: dict of `label`, `exit`, `confidence`.

        Args:
            images: `(B, H, W, C)` tensor (any B, also unknown inside `tf.function`).
            deadline: None, or an int (or int32 scalar tensor) in 1..K: samples still
                running after stage `deadline` take exit `deadline`'s prediction.
        """
        if tf.executing_eagerly():  # a caller to tell: refuse what a compiled pass must answer
            self._check_images(images)
            if deadline is not None:
                deadline = inputs.check_deadline(
                    deadline.numpy() if isinstance(deadline, tf.Tensor) else deadline, self.num_exits
                )
            self.refresh()
        with self._runtime.snapshot.active():
            return self._early_exit(images, deadline)

    def _early_exit(self, images: Tensor, deadline: int | Tensor | None) -> dict[str, Tensor]:
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.float32:
            images = tf.cast(images, tf.float32)
        if deadline is not None:
            deadline = inputs.assert_deadline(deadline, self.num_exits)
        valid = self._finite_images(images)
        images = self._normalized(images)
        n = tf.shape(images)[0]
        thresholds = tf.convert_to_tensor(self._thresholds.value)
        idx = tf.range(n)  # input positions of the samples still running
        state: list[Tensor] = [images]
        stay = all_stay = None
        # Per exit: the input positions of the samples leaving there and their results,
        # written into input order by one dynamic_stitch per output at the end (every
        # position leaves exactly once) instead of three scatters per exit.
        where: list[Tensor] = []
        labels: list[Tensor] = []
        exits: list[Tensor] = []
        conf: list[Tensor] = []
        for k in range(self.num_exits):
            out = self._stage_or_empty(k, state, stay, tf.size(idx) > 0, all_stay)
            score, pred = self._score(out[0], k, valid if k == 0 else tf.gather(valid, idx))
            last = k == self.num_exits - 1
            if last:
                where.append(idx)
                labels.append(pred)
                exits.append(tf.fill(tf.shape(idx), tf.constant(k + 1, tf.int32)))
                conf.append(score)
                break
            leave = self._leaves(score, thresholds, k)
            if deadline is not None:
                leave = tf.logical_or(leave, deadline <= k + 1)
            gone = tf.where(leave)[:, 0]
            where.append(tf.gather(idx, gone))
            labels.append(tf.gather(pred, gone))
            exits.append(tf.fill(tf.shape(gone), tf.constant(k + 1, tf.int32)))
            conf.append(tf.gather(score, gone))
            stay = tf.where(tf.logical_not(leave))[:, 0]
            all_stay = tf.equal(tf.size(gone), 0)
            idx, state = tf.gather(idx, stay), list(out[1:])
        return {
            "label": tf.dynamic_stitch(where, labels),
            "exit": tf.dynamic_stitch(where, exits),
            "confidence": tf.dynamic_stitch(where, conf),
        }

    def _normalized(self, images: Tensor) -> Tensor:
        """The model's input from the caller's images: raw pixels normalised (`preprocessing`)."""
        return images if self.preprocessing is None else self.preprocessing.normalize(images)

    def check_pixels(self, images: np.ndarray, names: Sequence[str] | None = None, what: str = "images") -> str | None:
        """Raw pixels against the training pixel range (`keras_ee.inputs.check_pixel_range`):
        a ValueError for pixels far outside, a warning text (returned) for a small excess, None
        when inside or when the model takes preprocessed images."""
        return None if self.preprocessing is None else self.preprocessing.check_pixels(images, names, what)

    def call(self, images: Tensor, deadline: int | Tensor | None = None, training: bool = False) -> dict[str, Tensor]:
        return self.early_exit(images, deadline=deadline)

    def refresh(self) -> None:
        """Re-reads the backbone's weights into the folded inference kernels the early-exit
        pass runs on (BatchNorm folded into each conv once instead of on every call).

        `predict`, `export`, `serving_function` and eager calls do it themselves; call it
        after changing the backbone's weights if you hold a compiled function of the pass
        (from `serving_function`, or your own `tf.function` around the model).
        """
        self._runtime.snapshot.refresh()

    def _check_deadline(self, deadline: object) -> int:
        return self.num_exits if deadline is None else inputs.check_deadline(deadline, self.num_exits)

    def _check_images(self, images: npt.ArrayLike | tf.Tensor) -> np.ndarray:
        if isinstance(images, tf.Tensor):
            images = images.numpy()
        want = self.input_shape_hw
        a = inputs.check_numeric(images, f"images of shape (N, {', '.join(map(str, want))})")
        if a.ndim != 1 + len(want) or tuple(a.shape[1:]) != want:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, want))}) as the model's input; received {a.shape}."
            )
        inputs.check_finite(a)
        warning = self.check_pixels(a)
        if warning:
            warnings.warn(warning, inputs.PixelRangeWarning, stacklevel=3)
        return a

    def serving_function(self, deadline: bool = False) -> Callable[..., dict[str, Tensor]]:
        """The compiled early-exit pass `f(images)`, or `f(images, deadline)` with `deadline=True`
        (input signature `[None, H, W, C]` float32 and an int32 scalar; one trace for every
        batch size). It runs on the backbone's weights as of this call (see `refresh`)."""
        self.refresh()
        return self._compiled(deadline)

    def _compiled(self, deadline: bool) -> Callable[..., dict[str, Tensor]]:
        if self._serve is None:
            spec = tf.TensorSpec((None,) + self.input_shape_hw, tf.float32, name="images")
            self._serve = (
                tf.function(lambda images: self.early_exit(images), input_signature=[spec]),
                tf.function(
                    lambda images, deadline: self.early_exit(images, deadline),
                    input_signature=[spec, tf.TensorSpec((), tf.int32, name="deadline")],
                ),
            )
        return self._serve[1 if deadline else 0]

    def predict(
        self,
        images: npt.ArrayLike,
        batch_size: int = 64,
        deadline: int | None = None,
        pooled: bool = False,
        verbose: int = 0,
        **kwargs: Any,
    ) -> dict[str, np.ndarray]:
        """Early-exit predictions for a numpy array of images.

        Args:
            images: `(N, H, W, C)` array (cast to float32): raw pixels as the dataset stores
                them for a model with a `preprocessing` (checked against its pixel range:
                far outside is a ValueError, a small excess a `PixelRangeWarning`), else
                preprocessed as in training.
            batch_size: samples per compiled call.
            deadline: None (the budget's thresholds only), or an int stage k in 1..K:
                anytime mode, every sample has its prediction after stage k at the latest.
            pooled: False: each batch of `batch_size` images runs through the stages on
                its own (the serving pass), so later stages see only that batch's
                survivors. True (throughput mode, for a set of images known up front, as
                in budgeted batch classification): the survivors of every batch are
                pooled per stage and a stage runs once `batch_size` of them are waiting,
                on all of them (the rest at the end), so every stage works on full
                batches. The decisions are the same (each sample's computation does
                not depend on its batch mates; scores may differ in the last float32
                bit).

        Returns:
            dict of numpy arrays `(N,)`: `label` (int32), `exit` (int32, 1-based),
            `confidence` (float32, the calibrated score at that exit).
        """
        if kwargs:
            raise TypeError(f"EarlyExitModel.predict got unexpected arguments {sorted(kwargs)}.")
        a = self._check_images(images)
        d = self._check_deadline(deadline)
        v.check_int("batch_size", batch_size, 1, where="EarlyExitModel.predict: ")
        pooled = v.check_bool("pooled", pooled, where="EarlyExitModel.predict: ")
        self.refresh()
        if pooled:
            return self._predict_pooled(a, int(batch_size), d)
        if deadline is None:
            fn = self._compiled(deadline=False)
        else:
            with_deadline, deadline_t = self._compiled(deadline=True), tf.constant(d, tf.int32)
            fn = lambda x: with_deadline(x, deadline_t)  # noqa: E731
        parts: dict[str, list[np.ndarray]] = {key: [] for key in OUTPUT_KEYS}
        for start in range(0, len(a), int(batch_size)):
            out = fn(tf.constant(a[start : start + int(batch_size)], tf.float32))
            for key in OUTPUT_KEYS:
                parts[key].append(out[key].numpy())
        empty = {"label": np.int32, "exit": np.int32, "confidence": np.float32}
        return {key: np.concatenate(parts[key]) if parts[key] else np.zeros(0, empty[key]) for key in OUTPUT_KEYS}

    def _pool_step(self, k: int, final: bool) -> Callable[..., Any]:
        """Compiled stage k (0-based) on a pool of its inputs and their images' `valid` flags
        (`_finite_images`): `(score, prediction, stay, *state)` where `stay` are the pool rows
        that go on and `state` their carried tensors (`final`: everybody leaves here, no state).
        One trace per stage: unknown batch size."""
        key = (k, bool(final))
        steps = self._runtime.pool_steps
        if key not in steps:
            stage = self._runtime.stages[k]
            spec = [tf.TensorSpec((None,) + tuple(i.shape[1:]), i.dtype) for i in stage.inputs]
            spec.append(tf.TensorSpec((None,), tf.bool, name="valid"))

            def step(*args: Tensor) -> tuple[Tensor, ...]:
                state, valid = args[:-1], args[-1]
                with self._runtime.snapshot.active():
                    out = stage(list(state) if k else self._normalized(state[0]), training=False)
                score, pred = self._score(out[0], k, valid)
                if final:
                    return score, pred
                thresholds = tf.convert_to_tensor(self._thresholds.value)
                stay = tf.where(tf.logical_not(self._leaves(score, thresholds, k)))[:, 0]
                return (score, pred, stay, *self._rows(out[1:], stay, tf.equal(tf.size(stay), tf.size(score))))

            steps[key] = tf.function(step, input_signature=spec)
        return steps[key]

    def _predict_pooled(self, a: np.ndarray, batch_size: int, last: int) -> dict[str, np.ndarray]:
        """`predict(pooled=True)`: a queue of waiting samples per stage, each run at `batch_size`."""
        n = len(a)
        labels, exits, conf = np.zeros(n, np.int32), np.zeros(n, np.int32), np.zeros(n, np.float32)
        valid = np.ones(n, bool)  # `_finite_images` of each input, set as its batch enters stage 1
        queues: list[list[tuple[np.ndarray, list[Tensor]]]] = [
            [] for _ in range(last)
        ]  # per stage: chunks of (input positions, [state tensors])

        def waiting(k: int) -> int:
            return sum(len(pos) for pos, _ in queues[k])

        def take(k: int) -> tuple[np.ndarray, list[Tensor]]:
            """Every waiting sample of stage k, as one pool. Chunks are never split: slicing
            each of RANet's up to 25 carried tensors eagerly cost more than the pooling saved."""
            chunks, queues[k] = queues[k], []
            if len(chunks) == 1:
                return chunks[0]
            return (
                np.concatenate([pos for pos, _ in chunks]),
                [tf.concat(parts, 0) for parts in zip(*[state for _, state in chunks])],
            )

        def run(k: int, pos: np.ndarray, state: list[Tensor]) -> None:
            final = k == last - 1
            out = self._pool_step(k, final)(*state, tf.constant(valid[pos]))
            score, pred = out[0].numpy(), out[1].numpy()
            leave = np.ones(len(pos), bool)
            if not final:
                stay = out[2].numpy()
                leave[stay] = False
                if len(stay):
                    queues[k + 1].append((pos[stay], list(out[3:])))
            gone = pos[leave]
            labels[gone], exits[gone], conf[gone] = pred[leave], k + 1, score[leave]

        def drain(flush: bool) -> None:
            for k in range(1, last):
                if waiting(k) >= batch_size or (flush and waiting(k)):
                    run(k, *take(k))

        for start in range(0, n, batch_size):
            batch = tf.constant(a[start : start + batch_size], tf.float32)
            pos = np.arange(start, min(start + batch_size, n))
            valid[pos] = self._finite_images(batch).numpy()
            run(0, pos, [batch])
            drain(flush=False)
        drain(flush=True)
        return {"label": labels, "exit": exits, "confidence": conf}

    def expected_costs(self, exits: npt.ArrayLike) -> np.ndarray:
        """Mul-Adds per sample of 1-based exit indices (`costs[exit - 1]`)."""
        return self.costs[np.asarray(exits) - 1]

    # ------------------------------------------------------------------ saving

    def get_config(self) -> dict[str, Any]:
        config = {
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "thresholds": [_json_float(t) for t in self.thresholds],
            "costs": self.costs.tolist(),
            "kind": self.kind,
            "temperature": self.temperature.tolist(),
            "budget": self.budget,
            "sweep": None if self.sweep is None else _json_sweep(self.sweep),
            "num_val": None if self._val_scores is None else int(self._val_scores.shape[1]),
            "preprocessing": None if self.preprocessing is None else self.preprocessing.to_dict(),
            "name": self.name,
        }
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any], custom_objects: dict[str, Any] | None = None) -> EarlyExitModel:
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(config.pop("backbone"), custom_objects=custom_objects)
        num_val = config.pop("num_val", None)
        thresholds = [_from_json_float(t) for t in config.pop("thresholds")]
        sweep = config.pop("sweep", None)
        if sweep is not None:
            sweep = dict(sweep, thresholds=[[_from_json_float(t) for t in row] for row in sweep["thresholds"]])
        val_scores = None if num_val is None else np.zeros((len(thresholds), int(num_val)), np.float32)
        return cls(backbone, thresholds=thresholds, sweep=sweep, val_scores=val_scores, **config)

    def save(self, filepath: StrPath, overwrite: bool = True, **kwargs: Any) -> Path:
        """Saves to a `.keras` file atomically (thresholds, score, temperature, costs, budget,
        sweep and validation scores included); `keras.saving.load_model` or `load` reads it."""
        path = Path(filepath)
        if path.suffix != ".keras":
            raise ValueError(f"EarlyExitModel.save writes a .keras file; received {str(path)!r}.")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists (pass overwrite=True to replace it).")
        with atomic_path(path) as tmp:
            super().save(tmp, **kwargs)
        return path

    def export(self, filepath: StrPath, overwrite: bool = False) -> Path:
        """Writes a TensorFlow SavedModel whose signatures do the early exit (no keras_ee needed).

        Signatures: `serving_default` / `serve(images)` and `anytime(images, deadline)`,
        `images` float32 `(None, H, W, C)` (raw pixels as the dataset stores them when the
        model has a `preprocessing`: the SavedModel normalises them), `deadline` int32
        scalar; both return the dict `label`, `exit`, `confidence`. Load with
        `tf.saved_model.load(path)`.

        Nothing keras-ee did not write is deleted. The SavedModel is written to a hidden
        sibling folder, then renamed into place; a folder that already exists keeps every
        entry but the SavedModel's own (`SAVED_MODEL_ENTRIES`: saved_model.pb, variables/,
        assets/, fingerprint.pb and keras-ee's mark `.keras-ee.json`). A new or empty folder or
        a previous export is written; a folder holding other files is refused unless
        `overwrite=True`.

        Raises:
            ValueError: `filepath` is a file (or lies under one).
            keras_ee.atomic.ForeignFolderError: (a `FileExistsError`) a folder with other
                files, without `overwrite=True`; nothing is written.
            keras_ee.atomic.WriteError: the disk is full or read-only; it names `filepath`,
                and a previous export there is left intact.
        """
        from keras_ee import atomic

        path = atomic.check_out_folder(
            filepath,
            what=None,
            recognise=_is_saved_model,
            overwrite=overwrite,
            hint="pass overwrite=True to write the SavedModel into it (only "
            f"{', '.join(SAVED_MODEL_ENTRIES)} are replaced; every other file stays).",
        )
        spec = tf.TensorSpec((None,) + self.input_shape_hw, tf.float32, name="images")
        self.refresh()
        archive = keras.export.ExportArchive()
        archive.track(self)
        archive.track(self._runtime.snapshot.module)
        archive.add_endpoint("serve", lambda images: self.early_exit(images), input_signature=[spec])
        archive.add_endpoint(
            "anytime",
            lambda images, deadline: self.early_exit(images, deadline),
            input_signature=[spec, tf.TensorSpec((), tf.int32, name="deadline")],
        )
        with atomic.writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_folder(path, SAVED_MODEL_ENTRIES, "savedmodel", first="saved_model.pb") as tmp:
            archive.write_out(str(tmp), verbose=False)
        return path


# What `export` writes into its folder, and so the only entries it replaces there.
SAVED_MODEL_ENTRIES = ("saved_model.pb", "variables", "assets", "fingerprint.pb", MARKER)


def _is_saved_model(path: StrPath) -> bool:
    """A SavedModel folder holding nothing else (one exported before keras-ee marked its exports)."""
    names = {e.name for e in Path(path).iterdir()}
    return "saved_model.pb" in names and names <= set(SAVED_MODEL_ENTRIES)


def _json_float(x: float) -> float | str:
    x = float(x)
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _from_json_float(x: float | str) -> float:
    return float(x)


def _json_sweep(sweep: dict[str, Any]) -> dict[str, Any]:
    out = dict(sweep)
    out["thresholds"] = [[_json_float(t) for t in row] for row in sweep["thresholds"]]
    for key in ("solved_q",):
        if key in out:
            out[key] = _json_float(out[key])
    return out
