"""One dataset type for every source: samples of (image, label, mask or none, variant, group).

Resize/normalise policy (documented in docs/data.md):
- images become float32 tensors (C, H, W) in [0, 1]: 8-bit files are divided by 255, 16-bit
  files (common for radiographs) by 65535, float arrays must already lie in [0, 1];
- channels: the dataset has one channel count (1 = grey, 3 = RGB). Grey images in an RGB
  dataset are replicated; RGB images in a grey dataset are converted to luminance; alpha is
  dropped;
- size: every image is resized to the dataset's ``image_size`` (default: the size of the first
  image) with area averaging when shrinking and bilinear interpolation when enlarging; masks get
  the same geometry, so a mask always lines up with its image, and stay in [0, 1];
- masks are decoded by auditkit.data.masks (0/1, 0/255, bool, float, label maps, JPEG, colour:
  its MASK_RULE), never on the images' 0-255 scale;
- mean/std normalisation is *not* applied here: it belongs to the model (see
  auditkit.models), so images, masks and explanations share one pixel space.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from .masks import Box, read_mask

# How a dataset's classes got their order (DatasetInfo.class_order, shown by `auditkit data show`).
ORDER_DECLARED = "as declared ({})"
ORDER_TEXT = "folder names in text order, as torchvision's ImageFolder"
ORDER_SORTED = "sorted labels (numerically when all are integers)"
ORDER_INDEX = "integer labels are the class indices"

# What a dataset's labels are (DatasetInfo.label_kind; the model heads of auditkit/models/outputs.py):
# one of K exclusive classes, one label of two classes (a one-logit model), or K independent findings.
SOFTMAX, BINARY, MULTILABEL = "softmax", "binary", "multilabel"
LABEL_KINDS = (SOFTMAX, BINARY, MULTILABEL)

# Variants in the order reports list them.
VARIANT_ORDER = ("contaminated", "permuted", "inverted", "clean", "original")

# A box (auditkit.data.masks.Box) is (x0, y0, x1, y1) in pixels of the original image, end exclusive.
ImageSource = Union[Path, np.ndarray]
MaskSource = Union[Path, np.ndarray, tuple[Box, ...], None]


@dataclass(frozen=True)
class Record:
    """Where one sample comes from. ``image``/``mask`` are file paths or in-memory arrays
    (H, W) or (H, W, C), uint8/uint16 or float in [0, 1]; a mask may also be a tuple of boxes.

    ``label``: the class index (softmax, binary), or for a multilabel dataset a tuple of K 0/1
    values, one per finding. ``artefact``: whether the image has the artefact, () when not known,
    (a,) for the image (DatasetInfo.artefact_scope "image"), or K values, one per finding ("finding";
    -1 where that finding's artefact was not annotated)."""

    image: ImageSource
    label: int | tuple[int, ...]
    mask: MaskSource = None
    variant: str = "original"
    group: str = ""
    split: str = ""
    artefact: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sample:
    image: torch.Tensor  # (C, H, W) float32 in [0, 1]
    label: int | torch.Tensor  # a class index; multilabel: (K,) float32 0/1, one per finding
    mask: torch.Tensor | None  # (1, H, W) float32 in [0, 1], 1 = annotated pixel
    variant: str
    group: str
    index: int
    artefact: torch.Tensor | None = None  # (1,) or (K,) float32 (Record.artefact), None when not known


@dataclass
class Batch:
    images: torch.Tensor  # (N, C, H, W)
    labels: torch.Tensor  # (N,) int64 class indices; multilabel: (N, K) float32 0/1
    masks: torch.Tensor  # (N, 1, H, W), zeros where a sample has no mask
    has_mask: torch.Tensor  # (N,) bool
    variants: list[str]
    groups: list[str]
    indices: torch.Tensor  # (N,) positions in the dataset
    artefacts: torch.Tensor | None = None  # (N, 1) or (N, K) float32 (Sample.artefact); None unless all say

    def to(self, device) -> Batch:
        return replace(
            self,
            images=self.images.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            masks=self.masks.to(device, non_blocking=True),
            has_mask=self.has_mask.to(device, non_blocking=True),
            artefacts=None if self.artefacts is None else self.artefacts.to(device, non_blocking=True),
        )


def collate(samples: Sequence[Sample]) -> Batch:
    images = torch.stack([s.image for s in samples])
    n, _, height, width = images.shape
    masks = torch.zeros(n, 1, height, width)
    has_mask = torch.zeros(n, dtype=torch.bool)
    for k, sample in enumerate(samples):
        if sample.mask is not None:
            masks[k] = sample.mask
            has_mask[k] = True
    if samples and isinstance(samples[0].label, torch.Tensor):
        labels = torch.stack([s.label for s in samples]).float()
    else:
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    known = [s.artefact for s in samples if s.artefact is not None]
    return Batch(
        images=images,
        labels=labels,
        masks=masks,
        has_mask=has_mask,
        variants=[s.variant for s in samples],
        groups=[s.group for s in samples],
        indices=torch.tensor([s.index for s in samples], dtype=torch.long),
        artefacts=torch.stack(known) if known and len(known) == n else None,
    )


# ---- reading pixels -------------------------------------------------------------


def read_image_file(path: Path) -> np.ndarray:
    """An image file as (H, W) or (H, W, 3) float32 in [0, 1] (RGB order, alpha dropped)."""
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise DataError(f"{path}: not a readable image (OpenCV could not decode it)")
    return _as_unit_float(pixels, str(path), from_opencv=True)


def _as_unit_float(pixels: np.ndarray, where: str, from_opencv: bool = False) -> np.ndarray:
    if pixels.dtype == np.uint8:
        out = pixels.astype(np.float32) / 255.0
    elif pixels.dtype == np.uint16:
        out = pixels.astype(np.float32) / 65535.0
    elif np.issubdtype(pixels.dtype, np.floating):
        out = pixels.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"{where}: contains NaN or infinite values")
        if out.size and (out.min() < 0.0 or out.max() > 1.0):
            raise DataError(f"{where}: float pixels must lie in [0, 1]; found [{out.min():g}, {out.max():g}]")
    else:
        raise DataError(f"{where}: unsupported pixel type {pixels.dtype} (use 8- or 16-bit, or float in [0, 1])")
    if out.ndim == 3:
        if out.shape[2] == 1:
            out = out[:, :, 0]
        elif out.shape[2] in (3, 4):
            out = out[:, :, :3]
            if from_opencv:
                out = out[:, :, ::-1]  # OpenCV reads BGR
        else:
            raise DataError(f"{where}: {out.shape[2]} channels; expected grey, RGB or RGBA")
    elif out.ndim != 2:
        raise DataError(f"{where}: expected a 2-D image; got shape {tuple(pixels.shape)}")
    return np.ascontiguousarray(out)


