"""The audit's typed records: what it keeps of each image while measuring, and the sections of its
JSON document that describe the run (the model, the data, the settings, each layer's activation share).

Each document section has ``to_json()``, which gives exactly the JSON the document has always held
(key order included; auditkit/audit/report.schema.json pins it). The per-image :class:`SampleRecord`
never reaches the document: :func:`auditkit.audit.runner.aggregate` turns a list of them into the
document's estimates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SampleRecord:
    """What the audit measured on one image (dataset index ``index``): the prediction, the mask, and
    the mask-based measurements, which stay None when the image has no mask, or an empty one
    (``mask_empty``), or when the test did not run on it."""

    index: int
    variant: str
    label: int
    prediction: int
    has_mask: bool
    mask_area: float | None = None  # share of the image's pixels above 0.5 in its mask
    mask_empty: bool | None = None  # None without a mask
    localisation: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> LOCALISATION_KEYS
    share: list[float] | None = None  # per activation-share layer: the share of activation inside D(M)
    coverage: list[float] | None = None  # per layer: D(M)'s mean, the share by chance
    removed_prediction: int | None = None  # the prediction with the masked region filled (reference variant)
    swap_prediction: int | None = None  # the prediction with another class's region pasted in
    partner_label: int | None = None  # the class of the image that region came from


@dataclass(frozen=True)
class SwapResult:
    """The swap counterfactual of one image: its prediction after the paste, and the donor's class."""

    index: int
    swap_prediction: int
    partner_label: int


@dataclass(frozen=True)
class ActivationShare:
    """One entry of the document's ``activation_share``: the share of a layer's activation inside
    the (downscaled) mask, with its interval, and the share by chance (the mask's coverage)."""

    layer: str
    share: dict[str, Any]  # an estimate: metrics.Estimate.as_dict()
    chance: float

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "share": self.share, "chance": self.chance}


@dataclass(frozen=True)
class CheckpointSection:
    """The document's ``checkpoint``: the audited model as its metadata describes it."""

    path: str | None
    arch: str
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    in_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalization: str  # where mean and std came from (auditkit/models/normalization.py)
    head: str = "softmax"  # softmax, or binary: one logit seen as two classes (auditkit/models/outputs.py)

    @classmethod
    def of(cls, meta, path: str | None) -> CheckpointSection:
        """From a model's ``meta`` (auditkit.models.ModelMeta) and the file it was read from."""
        return cls(path, meta.arch, tuple(meta.class_names), tuple(meta.input_size), meta.in_channels,
                   tuple(meta.mean), tuple(meta.std), meta.normalization, getattr(meta, "head", "softmax"))

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "arch": self.arch, "classes": list(self.classes),
                "input_size": list(self.input_size), "in_channels": self.in_channels, "head": self.head,
                "normalization": {"mean": list(self.mean), "std": list(self.std), "source": self.normalization}}


@dataclass(frozen=True)
class DataSection:
    """The document's ``data``: what was audited (counts per variant, masks, what the masks mark)."""

    spec: str
    fingerprint: str
    samples: int
    variants: dict[str, int]  # variant -> images, in the dataset's variant order
    with_masks: int
    empty_masks: int  # masks with no pixel above 0.5 at the model's input size
    mask_meaning: Any  # the dataset's mask_meaning as recorded (auditkit/data/meaning.py)

    @classmethod
    def of(cls, dataset, records: list[SampleRecord], spec: str | None) -> DataSection:
        """From the audited ``dataset`` (permuted variant added) and the per-image records."""
        return cls(spec or dataset.info.name, dataset.fingerprint(), len(dataset),
                   {v: sum(r.variant == v for r in dataset.records) for v in dataset.variants},
                   sum(r.mask is not None for r in dataset.records), sum(bool(r.mask_empty) for r in records),
                   dataset.info.mask_meaning)

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "fingerprint": self.fingerprint, "samples": self.samples,
                "variants": dict(self.variants), "with_masks": self.with_masks, "empty_masks": self.empty_masks,
                "mask_meaning": self.mask_meaning}


@dataclass(frozen=True)
class RunSection:
    """The document's ``config``: the settings the audit ran with (device resolved, processes counted)."""

    methods: tuple[str, ...]
    task: str
    batch_size: int
    device: str
    precision: str
    seed: int
    bootstrap: int
    confidence: float
    counterfactuals: bool
    epsilon: float
    processes: int
    positive_class: int | str | None

    @classmethod
    def of(cls, config, processes: int) -> RunSection:
        """From a resolved :class:`~auditkit.audit.runner.AuditConfig` and the number of processes."""
        return cls(tuple(config.methods), config.task, config.batch_size, str(config.device), config.precision,
                   config.seed, config.bootstrap, config.confidence, config.counterfactuals, config.epsilon,
                   processes, config.positive_class)

    def to_json(self) -> dict[str, Any]:
        return {"methods": list(self.methods), "task": self.task, "batch_size": self.batch_size,
                "device": self.device, "precision": self.precision, "seed": self.seed,
                "bootstrap": self.bootstrap, "confidence": self.confidence, "counterfactuals": self.counterfactuals,
                "epsilon": self.epsilon, "processes": self.processes, "positive_class": self.positive_class}


__all__ = ["ActivationShare", "CheckpointSection", "DataSection", "RunSection", "SampleRecord", "SwapResult"]
