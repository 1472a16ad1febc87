"""Augmentation of training batches (small clean splits, TEA teachers): shifts, turns, zooms and
channel orders, each image its own draw from a seeded generator. Borders repeat the edge pixels,
so a coloured background stays one colour."""

from __future__ import annotations

import math

import torch
from torch import nn


def random_shift(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image translated by its own random (dy, dx) in [-shift, shift]; borders repeat the edge
    pixels, so a coloured background stays one colour."""
    if shift == 0:
        return images
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (shift, shift, shift, shift), mode="replicate")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def random_rotate_scale(images: torch.Tensor, rotate: float, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Each image rotated by its own angle in [-rotate, rotate] degrees and zoomed by a factor in
    [1 - scale, 1 + scale] about its centre; outside pixels repeat the border, as ``random_shift``."""
    if rotate == 0 and scale == 0:
        return images
    n = images.shape[0]
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(rotate)
    zoom = 1 + (torch.rand(n, generator=generator) * 2 - 1) * scale
    # affine_grid maps output to input coordinates: the inverse of the wanted zoom.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, torch.zeros(n)], 1), torch.stack([sin, cos, torch.zeros(n)], 1)], 1)
    grid = nn.functional.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_channel_shuffle(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image's channels in its own random order. A teacher trained on a few hundred images can
    otherwise pick up chance colour-class correlations of its small sample (docs/methods/tea.md)."""
    order = torch.rand(images.shape[:2], generator=generator).argsort(dim=1).to(images.device)
    return images.gather(1, order[:, :, None, None].expand_as(images))


def augment_batch(images: torch.Tensor, config, generator: torch.Generator,
                  masks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The augmentation ``config`` (a TrainConfig) asks for. With ``masks`` ((N, 1, H, W), the
    annotations TAP, RRR and Energy penalise), each mask is moved by its image's own shift, turn and
    zoom, and ``(images, masks)`` is returned: a mask left in place would mark pixels the shortcut has
    moved away from. Channel orders change the images only."""
    channels = images.shape[1]
    both = images if masks is None else torch.cat([images, masks.to(images.dtype)], 1)
    both = random_rotate_scale(both, config.rotate, config.scale, generator)
    if config.channel_shuffle:
        both = torch.cat([random_channel_shuffle(both[:, :channels], generator), both[:, channels:]], 1)
    both = random_shift(both, config.shift, generator)
    if masks is None:
        return both
    return both[:, :channels], both[:, channels:].to(masks.dtype)
