"""run_discovery: audit a model when nobody has masks or variants.

1. One LRP-ε pass (relevance of each image's label) over the analysed images — the dominant cost,
   sharded under torchrun.
2. Strategy clusters per class (SpRAy, spray.py).
3. Candidate artefacts: clusters of at least ``min_cluster`` images whose mean relevance lies in a
   region (the fewest pixels holding ``mass`` of it cover at most ``max_area`` of the image, 0.5 by
   default); each member's proposed mask is its own most relevant box within that region (regions.py).
   Every cluster that a limit keeps from the test is listed with the limit, its value and its flag
   (``discovery_limits``); then the verdict is never "no shortcut found".
4. The causal test of each candidate against a control region of the same area in the same images
   (causal.py): a candidate is a shortcut only when its effect clearly beats the control's. A box
   with no room for a disjoint control is tested against the least overlapping one (conservative).
5. Global probes that need no mask (probes.py): colour, texture and frequency.
6. Propagation (propagate.py, issue 28): each confirmed artefact is searched for on every image by its
   appearance (normalised cross-correlation of its template with a context ring), and every image that
   carries it is masked, member of the confirming cluster or not; how many, and their match scores, are
   in ``data["propagation"]``.
7. A recommendation: localised shortcut -> mask-based repair with the proposed masks (``auto``: TAP,
   then RRR, ... until the repair proves itself; docs/repair.md "Which method for which shortcut");
   global -> TEA with a small clean teacher split; neither -> "no shortcut found", with what was tested,
   or "no shortcut among the tested candidates" with what was not and the rerun that tests it.

The report is data (schema ``auditkit.discover/1``); ``proposed_dataset`` turns it into a dataset
with the proposed masks that ``auditkit repair --data`` reads unchanged.

Files: config.py (settings), candidates.py (steps 1, 3, 4), spray.py (2), probes.py (5), propagate.py (6),
verdict.py (limits and step 7), record.py (the document's typed records), this file (the order of it all).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from .._version import __version__
from ..audit.tiles import encode_map, encode_picture
from ..data import AuditDataset, DatasetInfo, Record
from ..data.masks import annotated
from ..data.meaning import SPURIOUS, meaning_of
from ..device import device_for, resolve_precision
from ..distributed import Context
from ..errors import AuditkitError, DataError
from .candidates import _candidates, _causal_tests, _ImageBatches, _images, _predict_batches, relevance_pass
from .config import NO_SHORTCUT, NOT_ALL_TESTED, SCHEMA, SHORTCUT_FOUND, DiscoveryConfig
from .probes import run_probes
from .propagate import build_templates, find_matches, propagation_entry
from .record import (
    CheckpointEntry,
    ClusterEntry,
    DataEntry,
    DiscoveryDocument,
    InputMasks,
    MaskSummary,
    Normalization,
    Propagation,
    Verdict,
)
from .regions import box_mask, scale_box
from .spray import strategy_clusters
from .verdict import _recommendation, _rerun_flags, discovery_limits, untested_summary

__all__ = ["NO_SHORTCUT", "NOT_ALL_TESTED", "SCHEMA", "SHORTCUT_FOUND", "DiscoveryConfig", "DiscoveryReport",
           "discovery_limits", "proposed_dataset", "real_masks", "relevance_pass", "run_discovery",
           "untested_summary"]


@dataclass
class DiscoveryReport:
    """``data``: the JSON document (schema auditkit.discover/1, discovery.schema.json; built from the
    records of record.py); ``masks``: dataset index -> proposed mask (H, W) float32 in the dataset's image
    size, for every image where a confirmed artefact was found (propagate.py; never an empty mask)."""

    data: dict
    masks: dict[int, np.ndarray]

    @property
    def found(self) -> bool:
        return self.data["verdict"]["label"] == SHORTCUT_FOUND

    @property
    def complete(self) -> bool:
        """Whether every candidate was tested (no limit kept one from its causal test)."""
        return bool(self.data["verdict"].get("complete", True))

    def exit_code(self, fail_on_shortcut: bool) -> int:
        """0; with ``fail_on_shortcut``: 1 when a shortcut is found, 3 when none was found but some
        candidates were never tested (a gate must not pass what it did not test; the audit's rule)."""
        if not fail_on_shortcut:
            return 0
        if self.found:
            return 1
        return 0 if self.complete else 3


def _mask_boxes(dataset, rows, size, config) -> tuple[dict, Propagation | None]:
    """The proposed box (analysis size) of every image to mask, and the propagation's entry for the report
    (None when ``config.propagate`` is off: then the confirming clusters' members keep their own boxes).
    With propagation, an image is masked where a confirmed artefact's template matches it, member or not;
    a member whose box holds no match (an image without the artefact in a cluster that has it) is not."""
    if not config.propagate or not any(row.get("shortcut") for row in rows):
        return {p: box for row in rows if row.get("shortcut") for p, box in row["boxes"].items()}, None
    margin, threshold, contrast = config.match_margin, config.match_threshold, config.match_contrast
    templates = build_templates(lambda positions: _images(dataset, positions, config.device), rows, size, margin,
                                threshold)
    matches = {}
    for start in range(0, len(dataset), config.batch_size):
        positions = range(start, min(start + config.batch_size, len(dataset)))
        found = find_matches(_images(dataset, positions, config.device), templates, size, margin,
                             threshold=threshold, contrast=contrast)
        matches.update({p: m for p, m in zip(positions, found) if m is not None})
    entry = propagation_entry(matches, templates, rows, len(dataset), threshold, contrast, margin)
    return {p: m.box for p, m in matches.items()}, entry


def _heat_entry(values: np.ndarray) -> dict:
    return encode_map(torch.from_numpy(np.asarray(values, np.float32)))


def _exemplars(dataset, row, distributions, size, count):
    members = row["cluster"].members
    chosen = sorted(row["boxes"])[:count] if row["boxes"] else [int(p) for p in members[:count]]
    out = []
    for position in chosen:
        sample = dataset[int(position)]
        entry = {"index": int(position), "image": encode_picture(sample.image),
                 "heatmap": _heat_entry(distributions[position].numpy())}
        if position in row["boxes"]:
            box = scale_box(row["boxes"][position], size, dataset.image_size)
            entry["proposed_box"] = list(box)
            entry["mask"] = encode_picture(torch.from_numpy(box_mask(box, dataset.image_size))[None])
        out.append(entry)
    return out


def real_masks(masks: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], int]:
    """The proposed masks that mark something (a pixel above 0.5), and how many were empty: an empty
    proposed mask would make every later mask test of that image vacuous, so it is never a mask."""
    kept = {k: m for k, m in masks.items() if annotated(np.asarray(m)).any()}
    return kept, len(masks) - len(kept)


