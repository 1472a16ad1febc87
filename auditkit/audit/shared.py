"""What the single-label audit (runner.py) and the per-finding audit (multilabel.py) share: the
document's schema name and :class:`AuditReport`, the reference variant, the activation share inside
the mask, and the pairing test of two variants. Below both, so neither imports the other's module."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import AuditDataset
from ..models import run_capturing
from ..ops import downscale_masks, weighted_relu_sum
from .verdict import RELIANT

SCHEMA = "auditkit.audit/1"
LOCALISATION_KEYS = ("energy_in_mask", "top_quartile_recall", "top_quartile_precision", "iou")
# Energy in the mask is a share of the positive attribution: undefined for maps with none.
NO_POSITIVE = "no map has positive attribution to share out"


@dataclass
class AuditReport:
    """The audit's result: ``data`` is the JSON document (see docs/audit.md for its schema), example
    pictures included: ``auditkit.audit.render_html(report.data)`` needs nothing else."""

    data: dict

    @property
    def verdict(self) -> str:
        return self.data["verdict"]["label"]

    @property
    def tested(self) -> bool:
        """Whether any behavioural test ran and could tell (False: e.g. every mask empty and no variant
        to compare, or a model that predicts one class for every image, which no test can clear)."""
        verdict = self.data["verdict"]
        if verdict.get("degenerate") and verdict["label"] != RELIANT:  # multilabel: a finding no test can clear
            return False
        if verdict.get("constant_prediction") is not None or (verdict.get("at_chance") is not None
                                                               and verdict["label"] != RELIANT):
            return False
        return any(e["finding"] != "not run" for e in verdict["evidence"])

    def exit_code(self, fail_on_shortcut: bool) -> int:
        """0; with ``fail_on_shortcut``: 1 for a reliant verdict, 3 when no behavioural test could
        run (a gate must not pass a model it could not test)."""
        if not fail_on_shortcut:
            return 0
        if self.verdict == RELIANT:
            return 1
        return 0 if self.tested else 3


def reference_variant(dataset: AuditDataset) -> str:
    for name in ("contaminated", "original"):
        if name in dataset.variants:
            return name
    return dataset.variants[0]


def activation_shares(model, layers, images, masks, calls=None):
    """Per layer: share of the channel-summed ReLU activation inside D(M), and D's mean (chance).
    ``calls``: kept across batches, so a layer named "block#2" is the same call in every batch."""
    with torch.no_grad():
        _, captured, _ = run_capturing(model, layers, lambda: model(images), calls=calls)
        activations = [a for a in captured]
    if hasattr(model, "masks_for_network"):
        masks = model.masks_for_network(masks)  # at the resolution the network sees
    weights = downscale_masks(masks, [tuple(a.shape[-2:]) for a in activations])
    shares, coverages = [], []
    for activation, weight in zip(activations, weights):
        inside = weighted_relu_sum(activation, weight)
        total = weighted_relu_sum(activation, torch.ones_like(weight))
        shares.append(torch.where(total > 0, inside / total, torch.full_like(total, float("nan"))))
        coverages.append(weight.mean(dim=(1, 2)))
    return torch.stack(shares, 1), torch.stack(coverages, 1)


def aligned_labels(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two variants' label arrays are the same images in the same order (a paired bootstrap)."""
    return a.shape == b.shape and bool(np.array_equal(a, b))
