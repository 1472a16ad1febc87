"""MaskTune (Taghanaki et al. 2022, NeurIPS, arXiv:2210.00055): mask what the model relies on most, fine-tune on that.

For every training image the model's own saliency (Grad-CAM for the true class, upsampled) is
computed once; the pixels above mean + k·std of the map (k = 2 by default, per image) are set to
zero; the model is then fine-tuned with cross-entropy on the masked images, for one epoch by
default. The model must find other evidence for the labels, which breaks a shortcut it found first.

Multilabel models (K sigmoids): the Grad-CAM of every finding present in the image (of the finding
with the highest logit where none is), each thresholded as above; the union of those regions is masked,
and the fine-tune uses the model's own loss (BCE-with-logits, training/losses.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..._progress import progress_bar
from ...data import AuditDataset, collate, to_uint8
from ...data.dataset import Record
from ...explain import attribute
from ...training import Objective
from ...training.losses import multilabel_targets
from .base import MethodSpec


def masktune_dataset(model, dataset: AuditDataset, *, sigmas: float = 2.0, batch_size: int = 128,
                     device: str = "cpu", show_progress: bool = True) -> AuditDataset:
    """The training images with their most salient region blacked out (in memory, 8-bit)."""
    model.eval()
    records = []
    with progress_bar("MaskTune: masking salient regions", total=len(dataset), enabled=show_progress) as bar:
        for start in range(0, len(dataset), batch_size):
            indices = range(start, min(start + batch_size, len(dataset)))
            batch = collate([dataset[k] for k in indices]).to(device)
            if multilabel_targets(batch.labels):
                salient = _salient_findings(model, batch.images, batch.labels, sigmas)
            else:
                salient = _salient(attribute(model, batch.images, batch.labels, "gradcam")[:, 0], sigmas)
            masked = batch.images.masked_fill(salient, 0.0)
            pixels = to_uint8(masked)
            for j, k in enumerate(indices):
                r = dataset.records[k]
                records.append(Record(np.ascontiguousarray(pixels[j]), r.label, None, r.variant, r.group, r.split,
                                      r.artefact))
            bar.advance(len(indices))
    return AuditDataset(records, dataset.info, channels=dataset.channels, image_size=dataset.image_size)


def _salient(cams: torch.Tensor, sigmas: float) -> torch.Tensor:
    """(N, 1, H, W) bool: the pixels of each map (N, H, W) above its mean + sigmas * std."""
    flat = cams.flatten(1)
    threshold = (flat.mean(1) + sigmas * flat.std(1)).view(-1, 1, 1)
    return (cams > threshold).unsqueeze(1)


def _salient_findings(model, images: torch.Tensor, labels: torch.Tensor, sigmas: float) -> torch.Tensor:
    """Multilabel: the union of the salient regions of each image's present findings (module docstring)."""
    with torch.no_grad():
        top = model(images).argmax(1)
    present = labels > 0.5
    none = torch.nonzero(~present.any(1)).flatten()
    present[none, top[none]] = True  # an image without a finding: the one the model scores highest
    salient = torch.zeros((len(images), 1, *images.shape[-2:]), dtype=torch.bool, device=images.device)
    for k in torch.nonzero(present.any(0)).flatten().tolist():
        rows = present[:, k]
        salient[rows] |= _salient(attribute(model, images[rows], k, "gradcam")[:, 0], sigmas)
    return salient


@dataclass(frozen=True)
class MaskTuneOptions:
    sigmas: float = 2.0  # pixels above mean + sigmas * std of the Grad-CAM map are masked


def prepare_data(model, train: AuditDataset, options: MaskTuneOptions, mask_meaning: str, batch_size: int, device,
                 show_progress: bool) -> AuditDataset:
    # The data's masks are not read (MaskTune masks the model's own saliency), so what they mark,
    # ``mask_meaning``, does not matter: both meanings train alike.
    return masktune_dataset(model, train, sigmas=options.sigmas, batch_size=batch_size, device=device,
                            show_progress=show_progress)


SPEC = MethodSpec(
    name="masktune",
    rank=4,
    auto_rank=4,
    summary="mask what the model relies on most (its Grad-CAM), fine-tune on the masked images (Taghanaki et al. 2022)",
    masks=None,
    teacher="none",
    default_lambda=0.0,
    sweep=(0.0,),
    training={"epochs": 1, "grad_clip": 0.0, "schedule": "constant"},
    options=MaskTuneOptions,
    build=lambda model, options, teacher: Objective(),
    prepare_data=prepare_data,
    doc="docs/methods/masktune.md",
)
