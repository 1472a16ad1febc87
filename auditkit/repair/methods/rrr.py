"""RRR, Right for the Right Reasons (Ross et al. 2017; TAP Eq. 4): the sum over pixels of
(M ⊙ Σ_k ∂ log p_k / ∂x)², the input gradient of the summed log-probabilities inside the mask
(channels summed first), averaged over the batch. Needs a double backward.

Multilabel models (K sigmoids, labels (N, K)): each finding is its own two-class problem, so the summed
log-probabilities are Σ_k [log σ(z_k) + log σ(−z_k)], exactly what the sum gives for a one-logit model
seen as two classes [−z/2, z/2] (models/outputs.py); every finding's input gradient is penalised."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from ...training import Objective
from ...training.losses import multilabel_targets
from ._input_gradient import forward_with_input_gradient
from .base import MethodSpec


def finding_log_probabilities(out):
    """Σ_k [log σ(z_k) + log σ(−z_k)] per image: each finding's two log-probabilities, summed."""
    return (F.logsigmoid(out) + F.logsigmoid(-out)).sum(dim=1)


@dataclass
class RrrObjective(Objective):
    name = "rrr"

    def forward_and_loss(self, model, batch):
        _, logits, grad = forward_with_input_gradient(
            model, batch.images, finding_log_probabilities if multilabel_targets(batch.labels)
            else lambda out: F.log_softmax(out, dim=1).sum(dim=1))
        return logits, ((batch.masks * grad.sum(dim=1, keepdim=True)) ** 2).sum(dim=(1, 2, 3)).mean()


SPEC = MethodSpec(
    name="rrr",
    rank=1,
    auto_rank=1,
    summary="penalise the input gradient of the log-probabilities inside the mask (Ross et al. 2017)",
    masks="spurious",
    teacher="annotates",
    default_lambda=1.0,
    sweep=(1e-3, 1e-2, 1e-1, 1.0, 10.0),
    # The double-backward losses need gradient clipping (unclipped steps blew up in measured runs).
    training={"epochs": 3, "grad_clip": 1.0, "schedule": "constant"},
    build=lambda model, options, teacher: RrrObjective(),
    # Object masks: the gradient outside the object is penalised, pixel by pixel (no downscaling to
    # dilate it): RRR* of model guidance (Rao et al. 2023, arXiv:2303.11932).
    complement_sound="the input gradient outside the object (Rao et al. 2023's RRR*)",
    doc="docs/methods/rrr.md",
)
