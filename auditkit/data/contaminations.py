"""Contamination generators: spurious signals (shortcuts) correlated with the label.

Each generator adds an artifact whose appearance is a function of the label, so a classifier
can learn the artifact instead of the object. Every generator makes three variants:

- ``"contaminated"``: the artifact follows the label (the shortcut works);
- ``"permuted"``: the artifact is present but decorrelated from the label (the shortcut lies);
- ``"clean"``: no artifact;

and ``coloured-background`` adds ``"inverted"`` (class k wears class k+1's colour).

Generators (``CONTAMINATIONS`` maps their ``kind`` to the class):

- ``decoy-patch``  Decoy MNIST (Ross, Hughes & Doshi-Velez 2017, "Right for the Right
  Reasons", as used in the TAP paper §5.1): a grey patch in a random corner.
- ``coloured-background``  Coloured MNIST ("The Lazy Artist" study, Task 0): the background
  (or the strokes) takes a class colour, with a bias.
- ``text-tag``  TAP's PNEU/KNEE contamination (TAP paper §5.1): a class-specific string in a
  random corner.
- ``stripe``  TAP App. F: a vertical stripe near the left or right edge with a class brightness.
- ``marker``  a thin bar on the left border whose height encodes the class, in 90 % of the
  contaminated images (a site label or scanner mark; docs/repair.md).

``Contamination.apply(images, labels, variant, rng, num_classes)`` contaminates one batch (it
is also how audits make counterfactuals); ``contaminate_dataset`` contaminates a whole array in
chunks, with results independent of the chunk size.

Randomness: every image gets its own ``numpy.random.Generator``. ``apply`` draws 128 bits of
entropy from ``rng`` (advancing it), seeds a ``SeedSequence`` with them and spawns one child per
image (``SeedSequence.spawn``); all of an image's random choices (corner, other label, texture
noise) come from its child. ``contaminate_dataset(..., seed)`` does the same from
``numpy.random.default_rng(seed)``, spawning children chunk by chunk — ``SeedSequence.spawn``
numbers children consecutively, so chunk k gets exactly the children it would get from one
spawn of all N. Hence ``contaminate_dataset(x, y, c, v, seed)`` equals
``c.apply(x, y, v, numpy.random.default_rng(seed), K)`` for every chunk size.

Images are (N, C, H, W) float in [0, 1] with C in {1, 3} and any H, W; the work is done in
numpy/OpenCV on the CPU and the results are returned on the input's device as float32.
"""

from __future__ import annotations

import colorsys
import dataclasses
import string
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError

COMMON_VARIANTS = ("contaminated", "permuted", "clean")
DEFAULT_CHUNK_SIZE = 512

# Corner indices used by the corner-placed artifacts (decoy patch, text tag).
TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT, BOTTOM_RIGHT = 0, 1, 2, 3


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, minimum: int) -> int:
    # bool is an int subclass; "patch_size=True" is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= float(value) <= 1.0:
        raise DataError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise DataError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _check_rgb(name: str, value: object) -> tuple[float, float, float]:
    if isinstance(value, str):  # "1,0,0" from a command line or a builtin: query string
        value = value.split(",")
    try:
        rgb = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise DataError(f"{name} must be three numbers in [0, 1] (R, G, B), got {value!r}") from None
    if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
        raise DataError(f"{name} must be three numbers in [0, 1] (R, G, B), got {value!r}")
    return rgb  # type: ignore[return-value]


def _check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise DataError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return int(num_classes)


def _check_step(step: int, num_classes: int) -> None:
    """Brightness levels (255 - step*y)/255 must stay in [0, 1] for every label."""
    if step * (num_classes - 1) > 255:
        raise DataError(
            f"step={step} is too large for {num_classes} classes: step*(num_classes-1) must be <= 255 "
            f"(use step <= {255 // (num_classes - 1)})"
        )


