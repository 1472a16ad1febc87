"""Propagation: once a candidate region passes its causal test, find the artefact on every image that
carries it, not only on the members of the strategy cluster that revealed it (issue 28).

An artefact is found by its appearance. Each confirmed cluster gives a template: the per-pixel median
of its members' boxed content (the boxes of its most common size), with a ``margin`` of context around
the box, at the analysis size (images area-averaged like the relevance maps, zero-padded by the margin
so a box on the border keeps its context). Every image is searched for every template by normalised
cross-correlation (zero-mean NCC, the template-matching score of Lewis 1995, "Fast normalized
cross-correlation"); the image's best window scoring at least ``threshold`` is the artefact, and its box
is the image's mask. Why this and not the alternatives, measured on the built-in data (docs/discover.md,
"Propagation"):

- NCC is blind to brightness and contrast, so a class-coded artefact found in one class (decoy MNIST's
  grey patch, the stripe: their brightness codes the class) is found in every class: 99.6 % of decoy
  and 98.4 % of stripe images, where matching the template's exact pixels (RMS distance <= 0.05) found
  10 % and 19 %;
- the context ring matters: without it a uniform artefact (a white bar) is a uniform template, which
  any stroke of the object matches (the marker: 89 % of the unmarked images masked; with a one-pixel
  ring, none);
- the model's own evidence (the relevance share in the confirmed boxes) found 72 % of the marker images
  and masked 31 % of the unmarked ones: a model reads an artefact on some images more than on others,
  but the artefact is there all the same.

A window must also vary at least ``contrast`` x as much as the template (its standard deviation): a
flat or nearly flat window (background) has no defined correlation and is never a match.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .record import MatchScores, Propagation, TemplateEntry
from .regions import Box

TEMPLATE_BOXES = 256  # at most this many boxes per template (a cluster of 224-px images: 150 MB at most)


@dataclass
class Template:
    """One confirmed artefact's appearance at the analysis size."""

    pixels: torch.Tensor  # (C, h + 2 margin, w + 2 margin): the median boxed content with its context ring
    shape: tuple[int, int]  # (h, w) of the box itself
    clusters: list[int]  # the confirmed clusters (row numbers) whose members gave it
    members: int  # boxes it was built from


@dataclass
class Match:
    """An image's best match: the box (analysis size), its NCC score and the template's index."""

    box: Box
    score: float
    template: int


def _analysis_images(images: torch.Tensor, size: tuple[int, int], margin: int) -> torch.Tensor:
    """(n, C, H, W) images at the analysis size (area average, as the relevance maps), zero-padded."""
    if tuple(images.shape[-2:]) != tuple(size):
        images = F.adaptive_avg_pool2d(images.float(), size)
    return F.pad(images.float(), (margin,) * 4)


