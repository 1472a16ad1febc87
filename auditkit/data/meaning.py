"""What a dataset's masks mark (``DatasetInfo.mask_meaning``), defined once, and how each consumer
gets the masks it needs (docs/data.md, "What masks mark").

Two meanings, stored as the values dataset.json files and reports have always carried:
- ``"spurious"`` (say "artefact", "artifact" or "shortcut"): mask = 1 on the artefact the model
  must not use. TAP and RRR penalise it, the audit removes and swaps it. The default of every layout,
  bounding boxes included: auditkit audits shortcuts, and that is what the docs promise;
- ``"object"``: mask = 1 on the object, the evidence the model should use (model guidance,
  Rao et al. 2023, arXiv:2303.11932, draws boxes around objects). Energy maximises attribution in it.

A consumer calls ``masks_marking(dataset, needed, consumer, convert=...)``: masks that already mark
what it needs pass unchanged; otherwise they are turned into their complement within the image when
the consumer has said that reading is sound, else refused in one line naming ``mask_meaning`` (the
CLI's --masks-mark). Which consumer converts and why is written where it calls this.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import ParameterError
from .dataset import AuditDataset
from .masks import annotated

SPURIOUS = "spurious"  # mask = 1 on the artefact (the shortcut)
OBJECT = "object"  # mask = 1 on the object (the true evidence)
MEANINGS = (SPURIOUS, OBJECT)
DEFAULT = SPURIOUS  # every layout, boxes.csv included (docs/data.md)
# The words users say (the CLI's --masks-mark artefact|object) -> the stored value.
NAMES = {"artefact": SPURIOUS, "artifact": SPURIOUS, "spurious": SPURIOUS, "shortcut": SPURIOUS, "object": OBJECT}
WORDS = {SPURIOUS: "the artefact", OBJECT: "the object"}


def mask_meaning(value: str, where: str = "") -> str:
    """The stored meaning ("spurious" or "object") of a name users write; ParameterError (one line,
    naming ``mask_meaning``) for anything else. ``where``: the file it came from, if any."""
    name = str(value).strip().lower()
    if name not in NAMES:
        origin = f" (in {where})" if where else ""
        raise ParameterError("mask_meaning", f"must be artefact (or spurious) or object; got {value!r}{origin}")
    return NAMES[name]


def describe(meaning: str) -> str:
    """``meaning`` as people read it: "the artefact" or "the object"."""
    return WORDS[mask_meaning(meaning)]


def complement(dataset: AuditDataset, meaning: str) -> AuditDataset:
    """``dataset`` with each mask replaced by 1 − mask within its image, now marking ``meaning``.

    A record without a mask keeps none. An empty object mask (no pixel above 0.5) says no object was
    marked, which says nothing about where the artefact is: it becomes no mask, never a mask of the
    whole image (the whole image would then be penalised). An empty artefact mask (no artefact) becomes
    an object mask of the whole image, as its complement says. Every image is read once (for its size)
    and the complements are held in memory, as the teacher's annotations are."""
    records = []
    for r in dataset.records:
        mask = r.mask
        if mask is not None:
            pixels = dataset._read_mask(r, dataset._read_pixels(r).shape[:2])
            mask = None if meaning == SPURIOUS and not annotated(pixels).any() else _stored(1.0 - pixels)
        records.append(replace(r, mask=mask))
    return AuditDataset(records, replace(dataset.info, mask_meaning=meaning), channels=dataset.channels,
                        image_size=dataset.image_size)


def _stored(mask: np.ndarray) -> np.ndarray:
    """A complement kept in memory: 0/255 bytes when it is binary (as Energy always kept it), float32
    when soft — a soft mask in 8 bits could read back as a label map (auditkit/data/masks.py MASK_RULE)."""
    if np.isin(mask, (0.0, 1.0)).all():
        return (mask * 255).astype(np.uint8)
    return mask.astype(np.float32)


def refusal(have: str, consumer: str, needed: str, why: str = "") -> str:
    """The one line a consumer gives for masks it cannot use, read after the option's name
    ("`mask_meaning` is 'object' (...)", "--masks-mark is 'object' (...)")."""
    because = f" ({why})" if why else ""
    word = "artefact" if needed == SPURIOUS else "object"
    return (f"is {have!r} (the masks mark {WORDS[have]}), but {consumer} needs masks of {WORDS[needed]}{because}; "
            f"if they mark {WORDS[needed]}, set it to {word}")


def require(have: str, needed: str, consumer: str, *, convert: bool, why: str = "") -> str:
    """The checked meaning ``have``; ParameterError (one line naming ``mask_meaning``) when it is not
    ``needed`` and ``consumer`` cannot use the complement. Reads no pixels: a consumer's early check."""
    have = mask_meaning(have)
    if have != needed and not convert:
        raise ParameterError("mask_meaning", refusal(have, consumer, needed, why))
    return have


def masks_marking(dataset: AuditDataset, needed: str, consumer: str, *, convert: bool, why: str = "") -> AuditDataset:
    """``dataset`` with masks that mark ``needed``: unchanged when they do, their complement when
    ``convert`` (a reading the consumer has justified), else ParameterError naming ``mask_meaning``.
    Data without masks passes unchanged (each consumer says itself what it does without)."""
    have = require(dataset.info.mask_meaning, needed, consumer, convert=convert, why=why)
    if have == needed or not dataset.has_masks:
        return dataset
    return complement(dataset, needed)


def meaning_of(dataset: AuditDataset) -> str:
    """The dataset's stored meaning, checked (a dataset.json may carry anything)."""
    return mask_meaning(dataset.info.mask_meaning)


__all__ = ["DEFAULT", "MEANINGS", "NAMES", "OBJECT", "SPURIOUS", "complement", "describe", "mask_meaning",
           "masks_marking", "meaning_of", "refusal", "require"]
