"""What every contamination generator shares: the :class:`Contamination` base class (variants,
per-image randomness, the mask of the artefact), argument checks and the random draws the
generators use. The generators: :mod:`auditkit.data.contamination_marks` (decoy patch, stripe,
marker, text tag) and :mod:`auditkit.data.contamination_background` (coloured background); the
registry and ``contaminate_dataset``: :mod:`auditkit.data.contaminations`, whose docstring explains
the variants and the randomness.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

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