def ncc_windows(images: torch.Tensor, template: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-mean normalised cross-correlation of ``template`` (C, h, w) with every window of ``images``
    (n, C, H, W), and each window's standard deviation; both (n, H - h + 1, W - w + 1). A flat window
    scores 0."""
    channels, height, width = template.shape
    count = channels * height * width
    centred = template - template.mean()
    norm = centred.norm()
    ones = torch.ones(1, channels, height, width, dtype=images.dtype, device=images.device)
    sums = F.conv2d(images, ones)[:, 0]
    squares = F.conv2d(images * images, ones)[:, 0]
    variance = (squares - sums * sums / count).clamp_min(0)  # count x the window's variance
    products = F.conv2d(images, centred[None].to(images))[:, 0]
    score = torch.where(variance > 1e-12, products / (variance.sqrt() * norm + 1e-12), torch.zeros_like(products))
    score = score.clamp(-1.0, 1.0)  # rounding can overshoot 1 by an ulp
    return score, (variance / count).sqrt()


def _similar(a: Template, b: Template, threshold: float) -> bool:
    if a.pixels.shape != b.pixels.shape:
        return False
    score, _ = ncc_windows(a.pixels[None], b.pixels)
    return float(score.flatten()[0]) >= threshold


def build_templates(images_of, rows: list[dict], size: tuple[int, int], margin: int,
                    threshold: float) -> list[Template]:
    """One template per confirmed row (``rows`` with ``shortcut``), from its members' boxes of the most
    common size; templates that match each other at ``threshold`` are one (the marker's bar confirmed
    in eight classes is one template, searched once). ``images_of(positions)`` returns (n, C, H, W)."""
    templates: list[Template] = []
    for row in rows:
        if not row.get("shortcut") or not row["boxes"]:
            continue
        shape, _ = Counter(box[2:] for box in row["boxes"].values()).most_common(1)[0]
        same = sorted((p, b) for p, b in row["boxes"].items() if b[2:] == shape)
        same = same[:: -(-len(same) // TEMPLATE_BOXES)]  # evenly spaced: a median needs no more, memory stays small
        padded = _analysis_images(images_of([p for p, _ in same]), size, margin)
        height, width = shape[0] + 2 * margin, shape[1] + 2 * margin
        crops = torch.stack([padded[k, :, t : t + height, left : left + width]
                             for k, (_, (t, left, _, _)) in enumerate(same)])
        template = Template(crops.median(0).values, tuple(shape), [row["number"]], len(same))
        twin = next((t for t in templates if _similar(t, template, threshold)), None)
        if twin is None:
            templates.append(template)
        else:
            twin.clusters.append(row["number"])
            twin.members += template.members
    return templates


def find_matches(images: torch.Tensor, templates: list[Template], size: tuple[int, int], margin: int, *,
                 threshold: float, contrast: float) -> list[Match | None]:
    """The best match of any template in each of ``images`` (n, C, H, W): the window with the highest
    NCC among those scoring at least ``threshold`` whose standard deviation is at least ``contrast`` x
    the template's; None where no window qualifies."""
    padded = _analysis_images(images, size, margin)
    best: list[Match | None] = [None] * len(images)
    for number, template in enumerate(templates):
        pixels = template.pixels.to(padded)
        score, spread = ncc_windows(padded, pixels)
        floor = contrast * float((pixels - pixels.mean()).pow(2).mean().sqrt())
        score = torch.where(spread >= floor, score, torch.full_like(score, -1.0))
        values, where = score.flatten(1).max(1)
        columns = score.shape[2]
        for k, (value, index) in enumerate(zip(values.tolist(), where.tolist())):
            if value >= threshold and (best[k] is None or value > best[k].score):
                top, left = divmod(int(index), columns)
                # The window's top-left in the padded image is the box's top-left in the unpadded one.
                best[k] = Match((top, left, *template.shape), float(value), number)
    return best


def propagation_entry(matches: dict[int, Match], templates: list[Template], rows: list[dict], samples: int,
                      threshold: float, contrast: float, margin: int) -> Propagation:
    """What the propagation found, for the report: how many images carry a confirmed artefact, how many of
    them lie outside the clusters that confirmed it, the confirming clusters' members it did not find
    (their box holds no such artefact: no mask), and the match scores (the confidence)."""
    confirmed = {int(p) for row in rows if row.get("shortcut") for p in row["boxes"]}
    scores = np.array([m.score for m in matches.values()])
    statistic = lambda values, f: float(f(values)) if len(values) else None
    per_template = []
    for number, template in enumerate(templates):
        found = [k for k, m in matches.items() if m.template == number]
        values = np.array([matches[k].score for k in found])
        per_template.append(TemplateEntry(template.clusters, list(template.shape), template.members, len(found),
                                          sum(k not in confirmed for k in found), statistic(values, np.median),
                                          statistic(values, np.min)))
    return Propagation(
        method="appearance: zero-mean normalised cross-correlation of each confirmed artefact's template "
               "(its median boxed content with a context ring) over every image, at the analysis size",
        threshold=threshold, contrast=contrast, margin=margin, images=len(matches),
        share=len(matches) / samples if samples else 0.0, in_clusters=sum(k in confirmed for k in matches),
        beyond_clusters=sum(k not in confirmed for k in matches), members_without_match=len(confirmed - set(matches)),
        score=MatchScores(statistic(scores, np.median), statistic(scores, lambda v: np.quantile(v, 0.05)),
                          statistic(scores, np.min)),
        templates=per_template)
