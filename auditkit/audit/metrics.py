"""The numbers an audit reports, each a plain function of per-sample values.

Task metrics (TAP §5.2): accuracy (multi-class), F-score of the positive class (binary), mean
absolute error of class indices (ordinal). The binary F-score scores one named class: by default the
minority class of the audited data (``minority_class``), because the F-score of the majority class of
imbalanced data is high for a model that never predicts the rare finding (95 % "normal": F1 of
"normal" 0.974, F1 of the finding 0.0). A metric that cannot be computed (no samples; an F-score
whose class has no sample) is NaN here and ``null`` with a reason in the report (``undefined_reason``).

The Δ-metric is the degradation from the contaminated data to another variant (positive = worse),
with a bootstrap confidence interval;
when two variants hold the same base images in the same order (generated data) the bootstrap
resamples them jointly (paired), otherwise independently.

Localisation of one map A against one mask M (TAP App. D; model guidance, Rao et al. 2023,
arXiv:2303.11932, Eq. 2):
- energy in mask (energy pointing game on the spurious region): sum(M A+) / sum(A+);
- top-quartile recall |S ∩ T| / |S| and precision |S ∩ T| / |T|, T = the 25 % of pixels with the
  largest |A|, S = the mask (M > 0.5);
- IoU |S ∩ T| / |S ∪ T|.
A map spread evenly would score the mask's area fraction on energy and precision, and 0.25 on
recall: the report prints those chance levels beside the values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

TASKS = ("auto", "multiclass", "binary", "ordinal")
METRIC_OF_TASK = {"multiclass": "accuracy", "binary": "f1", "ordinal": "mae"}


@dataclass(frozen=True)
class Estimate:
    """A value with a bootstrap confidence interval (nan when there is no data), and, when the value
    could not be computed, why (``reason``, one phrase)."""

    value: float
    low: float
    high: float
    samples: int
    reason: str | None = None

    def as_dict(self) -> dict:
        """JSON: non-finite numbers become ``null``; ``reason`` is there when the value is null."""

        def clean(v):
            return None if v is None or not math.isfinite(float(v)) else round(float(v), 6)

        out = {"value": clean(self.value), "ci": [clean(self.low), clean(self.high)], "samples": self.samples}
        if out["value"] is None:
            out["reason"] = self.reason or "no data"
        return out

    def because(self, reason: str | None) -> Estimate:
        """The same estimate with ``reason`` (kept only when the value is missing)."""
        return replace(self, reason=reason) if reason and not math.isfinite(self.value) else self


EMPTY = Estimate(float("nan"), float("nan"), float("nan"), 0)


def resolve_task(task: str, num_classes: int) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    if task == "auto":
        return "binary" if num_classes == 2 else "multiclass"
    return task


# How ``resolve_positive`` chose the class, in words for the summary and the page.
HOW_CHOSEN = {"minority": "the minority class", "tie": "a tie: class index 1", "given": "as asked",
              "class 1": "class index 1, one-vs-rest"}


def resolve_positive(positive, task: str, classes: Sequence[str], labels) -> tuple[int | None, str]:
    """The class the binary F-score scores, and how it was chosen ("given", "minority", "tie" or
    "class 1").

    ``positive``: None (two classes: the minority of ``labels``, the audited split's class indices,
    ties -> 1; more classes: class 1, one-vs-rest), a class name, or a class index (int or digits).
    Not binary: (None, ""). Raises ParameterError for a class the task does not have, or a positive
    class given for a task that is not binary."""
    from ..errors import ParameterError

    if task != "binary":
        if positive is not None:
            raise ParameterError("positive_class", f"applies to the binary task (F-score) only; this task is {task}")
        return None, ""
    if positive is None:
        if len(classes) != 2:
            return 1, "class 1"
        counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=2)
        return minority_class(labels), "tie" if counts[0] == counts[1] else "minority"
    names = [str(c) for c in classes]
    if isinstance(positive, str) and positive in names:  # a name first: folders may be named "0", "1"
        return names.index(positive), "given"
    try:
        index = int(positive)
    except (TypeError, ValueError):
        index = -1
    fractional = isinstance(positive, float) and positive != index
    if isinstance(positive, bool) or fractional or not 0 <= index < len(classes):
        raise ParameterError("positive_class", f"must name one of the classes ({', '.join(names)}) or give its index "
                                               f"0..{len(classes) - 1}; got {positive!r}")
    return index, "given"


def minority_class(labels: Sequence[int] | np.ndarray) -> int:
    """The default positive class of a two-class task: the rarer of classes 0 and 1 in ``labels``
    (class indices), ties (and no labels) -> 1. A class with no sample is the rarer one."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=2)
    return 0 if counts[0] < counts[1] else 1


def task_metric(task: str, labels: np.ndarray, predictions: np.ndarray, positive: int = 1) -> float:
    """accuracy / F-score of class ``positive`` / MAE of class indices; NaN when it cannot be
    computed (no samples; for the F-score, no sample of class ``positive``: recall is 0/0).

    The F-score is sklearn's ``f1_score(labels, predictions, pos_label=positive)`` (one-vs-rest when
    there are more than two classes): 2 TP / (predicted positives + actual positives)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if len(labels) == 0:
        return float("nan")
    if task == "multiclass":
        return float(np.mean(labels == predictions))
    if task == "binary":
        actual = np.sum(labels == positive)
        if actual == 0:
            return float("nan")
        true_positive = np.sum((predictions == positive) & (labels == positive))
        return float(2 * true_positive / (np.sum(predictions == positive) + actual))
    return float(np.mean(np.abs(labels.astype(float) - predictions.astype(float))))


def undefined_reason(task: str, labels, positive: int, classes: Sequence[str]) -> str | None:
    """Why ``task_metric`` is NaN on ``labels`` (class indices), in words naming the classes; None
    when it is defined."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return "no samples"
    if task == "binary" and not np.any(labels == positive):
        present = sorted(set(labels.tolist()))
        held = (f"all {len(labels)} images are of one class ({classes[present[0]]!r})" if len(present) == 1
                else f"its {len(labels)} images are of classes {', '.join(repr(classes[c]) for c in present)}")
        return f"F1 of {classes[positive]!r} is undefined: {held}, none of {classes[positive]!r}"
    return None