#: Why discovery does not run on multi-label data or models (one line).
MULTILABEL_DISCOVERY = ("discovery does not support multilabel models or data yet (it clusters the explanations of "
                        "each image's one class); audit the findings instead: masks of the artefact, variants, or "
                        "per-image artefact flags for subgroup AUROC gaps (auditkit audit, docs/audit.md)")


def refuse_multilabel(model, dataset: AuditDataset) -> None:
    """AuditkitError (MULTILABEL_DISCOVERY) for a multilabel model or dataset."""
    if getattr(dataset, "label_kind", "softmax") == "multilabel" or getattr(
            getattr(model, "meta", None), "head", "softmax") == "multilabel":
        raise AuditkitError(MULTILABEL_DISCOVERY)


def run_discovery(
    model,
    dataset: AuditDataset,
    config: DiscoveryConfig | None = None,
    *,
    context: Context | None = None,
    show_progress: bool = False,
    data_spec: str | None = None,
    checkpoint: str | None = None,
    out_dir: str | None = None,
) -> DiscoveryReport:
    """Finds the shortcuts of ``model`` (an auditkit model) on labelled ``dataset`` without masks.

    Returns a DiscoveryReport: strategy clusters, candidate artefacts with their causal tests,
    global probes, the limits that kept clusters from the test (``data["limits"]``, ``data["skipped"]``),
    the verdict ("shortcut found" / "no shortcut found" / "no shortcut among the tested candidates"
    when a limit kept some out) and the recommendation
    (``data["recommendation"]["method"]``: auto, tea or none, and the next command). ``out_dir``
    only names the folder the recommendation's command reads. Raises AuditkitError for empty data
    and ParameterError for bad settings. The model is explained in eval mode and left as it was.
    Source: SpRAy (Lapuschkin et al. 2019), the audit's counterfactuals, docs/discover.md."""
    config = config or DiscoveryConfig()
    context = context or Context()
    config.validate()
    if len(dataset) == 0:
        raise AuditkitError("the data has no samples to analyse (check the split asked for)")
    refuse_multilabel(model, dataset)
    device = device_for(model, config.device, "discovery")
    config = replace(config, device=device, precision=resolve_precision(config.precision, device))
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    timings = {}  # seconds per stage, in the report: where the time goes

    def lap(stage: str) -> None:
        timings[stage] = round(time.perf_counter() - start - sum(timings.values()), 3)

    try:
        distributions, predictions = relevance_pass(model, dataset, config, context, show_progress)
        lap("relevance_pass")
        labels = np.array([r.label for r in dataset.records], int)
        size = tuple(distributions.shape[-2:])
        clusters = strategy_clusters(distributions, labels, grid=config.grid, max_clusters=config.max_clusters,
                                     seed=config.seed)
        rows = _candidates(clusters, distributions, labels, predictions, config)
        lap("clustering")
        _causal_tests(model, dataset, rows, labels, predictions, size, config)
        lap("causal_tests")
        rng = np.random.default_rng(config.seed)
        probe_indices = np.sort(rng.permutation(len(dataset))[: config.probe_samples])
        probe_labels = labels[probe_indices]
        batches = _ImageBatches(dataset, probe_indices, config)  # loaded once for every probe
        probes = run_probes(lambda edit: _predict_batches(model, dataset, probe_indices, config, edit, batches),
                            probe_labels,
                            predictions[probe_indices], dataset.num_classes, channels=dataset.channels,
                            seed=config.seed, resamples=config.bootstrap, confidence=config.confidence,
                            drop_threshold=config.probe_drop, retained_threshold=config.probe_retained)
        lap("probes")
        boxes, propagation = _mask_boxes(dataset, rows, size, config)
        masks, empty = real_masks({position: box_mask(scale_box(box, size, dataset.image_size), dataset.image_size)
                                   for position, box in boxes.items()})
        lap("propagation")
        cluster_entries = []
        for row in rows:
            cluster, region = row["cluster"], row["region"]
            cluster_entries.append(ClusterEntry(
                int(cluster.label), dataset.classes[cluster.label], cluster.number, len(cluster.members),
                row["accuracy"], cluster.eigengap, region.area, region.agreement, row.get("box_area"),
                row["candidate"], row.get("shortcut", False), row.get("test"),
                {"limit": row["untested"][0], "reason": row["untested"][1]} if row["untested"] else None,
                row["without_box"], row["without_control"],
                # Members masked: with propagation, clusters that confirmed nothing have masked members too.
                sum(int(p) in masks for p in cluster.members), _heat_entry(region.mean_map),
                _exemplars(dataset, row, distributions, size, config.exemplars)))
        confirmed = [e for e in cluster_entries if e.shortcut]
        global_signals = sorted({p["points_at"] for p in probes if p.get("points_at")})
        found = bool(confirmed or global_signals)
        limits = discovery_limits(rows, clusters, len(dataset), len(probe_indices), config)
        untested = untested_summary(limits, len(clusters))
        skipped = [{"class": e.label, "class_name": e.class_name, "cluster": e.cluster, "size": e.size, **e.untested}
                   for e in cluster_entries if e.untested]
        tested = (f"{len(clusters)} strategy clusters in {len(np.unique(labels))} classes, "
                  f"{sum(r['candidate'] for r in rows)} candidate regions causally tested"
                  + (f", {len(skipped)} not tested" if skipped else "")
                  + f", {sum(p['applicable'] for p in probes)} global probes")
        if confirmed:
            summary = (f"a localised shortcut: {len(confirmed)} of {len(clusters)} strategy clusters rely on a "
                       f"region ({len(masks)} images masked)")
            if propagation:
                summary += (f"; {propagation.images} of {len(dataset)} images carry the artefact "
                            f"({propagation.beyond_clusters} outside those clusters; match score median "
                            f"{propagation.score.median or 0:.2f}, each >= {config.match_threshold:g})")
        elif global_signals:
            summary = f"a global shortcut: the probes point at {', '.join(global_signals)}"
        elif untested:
            summary = f"no shortcut among the tested candidates; {untested}"
        else:
            summary = f"no shortcut found ({tested})"
        if found and untested:
            summary += f" ({untested})"
        label = SHORTCUT_FOUND if found else NOT_ALL_TESTED if untested else NO_SHORTCUT
        recommendation = _recommendation(confirmed, global_signals, data_spec or dataset.info.name, checkpoint, out_dir,
                                         model.meta.arch, untested, _rerun_flags(limits))
        lap("report")
    finally:
        model.train(was_training)
    meta = model.meta
    document = DiscoveryDocument(
        schema=SCHEMA,
        auditkit_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        checkpoint=CheckpointEntry(checkpoint, meta.arch, list(meta.class_names), list(meta.input_size),
                                   meta.in_channels,
                                   Normalization(list(meta.mean), list(meta.std), meta.normalization)),
        data=DataEntry(data_spec or dataset.info.name, dataset.fingerprint(), len(dataset),
                       sorted({r.split for r in dataset.records}), list(size)),
        config={**config.__dict__, "device": str(config.device)},
        accuracy=float(np.mean(predictions == labels)),
        clusters=cluster_entries,
        probes=probes,
        verdict=Verdict(label, summary, tested, bool(confirmed), global_signals, not skipped, untested),
        limits=limits,
        skipped=skipped,
        recommendation=recommendation,
        # Images without a real proposed region get no mask (never an empty one); their count is stated.
        # The proposed masks mark the suspected artefact; the data's own masks (whatever they mark,
        # auditkit/data/meaning.py) are neither read nor kept: proposed_dataset drops them.
        masks=MaskSummary(len(masks), len(dataset) - len(masks), empty,
                          float(np.mean([m.mean() for m in masks.values()])) if masks else None, SPURIOUS,
                          InputMasks(sum(r.mask is not None for r in dataset.records), meaning_of(dataset), False)),
        propagation=propagation,
        seconds=round(time.perf_counter() - start, 2),
        timings=timings,
    )
    return DiscoveryReport(document.as_json(), masks)


