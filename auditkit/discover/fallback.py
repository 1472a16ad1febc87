"""Auditing a checkpoint file, with discovery when the data gives the audit nothing to compare.

    done = audit_checkpoint(CheckpointAudit(Path("shortcut.safetensors"), "builtin:decoy-mnist"))
    done.kind, done.data["verdict"], done.exit_code(fail_on_shortcut=True)

The audit (auditkit.audit) needs masks or variants; on data with neither it could only answer
"inconclusive", so the shortcut is looked for instead (auditkit.discover, SpRAy-style clustering
of the heatmaps and causal tests): the outcome is then the discovery's document, with the same
exit codes. This lives beside discovery, above the audit it falls back from. The device is
resolved here, once per run, and passed down as a ``torch.device``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .._io import atomic_write_text
from .._json import dumps
from ..audit import AuditConfig, run_audit, write_html
from ..device import resolve_device, resolve_precision
from ..models import resolve_layers
from ..models.loading import ReadOptions, load_model
from ..training import model_data
from .html import render_discovery_html
from .runner import DiscoveryConfig, run_discovery

#: Where the fall-back's recommendation expects the proposed masks (the discovery writes none itself).
PROPOSED_DATA = "discovered"


@dataclass(frozen=True)
class CheckpointAudit:
    """What to audit and how. ``config.layers`` are names, resolved against the model; its device
    and precision are taken from ``device`` and ``precision``."""

    checkpoint: Path
    data: str  # a dataset spec with masks and/or variants (auditkit.data.open_dataset)
    split: str | None = "test"  # None: every sample
    config: AuditConfig = field(default_factory=AuditConfig)
    reading: ReadOptions = ReadOptions()
    classes: str | None = None
    findings: str | None = None  # multi-label data: the findings in order (auditkit.data.open_dataset)
    mask_meaning: str | None = None  # what the data's masks mark (auditkit.data.open_dataset)
    report_dir: Path | None = None  # report.json and report.html go here
    device: str | torch.device = "auto"
    precision: str = "auto"


@dataclass
class AuditedCheckpoint:
    """The audit's report, or the discovery's when the data had nothing to compare."""

    kind: str  # "audit" or "discovery"
    report: Any  # AuditReport or DiscoveryReport
    report_files: tuple[Path, Path] | None  # report.json and report.html, when a report_dir was given
    is_main: bool = True  # False on the other ranks under torchrun: nothing written there

    @property
    def data(self) -> dict:
        return self.report.data

    def exit_code(self, fail_on_shortcut: bool) -> int:
        return self.report.exit_code(fail_on_shortcut)


def audit_checkpoint(request: CheckpointAudit, *, show_progress: bool = False,
                     on_discovery: Callable[[], None] | None = None) -> AuditedCheckpoint:
    """Audits ``request.checkpoint`` on ``request.data``; on data without masks and with one variant,
    runs discovery instead (``on_discovery()`` first, on the main rank). Writes the report files
    when ``request.report_dir`` is given (main rank only)."""
    device = resolve_device(request.device)  # once per run
    precision = resolve_precision(request.precision, device)
    context = distributed.init_from_environment(device)
    try:
        model = load_model(request.checkpoint, request.reading).to(device)
        dataset = model_data(request.data, model, split=request.split, classes=request.classes,
                             mask_meaning=request.mask_meaning, findings=request.findings)
        config = replace(request.config, device=device, precision=precision)
        provenance = {"context": context, "show_progress": show_progress, "data_spec": request.data,
                      "checkpoint": str(request.checkpoint)}
        flags = dataset.label_kind == "multilabel" and bool(dataset.info.artefact_scope)
        if not dataset.has_masks and len(dataset.variants) == 1 and not flags:
            # Nothing to compare against: find the shortcut instead of answering "inconclusive" (multi-label
            # data with artefact flags has its subgroups to compare; without them, discovery refuses it).
            if context.is_main and on_discovery is not None:
                on_discovery()
            report = run_discovery(model, dataset, _discovery_config(config), out_dir=PROPOSED_DATA, **provenance)
            _recommend_discovery_first(report.data, request)
            kind, html = "discovery", render_discovery_html(report.data)
        else:
            if config.layers:
                config = replace(config, layers=tuple(resolve_layers(model, list(config.layers))))
            report = run_audit(model, dataset, config, **provenance)
            kind, html = "audit", None
        files = None
        if context.is_main and request.report_dir is not None:
            files = _write(request.report_dir, report.data, html)
    finally:
        distributed.finish(context)
    return AuditedCheckpoint(kind, report, files, context.is_main)


def _discovery_config(config: AuditConfig) -> DiscoveryConfig:
    """The discovery settings the audit's settings imply (the rest: discovery's defaults)."""
    return DiscoveryConfig(batch_size=config.batch_size, epsilon=config.epsilon, device=config.device,
                           precision=config.precision, seed=config.seed, bootstrap=config.bootstrap,
                           confidence=config.confidence)


def _recommend_discovery_first(document: dict, request: CheckpointAudit) -> None:
    """An "auto" repair needs the proposed masks, which only the discovery's own run writes: the
    recommended command writes them first."""
    recommendation = document["recommendation"]
    if recommendation["method"] == "auto":
        recommendation["command"] = (f"auditkit discover {request.checkpoint} --data {request.data} "
                                     f"--out {PROPOSED_DATA} && " + recommendation["command"])


def _write(folder: Path, document: dict, discovery_html: str | None) -> tuple[Path, Path]:
    json_path = atomic_write_text(folder / "report.json", dumps(document, indent=2, default=str) + "\n",
                                  overwrite=True)
    if discovery_html is not None:
        return json_path, atomic_write_text(folder / "report.html", discovery_html, overwrite=True)
    return json_path, write_html(document, folder / "report.html")


__all__ = ["AuditedCheckpoint", "CheckpointAudit", "audit_checkpoint"]
