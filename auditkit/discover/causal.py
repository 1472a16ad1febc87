"""The causal test of a candidate artefact: does the model's decision depend on the candidate region
more than on a control region of the same area in the same image?

Two edits, each applied to the candidate box and to the control box (regions.control_box):
- removal: the region filled with the image's own background statistics (the audit's removal
  counterfactual, audit.metrics.remove_region); effect = the share of predictions that change;
- transplant: the region pasted, at the same place, into an image of another class that the model
  gets right, after that image's own candidate region (when it has one) was removed; effect = the
  share of those images the model then assigns to the candidate's class (the audit's swap
  counterfactual seen from the donor: does the region carry the class?). Removing the recipient's
  own artefact first matters: a class-coded marker pasted beside the recipient's own marker is a
  contradiction, not a swap.

A candidate must also repeat itself: its boxes' contents vary much less across images than the
control boxes' do (``dispersion``).

The statistics are the paired per-image differences candidate - control, with bootstrap intervals.
Removal alone cannot tell an artefact from the object's most telling part (taking away the bar of a
"7" changes the answer too, more than taking away a less telling part); a transplant can: a piece of
a digit pasted into another digit rarely makes it that digit, a class-coded tag does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..audit.metrics import remove_region
from .regions import Box, box_mask


def paste_box(image: torch.Tensor, box: Box, donor: torch.Tensor, donor_box: Box) -> torch.Tensor:
    """``image`` (C, H, W) with ``donor``'s ``donor_box`` content resized (bilinear) into ``box``."""
    top, left, height, width = box
    dt, dl, dh, dw = donor_box
    patch = donor[:, dt : dt + dh, dl : dl + dw]
    if (dh, dw) != (height, width):
        patch = F.interpolate(patch[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    out = image.clone()
    out[:, top : top + height, left : left + width] = patch
    return out


def dispersion(images: torch.Tensor, boxes: list[Box], side: int = 8) -> float:
    """How much the boxed contents differ across images: each box resized to ``side`` x ``side``
    (bilinear, every channel), then the mean absolute deviation from their per-pixel median, in pixel
    units (0..1). An artefact repeats itself (a tag, a patch, a marker: near 0); object parts vary with
    the object. The control boxes' dispersion is the yardstick (Reveal-to-Revise, Pahde et al. 2023,
    finds artefacts as consistent concepts; this is the pixel-space form of that consistency)."""
    crops = [F.interpolate(image[None, :, t : t + h, left : left + w].float(), size=(side, side), mode="bilinear",
                           align_corners=False)[0].flatten() for image, (t, left, h, w) in zip(images, boxes)]
    if not crops:
        return float("nan")
    stacked = torch.stack(crops)
    return float((stacked - stacked.median(0).values).abs().mean())


def _predict(model, images: list[torch.Tensor], batch_size: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model(torch.stack(images[start : start + batch_size])).argmax(1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, int)


def edit_effects(model, images: torch.Tensor, predictions: np.ndarray, boxes: list[Box], controls: list[Box],
                 recipients: list[tuple[torch.Tensor, Box | None] | None], label: int, *, seed: int,
                 batch_size: int = 256) -> dict:
    """Per-image effects (n,) float arrays, nan where an edit was impossible: ``removal`` /
    ``control_removal`` (prediction changed), ``transplant`` / ``control_transplant`` (the recipient
    is then assigned ``label``, the candidate's class). ``images`` (n, C, H, W) in the model's input
    format and on its device; ``recipients[i]``: an image of another class (C, H, W) with its own
    candidate box to remove first (or None), or None."""
    size = tuple(images.shape[-2:])
    removed, removed_control, planted, planted_control = [], [], [], []
    for i, image in enumerate(images):
        for box, out in ((boxes[i], removed), (controls[i], removed_control)):
            mask = torch.from_numpy(box_mask(box, size))[None].to(image.device)
            out.append(remove_region(image, mask, seed * 1_000_003 + i))
        if recipients[i] is not None:
            recipient, own = recipients[i]
            if own is not None:
                own_mask = torch.from_numpy(box_mask(own, size))[None].to(image.device)
                recipient = remove_region(recipient, own_mask, seed * 1_000_003 + 500_000 + i)
            planted.append(paste_box(recipient, boxes[i], image, boxes[i]))
            planted_control.append(paste_box(recipient, controls[i], image, controls[i]))
    n = len(images)
    effects = {
        "removal": (_predict(model, removed, batch_size) != predictions).astype(float),
        "control_removal": (_predict(model, removed_control, batch_size) != predictions).astype(float),
        "transplant": np.full(n, np.nan),
        "control_transplant": np.full(n, np.nan),
    }
    given = [i for i in range(n) if recipients[i] is not None]
    if given:
        effects["transplant"][given] = (_predict(model, planted, batch_size) == label).astype(float)
        effects["control_transplant"][given] = (_predict(model, planted_control, batch_size) == label).astype(float)
    return effects
