"""The model's own task loss, for training and every repair: cross-entropy over exclusive classes
(softmax heads; a one-logit binary head is seen as two classes, where cross-entropy is its BCE), and
BCE-with-logits over K independent findings for a multilabel head (labels (N, K) float 0/1).

``pos_weight``: a multilabel dataset whose findings are skewed trains with BCE's ``pos_weight`` per
finding, negatives / positives of that finding (:func:`pos_weight_for`), so that a rare finding is not
learned as "always absent"; a finding whose positives are between a third and two thirds of the images
keeps weight 1. The weights are a function of the training labels alone, so a run repeats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: A finding is skewed when its share of positive images lies outside [SKEW, 1 - SKEW].
SKEW = 1 / 3
#: pos_weight is clipped to [1 / MAX_WEIGHT, MAX_WEIGHT] (a finding with a handful of positives).
MAX_WEIGHT = 100.0


def multilabel_targets(labels: torch.Tensor) -> bool:
    """Whether ``labels`` are multilabel targets: (N, K) floating 0/1, not (N,) class indices."""
    return labels.dim() == 2 and labels.is_floating_point()


def pos_weight_for(labels: torch.Tensor) -> torch.Tensor | None:
    """BCE's ``pos_weight`` for multilabel ``labels`` (N, K): negatives / positives per finding where the
    finding is skewed (module docstring), 1 elsewhere; None when no finding is skewed (or the labels are
    class indices)."""
    if not multilabel_targets(labels) or len(labels) == 0:
        return None
    positives = labels.float().sum(0)
    share = positives / len(labels)
    weight = ((len(labels) - positives) / positives.clamp_min(1)).clamp(1 / MAX_WEIGHT, MAX_WEIGHT)
    skewed = (share < SKEW) | (share > 1 - SKEW)
    if not bool(skewed.any()):
        return None
    return torch.where(skewed, weight, torch.ones_like(weight))


def task_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: torch.Tensor | None = None,
              reduction: str = "mean") -> torch.Tensor:
    """The model's own loss: cross-entropy for class indices, BCE-with-logits (mean over findings and
    images; with ``pos_weight`` per finding) for multilabel targets."""
    if multilabel_targets(labels):
        weight = None if pos_weight is None else pos_weight.to(logits.device, logits.dtype)
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=weight,
                                                  reduction="none").mean(1)
        return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
    return F.cross_entropy(logits, labels, reduction=reduction)


def correct(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Correct answers in a batch: argmax = label for classes; for findings, the share of the K findings
    whose prediction (z > 0) is right, summed over images (the label-wise accuracy)."""
    if multilabel_targets(labels):
        return float(((logits > 0).to(labels.dtype) == labels).float().mean(1).sum())
    return float((logits.argmax(1) == labels).sum())


__all__ = ["MAX_WEIGHT", "SKEW", "correct", "multilabel_targets", "pos_weight_for", "task_loss"]
