"""Accuracy and confusion matrix per variant: how a shortcut shows (accurate on contaminated data,
clearly worse on permuted and clean data)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .._progress import progress_bar
from ..data import AuditDataset, make_loader
from ..device import autocast, model_device, resolve_device, resolve_precision


@dataclass
class VariantResult:
    variant: str
    samples: int
    accuracy: float  # multilabel: the label-wise accuracy (the share of image x finding answers that are right)
    confusion: list[list[int]] = field(default_factory=list)  # rows: true class, columns: predicted
    # multilabel: per finding, [[true negatives, false positives], [false negatives, true positives]]
    per_finding: dict[str, list[list[int]]] = field(default_factory=dict)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: AuditDataset,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    precision: str = "auto",
    show_progress: bool = False,
) -> dict[str, VariantResult]:
    """Accuracy and confusion matrix of ``model`` on every variant of ``dataset``; the forward
    passes run on ``device`` (default: where the model is) in ``precision`` (auditkit.device:
    auto, fp32, bf16, fp16)."""
    device = model_device(model) if device is None else resolve_device(device)
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    k = dataset.num_classes
    if dataset.label_kind == "multilabel":
        try:
            return _evaluate_findings(model, dataset, batch_size, device, precision, show_progress)
        finally:
            model.train(was_training)
    confusion = {v: torch.zeros(k, k, dtype=torch.long) for v in dataset.variants}
    try:
        with progress_bar("evaluating", total=len(dataset), enabled=show_progress) as bar:
            for batch in make_loader(dataset, batch_size):
                with autocast(device, precision):
                    predicted = model(batch.images.to(device)).argmax(1).cpu()
                for variant in set(batch.variants):
                    rows = torch.tensor([v == variant for v in batch.variants])
                    index = batch.labels[rows] * k + predicted[rows]
                    confusion[variant] += torch.bincount(index, minlength=k * k).view(k, k)
                bar.advance(len(batch.labels))
    finally:
        model.train(was_training)
    results = {}
    for variant, matrix in confusion.items():
        total = int(matrix.sum())
        results[variant] = VariantResult(
            variant, total, float(matrix.diag().sum()) / max(total, 1), matrix.tolist()
        )
    return results


def _evaluate_findings(model, dataset: AuditDataset, batch_size: int, device, precision: str,
                       show_progress: bool) -> dict[str, VariantResult]:
    """Per variant: label-wise accuracy and one 2x2 confusion matrix per finding (z_k > 0: present)."""
    k = dataset.num_classes
    counts = {v: torch.zeros(k, 2, 2, dtype=torch.long) for v in dataset.variants}
    with progress_bar("evaluating", total=len(dataset), enabled=show_progress) as bar:
        for batch in make_loader(dataset, batch_size):
            with autocast(device, precision):
                predicted = (model(batch.images.to(device)) > 0).long().cpu()
            truth = batch.labels.long()
            for variant in set(batch.variants):
                rows = torch.tensor([v == variant for v in batch.variants])
                cell = truth[rows] * 2 + predicted[rows]  # (n, K): 0 tn, 1 fp, 2 fn, 3 tp
                for finding in range(k):
                    counts[variant][finding] += torch.bincount(cell[:, finding], minlength=4).view(2, 2)
            bar.advance(len(batch.labels))
    results = {}
    for variant, matrix in counts.items():
        answers = int(matrix.sum())
        right = int(matrix[:, 0, 0].sum() + matrix[:, 1, 1].sum())
        samples = answers // max(k, 1)
        results[variant] = VariantResult(variant, samples, right / max(answers, 1), [],
                                         {name: matrix[j].tolist() for j, name in enumerate(dataset.classes)})
    return results
