"""TEA, Training with Explanations Alone (Bassi et al. 2024, arXiv:2407.09788): the multi-resolution heat loss
between the student's and the teacher's LRP-ε heatmaps, (1/S) Σ_m d(AvgPool_2^m(Hs), AvgPool_2^m(Ht))
with d(a, b) = ‖a − b‖₁ / sqrt(‖a‖₁ ‖b‖₁) per sample, for the teacher's top K classes (their mean).
The heatmap is differentiable through the LRP kernels' autograd formulas. Optionally plus
distillation (Hinton et al. 2015): T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)) on the same images,
which gives the student the teacher's answers while the heat loss keeps it from reaching them
through the shortcut (docs/methods/tea.md has the ablation). Needs no masks, only a teacher.

Multilabel models (K sigmoids; the teacher multilabel over the same findings): the explained outputs are
the teacher's K highest finding logits, and the distillation is per finding, T² · KL(Bernoulli(σ(z_t / T))
‖ Bernoulli(σ(z_s / T))) averaged over the findings and the batch (each finding its own two-class
problem: the softmax KL of a one-logit model's two-class view). The task loss, when weighted in, is the
model's own (BCE-with-logits, training/losses.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ParameterError
from ...explain.defaults import EPSILON_AUDIT
from ...explain.lrp import lrp_epsilon_and_logits
from ...training import Objective
from ...training.losses import multilabel_targets
from .base import MethodSpec


def heat_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """d(Hs, Ht) = ||Hs - Ht||_1 / sqrt(||Hs||_1 ||Ht||_1) per sample (Bassi et al. 2024; as worked through in
    Bharadwaj 2026, "The Lazy Artist", Task 4)."""
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


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)), averaged over the batch (Hinton et al. 2015; the T²
    keeps the gradient's size independent of T)."""
    teacher_log_p = F.log_softmax(teacher_logits / temperature, dim=1)
    student_log_p = F.log_softmax(student_logits / temperature, dim=1)
    return temperature**2 * F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)


def finding_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              temperature: float = 1.0) -> torch.Tensor:
    """T² · KL(Bernoulli(σ(z_t / T)) ‖ Bernoulli(σ(z_s / T))), averaged over findings and images: the
    multilabel distillation (module docstring)."""
    s, t = student_logits / temperature, teacher_logits / temperature
    p = torch.sigmoid(t)
    kl = p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))
    return temperature**2 * kl.mean()


TEACHER_CACHE_BYTES = 1 << 30  # cache the teacher's heatmaps when they fit in 1 GiB


@dataclass
class TeaObjective(Objective):
    teacher: nn.Module | None = None
    epsilon: float = EPSILON_AUDIT
    scales: int = 4
    explained_class: str = "teacher"  # "teacher": the teacher's most likely classes; "random": random logits
    classes: int = 1  # classes explained per image (the loss is their mean)
    # TEA trains on explanations alone by default (FINDINGS: the task loss brings the shortcut back)
    task_weight: float = 0.0
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
        from ..._progress import progress_bar
        from ...data import make_loader

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
            distill = finding_distillation_loss if multilabel_targets(batch.labels) else distillation_loss
            loss = loss + self.distill_weight * distill(logits, teacher_logits.detach(), self.temperature)
        return logits, loss


@dataclass(frozen=True)
class TeaOptions:
    epsilon: float = EPSILON_AUDIT  # LRP-epsilon stabiliser (explain/defaults.py)
    scales: int = 4  # resolutions of the heat loss
    explained_class: str = "teacher"  # "teacher": the teacher's top classes; "random": random logits
    classes: int = 1  # classes explained per image (the loss is their mean)
    task_weight: float = 0.0  # cross-entropy's weight (0 = explanations alone)
    distill_weight: float = 1.0  # distillation of the teacher's class probabilities (0: heatmaps alone)
    temperature: float = 1.0  # distillation temperature T

    def validate(self) -> None:
        if self.explained_class not in ("teacher", "random"):
            raise ParameterError("explained_class", f"must be teacher or random; got {self.explained_class!r}")
        if self.classes < 1:
            raise ParameterError("classes", f"must be at least 1; got {self.classes}")
        if not (self.distill_weight >= 0 and math.isfinite(self.distill_weight)):
            raise ParameterError("distill_weight", f"must be a number >= 0; got {self.distill_weight}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ParameterError("temperature", f"must be a positive number; got {self.temperature}")
        if not self.epsilon > 0:
            raise ParameterError("epsilon", f"must be a positive number; got {self.epsilon}")


def build(model, options: TeaOptions, teacher) -> TeaObjective:
    return TeaObjective(teacher=teacher, epsilon=options.epsilon, scales=options.scales,
                        explained_class=options.explained_class, classes=options.classes,
                        task_weight=options.task_weight, distill_weight=options.distill_weight,
                        temperature=options.temperature)


SPEC = MethodSpec(
    name="tea",
    rank=3,
    auto_rank=2,
    summary="train the model to explain (and answer) like a teacher: LRP-epsilon heat loss plus distillation "
            "(Bassi et al. 2024)",
    masks=None,
    teacher="required",
    default_lambda=1.0,
    sweep=(0.1, 1.0, 10.0),
    # TEA learns a new reasoning from the heatmaps alone, so it needs more epochs than a penalty does;
    # the LRP ratio's derivative grows like 1/epsilon^2 near z = 0: clipped, cosine schedule.
    training={"epochs": 30, "grad_clip": 1.0, "schedule": "cosine"},
    options=TeaOptions,
    build=build,
    doc="docs/methods/tea.md",
)
