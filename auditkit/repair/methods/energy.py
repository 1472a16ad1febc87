"""Energy, the model-guidance loss (seed 003 Eq. 6): −EPG = −Σ M·A⁺ / Σ A⁺ for the true class's
input × gradient map, where M marks the *object*; averaged over the batch. Double backward.
Masks that mark the artefact (spurious) are turned into their complement first."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...data import AuditDataset, to_uint8
from ...data.dataset import Record
from ...training import Objective
from ._input_gradient import forward_with_input_gradient
from .base import MethodSpec


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample EPG (seed 003 Eq. 2): sum(M A+) / sum(A+); 0 where a map has no positive part."""
    positive = maps.clamp_min(0).flatten(1)
    inside = (positive * masks.flatten(1)).sum(1)
    return inside / positive.sum(1).clamp_min(1e-12)


@dataclass
class EnergyObjective(Objective):
    name = "energy"

    def forward_and_loss(self, model, batch):
        # Input x gradient of the true class's logit (seed 003 uses IxG for its B-cos-free models).
        images, logits, grad = forward_with_input_gradient(model, batch.images, lambda out: out.gather(1, batch.labels[:, None]))
        maps = (images * grad).sum(dim=1)
        return logits, -energy_in_mask(maps, batch.masks[:, 0]).mean()


def with_object_masks(dataset: AuditDataset) -> AuditDataset:
    """The dataset with each mask replaced by its complement (spurious -> object)."""
    records = []
    for r in dataset.records:
        mask = r.mask
        if mask is not None:
            pixels = dataset._read_mask(r, dataset._read_pixels(r).shape[:2])
            mask = to_uint8(1.0 - pixels)
        records.append(Record(r.image, r.label, mask, r.variant, r.group, r.split))
    return AuditDataset(records, dataset.info, channels=dataset.channels, image_size=dataset.image_size)


def prepare_data(model, train: AuditDataset, options, mask_meaning: str, batch_size: int, device, show_progress: bool):
    return with_object_masks(train) if mask_meaning == "spurious" else train


SPEC = MethodSpec(
    name="energy",
    summary="maximise the share of positive input x gradient inside the object mask (seed 003 Eq. 6)",
    masks="object",
    teacher="annotates",
    default_lambda=1.0,
    sweep=(0.1, 1.0, 10.0),
    training={"epochs": 3, "grad_clip": 1.0, "schedule": "constant"},
    build=lambda model, options, teacher: EnergyObjective(),
    prepare_data=prepare_data,
    doc="docs/methods/energy.md",
)