def _as_batch(images: object, labels: object, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated float32 (N, C, H, W) images and int64 (N,) labels as numpy arrays (copies)."""
    images_t = torch.as_tensor(images)
    labels_t = torch.as_tensor(labels)
    if images_t.dim() != 4 or images_t.shape[1] not in (1, 3):
        raise DataError(f"images must be (N, C, H, W) with C = 1 or 3, got shape {tuple(images_t.shape)}")
    if not images_t.is_floating_point():
        raise DataError(f"images must be floating point in [0, 1], got {images_t.dtype}")
    if labels_t.shape != (images_t.shape[0],):
        raise DataError(f"labels must be (N,) = ({images_t.shape[0]},), got shape {tuple(labels_t.shape)}")
    if labels_t.is_floating_point() or labels_t.is_complex() or labels_t.dtype == torch.bool:
        raise DataError(f"labels must be integers, got {labels_t.dtype}")
    x = images_t.detach().to("cpu", torch.float32).numpy().copy()
    y = labels_t.detach().to("cpu", torch.int64).numpy().copy()
    # "not (a and b)" also rejects NaN, for which every comparison is False.
    if x.size and not (x.min() >= 0.0 and x.max() <= 1.0):
        raise DataError(f"image values must be in [0, 1], got [{x.min()}, {x.max()}]")
    if y.size and not (y.min() >= 0 and y.max() < num_classes):
        raise DataError(f"labels must be in [0, {num_classes}), got values in [{y.min()}, {y.max()}]")
    return x, y


# ----------------------------------------------------------------------------- randomness


def image_seed_root(rng: np.random.Generator) -> np.random.SeedSequence:
    """A SeedSequence seeded by 128 bits drawn from ``rng``; its children seed one image each."""
    return np.random.SeedSequence(rng.integers(0, 2**32, size=4, dtype=np.uint64).tolist())


def spawn_generators(root: np.random.SeedSequence, count: int) -> list[np.random.Generator]:
    """The next ``count`` children of ``root`` as Generators (consecutive calls continue the numbering)."""
    return [np.random.Generator(np.random.PCG64(child)) for child in root.spawn(count)]


def _other_labels(labels: np.ndarray, generators: Sequence[np.random.Generator], num_classes: int) -> np.ndarray:
    """A label != y per image, uniform over the num_classes - 1 others: (y + 1 + U{0..K-2}) mod K.

    For two classes this is the swap 0 <-> 1.
    """
    offsets = np.array([g.integers(num_classes - 1) for g in generators], dtype=np.int64)
    return (labels + 1 + offsets) % num_classes


def _random_corners(generators: Sequence[np.random.Generator]) -> np.ndarray:
    return np.array([g.integers(4) for g in generators], dtype=np.int64)


def _corner_offsets(
    corners: np.ndarray, height: int, width: int, box_h: np.ndarray, box_w: np.ndarray, margin: int
) -> tuple[np.ndarray, np.ndarray]:
    """(top, left) per image of a box_h x box_w box ``margin`` px inside the chosen corner."""
    at_top = (corners == TOP_LEFT) | (corners == TOP_RIGHT)
    at_left = (corners == TOP_LEFT) | (corners == BOTTOM_LEFT)
    top = np.where(at_top, margin, height - margin - box_h)
    left = np.where(at_left, margin, width - margin - box_w)
    # A box too large for the margin hugs the edge instead of leaving the image.
    return np.clip(top, 0, np.maximum(height - box_h, 0)), np.clip(left, 0, np.maximum(width - box_w, 0))


def _box_masks(
    height: int, width: int, top: np.ndarray, left: np.ndarray, box_h: np.ndarray | int, box_w: np.ndarray | int
) -> np.ndarray:
    """(N, 1, H, W) bool: rows [top, top+box_h) x cols [left, left+box_w) per image."""
    bottom = (top + box_h)[:, None]
    right = (left + box_w)[:, None]
    rows = np.arange(height)[None, :]
    cols = np.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < bottom)  # (N, H)
    in_cols = (cols >= left[:, None]) & (cols < right)  # (N, W)
    return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]


def _label_brightness(labels: np.ndarray, step: int) -> np.ndarray:
    """(255 - step*y)/255 per image, float32 (computed in float64, then rounded once to float32)."""
    return ((255.0 - step * labels.astype(np.float64)) / 255.0).astype(np.float32)


def _round_half_up(value: float) -> int:
    return int(np.floor(value + 0.5))


# ----------------------------------------------------------------------------- base class


@dataclass(frozen=True)
class Contamination(ABC):
    """A spurious signal correlated with the label. Subclasses are frozen dataclasses of their parameters."""

    kind: ClassVar[str]
    variants: ClassVar[tuple[str, ...]] = COMMON_VARIANTS

    def out_channels(self, in_channels: int) -> int:
        """Channels of the contaminated images made from ``in_channels``-channel inputs."""
        return in_channels

    def params(self) -> dict:
        """The JSON-able parameters (None = the documented default), with ``kind``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"kind": self.kind, **{k: _jsonable(v) for k, v in values.items()}}

    def apply(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        variant: str,
        rng: np.random.Generator,
        num_classes: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Contaminate one batch: (new images (N, out_channels(C), H, W), masks (N, 1, H, W)).

        ``images`` (N, C, H, W) float in [0, 1], C in {1, 3}; ``labels`` (N,) integers in
        [0, num_classes). Masks are 1 exactly on the artifact's pixels (all 0 for "clean").
        Inputs are not modified; the output depends only on the inputs and ``rng``'s state
        (which advances by one 128-bit draw).
        """
        generators = spawn_generators(image_seed_root(rng), len(images))
        return self._apply_with_generators(images, labels, variant, generators, num_classes)

    def _apply_with_generators(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        variant: str,
        generators: Sequence[np.random.Generator],
        num_classes: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if variant not in self.variants:
            raise DataError(f"{self.kind} has no variant {variant!r}; variants: {', '.join(self.variants)}")
        num_classes = _check_num_classes(num_classes)
        x, y = _as_batch(images, labels, num_classes)
        self._check_fits(x.shape[2], x.shape[3], num_classes)
        if len(generators) != len(x):
            raise ValueError(f"{len(generators)} generators for {len(x)} images")
        if variant == "clean" or len(x) == 0:
            out, mask = self._clean(x), np.zeros((len(x), 1, *x.shape[2:]), dtype=bool)
        else:
            out, mask = self._render(x, y, variant, generators, num_classes)
        device = torch.as_tensor(images).device
        out_t = torch.from_numpy(np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)).to(device)
        mask_t = torch.from_numpy(mask.astype(np.float32)).to(device)
        return out_t, mask_t

    def _check_fits(self, height: int, width: int, num_classes: int) -> None:
        """Raise DataError when the parameters cannot work for this image size or class count."""

    def _clean(self, images: np.ndarray) -> np.ndarray:
        return images

    @abstractmethod
    def _render(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        variant: str,
        generators: Sequence[np.random.Generator],
        num_classes: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(float32 images (N, C', H, W), bool masks (N, 1, H, W)) for a non-clean variant."""


def _jsonable(value: object) -> object:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


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
            raise DataError(f"marker offset {self.offset} + width {self.bar_width(width)} exceeds the image width {width}")

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


# ----------------------------------------------------------------------------- coloured background

# Ten clearly distinct colours (pairwise RGB distance >= 0.36): red, green, blue, yellow,
# magenta, cyan, orange, purple, brown, light green.
DEFAULT_PALETTE = (
    (0.90, 0.10, 0.10),
    (0.10, 0.70, 0.15),
    (0.15, 0.30, 0.95),
    (0.95, 0.85, 0.10),
    (0.90, 0.15, 0.85),
    (0.10, 0.85, 0.90),
    (1.00, 0.50, 0.00),
    (0.45, 0.10, 0.60),
    (0.50, 0.30, 0.10),
    (0.60, 0.95, 0.45),
)
TEXTURES = ("noise", "smooth", "perlin")
SMOOTH_GRID = 4  # "smooth": a 4x4 grid of uniform values, bilinearly upsampled
PERLIN_GRIDS = (2, 4, 8, 16)  # "perlin": octave o uses a grid of PERLIN_GRIDS[o] cells, amplitude 2^-o


def default_palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) RGB in [0, 1]: DEFAULT_PALETTE's first colours for <= 10 classes,
    else num_classes evenly spaced hues (HSV h = k/K, s = 0.85, v = 0.9)."""
    if num_classes <= len(DEFAULT_PALETTE):
        return np.array(DEFAULT_PALETTE[:num_classes], dtype=np.float32)
    return np.array([colorsys.hsv_to_rgb(k / num_classes, 0.85, 0.9) for k in range(num_classes)], dtype=np.float32)


def _upsampled_grid(generator: np.random.Generator, cells: int, height: int, width: int, interpolation: int) -> np.ndarray:
    """A cells x cells grid of U[0, 1) values resized to (height, width) with cv2.resize."""
    grid = generator.random((cells, cells), dtype=np.float32)
    return cv2.resize(grid, (width, height), interpolation=interpolation)


def texture_field(texture: str, generator: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (H, W) float32 field t in [0, 1].

    - "noise":  t ~ U[0, 1) i.i.d. per pixel (high frequency);
    - "smooth": a SMOOTH_GRID x SMOOTH_GRID grid of U[0, 1) values, bilinearly upsampled
      (cv2.INTER_LINEAR; a convex combination, so it stays in [0, 1]);
    - "perlin": value noise, sum_o 2^-o * clip(bicubic(grid_o), 0, 1) / sum_o 2^-o over the
      octaves with grids of PERLIN_GRIDS cells (each capped at the image size).
    """
    if texture == "noise":
        return generator.random((height, width), dtype=np.float32)
    if texture == "smooth":
        return _upsampled_grid(generator, SMOOTH_GRID, height, width, cv2.INTER_LINEAR)
    total = np.zeros((height, width), dtype=np.float32)
    amplitudes = 0.0
    for octave, cells in enumerate(PERLIN_GRIDS):
        amplitude = 0.5**octave
        cells = max(2, min(cells, max(height, width)))
        layer = _upsampled_grid(generator, cells, height, width, cv2.INTER_CUBIC)
        total += amplitude * np.clip(layer, 0.0, 1.0)
        amplitudes += amplitude
    return total / np.float32(amplitudes)


