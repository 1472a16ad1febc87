"""How far TAP's mask is dilated at each targeted layer: the max-pool size k_l of Eq. 7, per layer.

    D_l(M) = AdaptiveAvgPool_(h_l,w_l)( MaxPool_{k_l, stride 1}(M) ),   k_l = 2 ρ_l + 1

ρ_l is the dilation radius in input (mask) pixels. Three schedules:

- ``fixed`` (TAP Eq. 7 as written): ρ_l = ⌊κ/2⌋ for every layer. A unit of a deep layer reads the
  input from well outside that border (its receptive field), so a thin artefact can survive
  (docs/repair.md, "Which method for which shortcut").
- ``cumulative`` (the TAP authors' public code, ``suppress_at``): the mask is brought down layer by
  layer, shallow to deep, and before each downscaling it is max-pooled with a κ×κ window at the
  resolution it has then (the previous targeted layer's). At input resolution that is
  ρ_l = Σ_{j ≤ l, h_{j-1} > h_j} ⌊κ/2⌋ · s_{j-1}, with s_j = H / h_j the input pixels per cell of
  targeted layer j (s_0 = 1: the input). Here it is applied as one max pool at input resolution
  (max-then-average, the fused op), where the authors' code max-pools the already averaged,
  fractional masks; for binary masks aligned with the cells the two agree.
- ``receptive`` (TAP Eq. 10 and App. A: a pixel reaches exactly the units whose receptive field
  holds it): ρ_l = max(⌊κ/2⌋, ⌈(r_l − s_l) / 2⌉), where r_l is the theoretical receptive field of
  the layer's units in input pixels (auditkit.models.presets.receptive_fields) and s_l the layer's
  stride; a cell of s_l pixels sees (r_l − s_l)/2 pixels beyond itself on each side.

- ``auto`` (auditkit's default): ``receptive`` when the deepest targeted layer's receptive field
  fits in the image (r_L <= max(H, W)), else ``fixed``. Measured (docs/repair.md, "Which method
  for which shortcut", 3 seeds on the two-layer CNN): there (r = 3, 8 px at 28x28) the receptive
  dilation repairs the thin marker that a fixed one leaves (permuted 0.96 against 0.74) and is as
  good or better on the other kinds (decoy 0.955 against 0.942). On ResNet-18 at 64x64 (r = 43 ...
  435 px) the receptive dilation covers every deep unit and the penalty destroys the model (0.09),
  and the cumulative one destroys it on the stripe (0.20, where fixed reaches 0.91) though it does
  better on the marker (0.82 against 0.61): fixed is the one that never did harm. A repair that
  leaves the model reliant says so (--fail-on-shortcut), and --lambda auto / --method auto sweep all three.

Layers are ordered by decreasing resolution (shallow to deep). Sizes are (height, width); a
non-square layer uses the larger of its two radii.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SCHEDULES = ("fixed", "cumulative", "receptive")  # what --lambda auto sweeps
NEEDS_RECEPTIVE_FIELDS = ("receptive", "auto")


def resolve(schedule: str, mask_size: tuple[int, int], receptive_fields: Sequence[float] | None) -> str:
    """The concrete schedule ``auto`` stands for here (any other is itself)."""
    if schedule != "auto":
        return schedule
    if not receptive_fields:
        return "fixed"
    return "receptive" if max(receptive_fields) <= max(mask_size) else "fixed"


def _stride(mask_size: tuple[int, int], size: tuple[int, int]) -> float:
    return max(mask_size[0] / size[0], mask_size[1] / size[1])


def kernel_sizes(
    schedule: str,
    kernel_size: int,
    mask_size: tuple[int, int],
    layer_sizes: Sequence[tuple[int, int]],
    receptive_fields: Sequence[float] | None = None,
) -> list[int]:
    """k_l for each layer (in the order given) under ``schedule``.

    ``kernel_size``: κ (Eq. 7's k; odd sizes keep the dilation centred). ``mask_size``: the mask's
    (H, W) in pixels; ``layer_sizes``: each targeted layer's (h, w); ``receptive_fields``: each
    layer's receptive field in mask pixels (``receptive`` only). Raises ValueError for an unknown
    schedule or missing receptive fields.
    """
    if schedule not in (*SCHEDULES, "auto"):
        raise ValueError(f"dilation: must be one of {', '.join(SCHEDULES)} or auto; got {schedule!r}")
    schedule = resolve(schedule, mask_size, receptive_fields)
    # A window of 2·max(H, W) − 1 already reaches every pixel from every pixel: wider ones give
    # the same D(M) at more cost.
    widest = 2 * max(mask_size) - 1
    return [min(k, widest) if k > kernel_size else k
            for k in _kernel_sizes(schedule, kernel_size, mask_size, layer_sizes, receptive_fields)]


def _kernel_sizes(schedule, kernel_size, mask_size, layer_sizes, receptive_fields) -> list[int]:
    base = kernel_size // 2
    if schedule == "fixed":
        return [kernel_size] * len(layer_sizes)
    if schedule == "receptive":
        if receptive_fields is None or len(receptive_fields) != len(layer_sizes):
            raise ValueError("dilation='receptive' needs the receptive field of every targeted layer")
        radii = [max(base, math.ceil((r - _stride(mask_size, s)) / 2 - 1e-9))
                 for r, s in zip(receptive_fields, layer_sizes)]
        return [2 * r + 1 for r in radii]
    # cumulative: walk the distinct resolutions from the finest to the coarsest.
    order = sorted(set(layer_sizes), key=lambda s: -s[0] * s[1])
    radius, previous, by_size = 0.0, tuple(mask_size), {}
    for size in order:
        if previous[0] * previous[1] > size[0] * size[1]:
            radius += base * _stride(mask_size, previous)
        by_size[size] = 2 * math.ceil(radius - 1e-9) + 1
        previous = size
    return [by_size[s] for s in layer_sizes]


__all__ = ["NEEDS_RECEPTIVE_FIELDS", "SCHEDULES", "kernel_sizes", "resolve"]
