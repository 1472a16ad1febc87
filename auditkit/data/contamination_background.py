"""The coloured-background contamination (Coloured MNIST) and the textures it paints with (see
:mod:`auditkit.data.contaminations` for the variants and the randomness).
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import cv2
import numpy as np

from ..errors import DataError
from .contamination_base import Contamination, _check_bool, _check_fraction, _check_rgb, _other_labels


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


def _upsampled_grid(
    generator: np.random.Generator, cells: int, height: int, width: int, interpolation: int
) -> np.ndarray:
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