def missing_classes(labels, classes: Sequence[str]) -> list[str]:
    """The classes with no sample in ``labels`` (class indices), in class order."""
    present = set(np.asarray(labels, dtype=np.int64).tolist())
    return [name for index, name in enumerate(classes) if index not in present]


def higher_is_better(task: str) -> bool:
    return task != "ordinal"


def _percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def bootstrap_metric(task, labels, predictions, *, resamples: int, confidence: float, seed: int,
                     positive: int = 1) -> Estimate:
    """The task metric with a percentile bootstrap interval over samples (resamples on which the
    metric is undefined are left out of the interval)."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    n = len(labels)
    if n == 0:
        return EMPTY
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    values = np.array([task_metric(task, labels[d], predictions[d], positive) for d in draws])
    low, high = _percentile_interval(values, confidence)
    return Estimate(task_metric(task, labels, predictions, positive), low, high, n)


def bootstrap_degradation(
    task: str,
    reference: tuple[np.ndarray, np.ndarray],
    other: tuple[np.ndarray, np.ndarray],
    *,
    paired: bool,
    resamples: int,
    confidence: float,
    seed: int,
    positive: int = 1,
) -> Estimate:
    """Degradation from ``reference`` (labels, predictions) to ``other``: positive = worse (the
    binary F-score is of class ``positive`` on both)."""
    (ref_labels, ref_pred), (other_labels, other_pred) = (tuple(map(np.asarray, pair)) for pair in (reference, other))
    if len(ref_labels) == 0 or len(other_labels) == 0:
        return EMPTY
    sign = 1.0 if higher_is_better(task) else -1.0

    def degradation(ri, oi):
        return sign * (task_metric(task, ref_labels[ri], ref_pred[ri], positive)
                       - task_metric(task, other_labels[oi], other_pred[oi], positive))

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        ri = rng.integers(0, len(ref_labels), len(ref_labels))
        oi = ri if paired else rng.integers(0, len(other_labels), len(other_labels))
        values.append(degradation(ri, oi))
    low, high = _percentile_interval(np.array(values), confidence)
    full = degradation(np.arange(len(ref_labels)), np.arange(len(other_labels)))
    return Estimate(full, low, high, min(len(ref_labels), len(other_labels)))


def bootstrap_mean(values, *, resamples: int, confidence: float, seed: int) -> Estimate:
    """Mean of per-sample values (nan entries ignored) with a percentile bootstrap interval."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return EMPTY
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = _percentile_interval(means, confidence)
    return Estimate(float(values.mean()), low, high, len(values))


def confusion_matrix(labels, predictions, num_classes: int) -> list[list[int]]:
    """Rows: true class; columns: predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, int), np.asarray(predictions, int)), 1)
    return matrix.tolist()


# ---- localisation --------------------------------------------------------------------------------


def localisation(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample energy in mask, top-quartile recall/precision and IoU: maps and masks (N, H, W)."""
    maps = maps.detach().float().flatten(1)
    region = masks.detach().float().flatten(1) > 0.5
    positive = maps.clamp_min(0)
    positive_total = positive.sum(1)
    energy = (positive * region).sum(1) / positive_total
    energy = torch.where(positive_total > 0, energy, torch.full_like(energy, float("nan")))
    magnitude = maps.abs()
    k = max(1, math.ceil(0.25 * magnitude.shape[1]))
    # Ties at the threshold are broken by position (topk), so T has exactly 25 % of the pixels.
    top = torch.zeros_like(region)
    top.scatter_(1, magnitude.topk(k, dim=1).indices, True)
    overlap = (top & region).sum(1).float()
    area = region.sum(1).float()
    nan = torch.full_like(area, float("nan"))
    return {
        "energy_in_mask": energy,
        "top_quartile_recall": torch.where(area > 0, overlap / area.clamp_min(1), nan),
        "top_quartile_precision": overlap / k,
        "iou": torch.where(area > 0, overlap / (area + k - overlap), nan),
        "mask_area": area / region.shape[1],
    }


# ---- counterfactual edits ---------------------------------------------------------------------------


def remove_region(image: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """``image`` (C, H, W) with the masked pixels replaced by noise drawn from the image's own
    unmasked pixels' per-channel mean and standard deviation (seeded, clipped to [0, 1])."""
    region = mask[0] > 0.5
    if not region.any():
        return image.clone()
    outside = ~region
    generator = torch.Generator(device="cpu").manual_seed(seed)
    out = image.clone()
    for channel in range(image.shape[0]):
        pixels = image[channel][outside] if outside.any() else image[channel].flatten()
        mean, std = pixels.mean(), pixels.std(unbiased=False) if pixels.numel() > 1 else pixels.new_zeros(())
        noise = torch.randn(int(region.sum()), generator=generator).to(image.device, image.dtype)
        out[channel][region] = (mean + std * noise).clamp(0, 1)
    return out


def paste_region(image: torch.Tensor, donor: torch.Tensor, donor_mask: torch.Tensor) -> torch.Tensor:
    """``image`` with ``donor``'s masked pixels pasted in (soft masks blend)."""
    alpha = donor_mask.clamp(0, 1)
    return image * (1 - alpha) + donor * alpha
