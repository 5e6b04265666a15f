"""IMTA: gradient equilibrium, inline subnetwork collaboration, one-for-all distillation.

"Improved Techniques for Training Adaptive Deep Networks", Li, Zhang, Qi, Huang, Yang and
Huang, ICCV 2019, arXiv:1908.06294.

How the model is built (`IMTA.transform_backbone`): every exit keeps its pooled feature
`exit_k_features` (width d). With inline collaboration, exit k > 1 classifies
`concat(feature_k, ISC(logits_{k-1}))` with `ISC = Dense(C -> d) + BatchNorm + ReLU`
(layers `exit_k_collab_dense`, `_bn`, `_relu`), i.e. its classifier `exit_k` is
`Dense(2d -> C)`; exit 1 keeps `Dense(d -> C)`. The transfer path ends in a
`CollaborationGate` (`exit_k_collab_gate`), closed in phase I: there the transfer
contributes exact zeros, the classifiers' transfer rows start at zero and get no gradient,
so phase I trains exactly the original network. The phase-I classifier of each exit is the
first d rows of its `Dense(2d -> C)`; phase II opens the gates and fine-tunes the
classifiers together with the transfer paths ("fine-tune only the last layer of each
classifier", the paper), or re-initialises them first (`phase2_init="random"`, as the
reference code builds new ones). The previous exit's logits cross the stage boundary
through a `stage_{k-1}_state_i` marker, so `keras_ee.costs.exit_costs` and
`keras_ee.models.split_stages` include the transfer paths: exit k pays for `C*d + d`
(transfer Dense) and `2d*C + C` (classifier) instead of `d*C + C`, plus the ReLU's d in the
reference rule. IMTA's Table 1 prints MSDNet's own costs for its IMTA models (params 0.30 ...
4.0 M, Mul-Adds 6.86 ... 137.3 M for the 7-exit CIFAR-100 model), i.e. it does not count
the transfer paths; ours are higher by exactly 25,856 Mul-Adds and 25,984 parameters per
exit after the first (C = 100, d = 128): msdnet_cifar_7's last exit costs 137.44 M Mul-Adds
and 4.12 M parameters instead of 137.28 M and 3.97 M.
"""

import typing
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_ee import validation as v
from keras_ee._typing import Tensor
from keras_ee.training import core
from keras_ee.training.methods import Method, Phase
from keras_ee.training.registry import SearchRange, register_method

if TYPE_CHECKING:
    from keras_ee.models import ExitStructure
    from keras_ee.training.model import MultiExitModel

_KL_REDUCTIONS = ("batchmean", "mean")
_FROZEN_BN = ("inference", "batch")
_PHASE2_INITS = ("phase1", "random")
_COLLAB = ("collab_dense", "collab_bn")


@keras.saving.register_keras_serializable(package="keras_ee")
class CollaborationGate(keras.layers.Layer):
    """Passes its input when open and exact zeros when closed (no gradient then).

    IMTA's inline-collaboration transfer path is closed in phase I and open in
    phase II. `open` is read when the layer is traced: re-trace after changing it
    (`MultiExitModel.enter_phase` does).

    Args:
        open: bool.
        **kwargs: standard layer arguments.
    """

    def __init__(self, open: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.open = bool(open)

    def call(self, inputs: Tensor) -> Tensor:
        return inputs if self.open else ops.zeros_like(inputs)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "open": self.open}


def distillation_terms(
    ce: Tensor,
    logits: list[Tensor],
    teacher_logits: Tensor,
    temperature: float,
    weight: float,
    reduction: str = "batchmean",
) -> Tensor:
    """One-for-all distillation per sample: `(1 - g) CE_i + g T^2 KL_i` for i < K, `CE_K`.

    `KL_i = sum_c p_t(c) log(p_t(c) / p_i(c))` with `p = softmax(logits / T)` and the
    teacher detached. `reduction="batchmean"` is the per-sample sum over classes (its batch
    mean is PyTorch's `batchmean`); `"mean"` also divides by the class count C, which is
    what the reference code's `KLDivLoss()` (element-wise mean) computes: its effective KD
    weight is `g / C` of the batchmean form (g = 0.9, C = 100: 0.009 x T^2 = 0.081).

    Returns:
        `(batch, K)` loss terms (their batch mean, summed over exits, is the loss).
    """
    t = float(temperature)
    teacher = ops.stop_gradient(ops.cast(teacher_logits, ce.dtype))
    log_pt = ops.log_softmax(teacher / t, axis=-1)
    pt = ops.exp(log_pt)
    columns = []
    k = len(logits)
    for i in range(k - 1):
        log_pi = ops.log_softmax(ops.cast(logits[i], ce.dtype) / t, axis=-1)
        kl = ops.sum(pt * (log_pt - log_pi), axis=-1)
        if reduction == "mean":
            kl = kl / ops.cast(ops.shape(log_pi)[-1], ce.dtype)
        columns.append((1.0 - weight) * ce[:, i] + weight * t * t * kl)
    columns.append(ce[:, k - 1])
    return ops.stack(columns, axis=1)


