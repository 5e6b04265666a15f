"""L2W + IMTA: meta-learned sample weights in both of IMTA's phases.

"Learning to Weight Samples for Dynamic Early-exiting Networks" (Han et al., ECCV 2022,
arXiv:2209.08310), Table 1's L2W+IMTA, on "Improved Techniques for Training Adaptive Deep
Networks" (Li et al., ICCV 2019, arXiv:1908.06294). No public code combines them; the L2W
paper says only that "the meta-learning procedure runs in both phases". Our reading:

- Phase I: L2W exactly (half-batch exchange, look-ahead, q-allocated meta loss), on the
  IMTA network with gradient equilibrium (the gradient scales are part of the network, so
  the look-ahead step sees them too).
- Phase II: the same L2W step over the phase-II parameters (the classifiers and the
  inline-collaboration paths; the frozen network is fixed, so the look-ahead is cheap).
  The weights scale each exit's whole training term, `w[i, k] * ((1 - g) CE + g T^2 KL)`
  for k < K and `w[i, K] * CE_K`; the weight network's inputs stay the cross-entropies
  (and confidences) it learned from in phase I, and the meta loss stays L2W's CE on the
  meta half. The WPN keeps training; its Adam restarts its decay with phase II's schedule,
  as the main optimizer does.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

import keras

from keras_ee._typing import Tensor
from keras_ee.training import core
from keras_ee.training.imta import IMTA
from keras_ee.training.l2w import L2W
from keras_ee.training.registry import SearchRange, register_method

if TYPE_CHECKING:
    from keras_ee.training.model import MultiExitModel


@register_method(
    "l2w_imta",
    summary="L2W's meta-learned sample weights in both IMTA phases (GE, then ISC + OFA on the frozen network)",
    paper="Learning to Weight Samples for Dynamic Early-exiting Networks (Han et al., ECCV 2022, "
    "arXiv:2209.08310), Table 1; IMTA (Li et al., ICCV 2019, arXiv:1908.06294)",
    search_space={"q": SearchRange(0.5, 1.0), "delta": SearchRange(0.1, 1.0)},
    reference_note="none public combines them: reference=code takes IMTA's code settings (L2W's code departs "
    "in no option)",
)
@keras.saving.register_keras_serializable(package="keras_ee")
class L2WIMTA(IMTA, L2W):
    """L2W's training step on IMTA's network and phases.

    Options: every option of `IMTA` and of `L2W` (see both), with their defaults.

    Example:
    >>> model = MultiExitModel(models.create("msdnet_cifar_7"), method=L2WIMTA(q=0.75, delta=0.8))
    """

    # L2W's step (two real optimizer steps per loaded batch), IMTA's network and phases.
    train_step = L2W.train_step

    def loss_terms(self, model: "MultiExitModel", x: Tensor) -> Callable[[Tensor, list[Tensor]], Tensor] | None:
        if self.current_phase == 0 or not self.distillation:
            return None
        teacher = self._teacher_for(model, x)
        return lambda ce, logits: self.exit_terms(ce, logits, teacher)

    def _teacher_for(self, model: "MultiExitModel", x: Tensor) -> Tensor:
        # The frozen network's last pooled feature for `x`: a forward whose BatchNorm
        # statistics updates are discarded (the step's own forward makes them).
        k = model.num_exits
        backbone = model.backbone
        _, _, named = core.stateless_forward(
            backbone,
            [v.value for v in backbone.trainable_variables],
            x,
            training=True,
            return_tensors=[f"exit_{k}_features"],
        )
        return self.teacher_logits(named[f"exit_{k}_features"])
