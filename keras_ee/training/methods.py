"""Training methods: the pluggable part of `MultiExitModel`.

A `Method` decides how a loaded batch turns into parameter updates. The
model owns the backbone, the optimizer and the per-exit metrics; the method
owns its own state (e.g. L2W's weight prediction network and its optimizer),
which is tracked as part of the model so that `.keras` saving and
`keras.callbacks.BackupAndRestore` restore it.

Hooks (override what the method needs):

- `transform_backbone(backbone)`: a new functional backbone built from the
  given one, before `MultiExitModel` wraps it (IMTA's inline collaboration
  adds classifiers fed by the previous exit's logits; gating reads each
  exit's features). Saved models hold the transformed backbone.
- `setup(model)`: create the method's variables once the backbone is known.
- `check_optimizer(optimizer)`: reject optimizers the method cannot use.
- `compute_loss(model, y, logits, ce, sample_weight)`: the training loss
  of one forward pass; the default `train_step` (one forward, one backward,
  one optimizer step) uses it. IMTA's self-distillation fits here (extra
  loss terms with a detached teacher).
- `train_step(model, data)`: a whole step, for methods that need more
  (L2W's half-batch exchange and look-ahead; HDKD's bilevel gamma update;
  budget-aware gating's alternating gater update). The building blocks live
  in `keras_ee.training.core` and `keras_ee.training.bilevel`; the real
  optimizer step is `model.apply_step(grads, per_exit_loss)` (gradients of
  `model.scale_loss(loss)`: over the replicas, times the loss scale), which
  also checks for NaN/inf; each real step runs inside `model.skippable_step`, so
  that a step skipped for a loss-scale overflow changes nothing. Forward
  passes with substituted parameters that also return named intermediate
  tensors (an exit's pooled feature): `core.stateless_forward(...,
  return_tensors=[...])`.
- `uses_meta_stream = True`: each step also gets a held-out batch
  (`train_step(model, data, meta_batch)`), by default from the calibration
  hold-out (`keras_ee.data.DatasetSplits.meta_dataset`).
- `test_loss(model, y, logits, ce)`: the loss reported by `evaluate`.
- `step_logs(model)`: the dict of logs returned after a step.
- `callbacks()`: Keras callbacks the method needs during `fit` (added by
  `keras-ee train`; users of plain `model.fit` add them themselves).
- `save_artifacts(model, splits, folder)`: the method's own files in the run
  folder (a `keras_ee.run_folder.RunFolder`) after training (L2W: `wpn.npz`,
  `l2w_samples.npz`), written with `keras_ee.atomic`.
- `phases(epochs)` and `enter_phase(model, index, fresh)`: training in
  several phases (IMTA: phase I trains everything, phase II freezes it and
  trains new classifiers). `phases` lists `Phase`s (name, epochs, optimizer
  settings); `enter_phase` configures the model for one of them (which layers
  train, the mode of frozen BatchNorm, what the loss is). `keras-ee train`
  runs every phase, each with its own optimizer and learning-rate schedule
  over the phase's steps, shows the phase in its progress, and resumes an
  interrupted run inside the right phase. With plain `model.fit`, use
  `keras_ee.training.fit_phases`, or per phase: `model.enter_phase(i)`,
  `model.compile(optimizer=...)` (a new optimizer: the trainable set
  changed), `model.fit(..., epochs=phase.epochs)`.

A method file registers its class with `keras_ee.training.register_method`
(name, one-line summary, paper, search space); see
`keras_ee.training.registry`.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_ee import validation as v
from keras_ee._typing import Tensor
from keras_ee.training import core
from keras_ee.training.registry import register_method

if TYPE_CHECKING:
    from keras_ee.data import DatasetSplits
    from keras_ee.run_folder import RunFolder
    from keras_ee.training.model import MultiExitModel


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase of a method's training (see `Method.phases`).

    Attributes:
        name: a short name shown in progress output (e.g. "phase_2").
        epochs: the phase's epochs (>= 1).
        optimizer_options: overrides of the run's SGD settings for this phase
            (`momentum`, `nesterov`, `weight_decay`, `learning_rate`), e.g. IMTA's
            `{"nesterov": True}`.
        make_optimizer: optional `fn(total_steps) -> keras optimizer` that replaces
            the run's optimizer for this phase entirely (`total_steps`: the phase's
            optimizer steps, for a schedule).
    """

    name: str
    epochs: int
    optimizer_options: dict = dataclasses.field(default_factory=dict)
    make_optimizer: Callable | None = None

    def __post_init__(self) -> None:
        v.check_int("epochs", self.epochs, 1, where=f"phase {self.name!r}: ")
        unknown = sorted(set(self.optimizer_options) - {"momentum", "nesterov", "weight_decay", "learning_rate"})
        if unknown:
            raise ValueError(
                f"phase {self.name!r}: unknown optimizer options {unknown}; expected momentum, "
                "nesterov, weight_decay or learning_rate."
            )


