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
  d(a, b) = ‖a − b‖₁ / sqrt(‖a‖₁ ‖b‖₁) per sample, for the teacher's top K classes (their mean).
  The heatmap is differentiable through the LRP kernels' autograd formulas. Optionally plus
  distillation (Hinton et al. 2015): T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) on the same images,
  which gives the student the teacher's answers while the heat loss keeps it from reaching them
  through the shortcut (docs/methods/tea.md has the ablation).

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
from ..explain.lrp import lrp_epsilon_and_logits
from ..models import capture_activations
from ..ops import tap_loss


class Objective:
    """Base: no extra loss. ``forward_and_loss(model, batch) -> (logits, explanation loss)`` runs the
    model once: the trainer adds ``task_weight`` · CE(logits) and λ · the explanation loss.
    ``layers``: modules whose outputs ``loss`` receives (TAP). ``prepare`` runs once before training."""

    name = "plain"
    layers: tuple[str, ...] = ()
    task_weight: float = 1.0

    def prepare(self, train_set, device, show_progress: bool = False) -> None:
        """Work done once per run (e.g. caching a teacher's heatmaps)."""

    def forward_and_loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        with capture_activations(model, self.layers) as activations:
            logits = model(batch.images)
        return logits, self.loss(model, batch, logits, list(activations))

    def loss(self, model: nn.Module, batch: Batch, logits: torch.Tensor, activations: list[torch.Tensor]) -> torch.Tensor:
        return logits.new_zeros(())


@dataclass
class TapObjective(Objective):
    layers: tuple[str, ...] = ()
    kernel_size: int = 3
    name = "tap"

    def loss(self, model, batch, logits, activations):
        return tap_loss(activations, batch.masks, self.kernel_size, defer_gradient=True)


def forward_with_input_gradient(model: nn.Module, images: torch.Tensor, scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(leaf images, logits, d scores(logits).sum() / d images), the graph kept for a second backward.
    One forward serves both the task loss (logits) and the input-gradient loss."""
    images = images.detach().requires_grad_(True)
    logits = model(images)
    (grad,) = torch.autograd.grad(scores(logits).sum(), images, create_graph=True)
    return images, logits, grad


@dataclass
class RrrObjective(Objective):
    name = "rrr"

    def forward_and_loss(self, model, batch):
        _, logits, grad = forward_with_input_gradient(model, batch.images, lambda out: F.log_softmax(out, dim=1).sum(dim=1))
        return logits, ((batch.masks * grad.sum(dim=1, keepdim=True)) ** 2).sum(dim=(1, 2, 3)).mean()


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


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)), averaged over the batch (Hinton et al. 2015; the T²
    keeps the gradient's size independent of T)."""
    teacher_log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    student_log_p = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)


TEACHER_CACHE_BYTES = 1 << 30  # cache the teacher's heatmaps when they fit in 1 GiB


@dataclass
class TeaObjective(Objective):
    teacher: nn.Module | None = None
    epsilon: float = 0.01
    scales: int = 4
    explained_class: str = "teacher"  # "teacher": the teacher's most likely classes; "random": random logits
    classes: int = 1  # classes explained per image (the loss is their mean)
    task_weight: float = 0.0  # TEA trains on explanations alone by default (FINDINGS: task loss brings the shortcut back)
    distill_weight: float = 1.0  # weight of the distillation term (0: heatmaps alone; docs/methods/tea.md)
    temperature: float = 1.0  # distillation temperature T
    cache_bytes: int = TEACHER_CACHE_BYTES
    name = "tea"

    def __post_init__(self) -> None:
        # (targets (N, K), maps (N, K, H, W), teacher logits (N, classes)) per training sample
        self._cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def teacher_explanation(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(targets (N, K), teacher maps (N, K, H, W), teacher logits (N, classes)) for a batch: the
        classes explained, the teacher's LRP-epsilon heatmap of each, and its logits."""
        with torch.no_grad():
            logits = self.teacher(images)
            k = min(self.classes, logits.shape[1])
            if self.explained_class == "teacher":
                targets = logits.topk(k, dim=1).indices
            else:  # k distinct random classes per image
                targets = torch.rand(logits.shape, device=images.device).argsort(dim=1)[:, :k]
        maps, _ = lrp_epsilon_and_logits(self.teacher, images, targets, epsilon=self.epsilon)
        return targets, maps, logits

    def prepare(self, train_set, device, show_progress: bool = False) -> None:
        """The teacher and the training images do not change during a repair, so with the teacher's
        own classes explained its heatmaps are computed once here instead of in every step."""
        self._cache = None
        if self.explained_class != "teacher" or len(train_set) == 0:
            return
        channels, height, width = train_set[0].image.shape
        if len(train_set) * self.classes * height * width * 4 > self.cache_bytes:
            return
        from .._progress import progress_bar
        from ..data import make_loader

        parts = []
        with progress_bar("teacher heatmaps", total=len(train_set), enabled=show_progress) as bar:
            for batch in make_loader(train_set, 128):
                parts.append(self.teacher_explanation(batch.images.to(device)))
                bar.advance(len(batch.images))
        self._cache = tuple(torch.cat(column) for column in zip(*parts))

    def forward_and_loss(self, model, batch):
        if self._cache is not None:
            targets, teacher_maps, teacher_logits = (c[batch.indices.to(c.device)] for c in self._cache)
        else:
            targets, teacher_maps, teacher_logits = self.teacher_explanation(batch.images)
        # One LRP forward gives the student's logits (for accuracy, the task and distillation terms) and maps.
        student_maps, logits = lrp_epsilon_and_logits(model, batch.images, targets, epsilon=self.epsilon,
                                                      create_graph=True)
        # Every (image, class) pair is one sample of the heat loss: the mean over both.
        loss = multiresolution_heat_loss(student_maps.flatten(0, 1), teacher_maps.detach().flatten(0, 1), self.scales)
        if self.distill_weight:
            loss = loss + self.distill_weight * distillation_loss(logits, teacher_logits.detach(), self.temperature)
        return logits, loss
