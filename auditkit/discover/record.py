"""The discovery document as typed records: each part of ``discovery.json`` (schema ``auditkit.discover/1``,
auditkit/discover/discovery.schema.json) is a dataclass, so a field is named once and checked by the
type checker, and ``as_json`` turns the record into exactly the JSON the string-keyed dicts gave.

Parts still built as plain dicts, on purpose: a cluster's causal ``test`` and the ``probes`` (bootstrap
estimates, already ``Estimate.as_dict``) and ``config`` (DiscoveryConfig's own fields)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any


def as_json(value: Any) -> Any:
    """A record (and the records, lists and dicts inside it) as JSON-ready data. A field's JSON name is
    its ``metadata["json"]`` when it has one (``class`` is a Python keyword); a field marked
    ``metadata["flatten"]`` (a dict) has its keys merged into its record's."""
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for item in fields(value):
            content = as_json(getattr(value, item.name))
            if item.metadata.get("flatten"):
                out.update(content)
            else:
                out[item.metadata.get("json", item.name)] = content
        return out
    if isinstance(value, dict):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(item) for item in value]
    return value


@dataclass
class Normalization:
    mean: list[float]
    std: list[float]
    source: str


@dataclass
class CheckpointEntry:
    path: str | None
    arch: str
    classes: list[str]
    input_size: list[int]
    in_channels: int
    normalization: Normalization


@dataclass
class DataEntry:
    spec: str
    fingerprint: str
    samples: int
    splits: list[str]
    analysis_size: list[int]


@dataclass
class ClusterEntry:
    """One strategy cluster: its region, whether it was a candidate, its causal test and its exemplars."""

    label: int = field(metadata={"json": "class"})
    class_name: str
    cluster: int
    size: int
    accuracy: float
    eigengap: float
    region_area: float
    agreement: float
    box_area: float | None
    candidate: bool
    shortcut: bool
    test: dict | None
    untested: dict | None  # {"limit", "reason"}
    without_box: int
    without_control: int
    masked: int  # members masked (with propagation, also in clusters that confirmed nothing)
    mean_heatmap: dict
    exemplars: list[dict]


@dataclass
class LimitEntry:
    """A setting that kept strategy clusters (or images) from the causal test, with what it did."""

    limit: str
    flag: str | None
    value: Any
    effect: str
    skips: bool
    clusters: int
    images: int
    lift: Any
    description: str
    extra: dict = field(default_factory=dict, metadata={"flatten": True})  # classes=, overlapping=


@dataclass
class Recommendation:
    method: str  # auto | tea | none
    kind: str  # localised | global | untested | none
    reason: str
    command: str | None


@dataclass
class Verdict:
    label: str
    summary: str
    tested: str
    localised: bool
    global_signals: list[str] = field(metadata={"json": "global"})
    complete: bool
    untested: str | None


@dataclass
class InputMasks:
    images: int
    mask_meaning: str
    kept: bool


@dataclass
class MaskSummary:
    images: int
    without_mask: int
    empty_dropped: int
    mean_area: float | None
    mask_meaning: str
    input_masks: InputMasks


@dataclass
class MatchScores:
    median: float | None
    p05: float | None
    min: float | None


@dataclass
class TemplateEntry:
    clusters: list[int]
    box: list[int]
    built_from: int
    images: int
    beyond_clusters: int
    score_median: float | None
    score_min: float | None


@dataclass
class Propagation:
    """Where the confirmed artefacts were found across the data (propagate.py)."""

    method: str
    threshold: float
    contrast: float
    margin: int
    images: int
    share: float
    in_clusters: int
    beyond_clusters: int
    members_without_match: int
    score: MatchScores
    templates: list[TemplateEntry]


@dataclass
class DiscoveryDocument:
    schema: str
    auditkit_version: str
    created: str
    checkpoint: CheckpointEntry
    data: DataEntry
    config: dict
    accuracy: float
    clusters: list[ClusterEntry]
    probes: list[dict]
    verdict: Verdict
    limits: list[LimitEntry]
    skipped: list[dict]
    recommendation: Recommendation
    masks: MaskSummary
    propagation: Propagation | None
    seconds: float
    timings: dict[str, float]

    def as_json(self) -> dict:
        return as_json(self)
