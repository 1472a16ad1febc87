"""Contaminations drawn on top of the image: a decoy patch or a text tag in a random corner, a
stripe near an edge, a bar on the left border (see :mod:`auditkit.data.contaminations` for the
variants and the randomness, :mod:`auditkit.data.contamination_base` for the base class).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .contamination_base import (
    Contamination,
    _box_masks,
    _check_fraction,
    _check_int,
    _check_step,
    _corner_offsets,
    _label_brightness,
    _other_labels,
    _random_corners,
    _round_half_up,
)


# ----------------------------------------------------------------------------- decoy patch


@dataclass(frozen=True)
class DecoyPatch(Contamination):
    """Decoy MNIST (Ross et al. 2017; TAP paper §5.1).

    A ``patch_size`` x ``patch_size`` square flush with a corner chosen uniformly per image,
    every channel set to v(y) = (255 - step*y)/255 (step 25: labels 0..9 -> 255..30).
    "contaminated" uses the image's label y; "permuted" a label drawn uniformly from the
    num_classes - 1 others. Mask = the patch. Needs step*(num_classes - 1) <= 255 and
    patch_size <= min(H, W).
    """

    kind: ClassVar[str] = "decoy-patch"
    patch_size: int = 4
    step: int = 25

    def __post_init__(self) -> None:
        _check_int("patch_size", self.patch_size, 1)
        _check_int("step", self.step, 1)

    def _check_fits(self, height: int, width: int, num_classes: int) -> None:
        _check_step(self.step, num_classes)
        if self.patch_size > min(height, width):
            raise DataError(f"patch_size={self.patch_size} does not fit {height}x{width} images")

    def _render(self, images, labels, variant, generators, num_classes):
        n, _, height, width = images.shape
        corners = _random_corners(generators)
        shown = labels if variant == "contaminated" else _other_labels(labels, generators, num_classes)
        size = np.full(n, self.patch_size)
        top, left = _corner_offsets(corners, height, width, size, size, margin=0)
        mask = _box_masks(height, width, top, left, self.patch_size, self.patch_size)
        value = _label_brightness(shown, self.step)[:, None, None, None]
        return np.where(mask, value, images), mask


# ----------------------------------------------------------------------------- stripe


@dataclass(frozen=True)
class Stripe(Contamination):
    """TAP App. F: a full-height vertical stripe near the left or right edge.

    Width w = ``width`` or, when None, max(1, round(6 * W / 224)) (6 px at 224 px); offset o
    drawn uniformly from {0, ..., max_offset} with max_offset = ``max_offset`` or, when None,
    round(15 * W / 224) (15 px at 224 px); rounding is half-up. The edge (left/right) is drawn
    uniformly per image; the stripe covers columns [o, o+w) from the left edge or
    [W-o-w, W-o) from the right edge, all rows. Every channel is set to
    v(y) = (255 - step*y)/255 with step = ``step`` or, when None, 255 // num_classes
    (127 for 2 classes, 51 for 5, as in TAP). "permuted" shows a label drawn uniformly from
    the other classes (for 2 classes: the swap). Mask = the stripe.
    """

    kind: ClassVar[str] = "stripe"
    width: int | None = None
    max_offset: int | None = None
    step: int | None = None

    def __post_init__(self) -> None:
        if self.width is not None:
            _check_int("width", self.width, 1)
        if self.max_offset is not None:
            _check_int("max_offset", self.max_offset, 0)
        if self.step is not None:
            _check_int("step", self.step, 1)

    def stripe_width(self, image_width: int) -> int:
        return self.width if self.width is not None else max(1, _round_half_up(6 * image_width / 224))

    def stripe_max_offset(self, image_width: int) -> int:
        return self.max_offset if self.max_offset is not None else _round_half_up(15 * image_width / 224)

    def brightness_step(self, num_classes: int) -> int:
        return self.step if self.step is not None else 255 // num_classes

    def _check_fits(self, height: int, width: int, num_classes: int) -> None:
        step = self.brightness_step(num_classes)
        if step < 1:
            raise DataError(f"stripe brightness needs num_classes <= 255 (got {num_classes}) or an explicit step")
        _check_step(step, num_classes)
        stripe_w, max_off = self.stripe_width(width), self.stripe_max_offset(width)
        if stripe_w + max_off > width:
            raise DataError(f"stripe width {stripe_w} + max_offset {max_off} exceeds the image width {width}")

    def _render(self, images, labels, variant, generators, num_classes):
        n, _, height, width = images.shape
        stripe_w, max_off = self.stripe_width(width), self.stripe_max_offset(width)
        # Per image, in this order: edge (0 left, 1 right), offset, then the other label if permuted.
        from_right = np.array([g.integers(2) for g in generators], dtype=bool)
        offsets = np.array([g.integers(max_off + 1) for g in generators], dtype=np.int64)
        shown = labels if variant == "contaminated" else _other_labels(labels, generators, num_classes)
        left = np.where(from_right, width - offsets - stripe_w, offsets)
        mask = _box_masks(height, width, np.zeros(n, dtype=np.int64), left, height, stripe_w)
        value = _label_brightness(shown, self.brightness_step(num_classes))[:, None, None, None]
        return np.where(mask, value, images), mask


# ----------------------------------------------------------------------------- marker


@dataclass(frozen=True)
class Marker(Contamination):
    """A thin class-coded mark: a vertical bar on the left border whose HEIGHT encodes the class, as a
    site label or a scanner mark can (the shortcut of docs/repair.md's "which method" table).

    Bar: ``width`` px wide (default max(1, round(W / 28))) and ``length`` px long (default
    max(2, round(5 H / 28)): 1x5 px at 28x28), in columns [``offset``, offset + width) (default 0),
    value 1 in every channel. Its top row for class y is m + round(y (H - 2m - length) / (K - 1)),
    m = round(2 H / 28): class 0 at the top, class K-1 at the bottom; neighbouring classes' bars
    overlap, so the model must read the bar's exact position. Deterministic given the label: no
    random placement. In "contaminated" a fraction ``presence`` of the images (drawn per image)
    carries the bar of its own label, the rest none (mask all 0); "permuted" always shows the bar
    of a label drawn uniformly from the other classes. Mask = the bar.
    """

    kind: ClassVar[str] = "marker"
    length: int | None = None
    width: int | None = None
    offset: int = 0
    presence: float = 0.9

    def __post_init__(self) -> None:
        if self.length is not None:
            _check_int("length", self.length, 1)
        if self.width is not None:
            _check_int("width", self.width, 1)
        _check_int("offset", self.offset, 0)
        _check_fraction("presence", self.presence)

    def bar_length(self, height: int) -> int:
        return self.length if self.length is not None else max(2, _round_half_up(5 * height / 28))

    def bar_width(self, width: int) -> int:
        return self.width if self.width is not None else max(1, _round_half_up(width / 28))

    def margin(self, height: int) -> int:
        return _round_half_up(2 * height / 28)

    def tops(self, labels: np.ndarray, height: int, num_classes: int) -> np.ndarray:
        """The bar's top row for each label."""
        travel = height - 2 * self.margin(height) - self.bar_length(height)
        steps = labels.astype(np.float64) * travel / max(num_classes - 1, 1)
        return (self.margin(height) + np.floor(steps + 0.5)).astype(np.int64)

    def _check_fits(self, height: int, width: int, num_classes: int) -> None:
        if height - 2 * self.margin(height) - self.bar_length(height) < 0:
            raise DataError(f"a marker of length {self.bar_length(height)} does not fit {height}-px-high images")
        if self.offset + self.bar_width(width) > width:
            raise DataError(
                f"marker offset {self.offset} + width {self.bar_width(width)} exceeds the image width {width}"
            )

    def _render(self, images, labels, variant, generators, num_classes):
        n, _, height, width = images.shape
        # Per image, in this order: whether the bar is shown (contaminated), then the other label (permuted).
        if variant == "contaminated":
            shown = np.array([g.random() < self.presence for g in generators], dtype=bool)
            coded = labels
        else:
            shown = np.ones(n, dtype=bool)
            coded = _other_labels(labels, generators, num_classes)
        top = self.tops(coded, height, num_classes)
        left = np.full(n, self.offset, dtype=np.int64)
        mask = _box_masks(height, width, top, left, self.bar_length(height), self.bar_width(width))
        mask &= shown[:, None, None, None]
        return np.where(mask, np.float32(1.0), images), mask


# ----------------------------------------------------------------------------- text tag

TEXT_FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_WIDTH_FRACTION = 0.35  # the widest tag spans 35% of the image width...
TEXT_HEIGHT_FRACTION = 0.35  # ...unless that would make it taller than 35% of the height


def default_text_tags(num_classes: int) -> tuple[str, ...]:
    """TAP's tags: ("ABC", "XYZ") for 2 classes (PNEU), ("ABC", "DEF", "GHI", "JKL", "MNO") for 5 (KNEE).

    Otherwise class k < 8 gets the k-th consecutive 3-letter group ("ABC", "DEF", ..., "VWX")
    and class k >= 8 the zero-padded number f"{k:03d}" ("008", "009", ...), so every tag has
    (at least) three characters of similar rendered width.
    """
    if num_classes == 2:
        return ("ABC", "XYZ")
    letters = string.ascii_uppercase
    return tuple(letters[3 * k : 3 * k + 3] if k < 8 else f"{k:03d}" for k in range(num_classes))


def _text_thickness(height: int, width: int) -> int:
    """Stroke thickness in px: 1 up to ~170 px, 2 at 224 px, 5 at 512 px."""
    return max(1, _round_half_up(min(height, width) / 112))


def _render_tag(text: str, scale: float, thickness: int) -> np.ndarray:
    """The tag drawn white (255, anti-aliased) and cropped to its non-zero pixels: uint8 (h, w)."""
    (text_w, text_h), baseline = cv2.getTextSize(text, TEXT_FONT, scale, thickness)
    pad = 2 * thickness + 2  # room for the stroke width and anti-aliasing around the nominal box
    canvas = np.zeros((text_h + baseline + 2 * pad, text_w + 2 * pad), dtype=np.uint8)
    cv2.putText(canvas, text, (pad, pad + text_h), TEXT_FONT, scale, 255, thickness, cv2.LINE_AA)
    rows = np.flatnonzero(canvas.any(axis=1))
    cols = np.flatnonzero(canvas.any(axis=0))
    if rows.size == 0:
        return canvas[:0, :0]
    return canvas[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def render_text_tags(tags: Sequence[str], height: int, width: int) -> list[np.ndarray]:
    """Each tag as a tight uint8 alpha image, all at one font scale and thickness.

    thickness = max(1, round(min(H, W)/112)). The scale makes the widest tag's drawn pixels
    span 35% of W unless the tallest would then exceed 35% of H: a first guess from
    cv2.getTextSize at scale 1, corrected once by the ratio of target to drawn size (the
    nominal text box includes side bearings, so the guess draws ~15% narrow). One common
    scale keeps the tag's size from carrying the class.
    """
    thickness = _text_thickness(height, width)
    target_w, target_h = TEXT_WIDTH_FRACTION * width, TEXT_HEIGHT_FRACTION * height
    sizes = [cv2.getTextSize(t, TEXT_FONT, 1.0, thickness) for t in tags]
    widest = max(w for (w, _), _ in sizes)
    tallest = max(h + b for (_, h), b in sizes)
    scale = min(target_w / widest, target_h / tallest)
    drawn = [_render_tag(t, scale, thickness) for t in tags]
    drawn_w = max(d.shape[1] for d in drawn)
    drawn_h = max(d.shape[0] for d in drawn)
    if drawn_w == 0:
        return drawn
    scale *= min(target_w / drawn_w, target_h / drawn_h)
    return [_render_tag(t, scale, thickness) for t in tags]


def _text_margin(height: int, width: int) -> int:
    """Gap between a tag and the image edges: 4% of the shorter side, at least 1 px."""
    return max(1, _round_half_up(0.04 * min(height, width)))


@dataclass(frozen=True)
class TextTag(Contamination):
    """TAP's PNEU/KNEE contamination (TAP paper §5.1): a class-specific string in a random corner.

    The tag of the shown class (``strings`` or ``default_text_tags(num_classes)``) is drawn
    white with cv2.putText (FONT_HERSHEY_SIMPLEX, anti-aliased; scale and thickness from
    ``render_text_tags``: the widest tag spans ~35% of the width) and pasted in a corner drawn
    uniformly per image, ``_text_margin`` px from the edges. With a = rendered/255 per pixel,
    out = (1 - a) * x + a * 1 in every channel. Mask = pixels with a > 0, dilated by a
    (2*mask_margin+1)-square when mask_margin > 0. "permuted" shows a tag drawn uniformly from
    the other classes (for 2 classes: the swap). ``strings`` may be a comma-separated string.
    """

    kind: ClassVar[str] = "text-tag"
    strings: tuple[str, ...] | None = None
    mask_margin: int = 0

    def __post_init__(self) -> None:
        if self.strings is not None:
            tags = self.strings.split(",") if isinstance(self.strings, str) else self.strings
            if not isinstance(tags, Sequence) or not all(isinstance(t, str) for t in tags):
                raise DataError(f"strings must be a list of strings, got {self.strings!r}")
            tags = tuple(t.strip() for t in tags)
            if not all(t and t.isascii() and t.isprintable() for t in tags):
                raise DataError(f"strings must be non-empty printable ASCII (Hershey fonts), got {tags!r}")
            if len(set(tags)) != len(tags):
                raise DataError(f"strings must be distinct, got {tags!r}")
            object.__setattr__(self, "strings", tags)
        _check_int("mask_margin", self.mask_margin, 0)

    def tags(self, num_classes: int) -> tuple[str, ...]:
        return self.strings if self.strings is not None else default_text_tags(num_classes)

    def _check_fits(self, height: int, width: int, num_classes: int) -> None:
        if self.strings is not None and len(self.strings) != num_classes:
            raise DataError(f"text-tag has {len(self.strings)} strings for {num_classes} classes")

    def _render(self, images, labels, variant, generators, num_classes):
        n, _, height, width = images.shape
        templates = render_text_tags(self.tags(num_classes), height, width)
        if any(t.size == 0 for t in templates):
            raise DataError(f"{height}x{width} images are too small to draw text tags on")
        corners = _random_corners(generators)
        shown = labels if variant == "contaminated" else _other_labels(labels, generators, num_classes)
        box_h = np.array([templates[k].shape[0] for k in shown], dtype=np.int64)
        box_w = np.array([templates[k].shape[1] for k in shown], dtype=np.int64)
        top, left = _corner_offsets(corners, height, width, box_h, box_w, _text_margin(height, width))
        alpha = np.zeros((n, 1, height, width), dtype=np.float32)
        for i in range(n):  # paste each image's tag (clipped in case it exceeds a tiny image)
            tag = templates[shown[i]][: height - top[i], : width - left[i]]
            alpha[i, 0, top[i] : top[i] + tag.shape[0], left[i] : left[i] + tag.shape[1]] = tag / np.float32(255.0)
        out = (1.0 - alpha) * images + alpha
        mask = torch.from_numpy(alpha > 0)
        if self.mask_margin > 0:  # square dilation = max pool with stride 1
            k = 2 * self.mask_margin + 1
            mask = F.max_pool2d(mask.float(), k, stride=1, padding=self.mask_margin) > 0
        return out, mask.numpy()