def phase_of_epoch(phases: Sequence[Phase], epoch: int) -> int:
    """Index of the phase that epoch `epoch` (0-based, counted over all phases) belongs to."""
    end = 0
    for i, phase in enumerate(phases):
        end += phase.epochs
        if epoch < end:
            return i
    return len(phases) - 1


def phase_starts(phases: Sequence[Phase]) -> tuple[list[int], int]:
    """First epoch (0-based, over all phases) of every phase, and the total epoch count."""
    starts: list[int] = []
    total = 0
    for phase in phases:
        starts.append(total)
        total += phase.epochs
    return starts, total


@keras.saving.register_keras_serializable(package="keras_ee")
class Method(keras.layers.Layer):
    """Base class of training methods for `MultiExitModel`.

    A method is a (non-trainable at the model level) Keras layer, so its
    variables are saved with the model. Subclasses override
    `compute_loss` (single forward/backward methods) or `train_step`.

    Args:
        **kwargs: standard `keras.layers.Layer` arguments (e.g. `name`).
    """

    # Real optimizer steps per loaded batch: learning-rate schedules count optimizer
    # iterations, so a run's total is epochs * batches * this. An instance may set its own
    # from its options (gating's `gater_update="exchange"`: 2).
    optimizer_steps_per_batch = 1
    # The fewest samples of a loaded batch that one replica (or the one device) can train on:
    # `keras-ee train` refuses a global batch that gives a replica fewer, and drops an epoch's
    # last batch when it is smaller (L2W's half-batch exchange: 2).
    min_batch_per_replica = 1
    # Whether each step also gets a batch of held-out data: then `train_step` is called
    # as `train_step(model, data, meta_batch=(x_meta, y_meta))` and the data fed to
    # `fit` is `((x, y), (x_meta, y_meta))` (`keras_ee.experiment.training_data`).
    uses_meta_stream = False
    # The registered name, set by `register_method`.
    method_name: ClassVar[str]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_exits: int = None  # type: ignore[assignment]  # K, set by `setup` (None before)
        self.current_phase = 0

    def phases(self, epochs: int) -> list[Phase]:
        """The method's training phases for a run of `epochs` (default: one phase).

        Args:
            epochs: the run's `epochs` setting (multi-phase methods document what it
                means for them; IMTA: phase I's epochs).

        Returns:
            A list of `Phase`s, run in order.
        """
        return [Phase("train", int(epochs))]

    def enter_phase(self, model: "MultiExitModel", index: int, fresh: bool = True) -> None:
        """Configure `model` for phase `index` (trainable layers, BatchNorm mode, loss).

        Must work from any current phase (a resumed run may go back to an earlier
        phase's backup). `fresh=True` when the phase starts now (a method may
        initialise what the phase trains, or take a snapshot of a teacher);
        `fresh=False` when a backup's weights are about to be loaded into it.
        The caller compiles the model with a new optimizer afterwards.
        """
        if index != 0:
            raise ValueError(f"{type(self).__name__} has one training phase; received phase index {index}.")
        self.current_phase = 0

    def transform_backbone(self, backbone: keras.Model) -> keras.Model:
        """The backbone this method trains, built from `backbone` (default: itself).

        Called by `MultiExitModel` before wrapping; must return a built
        functional `keras.Model` whose outputs are the exits' logits, and may
        reuse `backbone`'s layers (and so its weights).
        """
        return backbone

    def setup(self, model: "MultiExitModel") -> None:
        """Create the method's state; called once by `MultiExitModel`.

        Args:
            model: the `MultiExitModel` (its backbone is built, `num_exits`
                is known; the optimizer is not known yet).
        """
        self.num_exits = model.num_exits
        self.built = True

    def check_optimizer(self, optimizer: keras.optimizers.Optimizer) -> None:
        """Raise if `optimizer` cannot be used by this method."""

    def auxiliary_optimizers(self) -> list[keras.optimizers.Optimizer]:
        """The method's own optimizers (L2W's WPN Adam, the gater's, HDKD's gamma optimizer).

        Default: every `keras.optimizers.Optimizer` held as an attribute of the method. Their
        state belongs to the step they take: `MultiExitModel.skippable_step` restores it when
        the real step is skipped for a loss-scale overflow.
        """
        return [value for value in vars(self).values() if isinstance(value, keras.optimizers.Optimizer)]

    def metric_names(self) -> list[str]:
        """Names of the method's own per-step logs (besides the model's)."""
        return []

    def compute_loss(
        self, model: "MultiExitModel", y: Tensor, logits: list[Tensor], ce: Tensor, sample_weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Training loss of one forward pass.

        Args:
            model: the `MultiExitModel`.
            y: labels of the batch.
            logits: list of the exits' logits.
            ce: `(batch, K)` per-sample cross-entropies.
            sample_weight: optional `(batch,)` sample weights.

        Returns:
            `(total_loss, per_exit_loss)`: a scalar and a `(K,)` tensor whose
            sum is `total_loss` (used for logs and the non-finite check).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `compute_loss` or override `train_step`.")

    def test_loss(self, model: "MultiExitModel", y: Tensor, logits: list[Tensor], ce: Tensor) -> Tensor:
        """Loss reported by `evaluate`: sum of the exits' mean CE."""
        return ops.sum(ops.mean(ce, axis=0))

    def train_step(self, model: "MultiExitModel", data: Any) -> dict[str, Tensor]:
        """One forward, one backward, one optimizer step on the batch."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        model.skippable_step(lambda x, y, sw: self._single_step(model, x, y, sw), args=(x, y, sample_weight))
        return self.step_logs(model)

    def _single_step(self, model: "MultiExitModel", x: Tensor, y: Tensor, sample_weight: Tensor | None) -> None:
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            ce = core.per_exit_cross_entropy(y, logits)
            loss, per_exit = self.compute_loss(model, y, logits, ce, sample_weight)
            scaled = model.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        model.apply_step(grads, per_exit)
        model.update_step_metrics(loss, y, logits, ce)

    def step_logs(self, model: "MultiExitModel") -> dict[str, Tensor]:
        return model.model_logs()

    def callbacks(self) -> list[keras.callbacks.Callback]:
        """Keras callbacks this method needs during `fit` (default none)."""
        return []

    def save_artifacts(self, model: "MultiExitModel", splits: "DatasetSplits", folder: "RunFolder") -> None:
        """Write the method's own files into the run folder after training.

        Args:
            model: the trained `MultiExitModel`.
            splits: the run's `keras_ee.data.DatasetSplits`.
            folder: the run folder (`keras_ee.run_folder.RunFolder`: its file names, and
                `folder / name` as for a `pathlib.Path`); write with `keras_ee.atomic`.
        """

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        # `trainable` and `dtype` are managed by the model, not the user.
        config.pop("trainable", None)
        config.pop("dtype", None)
        return config


@register_method(
    "baseline",
    summary="sum of the exits' cross-entropies, optionally with fixed per-exit weights",
    paper="Multi-Scale Dense Networks for Resource Efficient Image Classification (Huang et al., ICLR 2018, "
    "arXiv:1703.09844)",
    option_types={"exit_weights": None},  # any JSON value (a list of K weights), as its default None says
    reference_code={},
    reference_note="kalviny/MSDNet-PyTorch and yangle15/RANet-pytorch train on the summed cross-entropy, as the papers",
)
@keras.saving.register_keras_serializable(package="keras_ee")
class Baseline(Method):
    """Sum of the exits' cross-entropies, with optional fixed exit weights.

    `loss = sum_k c_k * mean_i(sw_i * l[i, k])` with `c_k = exit_weights[k]`
    (all 1 by default) and sample weights `sw` (all 1 by default; Keras'
    "sum over batch size" convention).

    Args:
        exit_weights: optional sequence of K non-negative finite floats.
        **kwargs: standard layer arguments (e.g. `name`).

    Example:
    >>> model = MultiExitModel(backbone, method=Baseline())
    >>> model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9))
    """

    def __init__(self, exit_weights: Sequence[float] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if exit_weights is not None:
            if isinstance(exit_weights, (str, bytes)) or not hasattr(exit_weights, "__len__"):
                raise TypeError(f"`exit_weights` must be None or a sequence of floats; received {exit_weights!r}.")
            arr = np.asarray(exit_weights, dtype=np.float64)
            if arr.ndim != 1 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(
                    f"`exit_weights` must be a 1-D sequence of finite, non-negative floats; received {exit_weights!r}."
                )
            exit_weights = [float(v) for v in arr]
        self.exit_weights = exit_weights

    def setup(self, model: "MultiExitModel") -> None:
        if self.exit_weights is not None and len(self.exit_weights) != model.num_exits:
            raise ValueError(
                f"`exit_weights` has {len(self.exit_weights)} entries but the backbone has {model.num_exits} exits."
            )
        super().setup(model)

    def _coefficients(self, dtype: Any) -> Tensor:
        if self.exit_weights is None:
            return ops.ones((self.num_exits,), dtype=dtype)
        return ops.convert_to_tensor(self.exit_weights, dtype=dtype)

    def compute_loss(
        self, model: "MultiExitModel", y: Tensor, logits: list[Tensor], ce: Tensor, sample_weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        per_exit = core.sample_weighted_exit_losses(ce, sample_weight) * self._coefficients(ce.dtype)
        return ops.sum(per_exit), per_exit

    def test_loss(self, model: "MultiExitModel", y: Tensor, logits: list[Tensor], ce: Tensor) -> Tensor:
        return ops.sum(ops.mean(ce, axis=0) * self._coefficients(ce.dtype))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["exit_weights"] = self.exit_weights
        return config
