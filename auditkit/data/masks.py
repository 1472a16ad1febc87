"""Masks: one reader for every mask source (image files, in-memory or .npz arrays, boxes), and the
rule it reads them by.

A mask becomes float32 (H, W) in [0, 1], 1 = annotated pixel. People save masks in many ways: 0/1
(``(mask > 0).astype(np.uint8)``, the most common), 0/255, bool, float in [0, 1], label maps, RGB
images, JPEG files. Reading a 0/1 mask on a 0-255 scale turns every mask into ~0.004, an empty mask
in all but name, so the encoding is decided per mask from its values, by this rule (``MASK_RULE``,
also in docs/data.md):

1. bool: True = annotated.
2. float: must be finite and in [0, 1]; read as is (soft masks stay soft). Anything else is refused.
3. integer (any integer type, 8-/16-bit files included; negative values are refused), by its
   largest value ``top`` and the scale S = 255 when ``top`` <= 255, else 65535:
   a. ``top`` <= 1: a 0/1 mask, read as is;
   b. ``top`` = S (e.g. 255): value / S, so 0/255 and 0/65535 masks give exactly 0/1 and a soft
      mask saved on the 0-255 scale stays soft; but when every other non-zero value is a small id
      (at most 64), e.g. {0, 1, 255}, it is a label map with S as "void": non-zero = annotated;
   c. 1 < ``top`` <= 64 (small ids) with at most 64 distinct non-zero values: a label map, e.g.
      {0, 3, 7}: every non-zero value = annotated (the mask marks *where*, not *which*);
   d. 1 < ``top`` < S with more than 64 distinct values: a soft mask that never reaches full scale,
      value / S;
   d'. 64 < ``top`` < S with at most 64 distinct values (e.g. {0, 20, 100}): ambiguous (a label map
      would mark every non-zero pixel, a soft reading almost none): refused, naming both readings;
   e. ``top`` > 65535 (32-/64-bit integers): a label map, as in c.
4. lossy files (JPEG, lossy WebP) hold binary masks with compression noise near edges: annotated
   where the value is at least half the scale (128 of 255). A lossy mask whose values stay below
   half the scale but above 0 (a 0/1 mask saved as JPEG, which compression destroys) is refused.
5. colour: a mask whose colour channels are equal is read as grey; a coloured one (a colour-coded
   label map) is annotated where any channel is non-zero (lossy: any channel at least half the
   scale). An RGBA mask whose colour is one constant and whose alpha varies is read from its alpha;
   otherwise alpha is ignored. A palette PNG is read by its palette indices (case 3), not its colours.
6. boxes (x0, y0, x1, y1), pixels of the image, end exclusive: 1 inside any box.

Each mask is decided on its own, so one dataset may mix encodings; an all-zero mask is empty under
every reading. The rule is cheap: a maximum, a comparison, and a histogram only in cases 3c/3d.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import DataError

# The rule as text, for messages and reports (empty under python -OO, which strips docstrings).
MASK_RULE = __doc__[__doc__.index("1. bool") : __doc__.index("Each mask is decided")].rstrip() if __doc__ else ""

# Label maps are small ids: more distinct non-zero values than this below full scale (3d), or an
# intermediate value above it next to full scale (3b), make a mask soft, not a label map.
LABEL_MAP_MAX_VALUES = 64

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class MaskReading:
    """A decoded mask and how it was read (the rule's case, for messages and tests)."""

    pixels: np.ndarray  # (H, W) float32 in [0, 1], 1 = annotated
    encoding: str  # bool, 0/1, 0/255, 0/65535, soft/255, soft/65535, float, label map, lossy, colour, boxes, empty


def read_mask(source, where: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """A mask from any source as float32 (H, W) in [0, 1] by the rule of this module.

    ``source``: a file path (PNG, JPEG, TIFF, BMP, ...; grey, RGB, RGBA or palette), an array (H, W)
    or (H, W, C) with C 1, 3 or 4 (bool, any integer type, or float in [0, 1]), or a tuple of boxes
    (x0, y0, x1, y1) in pixels, end exclusive, which needs ``size``, the image's (H, W).
    ``where`` names the mask in error messages. Raises DataError (one line) for an unreadable file,
    an unsupported type or shape, NaN, negative values, floats outside [0, 1], boxes outside the
    image, or a lossy file whose values cannot be told apart from compression noise."""
    return decode_source(source, where, size).pixels


def decode_source(source, where: str, size: tuple[int, int] | None = None) -> MaskReading:
    """Like ``read_mask``, with the case of the rule that decided the reading."""
    if isinstance(source, tuple):
        if size is None:
            raise DataError(f"{where}: boxes need the image's size")
        return MaskReading(boxes_to_mask(source, size[0], size[1], where), "boxes")
    if isinstance(source, (str, Path)):
        return read_mask_file(Path(source))
    return decode_mask(np.asarray(source), where)


# A pixel is annotated when its mask value is above this: the pixels the audit's region tests edit
# (remove_region, swaps, localisation), and the one rule for an "empty" mask in the audit, the mask
# methods' guard and discovery's proposed masks, so a mask a repair trains on is one the proof can test.
ANNOTATED_ABOVE = 0.5


def annotated(mask):
    """The annotated pixels of ``mask`` (a numpy array or torch tensor of values in [0, 1]): a bool
    array/tensor of the same shape, ``mask > ANNOTATED_ABOVE``."""
    return mask > ANNOTATED_ABOVE


def is_annotated(source, where: str) -> bool:
    """Whether a mask marks at least one pixel (``annotated``; boxes: at least one box). Reads files,
    so call it once per mask where data enters, not per training step."""
    if source is None:
        return False
    if isinstance(source, tuple):
        return len(source) > 0
    return bool(annotated(read_mask(source, where)).any())


def boxes_to_mask(boxes: tuple[Box, ...], height: int, width: int, where: str) -> np.ndarray:
    """(height, width) float32 mask, 1 inside any box (x0, y0, x1, y1), pixels, end exclusive."""
    mask = np.zeros((height, width), dtype=np.float32)
    for x0, y0, x1, y1 in boxes:
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise DataError(f"{where}: box ({x0}, {y0}, {x1}, {y1}) lies outside the {width}x{height} image")
        mask[y0:y1, x0:x1] = 1.0
    return mask


# ---- files -----------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _sniff(path: Path) -> tuple[bool, bool]:
    """(lossy, palette) from the file's first bytes, whatever its suffix says."""
    with path.open("rb") as handle:
        head = handle.read(32)
    lossy = head[:3] == b"\xff\xd8\xff" or (head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8 ")
    # PNG: the IHDR chunk comes first; its colour type (byte 25) 3 means palette indices.
    palette = head[:8] == _PNG_SIGNATURE and len(head) > 25 and head[25] == 3
    return lossy, palette


def read_mask_file(path: Path) -> MaskReading:
    """A mask image file decoded by the rule (see ``read_mask``)."""
    where = str(path)
    if not path.is_file():
        raise DataError(f"{where}: no such mask file")
    try:
        lossy, palette = _sniff(path)
    except OSError as error:
        raise DataError(f"{where}: cannot read the mask file ({error})") from error
    if palette:
        # OpenCV turns palette indices into colours; the indices are the mask (label map or 0/1).
        from PIL import Image

        try:
            with Image.open(path) as image:
                pixels = np.asarray(image)
        except OSError as error:
            raise DataError(f"{where}: not a readable image ({error})") from error
    else:
        pixels = cv2.imread(where, cv2.IMREAD_UNCHANGED)
        if pixels is None:
            raise DataError(f"{where}: not a readable image (OpenCV could not decode it)")
    return decode_mask(pixels, where, lossy=lossy)


# ---- arrays ------------------------------------------------------------------------------------


def decode_mask(pixels: np.ndarray, where: str, *, lossy: bool = False) -> MaskReading:
    """An array (H, W) or (H, W, C), C in 1, 3, 4, decoded by the rule; ``lossy``: it was stored
    with lossy compression (JPEG), so it is thresholded at half its scale."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    coloured = False
    if pixels.ndim == 3:
        if pixels.shape[2] not in (3, 4):
            raise DataError(f"{where}: a mask with {pixels.shape[2]} channels; expected grey, RGB or RGBA")
        colour = pixels[:, :, :3]
        alpha = pixels[:, :, 3] if pixels.shape[2] == 4 else None
        if alpha is not None and colour.min() == colour.max() and alpha.min() != alpha.max():
            pixels = alpha  # a transparent overlay: the alpha channel draws the mask
        elif np.array_equal(colour[:, :, 0], colour[:, :, 1]) and np.array_equal(colour[:, :, 0], colour[:, :, 2]):
            pixels = colour[:, :, 0]
        else:
            pixels, coloured = colour.max(axis=2), True
    if pixels.ndim != 2:
        raise DataError(f"{where}: expected a 2-D mask (H, W) or (H, W, C); got shape {tuple(pixels.shape)}")
    if pixels.dtype == np.bool_:
        return MaskReading(pixels.astype(np.float32), "bool")
    if np.issubdtype(pixels.dtype, np.floating):
        return _decode_float(pixels, where)
    if not np.issubdtype(pixels.dtype, np.integer):
        raise DataError(f"{where}: unsupported mask type {pixels.dtype} (use bool, integers, or float in [0, 1])")
    return _decode_integer(pixels, where, lossy=lossy, coloured=coloured)


def _decode_float(pixels: np.ndarray, where: str) -> MaskReading:
    out = pixels.astype(np.float32)
    if not np.isfinite(out).all():
        raise DataError(f"{where}: the mask contains NaN or infinite values")
    if out.size and (out.min() < 0.0 or out.max() > 1.0):
        hint = "; divide a 0-255 mask by 255" if out.max() > 1.0 and out.min() >= 0.0 else ""
        raise DataError(f"{where}: a float mask must lie in [0, 1]; found [{out.min():g}, {out.max():g}]{hint}")
    return MaskReading(np.ascontiguousarray(out), "float")


def _decode_integer(pixels: np.ndarray, where: str, *, lossy: bool, coloured: bool) -> MaskReading:
    if pixels.size == 0:
        return MaskReading(pixels.astype(np.float32), "empty")
    if np.issubdtype(pixels.dtype, np.signedinteger) and pixels.min() < 0:
        raise DataError(f"{where}: the mask has negative values (min {int(pixels.min())}); expected 0 = not annotated")
    top = int(pixels.max())
    if top == 0:
        return MaskReading(np.zeros(pixels.shape, np.float32), "empty")
    scale = 255 if top <= 255 else 65535
    if lossy:
        if top < (scale + 1) // 2:
            raise DataError(
                f"{where}: a lossy (JPEG) mask whose values peak at {top} of {scale}: a 0/1 mask or a tiny region "
                "that compression has damaged beyond recovery; save masks losslessly (PNG)"
            )
        return MaskReading((pixels >= (scale + 1) // 2).astype(np.float32), "lossy")
    if coloured:
        return MaskReading((pixels > 0).astype(np.float32), "colour")
    if top == 1:
        return MaskReading(pixels.astype(np.float32), "0/1")
    if top == scale:
        # (values strictly between 0 and the top make it soft: cheaper than a histogram on this common path)
        between = np.logical_and(pixels > 0, pixels < top)
        if not between.any():
            return MaskReading((pixels > 0).astype(np.float32), f"0/{scale}")
        if int(pixels[between].max()) <= LABEL_MAP_MAX_VALUES:
            # Only small ids besides the top: a label map with the top as "void/ignore" (e.g. {0, 1, 255}),
            # whose labels a soft reading would turn into ~0.004.
            return MaskReading((pixels > 0).astype(np.float32), "label map")
        return MaskReading((pixels.astype(np.float32) / scale).astype(np.float32), f"soft/{scale}")
    if top > 65535:
        return MaskReading((pixels > 0).astype(np.float32), "label map")
    levels = _distinct_nonzero(pixels, top)
    if levels > LABEL_MAP_MAX_VALUES:
        return MaskReading((pixels.astype(np.float32) / scale).astype(np.float32), f"soft/{scale}")
    if top <= LABEL_MAP_MAX_VALUES:
        return MaskReading((pixels > 0).astype(np.float32), "label map")
    # Few levels, peaking between the ids and full scale (e.g. {0, 20, 100}): a label map would mark every
    # non-zero pixel, a soft reading almost none. Guessing either way can flip a verdict: refuse, naming both.
    raise DataError(
        f"{where}: an integer mask with {levels} non-zero level(s) up to {top} of {scale} is ambiguous: a label "
        f"map (every non-zero pixel annotated) or a soft mask (value / {scale})? Save it as 0/1, 0/{scale}, or "
        "float in [0, 1]"
    )


def _distinct_nonzero(pixels: np.ndarray, top: int) -> int:
    """How many distinct non-zero values (a histogram: linear time for values up to 65535)."""
    if top <= 65535:
        counts = np.bincount(pixels.ravel().astype(np.int64, copy=False), minlength=top + 1)
        return int(np.count_nonzero(counts[1:]))
    return int(np.count_nonzero(np.unique(pixels)))
