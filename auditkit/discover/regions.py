"""Candidate artefacts: where a strategy cluster's relevance concentrates, and each member's own
region there (the proposed mask), plus a control region of the same area for the causal test.

Boxes are (top, left, height, width) in the pixels of the maps they were found on. A proposed mask
is a box: artefacts (tags, markers, patches, burnt-in text) are compact, a box is what an annotator
would draw, and it survives resizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

Box = tuple[int, int, int, int]


@dataclass
class Region:
    """The top of a cluster's mean relevance distribution."""

    mask: np.ndarray  # (H, W) bool: the fewest pixels holding ``mass`` of the mean distribution
    area: float  # its share of the image
    agreement: float  # share of the members whose most relevant pixel lies inside it (chance: ``area``)
    mean_map: np.ndarray  # (H, W) float64, the cluster's mean relevance distribution


def top_region(distribution: np.ndarray, mass: float) -> np.ndarray:
    """The fewest pixels of a (H, W) distribution (sum 1) whose values add up to ``mass``."""
    flat = distribution.ravel()
    order = np.argsort(-flat, kind="stable")
    count = int(np.searchsorted(np.cumsum(flat[order]), mass * flat.sum())) + 1
    region = np.zeros(flat.shape, bool)
    region[order[: min(count, flat.size)]] = True
    return region.reshape(distribution.shape)


def cluster_region(distributions: torch.Tensor, mass: float = 0.5) -> Region:
    """``distributions`` (n, H, W) of one cluster's members (each summing to 1) -> its Region."""
    values = distributions.double().numpy()
    mean = values.mean(0)
    region = top_region(mean, mass)
    peaks = values.reshape(len(values), -1).argmax(1)
    agreement = float(region.ravel()[peaks].mean()) if len(values) else 0.0
    return Region(region, float(region.mean()), agreement, mean)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def proposed_box(distribution: np.ndarray, region: np.ndarray, *, level: float = 0.1) -> Box | None:
    """A member's own region within its cluster's: among its pixels inside ``region`` (dilated by one
    pixel) that hold at least ``level`` x its largest relevance there, the bounding box of those
    connected to that peak, gaps of one pixel bridged (an artefact whose relevance is patchy, a
    one-pixel stripe lit at some rows, is boxed whole; object parts elsewhere in the region are not
    joined to it). None when it has no relevance there."""
    allowed = dilate(region, 1)
    inside = np.where(allowed, distribution, 0.0)
    peak = inside.max()
    if peak <= 0:
        return None
    strong = inside >= level * peak
    _, components = cv2.connectedComponents(dilate(strong, 1).astype(np.uint8), connectivity=8)
    row, col = np.unravel_index(int(np.argmax(inside)), inside.shape)
    rows, cols = np.nonzero(strong & (components == components[row, col]))
    return int(rows.min()), int(cols.min()), int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def _window_means(distribution: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """Mean of ``distribution`` (H, W) in every height x width window, indexed by the window's top-left
    corner; None when the window does not fit."""
    rows, cols = distribution.shape
    if height > rows or width > cols:
        return None
    return F.avg_pool2d(torch.from_numpy(distribution)[None, None], (height, width), stride=1)[0, 0].numpy()


def control_box(distribution: np.ndarray, box: Box, *, margin: int = 1, avoid: np.ndarray | None = None) -> Box | None:
    """A box of the same size as ``box`` that does not touch it (``margin`` pixels apart) nor, where
    possible, ``avoid`` (H, W bool: the cluster's region, so the control does not land on another
    part of the same artefact), placed where the image's own relevance inside it is largest: the
    control asks whether the candidate region matters more than the most relevant other region of the
    same area, so that removing an object part (which any model needs) does not pass for a shortcut.
    None when no such place exists."""
    top, left, height, width = box
    sums = _window_means(distribution, height, width)
    if sums is None:
        return None
    # Positions whose box would overlap the candidate grown by the margin are not allowed.
    r = np.arange(sums.shape[0])[:, None]
    c = np.arange(sums.shape[1])[None, :]
    overlaps = ((r + height > top - margin) & (r < top + height + margin)
                & (c + width > left - margin) & (c < left + width + margin))
    sums = np.where(overlaps, -np.inf, sums)
    if avoid is not None and avoid.any():
        hits = F.avg_pool2d(torch.from_numpy(avoid.astype(np.float64))[None, None], (height, width),
                            stride=1)[0, 0].numpy()
        if np.isfinite(np.where(hits > 0, -np.inf, sums)).any():
            sums = np.where(hits > 0, -np.inf, sums)
    if not np.isfinite(sums).any():
        return None
    row, col = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(row), int(col), height, width


def box_overlap(a: Box, b: Box) -> float:
    """Share of ``a``'s pixels that lie inside ``b`` (0..1)."""
    rows = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    cols = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return rows * cols / max(1, a[2] * a[3])


def overlapping_control_box(distribution: np.ndarray, box: Box, *,
                            max_overlap: float = 0.5) -> tuple[Box, float] | None:
    """The control for a candidate box too large for a disjoint one (``control_box`` found no place:
    a box taller and wider than about half the image): a box of the same size at the place sharing the
    fewest pixels with the candidate, the most relevant of those. Returns (box, shared share 0..1), or
    None when even the best place shares more than ``max_overlap`` of its pixels with the candidate.

    Why this is sound but conservative: the shared pixels are edited in both arms of the paired test,
    so whatever they carry adds to the control's effect as much as to the candidate's and cancels in
    the difference; only what the candidate holds beyond the control counts. A shortcut lying in the
    shared part is missed, never invented (docs/discover.md, "Large regions")."""
    top, left, height, width = box
    sums = _window_means(distribution, height, width)
    if sums is None:
        return None
    r = np.arange(sums.shape[0])[:, None]
    c = np.arange(sums.shape[1])[None, :]
    shared_rows = np.clip(np.minimum(r + height, top + height) - np.maximum(r, top), 0, None)
    shared_cols = np.clip(np.minimum(c + width, left + width) - np.maximum(c, left), 0, None)
    shared = shared_rows * shared_cols / (height * width)
    least = shared.min()
    if least > max_overlap:
        return None
    row, col = np.unravel_index(int(np.argmax(np.where(shared <= least + 1e-12, sums, -np.inf))), sums.shape)
    return (int(row), int(col), height, width), float(least)


def scale_box(box: Box, from_size: tuple[int, int], to_size: tuple[int, int]) -> Box:
    """A box found on maps of ``from_size`` (H, W) in the pixels of ``to_size`` (outward rounding)."""
    sy, sx = to_size[0] / from_size[0], to_size[1] / from_size[1]
    top, left = int(np.floor(box[0] * sy)), int(np.floor(box[1] * sx))
    bottom, right = int(np.ceil((box[0] + box[2]) * sy)), int(np.ceil((box[1] + box[3]) * sx))
    return top, left, min(bottom, to_size[0]) - top, min(right, to_size[1]) - left


def box_mask(box: Box, size: tuple[int, int]) -> np.ndarray:
    """(H, W) float32 mask, 1 inside ``box``."""
    mask = np.zeros(size, np.float32)
    top, left, height, width = box
    mask[top : top + height, left : left + width] = 1.0
    return mask


def box_iou(mask: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two (H, W) masks (> 0.5 counts as inside); 0 when both are empty."""
    a, b = mask > 0.5, truth > 0.5
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0
