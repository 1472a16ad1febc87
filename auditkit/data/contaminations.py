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

Files: the base class, checks and random draws in ``contamination_base.py``; the generators drawn
on top of the image in ``contamination_marks.py``; the coloured background in
``contamination_background.py``; the registry and ``contaminate_dataset`` here, which also
re-exports every public name of the three.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..errors import DataError
from .contamination_background import (  # noqa: F401  (re-exported: importable from here as before)
    DEFAULT_PALETTE,
    PERLIN_GRIDS,
    SMOOTH_GRID,
    TEXTURES,
    ColouredBackground,
    default_palette,
    texture_field,
)
from .contamination_base import (  # noqa: F401  (re-exported, as above)
    BOTTOM_LEFT,
    BOTTOM_RIGHT,
    COMMON_VARIANTS,
    DEFAULT_CHUNK_SIZE,
    TOP_LEFT,
    TOP_RIGHT,
    Contamination,
    _check_int,
    image_seed_root,
    spawn_generators,
)
from .contamination_marks import (  # noqa: F401  (re-exported, as above)
    TEXT_FONT,
    TEXT_HEIGHT_FRACTION,
    TEXT_WIDTH_FRACTION,
    DecoyPatch,
    Marker,
    Stripe,
    TextTag,
    default_text_tags,
    render_text_tags,
)

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
        out, mask = contamination._apply_with_generators(
            images_t[batch], labels_t[batch], variant, generators, num_classes
        )
        outs.append(out)
        masks.append(mask)
    return torch.cat(outs), torch.cat(masks)
