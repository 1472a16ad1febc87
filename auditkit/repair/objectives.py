"""Training objectives that repair a shortcut: loss = task loss + λ · explanation loss (TAP Eq. 3).

- TAP (TAP Eq. 7-8): the mean over targeted layers of the batch-mean penalty on activations in the
  downscaled mask, through the fused kernels. First-order only.
- RRR (Ross et al. 2017; TAP Eq. 4): sum over pixels of (M ⊙ Σ_k ∂ log p_k / ∂x)², the input
  gradient of the summed log-probabilities inside the mask (channels summed first), averaged over
  the batch. Needs a double backward.
- Energy (model guidance, seed 003 Eq. 6): −EPG = −Σ M·A⁺ / Σ A⁺ for the true class's input × gradient
  map, where M marks the *object*; averaged over the batch. Double backward.
- TEA (Bassi et al.; seed 004): the multi-resolution heat loss between the student's and the
  teacher's LRP-ε heatmaps, (1/S) Σ_m d(AvgPool_2^m(Hs), AvgPool_2^m(Ht)) with
  d(a, b) = ‖a − b‖₁ / sqrt(‖a‖₁ ‖b‖₁) per sample. The heatmap is differentiable through the LRP
  kernels' autograd formulas.

Each objective is a small class: ``loss(model, batch, logits, activations) -> tensor`` and the layers it
needs captured (TAP only). The task loss is added by the trainer with its own weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Batch
from ..explain import attribute
from ..ops import tap_loss


class Objective:
    """Base: no extra loss. ``layers``: modules whose outputs the trainer captures for ``loss``."""

    name = "plain"
    layers: tuple[str, ...] = ()
    task_weight: float = 1.0

    def loss(self, model: nn.Module, batch: Batch, logits: torch.Tensor, activations: list[torch.Tensor]) -> torch.Tensor:
        return logits.new_zeros(())


@dataclass
class TapObjective(Objective):
    layers: tuple[str, ...] = ()
    kernel_size: int = 3
    name = "tap"

    def loss(self, model, batch, logits, activations):
        return tap_loss(activations, batch.masks, self.kernel_size)


def input_gradients(model: nn.Module, images: torch.Tensor, scores) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, d scores(logits) / d images) with the graph kept for a second backward."""
    images = images.detach().requires_grad_(True)
    logits = model(images)
    (grad,) = torch.autograd.grad(scores(logits).sum(), images, create_graph=True)
    return logits, grad


@dataclass
class RrrObjective(Objective):
    name = "rrr"

    def loss(self, model, batch, logits, activations):
        # A fresh forward with the input as a leaf: RRR differentiates w.r.t. the pixels.
        _, grad = input_gradients(model, batch.images, lambda out: F.log_softmax(out, dim=1).sum(dim=1))
        return ((batch.masks * grad.sum(dim=1, keepdim=True)) ** 2).sum(dim=(1, 2, 3)).mean()


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample EPG (seed 003 Eq. 2): sum(M A+) / sum(A+); 0 where a map has no positive part."""
    positive = maps.clamp_min(0).flatten(1)
    inside = (positive * masks.flatten(1)).sum(1)
    return inside / positive.sum(1).clamp_min(1e-12)


@dataclass
class EnergyObjective(Objective):
    name = "energy"

    def loss(self, model, batch, logits, activations):
        targets = batch.labels
        maps = attribute(model, batch.images, targets, "input_x_gradient", create_graph=True)[:, 0]
        return -energy_in_mask(maps, batch.masks[:, 0]).mean()


def heat_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """d(Hs, Ht) = ||Hs - Ht||_1 / sqrt(||Hs||_1 ||Ht||_1) per sample (seed 004, Task 4 Part 11)."""
    s, t = student.flatten(1), teacher.flatten(1)
    scale = torch.sqrt(s.abs().sum(1) * t.abs().sum(1)).clamp_min(1e-12)
    return (s - t).abs().sum(1) / scale


def multiresolution_heat_loss(student: torch.Tensor, teacher: torch.Tensor, scales: int = 4) -> torch.Tensor:
    """(1/S) sum_m d(AvgPool(Hs; 2^m), AvgPool(Ht; 2^m)), averaged over the batch; maps (N, H, W).
    Scales stop where the map would be smaller than 1 pixel."""
    usable = max(1, min(scales, int(math.log2(min(student.shape[-2:]))) + 1))
    total = student.new_zeros(())
    for m in range(usable):
        k = 2**m
        s = F.avg_pool2d(student.unsqueeze(1), k) if k > 1 else student.unsqueeze(1)
        t = F.avg_pool2d(teacher.unsqueeze(1), k) if k > 1 else teacher.unsqueeze(1)
        total = total + heat_distance(s, t).mean()
    return total / usable


@dataclass
class TeaObjective(Objective):
    teacher: nn.Module | None = None
    epsilon: float = 0.01
    scales: int = 4
    explained_class: str = "teacher"  # "teacher": the teacher's prediction; "random": a random logit
    task_weight: float = 0.0  # TEA trains on explanations alone by default (FINDINGS: task loss brings the shortcut back)
    name = "tea"

    def loss(self, model, batch, logits, activations):
        with torch.no_grad():
            if self.explained_class == "teacher":
                targets = self.teacher(batch.images).argmax(1)
            else:
                targets = torch.randint(0, logits.shape[1], (len(batch.labels),), device=logits.device)
        teacher_maps = attribute(self.teacher, batch.images, targets, "lrp_epsilon", epsilon=self.epsilon)[:, 0]
        student_maps = attribute(model, batch.images, targets, "lrp_epsilon", epsilon=self.epsilon, create_graph=True)[:, 0]
        return multiresolution_heat_loss(student_maps, teacher_maps.detach(), self.scales)
