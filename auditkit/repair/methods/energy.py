"""Energy, the model-guidance loss (Rao et al. 2023, arXiv:2303.11932, Eq. 6): −EPG = −Σ M·A⁺ / Σ A⁺ for the true
class's input × gradient map, where M marks the *object*; averaged over the batch. Double backward.
Masks that mark the artefact are turned into their complement first (``SPEC.complement_sound``).

Multilabel models (K sigmoids, labels (N, K)): as Rao et al. do on multi-label PASCAL VOC, one map per
positive finding (the input x gradient of its logit z_k), the loss the mean −EPG over the (image,
finding) pairs whose finding is present; images without a finding add nothing. One input gradient per
finding present in the batch (K at most)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...training import Objective
from ...training.losses import multilabel_targets
from ._input_gradient import forward_with_input_gradient
from .base import MethodSpec


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample EPG (Rao et al. 2023, Eq. 2): sum(M A+) / sum(A+); 0 where a map has no positive part."""
    positive = maps.clamp_min(0).flatten(1)
    inside = (positive * masks.flatten(1)).sum(1)
    return inside / positive.sum(1).clamp_min(1e-12)


@dataclass
class EnergyObjective(Objective):
    name = "energy"

    def forward_and_loss(self, model, batch):
        if multilabel_targets(batch.labels):
            return self._per_finding(model, batch)
        # Input x gradient of the true class's logit (Rao et al. 2023 use IxG for their B-cos-free models).
        images, logits, grad = forward_with_input_gradient(model, batch.images,
                                                           lambda out: out.gather(1, batch.labels[:, None]))
        maps = (images * grad).sum(dim=1)
        return logits, -energy_in_mask(maps, batch.masks[:, 0]).mean()

    def _per_finding(self, model, batch):
        """-EPG averaged over the (image, finding) pairs with the finding present (module docstring)."""
        images = batch.images.detach().requires_grad_(True)
        logits = model(images)
        positive = batch.labels > 0.5
        total, pairs = logits.new_zeros(()), int(positive.sum())
        for k in torch.nonzero(positive.any(0)).flatten().tolist():
            rows = positive[:, k]
            # Images without finding k get zero weight: their maps do not enter the loss.
            (grad,) = torch.autograd.grad((logits[:, k] * rows).sum(), images, create_graph=True)
            maps = (images * grad).sum(dim=1)
            total = total - energy_in_mask(maps[rows], batch.masks[rows, 0]).sum()
        return logits, total / max(pairs, 1)


SPEC = MethodSpec(
    name="energy",
    rank=2,
    auto_rank=3,
    summary="maximise the share of positive input x gradient inside the object mask (Rao et al. 2023, Eq. 6)",
    masks="object",
    teacher="annotates",
    default_lambda=1.0,
    sweep=(0.1, 1.0, 10.0),
    training={"epochs": 3, "grad_clip": 1.0, "schedule": "constant"},
    build=lambda model, options, teacher: EnergyObjective(),
    # The repair turns artefact masks into their complement before training (repair/runner.py).
    complement_sound="the share of attribution off the artefact: everything but the artefact may be used",
    doc="docs/methods/energy.md",
)