def proposed_dataset(dataset: AuditDataset, report: DiscoveryReport) -> AuditDataset:
    """``dataset`` with the proposed masks (mask = 1 on the suspected artefact, ``mask_meaning``
    "spurious"): what ``auditkit repair --data`` and ``auditkit audit --data`` read. The data's own masks
    are dropped, never mixed in: they may mark the object, and one dataset has one meaning. Images without a
    proposed region keep no mask: an empty proposed mask (no pixel above 0.5) is never written, since
    it would make the later mask tests of that image vacuous; ``report.data["masks"]`` counts them.
    The records' splits, variants and groups are kept. Raises DataError when a proposed mask's shape
    is not the dataset's image size (a report of other data)."""
    masks, _ = real_masks(report.masks)
    for k, mask in masks.items():
        if not 0 <= k < len(dataset) or tuple(np.shape(mask)) != tuple(dataset.image_size):
            raise DataError(f"the discovery's proposed mask for image {k} does not fit this data ({len(dataset)} "
                            f"images of {dataset.image_size[0]}x{dataset.image_size[1]}): give the data it ran on")
    records = [
        Record(record.image, record.label, (masks[k] * 255).astype(np.uint8) if k in masks else None,
               record.variant, record.group, record.split, record.artefact)
        for k, record in enumerate(dataset.records)
    ]
    info = DatasetInfo(f"{dataset.info.name} (discovered masks)", dataset.info.source, dataset.classes,
                       mask_meaning=SPURIOUS, label_kind=dataset.info.label_kind,
                       artefact_scope=dataset.info.artefact_scope)
    return AuditDataset(records, info, channels=dataset.channels, image_size=dataset.image_size)