def _resize(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    if pixels.shape[:2] == (height, width):
        return pixels
    shrinking = height * width < pixels.shape[0] * pixels.shape[1]
    resized = cv2.resize(pixels, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


def _to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    if pixels.ndim == 2:
        return pixels[None] if channels == 1 else np.repeat(pixels[None], 3, axis=0)
    if channels == 3:
        return pixels.transpose(2, 0, 1)
    # ITU-R BT.601 luminance, as OpenCV's RGB->grey conversion.
    return (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[None]


def _describe(source) -> str:
    return str(source) if isinstance(source, Path) else "in-memory image"


# ---- the dataset -------------------------------------------------------------------


@dataclass
class DatasetInfo:
    """What a dataset is, for reports and checkpoint metadata."""

    name: str
    source: str
    classes: tuple[str, ...]
    # What mask = 1 marks: "spurious" (the artefact) or "object"; defined in auditkit/data/meaning.py.
    mask_meaning: str = "spurious"
    generator: dict = field(default_factory=dict)  # the contamination that made it, if any
    class_order: str = ""  # the rule that ordered ``classes`` (auditkit/data/readers.py), for reports
    # softmax (one of the classes), binary (two classes, one logit: classes[1] is the positive one) or
    # multilabel (``classes`` are the K findings, each image has any number of them).
    label_kind: str = SOFTMAX
    # What Record.artefact holds: "" (nothing), "image" (one 0/1 per image), "finding" (one per finding).
    artefact_scope: str = ""


class AuditDataset(Dataset):
    """Samples of (image, label, mask or none, variant, group) from any source.

    ``records`` say where each sample comes from; pixels are read, converted and resized on
    access (see the module docstring for the policy).
    """

    def __init__(
        self,
        records: Sequence[Record],
        info: DatasetInfo,
        *,
        channels: int | None = None,
        image_size: tuple[int, int] | None = None,
    ):
        self.records = list(records)
        self.info = info
        _check_labels(self.records, info)
        if (channels is None or image_size is None) and self.records:
            first = self._read_pixels(self.records[0])
            channels = channels or (3 if first.ndim == 3 else 1)
            image_size = image_size or (int(first.shape[0]), int(first.shape[1]))
        if channels not in (1, 3, None):
            raise DataError(f"{info.name}: channels must be 1 or 3; got {channels}")
        self.channels = channels or 1
        self.image_size = tuple(image_size) if image_size else (0, 0)
        self._fingerprint: str | None = None

    # -- access --
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        pixels = self._read_pixels(record)
        original_size = pixels.shape[:2]
        image = torch.from_numpy(_to_channels(_resize(pixels, self.image_size), self.channels).copy())
        mask = None
        if record.mask is not None:
            mask_pixels = self._read_mask(record, original_size)
            mask = torch.from_numpy(_resize(mask_pixels, self.image_size)[None].copy())
        label = record.label
        if isinstance(label, tuple):
            label = torch.tensor(label, dtype=torch.float32)
        artefact = torch.tensor(record.artefact, dtype=torch.float32) if record.artefact else None
        return Sample(image, label, mask, record.variant, record.group, index, artefact)

    def _read_pixels(self, record: Record) -> np.ndarray:
        if isinstance(record.image, Path):
            return read_image_file(record.image)
        return _as_unit_float(np.asarray(record.image), "in-memory image")

    def _read_mask(self, record: Record, size: tuple[int, int]) -> np.ndarray:
        """The record's mask as float32 (H, W) in [0, 1] at its image's ``size`` (H, W): files,
        arrays and boxes all go through auditkit.data.masks.read_mask, which decides 0/1, 0/255,
        bool, float, label-map, lossy and colour encodings per mask (its MASK_RULE)."""
        source = record.mask
        where = str(source) if isinstance(source, Path) else f"mask of {_describe(record.image)}"
        mask = read_mask(source, where, size)
        if isinstance(source, tuple):
            return mask
        if mask.shape != size and not (isinstance(source, np.ndarray) and mask.shape == tuple(self.image_size)):
            # (an in-memory mask already made at the dataset's size, e.g. a teacher annotation, is fine)
            raise DataError(
                f"{where} is {mask.shape[1]}x{mask.shape[0]} but its image {_describe(record.image)} is "
                f"{size[1]}x{size[0]}"
            )
        return mask

    # -- views --
    @property
    def classes(self) -> tuple[str, ...]:
        return self.info.classes

    @property
    def num_classes(self) -> int:
        return len(self.info.classes)

    @property
    def label_kind(self) -> str:
        """softmax, binary or multilabel (DatasetInfo.label_kind)."""
        return self.info.label_kind

    @property
    def findings(self) -> tuple[str, ...]:
        """The findings a model scores: a multilabel dataset's K findings (its ``classes``), a binary
        dataset's positive class (``classes[1]``); () for softmax classes."""
        if self.info.label_kind == MULTILABEL:
            return self.info.classes
        return self.info.classes[1:2] if self.info.label_kind == BINARY else ()

    @property
    def targets(self) -> torch.Tensor:
        """Every record's label, without reading pixels: (N,) int64 class indices, or (N, K) float32
        0/1 for a multilabel dataset."""
        if self.info.label_kind == MULTILABEL:
            return torch.tensor([r.label for r in self.records], dtype=torch.float32).reshape(-1, self.num_classes)
        return torch.tensor([r.label for r in self.records], dtype=torch.long)

    def has_artefact(self, finding: int | str | None = None) -> torch.Tensor | None:
        """(N,) bool: which images have the artefact, for subgroup audits. Per-image flags
        (artefact_scope "image") answer for every finding; per-finding flags need ``finding`` (its
        index or name). None when the dataset does not say for every record (or for that finding)."""
        scope = self.info.artefact_scope
        if not scope or not self.records or any(not r.artefact for r in self.records):
            return None
        if scope == "image":
            return torch.tensor([r.artefact[0] == 1 for r in self.records])
        if finding is None:
            raise DataError(f"{self.info.name}: the artefact is annotated per finding; name the finding "
                            f"({', '.join(self.findings)})")
        k = self.findings.index(finding) if isinstance(finding, str) and finding in self.findings else finding
        if not isinstance(k, int) or not 0 <= k < len(self.findings):
            raise DataError(f"{self.info.name}: no finding {finding!r}; findings: {', '.join(self.findings)}")
        flags = [r.artefact[k] for r in self.records]
        return None if -1 in flags else torch.tensor([v == 1 for v in flags])

    @property
    def variants(self) -> list[str]:
        present = {r.variant for r in self.records}
        return [v for v in VARIANT_ORDER if v in present] + sorted(present - set(VARIANT_ORDER))

    @property
    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records})

    @property
    def has_masks(self) -> bool:
        return any(r.mask is not None for r in self.records)

    def select(
        self,
        *,
        split: str | None = None,
        variant: str | Iterable[str] | None = None,
        indices: Iterable[int] | None = None,
    ) -> AuditDataset:
        """A dataset over a subset of the records (same classes, channels and size)."""
        if split is not None and split not in self.splits:
            raise DataError(f"{self.info.name}: no split {split!r}; it has {', '.join(self.splits) or 'none'}")
        wanted = {variant} if isinstance(variant, str) else set(variant) if variant is not None else None
        if wanted is not None and not wanted <= set(self.variants):
            missing = ", ".join(sorted(wanted - set(self.variants)))
            raise DataError(f"{self.info.name}: no variant {missing}; it has {', '.join(self.variants)}")
        chosen = range(len(self.records)) if indices is None else indices
        records = [
            self.records[i]
            for i in chosen
            if (split is None or self.records[i].split == split)
            and (wanted is None or self.records[i].variant in wanted)
        ]
        return AuditDataset(records, self.info, channels=self.channels, image_size=self.image_size)

    def with_format(self, *, channels: int | None = None, image_size: tuple[int, int] | None = None) -> AuditDataset:
        """The same samples converted to another channel count or size (e.g. a model's input)."""
        return AuditDataset(
            self.records,
            self.info,
            channels=channels or self.channels,
            image_size=tuple(image_size) if image_size else self.image_size,
        )

    def fingerprint(self) -> str:
        """A short hash identifying the records (files: path, size and time; arrays: bytes)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for record in self.records:
                for source in (record.image, record.mask):
                    if isinstance(source, Path):
                        stat = source.stat()
                        digest.update(f"{source}|{stat.st_size}|{stat.st_mtime_ns}".encode())
                    elif isinstance(source, np.ndarray):
                        digest.update(np.ascontiguousarray(source).tobytes())
                    else:
                        digest.update(repr(source).encode())
                digest.update(f"|{record.label}|{record.variant}|{record.group}|{record.split}".encode())
                if record.artefact:
                    digest.update(f"|{record.artefact}".encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def channel_stats(self, max_samples: int = 2000) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and standard deviation of the pixels (of up to ``max_samples``
        evenly spaced samples): the input normalisation a model trained on this data uses."""
        if not self.records:
            raise DataError(f"{self.info.name}: no samples to compute statistics from")
        step = max(1, len(self.records) // max_samples)
        pixels = torch.stack([self[k].image for k in range(0, len(self.records), step)])
        channels = pixels.transpose(0, 1).reshape(self.channels, -1).double()
        mean = channels.mean(dim=1)
        std = channels.std(dim=1).clamp_min(1e-3)  # a constant channel must not divide by zero
        return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)

    def summary(self) -> dict:
        """Counts per split, variant and class, for people and JSON."""
        by_split_variant = Counter((r.split or "-", r.variant) for r in self.records)
        multilabel = self.info.label_kind == MULTILABEL
        if multilabel:
            positives = self.targets.sum(dim=0).long().tolist() if self.records else [0] * self.num_classes
            per_class = dict(zip(self.classes, positives))
        else:
            by_label = Counter(r.label for r in self.records)
            per_class = {self.classes[k]: by_label[k] for k in sorted(by_label)}
        with_artefact: int | dict | None = None
        if self.info.artefact_scope == "image":
            with_artefact = sum(r.artefact[:1] == (1,) for r in self.records)
        elif self.info.artefact_scope == "finding":
            with_artefact = {f: sum(r.artefact[k:k + 1] == (1,) for r in self.records)
                             for k, f in enumerate(self.classes)}
        return {
            "name": self.info.name,
            "source": self.info.source,
            "samples": len(self.records),
            "classes": list(self.classes),
            "class_order": self.info.class_order,
            "channels": self.channels,
            "image_size": list(self.image_size),
            "splits": {
                split: {v: n for (s, v), n in sorted(by_split_variant.items()) if s == split}
                for split in sorted({s for s, _ in by_split_variant})
            },
            "per_class": per_class,  # multilabel: images with each finding
            "with_masks": sum(r.mask is not None for r in self.records),
            "mask_meaning": self.info.mask_meaning,
            "generator": self.info.generator,
            "label_kind": self.info.label_kind,
            "findings": list(self.findings),
            **({"without_findings": sum(not any(r.label) for r in self.records)} if multilabel else {}),
            **({"artefact_scope": self.info.artefact_scope} if self.info.artefact_scope else {}),
            **({"with_artefact": with_artefact} if with_artefact is not None else {}),
        }


def _check_labels(records: Sequence[Record], info: DatasetInfo) -> None:
    """One line (DataError) for a label that does not fit the dataset's label kind and classes."""
    kind, k = info.label_kind, len(info.classes)
    if kind not in LABEL_KINDS:
        raise DataError(f"{info.name}: label_kind must be one of {', '.join(LABEL_KINDS)}; got {kind!r}")
    if kind == BINARY and k != 2:
        raise DataError(f"{info.name}: a binary dataset has two classes (negative, positive); got {k}: "
                        f"{', '.join(info.classes)}")
    if kind == MULTILABEL and k == 0:
        raise DataError(f"{info.name}: a multilabel dataset needs at least one finding; the finding list is empty")
    widths = {"": (0,), "image": (0, 1), "finding": (0, k)}
    allowed = (0, 1, -1) if info.artefact_scope == "finding" else (0, 1)
    if info.artefact_scope not in widths:
        raise DataError(f"{info.name}: artefact_scope must be image or finding; got {info.artefact_scope!r}")
    for record in records:
        label = record.label
        if kind == MULTILABEL:
            if not isinstance(label, tuple) or len(label) != k or any(v not in (0, 1) for v in label):
                raise DataError(f"{info.name}: the label of {_describe(record.image)} must be {k} values 0/1, one "
                                f"per finding ({', '.join(info.classes)}); got {label!r}")
        elif isinstance(label, tuple) or not 0 <= label < k:
            raise DataError(f"{info.name}: label {label} of {_describe(record.image)} is outside the {k} classes")
        if record.artefact and (len(record.artefact) not in widths[info.artefact_scope] or any(
                v not in allowed for v in record.artefact)):
            raise DataError(f"{info.name}: the artefact flags {record.artefact} of {_describe(record.image)} do not "
                            f"fit artefact_scope {info.artefact_scope or 'none'!r}")


def make_loader(
    dataset: AuditDataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader yielding Batch objects; shuffling is seeded for repeatable runs."""
    if len(dataset) == 0:
        raise DataError(f"{dataset.info.name}: no samples to load (check the split and variant asked for)")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=drop_last,
    )
