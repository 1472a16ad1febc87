"""Global-signal probes: shortcuts no region is to blame for (colour, texture, frequency).

Each probe edits every image the same way and measures the model's accuracy and the share of
changed predictions, with bootstrap intervals (paired with the unedited images). Two families:
- shape-preserving edits (greyscale, colour-channel permutation, hue rotation, low-pass): a model
  that reads the object keeps its accuracy; a large drop means the model reads what was removed
  (colour, fine texture);
- shape-destroying edits (patch shuffling, high-pass): a model that reads the object falls towards
  chance; a model that keeps its accuracy reads something that survives them (colour, texture, a
  global statistic) — the sign of a global shortcut (SpRAy's "Clever Hans" strategies that need no
  region; the coloured-MNIST shortcut of Bharadwaj 2026, "The Lazy Artist").

Pixel values are in [0, 1], images (N, C, H, W); edits keep that range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..audit import metrics as M


def greyscale(x: torch.Tensor, seed: int) -> torch.Tensor:
    """ITU-R BT.601 luma in every channel."""
    weights = x.new_tensor([0.299, 0.587, 0.114])[None, :, None, None]
    return (x * weights).sum(1, keepdim=True).expand_as(x).clone()


def channel_permutation(x: torch.Tensor, seed: int) -> torch.Tensor:
    """RGB -> BRG (a cyclic permutation: every channel moves)."""
    return x[:, [2, 0, 1]].clone()


def hue_rotation(x: torch.Tensor, seed: int, degrees: float = 90.0) -> torch.Tensor:
    """Rotates hue by ``degrees`` about the grey axis (luma and saturation kept, to first order)."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    # Rotation about the (1, 1, 1) axis in RGB (Rodrigues), a standard hue rotation matrix.
    third, root = 1.0 / 3.0, math.sqrt(1.0 / 3.0)
    matrix = torch.tensor([
        [cos + (1 - cos) * third, third * (1 - cos) - root * sin, third * (1 - cos) + root * sin],
        [third * (1 - cos) + root * sin, cos + third * (1 - cos), third * (1 - cos) - root * sin],
        [third * (1 - cos) - root * sin, third * (1 - cos) + root * sin, cos + third * (1 - cos)],
    ], dtype=x.dtype, device=x.device)
    return torch.einsum("ij,njhw->nihw", matrix, x).clamp(0, 1)


def _gaussian_blur(x: torch.Tensor) -> torch.Tensor:
    sigma = max(x.shape[-2:]) / 28.0  # one pixel on a 28x28 digit, the same share of any image
    radius = max(1, int(math.ceil(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def low_pass(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Gaussian blur, σ = max(H, W) / 28 pixels."""
    return _gaussian_blur(x)


def high_pass(x: torch.Tensor, seed: int) -> torch.Tensor:
    """The image minus its blur, around each image's own channel mean."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - _gaussian_blur(x) + mean).clamp(0, 1)


def patch_shuffle(x: torch.Tensor, seed: int, grid: int = 4) -> torch.Tensor:
    """The image cut into ``grid`` x ``grid`` tiles, the tiles permuted (a seeded permutation per image)."""
    n, c, h, w = x.shape
    th, tw = h // grid, w // grid
    out = x.clone()
    generator = torch.Generator().manual_seed(seed)
    tiles = x[:, :, : th * grid, : tw * grid].reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5)
    tiles = tiles.reshape(n, grid * grid, c, th, tw)
    order = torch.stack([torch.randperm(grid * grid, generator=generator) for _ in range(n)]).to(x.device)
    shuffled = tiles[torch.arange(n, device=x.device)[:, None], order]
    out[:, :, : th * grid, : tw * grid] = (
        shuffled.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, th * grid, tw * grid))
    return out


@dataclass(frozen=True)
class Probe:
    name: str
    edit: object  # (x, seed) -> x
    preserves_shape: bool | None  # None: reported only
    needs_colour: bool
    signal: str  # what a positive finding points at
    description: str


PROBES = (
    Probe("greyscale", greyscale, True, True, "colour", "colour removed (luma kept)"),
    Probe("channel_permutation", channel_permutation, True, True, "colour", "RGB -> BRG"),
    Probe("hue_rotation", hue_rotation, True, True, "colour", "hue rotated by 90°"),
    Probe("low_pass", low_pass, True, False, "high-frequency texture", "Gaussian blur, σ = side/28"),
    # Reported, never decisive: thin strokes (digits, text) survive a high-pass, so a model that reads
    # the object keeps its accuracy too.
    Probe("high_pass", high_pass, None, False, "", "image minus its blur"),
    Probe("patch_shuffle", patch_shuffle, False, False, "colour, texture or a global statistic",
          "4 x 4 tiles shuffled"),
)


def run_probes(predict_under, labels: np.ndarray, predictions: np.ndarray, num_classes: int, *, channels: int,
               seed: int, resamples: int, confidence: float, drop_threshold: float = 0.10,
               retained_threshold: float = 0.5) -> list[dict]:
    """Every applicable probe: accuracy, its drop, the changed share, and a finding.
    ``predict_under(edit) -> (N,)`` numpy predictions of the probed images (N, C, H, W) after
    ``edit(images, seed)``; ``labels`` and ``predictions`` (N,) are those of the unedited images.

    Findings: a shape-preserving probe *points at* its signal when the lower end of the accuracy
    drop's interval exceeds ``drop_threshold``; a shape-destroying probe does when the lower end of
    its accuracy's interval keeps more than ``retained_threshold`` of the accuracy above chance."""
    stats = dict(resamples=resamples, confidence=confidence)
    chance = 1.0 / num_classes
    base = M.task_metric("multiclass", labels, predictions)
    rows = []
    for number, probe in enumerate(PROBES):
        if probe.needs_colour and channels != 3:
            rows.append({"probe": probe.name, "description": probe.description, "applicable": False,
                         "finding": "not applicable (no colour channels)", "points_at": None})
            continue
        edited = predict_under(probe.edit)
        accuracy = M.bootstrap_metric("multiclass", labels, edited, seed=seed + 500 + number, **stats)
        drop = M.bootstrap_degradation("multiclass", (labels, predictions), (labels, edited), paired=True,
                                       seed=seed + 520 + number, **stats)
        changed = M.bootstrap_mean((edited != predictions).astype(float), seed=seed + 540 + number, **stats)
        if probe.preserves_shape is None:
            positive, rule = False, "reported only"
        elif probe.preserves_shape:
            positive = drop.low > drop_threshold
            rule = f"accuracy drop {drop.value:.3f} [{drop.low:.3f}, {drop.high:.3f}] vs {drop_threshold:g}"
        else:
            kept = (accuracy.low - chance) / max(base - chance, 1e-9)
            positive = base - chance > 0.1 and kept > retained_threshold
            rule = (f"accuracy {accuracy.value:.3f} [{accuracy.low:.3f}, {accuracy.high:.3f}] keeps "
                    f"{max(kept, 0):.0%} of the {base:.3f} - chance {chance:.3f} (needs > {retained_threshold:.0%})")
        rows.append({
            "probe": probe.name, "description": probe.description, "applicable": True,
            "preserves_shape": probe.preserves_shape, "accuracy": accuracy.as_dict(), "drop": drop.as_dict(),
            "changed": changed.as_dict(), "rule": rule,
            "finding": (f"points at {probe.signal}" if positive
                        else "no sign" if probe.preserves_shape is not None else "–"),
            "points_at": probe.signal if positive else None,
        })
    return rows