@dataclass(frozen=True)
class ColouredBackground(Contamination):
    """Coloured MNIST ("The Lazy Artist", Task 0): the class colour on the background (or strokes).

    The digit's grey level is alpha = x (C = 1) or the channel mean (C = 3), white strokes on
    a dark background; the output has 3 channels. Colour c = palette[shown class], with the
    palette ``palette`` or ``default_palette(num_classes)``, and t = ``texture_field`` in [0, 1].

    Background mode (default):
        background = c * ((1 - noise_mix) + noise_mix * t)
        out        = alpha * stroke_colour + (1 - alpha) * background
        mask       = alpha < stroke_threshold   (the pixels where the colour dominates)
    Foreground mode (``foreground=True``): the strokes carry the colour, the background is
    grey texture with no class information:
        out  = alpha * c + (1 - alpha) * (noise_mix * t)   (t replicated to 3 channels)
        mask = alpha >= stroke_threshold        (the stroke pixels)

    Shown class: "contaminated": y with probability ``bias``, else one of the other classes
    uniformly; "permuted": uniform over all num_classes colours (the study's hard set);
    "inverted": (y + 1) mod num_classes; "clean": the grey digit replicated to 3 channels.
    """

    kind: ClassVar[str] = "coloured-background"
    variants: ClassVar[tuple[str, ...]] = ("contaminated", "permuted", "inverted", "clean")
    bias: float = 0.95
    texture: str = "noise"
    noise_mix: float = 0.4
    foreground: bool = False
    stroke_threshold: float = 0.1
    stroke_colour: tuple[float, float, float] = (1.0, 1.0, 1.0)
    palette: tuple[tuple[float, float, float], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bias", _check_fraction("bias", self.bias))
        object.__setattr__(self, "noise_mix", _check_fraction("noise_mix", self.noise_mix))
        threshold = _check_fraction("stroke_threshold", self.stroke_threshold)
        if threshold == 0.0:
            raise DataError("stroke_threshold must be in (0, 1], got 0")
        object.__setattr__(self, "stroke_threshold", threshold)
        if self.texture not in TEXTURES:
            raise DataError(f"texture must be one of {', '.join(TEXTURES)}, got {self.texture!r}")
        object.__setattr__(self, "foreground", _check_bool("foreground", self.foreground))
        object.__setattr__(self, "stroke_colour", _check_rgb("stroke_colour", self.stroke_colour))
        if self.palette is not None:
            if isinstance(self.palette, str) or not isinstance(self.palette, Sequence):
                raise DataError(f"palette must be a list of (R, G, B) colours in [0, 1], got {self.palette!r}")
            colours = tuple(_check_rgb("palette", c) for c in self.palette)
            if len(set(colours)) != len(colours):
                raise DataError("palette colours must be distinct")
            object.__setattr__(self, "palette", colours)

    def out_channels(self, in_channels: int) -> int:
        return 3

    def colours(self, num_classes: int) -> np.ndarray:
        """(num_classes, 3) float32: the colour of each class."""
        if self.palette is None:
            return default_palette(num_classes)
        return np.array(self.palette[:num_classes], dtype=np.float32)

    def _check_fits(self, height: int, width: int, num_classes: int) -> None:
        if self.palette is not None and len(self.palette) < num_classes:
            raise DataError(f"palette has {len(self.palette)} colours for {num_classes} classes")

    @staticmethod
    def _grey(images: np.ndarray) -> np.ndarray:
        """(N, 1, H, W): the digit's grey level (channel mean for RGB inputs)."""
        return images.mean(axis=1, keepdims=True, dtype=np.float32)

    def _clean(self, images: np.ndarray) -> np.ndarray:
        return np.repeat(self._grey(images), 3, axis=1)

    def _shown_classes(self, labels, variant, generators, num_classes) -> np.ndarray:
        if variant == "inverted":
            return (labels + 1) % num_classes
        if variant == "permuted":
            return np.array([g.integers(num_classes) for g in generators], dtype=np.int64)
        # contaminated: per image one uniform draw for the bias coin, then the other label.
        keeps = np.array([g.random() < self.bias for g in generators], dtype=bool)
        return np.where(keeps, labels, _other_labels(labels, generators, num_classes))

    def _render(self, images, labels, variant, generators, num_classes):
        _, _, height, width = images.shape
        alpha = self._grey(images)
        shown = self._shown_classes(labels, variant, generators, num_classes)
        colour = self.colours(num_classes)[shown][:, :, None, None]  # (N, 3, 1, 1)
        # Textures come after the class draws in each image's stream.
        t = np.stack([texture_field(self.texture, g, height, width) for g in generators])[:, None]
        if self.foreground:
            out = alpha * colour + (1.0 - alpha) * (self.noise_mix * t)
            mask = alpha >= self.stroke_threshold
        else:
            background = colour * ((1.0 - self.noise_mix) + self.noise_mix * t)
            stroke = np.array(self.stroke_colour, dtype=np.float32)[None, :, None, None]
            out = alpha * stroke + (1.0 - alpha) * background
            mask = alpha < self.stroke_threshold
        return out.astype(np.float32), mask


# ----------------------------------------------------------------------------- registry

CONTAMINATIONS: dict[str, type[Contamination]] = {
    cls.kind: cls for cls in (DecoyPatch, ColouredBackground, TextTag, Stripe, Marker)
}


def make_contamination(kind: str, **params: object) -> Contamination:
    """The generator registered as ``kind``, built from ``params`` (DataError naming a bad one)."""
    if kind not in CONTAMINATIONS:
        raise DataError(f"unknown contamination {kind!r}; known: {', '.join(CONTAMINATIONS)}")
    cls = CONTAMINATIONS[kind]
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = [name for name in params if name not in accepted]
    if unknown:
        raise DataError(f"{kind} has no parameter {unknown[0]!r}; parameters: {', '.join(accepted)}")
    return cls(**params)


def contaminate_dataset(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    contamination: Contamination,
    variant: str,
    seed: int,
    num_classes: int | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``contamination`` applied to a whole array, ``chunk_size`` images at a time.

    Equals ``contamination.apply(images, labels, variant, numpy.random.default_rng(seed),
    num_classes)`` for every chunk size: image i always uses the i-th child of the seed's
    SeedSequence (see the module docstring). ``num_classes`` defaults to max(labels) + 1 —
    pass it whenever a split may lack the highest class, since the palette, tags and
    brightness steps depend on it.
    """
    chunk_size = _check_int("chunk_size", chunk_size, 1)
    images_t, labels_t = torch.as_tensor(images), torch.as_tensor(labels)
    if num_classes is None:
        num_classes = int(labels_t.max()) + 1 if labels_t.numel() else 2
    root = image_seed_root(np.random.default_rng(seed))
    outs, masks = [], []
    for start in range(0, max(len(images_t), 1), chunk_size):
        batch = slice(start, start + chunk_size)
        generators = spawn_generators(root, len(images_t[batch]))
        out, mask = contamination._apply_with_generators(images_t[batch], labels_t[batch], variant, generators, num_classes)
        outs.append(out)
        masks.append(mask)
    return torch.cat(outs), torch.cat(masks)
