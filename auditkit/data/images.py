"""Float images as 8-bit pixels: the one conversion every writer and renderer uses."""

from __future__ import annotations

import numpy as np
import torch


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Images in [0, 1] as uint8 pixels in the layout image files use (channels last, a single
    channel dropped): (N, C, H, W) -> (N, H, W) or (N, H, W, C); (C, H, W) -> (H, W) or (H, W, C);
    (H, W) -> (H, W). Values are clamped to [0, 1] and rounded to the nearest of 256 levels."""
    if isinstance(images, torch.Tensor):
        pixels = (images.detach().float().cpu().clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    else:
        pixels = np.round(np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    if pixels.ndim == 2:
        return pixels
    channel_axis = pixels.ndim - 3  # 0 for (C, H, W), 1 for (N, C, H, W)
    if pixels.shape[channel_axis] == 1:
        return np.ascontiguousarray(np.squeeze(pixels, axis=channel_axis))
    return np.ascontiguousarray(np.moveaxis(pixels, channel_axis, -1))