@register_method(
    "imta",
    summary="gradient equilibrium (phase I), then inline collaboration + one-for-all distillation on "
    "new classifiers over the frozen network (phase II)",
    paper="Improved Techniques for Training Adaptive Deep Networks (Li et al., ICCV 2019, arXiv:1908.06294)",
    search_space={"temperature": SearchRange(1.0, 5.0), "distill_weight": SearchRange(0.1, 0.95)},
    option_types={
        "kl_reduction": typing.Literal[_KL_REDUCTIONS],
        "frozen_batchnorm": typing.Literal[_FROZEN_BN],
        "phase2_init": typing.Literal[_PHASE2_INITS],
    },
    reference_code={
        "kl_reduction": "mean",
        "detach_transfer": False,
        "frozen_batchnorm": "batch",
        "nesterov": False,
        "phase2_init": "random",
    },
    reference_note="kalviny/IMTA: main_IMTA.py (KLDivLoss() element-wise mean, model.train() on the frozen "
    "network, SGD without Nesterov, new nn.Linear classifiers), models/msdnet_imta.py (no detach)",
)
@keras.saving.register_keras_serializable(package="keras_ee")
class IMTA(Method):
    """IMTA's three techniques and two phases, each technique switchable for the ablation.

    Phase I trains the whole network from scratch on the summed cross-entropy, with
    gradient equilibrium (GE) at each exit's branch point (`exit_k_branch` scaled by
    1/(K-k+1), `exit_k_trunk` by (K-k)/(K-k+1); in MSDNet the coarsest scale only, as the
    reference; in RANet and `attach_exits` models the exit's branch tensor). Phase II
    freezes that network and trains only the classifiers and the inline-collaboration
    (ISC) transfer paths, with one-for-all distillation (OFA) from the frozen phase-I last
    exit (a snapshot taken when phase II starts). Without ISC and OFA there is no phase II.

    `epochs` (the run's `--epochs`) is phase I; phase II lasts `phase2_epochs`, by default
    0.6 x phase I (the paper's 180/300), at least 1. Each phase gets a new SGD with its
    own schedule over the phase (the paper: lr 0.1, /10 at 50% and 75% of its epochs, per epoch as its
    code: `--schedule step_per_epoch`).

    Args:
        gradient_equilibrium: bool, GE in phase I (default True). False sets every
            branch/trunk scale to 1.
        inline_collaboration: bool, ISC transfer paths in phase II (default True).
        distillation: bool, OFA in phase II (default True).
        temperature: OFA's T (default 3, CIFAR).
        distill_weight: OFA's g in `(1 - g) CE + g T^2 KL` (default 0.9, CIFAR).
        kl_reduction: "batchmean" (default: KL summed over classes, averaged over the
            batch) or "mean" (the reference code's element-wise mean: KD weight g/C).
        detach_transfer: bool, stop the gradient of exit k's loss at exit k-1's logits
            (default True, the paper); False: the reference code, exit k's loss also
            trains exit k-1's classifier and transfer path.
        frozen_batchnorm: phase II's frozen BatchNorm: "inference" (default, Keras'
            `trainable=False`: moving statistics, not updated; the frozen network runs
            forward in inference mode and only the new parts run backward) or "batch"
            (the reference code: batch statistics, moving statistics keep updating).
        nesterov: bool, Nesterov momentum in both phases (default True, the paper; the
            reference code uses none). It decides for IMTA runs of `keras-ee train`, over
            the run's `--nesterov`.
        phase2_epochs: int or None (default: max(1, round(0.6 * epochs))).
        phase2_init: "phase1" (default: phase II starts from the phase-I classifiers, the
            transfer rows at zero) or "random" (new classifiers, as the reference code).
        transfer_widths: None (default: each exit's transfer path is as wide as its pooled
            feature d, which is the reference's d = 128 on CIFAR and its ImageNet step-4
            list [384, 384, 352, 304, 560]) or one width per exit. The reference's
            ImageNet lists for steps 6 and 7 ([512, 544, 496, 880, 792], [576, 640, 608,
            528, 976]) differ from the pooled features of our msdnet_imagenet_s6/s7 (which
            match MSDNet's published costs: [384, 448, 448, 416, 800], [384, 480, 496,
            472, 920]); pass them here to use them as the transfer widths.
        **kwargs: standard layer arguments.

    Example:
    >>> model = MultiExitModel(models.create("msdnet_cifar_5"), method=IMTA())
    >>> fit_phases(model, train_ds, epochs=300,
    ...            make_optimizer=lambda phase, i: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True))
    """

    # The transfer paths' BatchNorm normalises flat features over the batch alone: a batch of one
    # has no unbiased variance (PyTorch refuses it too), so an epoch drops a last batch of 1.
    min_batch_per_replica = 2

    def __init__(
        self,
        gradient_equilibrium: bool = True,
        inline_collaboration: bool = True,
        distillation: bool = True,
        temperature: float = 3.0,
        distill_weight: float = 0.9,
        kl_reduction: str = "batchmean",
        detach_transfer: bool = True,
        frozen_batchnorm: str = "inference",
        nesterov: bool = True,
        phase2_epochs: int | None = None,
        phase2_init: str = "phase1",
        transfer_widths: list | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (
            ("gradient_equilibrium", gradient_equilibrium),
            ("inline_collaboration", inline_collaboration),
            ("distillation", distillation),
            ("detach_transfer", detach_transfer),
            ("nesterov", nesterov),
        ):
            v.check_bool(name, value)
        for name, choice, allowed in (
            ("kl_reduction", kl_reduction, _KL_REDUCTIONS),
            ("frozen_batchnorm", frozen_batchnorm, _FROZEN_BN),
            ("phase2_init", phase2_init, _PHASE2_INITS),
        ):
            v.check_choice(name, choice, allowed)
        v.check_number("temperature", temperature, low=0.0, low_open=True)
        v.check_number("distill_weight", distill_weight, low=0.0, high=1.0)
        if phase2_epochs is not None:
            v.check_int("phase2_epochs", phase2_epochs, 1)
        self.gradient_equilibrium = bool(gradient_equilibrium)
        self.inline_collaboration = bool(inline_collaboration)
        self.distillation = bool(distillation)
        self.temperature = float(temperature)
        self.distill_weight = float(distill_weight)
        self.kl_reduction = kl_reduction
        self.detach_transfer = bool(detach_transfer)
        self.frozen_batchnorm = frozen_batchnorm
        self.nesterov = bool(nesterov)
        self.phase2_epochs = phase2_epochs
        self.phase2_init = phase2_init
        if transfer_widths is not None:  # one per exit: checked against the model in `setup`
            transfer_widths = list(v.check_int_tuple("transfer_widths", transfer_widths, 1))
        self.transfer_widths = transfer_widths

    @property
    def has_phase2(self) -> bool:
        return self.inline_collaboration or self.distillation

    # --- the model ---------------------------------------------------------------

    def transform_backbone(self, backbone: keras.Model) -> keras.Model:
        """The backbone with ISC transfer paths (closed until phase II) before every exit k > 1."""
        from keras_ee import models
        from keras_ee.models import blocks

        structure = _structure(backbone)
        if not self.inline_collaboration:
            return backbone
        if self.transfer_widths is not None and len(self.transfer_widths) != structure.num_exits:
            raise ValueError(
                f"`transfer_widths` has {len(self.transfer_widths)} entries but the backbone has "
                f"{structure.num_exits} exits."
            )
        # The transfer paths' BatchNorm as the backbone's (synchronized, moving variance update).
        unit_options = blocks.UnitOptions.of(backbone)
        outputs = []
        for k in range(1, structure.num_exits + 1):
            old = structure.logits[k - 1]
            features = structure.features[k - 1].output
            if k == 1:
                outputs.append(old(features))
                continue
            d, c = int(features.shape[-1]), int(old.units)
            width = d if self.transfer_widths is None else self.transfer_widths[k - 1]
            state_index = len(structure.stage_states[k - 2])
            prev = keras.layers.Identity(name=f"stage_{k - 1}_state_{state_index}")(outputs[-1])
            prev = models.GradientScale(0.0 if self.detach_transfer else 1.0, name=f"exit_{k}_collab_detach")(prev)
            t = keras.layers.Dense(
                width,
                kernel_initializer=blocks.torch_default_init(),
                bias_initializer=blocks.torch_default_bias_init(c),
                name=f"exit_{k}_collab_dense",
            )(prev)
            t = blocks.batch_normalization(f"exit_{k}_collab_bn", unit_options)(t)
            t = keras.layers.ReLU(name=f"exit_{k}_collab_relu")(t)
            t = CollaborationGate(False, name=f"exit_{k}_collab_gate")(t)
            joint = keras.layers.Concatenate(name=f"exit_{k}_collab_concat")([features, t])
            new = keras.layers.Dense(
                c,
                kernel_initializer=blocks.torch_default_init(),
                bias_initializer=blocks.torch_default_bias_init(d + width),
                name=f"exit_{k}",
            )
            outputs.append(new(joint))
            # Phase I is the original network: its classifier in the first d rows, zeros below.
            kernel, bias = old.get_weights()
            new.set_weights([np.concatenate([kernel, np.zeros((width, c), kernel.dtype)]), bias])
        return keras.Model(core.model_inputs(backbone), outputs, name=backbone.name)

    def setup(self, model: "MultiExitModel") -> None:
        super().setup(model)
        structure = _structure(model.backbone)
        self.num_exits = structure.num_exits
        if self.distillation:
            d = int(structure.features[-1].output.shape[-1])
            c = model.num_classes
            self.teacher_kernel = self.add_weight(
                shape=(d, c), initializer="zeros", trainable=False, name="teacher_kernel"
            )
            self.teacher_bias = self.add_weight(shape=(c,), initializer="zeros", trainable=False, name="teacher_bias")
        # Variables that are not trainable by nature (BatchNorm statistics); phase II in
        # "batch" mode freezes the others by their own flag, which is not saved.
        self._statistics = frozenset(id(v) for v in model.backbone.weights if not v.trainable)
        self.enter_phase(model, self.current_phase, fresh=False)
        self.built = True

    def phases(self, epochs: int) -> list[Phase]:
        opts = {"nesterov": self.nesterov}
        first = Phase("phase_1", int(epochs), opts)
        if not self.has_phase2:
            return [first]
        second = self.phase2_epochs if self.phase2_epochs is not None else max(1, int(round(0.6 * epochs)))
        return [first, Phase("phase_2", int(second), opts)]

    def enter_phase(self, model: "MultiExitModel", index: int, fresh: bool = True) -> None:
        if index not in range(len(self.phases(1))):
            raise ValueError(
                f"IMTA with these options has {len(self.phases(1))} phase(s); received phase index {index}."
            )
        backbone = model.backbone
        structure = _structure(backbone)
        k_total = structure.num_exits
        for k in range(1, k_total + 1):
            branch, trunk = structure.branch[k - 1], structure.trunk[k - 1]
            remaining = k_total - k + 1
            if branch is not None:
                branch.scale = 1.0 / remaining if self.gradient_equilibrium else 1.0
            if trunk is not None:
                trunk.scale = (remaining - 1) / remaining if self.gradient_equilibrium else 1.0
        heads = self._phase2_layer_names(k_total)
        collab = {f"exit_{k}_{part}" for k in range(2, k_total + 1) for part in _COLLAB}
        for layer in backbone.layers:
            if isinstance(layer, CollaborationGate):
                layer.open = index == 1
            if not layer.weights:
                continue
            if index == 0:
                # Everything trains but the transfer paths (their gate is closed).
                trains = layer.name not in collab
                self._set_trainable(layer, trains, trains)
            elif layer.name in heads:
                self._set_trainable(layer, True, True)
            elif self.frozen_batchnorm == "inference":
                self._set_trainable(layer, False, False)
            else:  # "batch": training-mode BatchNorm (batch statistics), weights fixed
                self._set_trainable(layer, True, False)
        if index == 1 and fresh:
            self._start_phase2(model, structure)
        self.current_phase = index

    def _set_trainable(self, layer: keras.layers.Layer, layer_trainable: bool, weights_trainable: bool) -> None:
        # Keras 3: `layer.trainable` sets its variables' own flags, and a layer's
        # trainable variables are those whose flag is set; BatchNorm runs in training
        # mode only in a trainable layer. So "frozen, batch statistics" is a trainable
        # layer whose variables are not.
        layer.trainable = layer_trainable
        for weight in layer.weights:
            weight.trainable = weights_trainable and id(weight) not in self._statistics

    def _phase2_layer_names(self, k_total: int) -> set[str]:
        names = {f"exit_{k}" for k in range(1, k_total + 1)}
        if self.inline_collaboration:
            names |= {f"exit_{k}_{part}" for k in range(2, k_total + 1) for part in _COLLAB}
        return names

    def _start_phase2(self, model: "MultiExitModel", structure: "ExitStructure") -> None:
        """Snapshot the phase-I last exit as the teacher; re-initialise the heads if asked."""
        last = model.backbone.get_layer(f"exit_{structure.num_exits}")
        if self.distillation:
            d = self.teacher_kernel.shape[0]
            self.teacher_kernel.assign(last.kernel[:d])
            self.teacher_bias.assign(last.bias)
        if self.phase2_init == "random":
            for name in sorted(self._phase2_layer_names(structure.num_exits)):
                layer = model.backbone.get_layer(name)
                if isinstance(layer, keras.layers.Dense):
                    layer.kernel.assign(layer.kernel_initializer(layer.kernel.shape, layer.kernel.dtype))
                    layer.bias.assign(layer.bias_initializer(layer.bias.shape, layer.bias.dtype))

    # --- losses and steps -------------------------------------------------------

    def teacher_logits(self, features: Tensor) -> Tensor:
        """The frozen phase-I last exit on its pooled feature (detached)."""
        kernel = ops.cast(self.teacher_kernel, features.dtype)
        return ops.stop_gradient(ops.matmul(features, kernel) + ops.cast(self.teacher_bias, features.dtype))

    def exit_terms(self, ce: Tensor, logits: list[Tensor], teacher: Tensor | None) -> Tensor:
        """Per-sample, per-exit training terms `(batch, K)` of phase II (OFA, or CE without it)."""
        if not self.distillation:
            return ce
        return distillation_terms(ce, logits, teacher, self.temperature, self.distill_weight, self.kl_reduction)

    def compute_loss(
        self, model: "MultiExitModel", y: Tensor, logits: list[Tensor], ce: Tensor, sample_weight: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        per_exit = core.sample_weighted_exit_losses(ce, sample_weight)
        return ops.sum(per_exit), per_exit

    def train_step(self, model: "MultiExitModel", data: Any) -> dict[str, Tensor]:
        if self.current_phase == 0:
            return super().train_step(model, data)
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        model.skippable_step(lambda x, y, sw: self._phase2_step(model, x, y, sw), args=(x, y, sample_weight))
        return self.step_logs(model)

    def _phase2_step(self, model: "MultiExitModel", x: Tensor, y: Tensor, sample_weight: Tensor | None) -> None:
        k = model.num_exits
        probe = core.probe_model(model.backbone, (f"exit_{k}_features",))
        variables = model.trainable_variables
        with tf.GradientTape() as tape:
            *logits, features = probe(x, training=True)
            ce = core.per_exit_cross_entropy(y, logits)
            teacher = self.teacher_logits(features) if self.distillation else None
            per_exit = core.sample_weighted_exit_losses(self.exit_terms(ce, logits, teacher), sample_weight)
            loss = ops.sum(per_exit)
            scaled = model.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        model.apply_step(grads, per_exit)
        model.update_step_metrics(loss, y, logits, ce)

    # --- saving -----------------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            gradient_equilibrium=self.gradient_equilibrium,
            inline_collaboration=self.inline_collaboration,
            distillation=self.distillation,
            temperature=self.temperature,
            distill_weight=self.distill_weight,
            kl_reduction=self.kl_reduction,
            detach_transfer=self.detach_transfer,
            frozen_batchnorm=self.frozen_batchnorm,
            nesterov=self.nesterov,
            phase2_epochs=self.phase2_epochs,
            phase2_init=self.phase2_init,
            transfer_widths=self.transfer_widths,
            current_phase=self.current_phase,
        )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "IMTA":
        config = dict(config)
        phase = int(config.pop("current_phase", 0))
        method = cls(**config)
        method.current_phase = phase  # a saved phase-II model loads in phase II
        return method


def _structure(backbone: keras.Model) -> "ExitStructure":
    from keras_ee import models

    try:
        return models.exit_structure(backbone)
    except ValueError as e:
        raise ValueError(
            f"IMTA needs a keras-ee multi-exit backbone (models.create, a builder or attach_exits: named "
            f"exit_k, exit_k_features, branch/trunk and stage-marker layers); {e}"
        ) from None
