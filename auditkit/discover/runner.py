"""run_discovery: audit a model when nobody has masks or variants.

1. One LRP-ε pass (relevance of each image's label) over the analysed images — the dominant cost,
   sharded under torchrun.
2. Strategy clusters per class (SpRAy, spray.py).
3. Candidate artefacts: clusters of at least ``min_cluster`` images whose mean relevance lies in a
   small region (the fewest pixels holding ``mass`` of it cover at most ``max_area`` of the image);
   each member's proposed mask is its own most relevant box within that region (regions.py).
4. The causal test of each candidate against a control region of the same area in the same images
   (causal.py): a candidate is a shortcut only when its effect clearly beats the control's.
5. Global probes that need no mask (probes.py): colour, texture and frequency.
6. A recommendation: localised shortcut -> mask-based repair with the proposed masks (``auto``: TAP,
   then RRR, ... until the repair proves itself; docs/repair.md "Which method for which shortcut");
   global -> TEA with a small clean teacher split; neither -> "no shortcut found", with what was tested.

The report is data (schema ``auditkit.discover/1``); ``proposed_dataset`` turns it into a dataset
with the proposed masks that ``auditkit repair --data`` reads unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from .._progress import progress_bar
from .._version import __version__
from ..audit import metrics as M
from ..audit.tiles import encode_map, encode_picture
from ..data import AuditDataset, DatasetInfo, Record, collate
from ..device import autocast, device_for, resolve_precision
from ..distributed import Context, gather
from ..errors import AuditkitError, ParameterError
from ..explain import attribute
from .causal import dispersion, edit_effects
from .probes import run_probes
from .regions import (
    box_mask,
    cluster_region,
    control_box,
    dilate,
    proposed_box,
    scale_box,
)
from .spray import relevance_distribution, strategy_clusters

SCHEMA = "auditkit.discover/1"
SHORTCUT_FOUND, NO_SHORTCUT = "shortcut found", "no shortcut found"


@dataclass(frozen=True)
class DiscoveryConfig:
    """Settings of ``run_discovery``; every threshold is a share (0..1)."""

    epsilon: float = 0.01  # LRP-ε stabiliser
    batch_size: int = 128
    device: str = "auto"  # where the model is ("auto") or cpu | cuda | cuda:N
    precision: str = "auto"
    seed: int = 0
    analysis_side: int = 64  # relevance maps are area-averaged to at most this many pixels a side
    grid: int = 8  # SpRAy features: relevance on grid x grid cells
    max_clusters: int = 8  # per class
    min_cluster: int = 10  # smaller clusters are listed, not tested
    mass: float = 0.5  # a cluster's region: the fewest pixels holding this share of its mean relevance
    max_area: float = 0.10  # candidate artefacts cover at most this share of the image
    box_level: float = 0.1  # a member's box holds its pixels in the region with at least this x its peak relevance
    effect_threshold: float = 0.10  # candidate - control effect (share of images) that counts
    max_tested: int = 200  # images per candidate in the causal test (a seeded sample; all get masks)
    max_dispersion: float = 0.05  # mean absolute deviation of the candidate boxes' content (pixel units)
    max_dispersion_ratio: float = 0.5  # ... and relative to the control boxes'
    probe_samples: int = 1000  # images the global probes edit
    probe_drop: float = 0.10  # accuracy drop under a shape-preserving probe that counts
    probe_retained: float = 0.5  # share of above-chance accuracy kept under a shape-destroying probe that counts
    bootstrap: int = 1000
    confidence: float = 0.95
    exemplars: int = 6  # per cluster, in the report

    def validate(self) -> None:
        for name in ("batch_size", "analysis_side", "grid", "max_clusters", "min_cluster", "bootstrap", "max_tested"):
            if getattr(self, name) < 1:
                raise ParameterError(name, f"must be at least 1; got {getattr(self, name)}")
        for name in ("mass", "max_area", "confidence", "probe_retained", "box_level"):
            if not 0 < getattr(self, name) <= 1:
                raise ParameterError(name, f"must lie in (0, 1]; got {getattr(self, name)}")
        if self.epsilon < 0 or self.probe_samples < 0 or self.exemplars < 0:
            raise ParameterError("epsilon" if self.epsilon < 0 else "probe_samples" if self.probe_samples < 0
                                 else "exemplars", "must not be negative")


@dataclass
class DiscoveryReport:
    """``data``: the JSON document (schema auditkit.discover/1); ``masks``: dataset index -> proposed
    mask (H, W) float32 in the dataset's image size, for every image of a confirmed candidate."""

    data: dict
    masks: dict[int, np.ndarray]

    @property
    def found(self) -> bool:
        return self.data["verdict"]["label"] == SHORTCUT_FOUND

    def exit_code(self, fail_on_shortcut: bool) -> int:
        return 1 if fail_on_shortcut and self.found else 0


def _analysis_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def relevance_pass(model, dataset: AuditDataset, config: DiscoveryConfig, context: Context,
                   show_progress: bool) -> tuple[torch.Tensor, np.ndarray]:
    """Relevance distributions (N, h, w) float32 of every image's label, at the analysis size, and
    the model's predictions (N,)."""
    size = _analysis_size(dataset.image_size, config.analysis_side)
    starts = list(range(0, len(dataset), config.batch_size))[context.rank :: context.world_size]
    parts = []
    with progress_bar("explaining (LRP-ε)", total=len(starts), enabled=show_progress and context.is_main) as bar:
        for start in starts:
            indices = list(range(start, min(start + config.batch_size, len(dataset))))
            batch = collate([dataset[i] for i in indices]).to(config.device)
            with autocast(config.device, config.precision):
                with torch.no_grad():
                    predictions = model(batch.images).argmax(1)
                maps = attribute(model, batch.images, batch.labels, "lrp_epsilon", epsilon=config.epsilon)[:, 0]
            maps = maps.float().cpu()
            if tuple(maps.shape[-2:]) != size:
                maps = F.adaptive_avg_pool2d(maps[:, None], size)[:, 0]
            parts.append((start, relevance_distribution(maps).float().numpy(), predictions.cpu().numpy()))
            bar.advance(1)
    parts = sorted(gather(context, parts), key=lambda p: p[0])
    return (torch.from_numpy(np.concatenate([p[1] for p in parts])), np.concatenate([p[2] for p in parts]))


def _images(dataset: AuditDataset, indices, device) -> torch.Tensor:
    return torch.stack([dataset[int(i)].image for i in indices]).to(device)


class _ImageBatches:
    """The batches of ``indices``, decoded once and kept when they fit in 256 MB (the probes edit
    the same images six times; decoding them again cost as much as the model's forward passes)."""

    LIMIT_BYTES = 256 * 2**20

    def __init__(self, dataset: AuditDataset, indices, config) -> None:
        self.dataset, self.indices, self.config = dataset, indices, config
        height, width = dataset.image_size
        fits = len(indices) * dataset.channels * height * width * 4 <= self.LIMIT_BYTES
        self.kept = [self.load(start) for start in self.starts()] if fits else None

    def starts(self) -> range:
        return range(0, len(self.indices), self.config.batch_size)

    def load(self, start: int) -> torch.Tensor:
        return _images(self.dataset, self.indices[start : start + self.config.batch_size], self.config.device)

    def __iter__(self):
        for number, start in enumerate(self.starts()):
            yield start, (self.kept[number] if self.kept is not None else self.load(start))


def _predict_batches(model, dataset, indices, config, edit, batches: _ImageBatches) -> np.ndarray:
    """Predictions (N,) for ``batches`` of ``indices`` after ``edit(images, seed)`` (which must not
    change its input: the batches are reused)."""
    out = []
    for start, images in batches:
        if edit is not None:
            images = edit(images, config.seed + start)
        with torch.no_grad(), autocast(config.device, config.precision):
            out.append(model(images).argmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, int)


def _estimate(values: np.ndarray, seed: int, config: DiscoveryConfig) -> M.Estimate:
    values = values[~np.isnan(values)]
    return M.bootstrap_mean(values.tolist(), resamples=config.bootstrap, confidence=config.confidence, seed=seed)


def _candidates(clusters, distributions, labels, predictions, config):
    """Per cluster: its region and, for candidates, every member's proposed and control boxes (analysis size)."""
    rows = []
    for number, cluster in enumerate(clusters):
        members = cluster.members
        region = cluster_region(distributions[members], config.mass)
        row = {"cluster": cluster, "region": region, "number": number, "boxes": {}, "controls": {},
               "accuracy": float(np.mean(predictions[members] == labels[members])),
               "candidate": len(members) >= config.min_cluster and region.area <= config.max_area}
        if row["candidate"]:
            avoid = dilate(region.mask, 1)
            for position in members:
                distribution = distributions[position].double().numpy()
                box = proposed_box(distribution, region.mask, level=config.box_level)
                control = control_box(distribution, box, avoid=avoid) if box is not None else None
                if box is not None and control is not None:
                    row["boxes"][int(position)], row["controls"][int(position)] = box, control
            # The boxes must be small too: a cluster whose members' own boxes are large is an object.
            areas = [b[2] * b[3] / region.mask.size for b in row["boxes"].values()]
            row["box_area"] = float(np.median(areas)) if areas else None
            row["candidate"] = len(areas) >= config.min_cluster and row["box_area"] <= config.max_area
        rows.append(row)
    return rows


def _causal_tests(model, dataset, rows, labels, predictions, size, config):
    """Runs the causal test of every candidate row (adds row["test"] and row["shortcut"])."""
    scale = lambda box: scale_box(box, size, dataset.image_size)
    correct = predictions == labels
    # Recipients: correctly classified members of other classes' candidates (their own region is
    # removed before the transplant), else any correctly classified image of another class.
    boxed = {p: r["boxes"][p] for r in rows if r["candidate"] for p in r["boxes"] if correct[p]}
    rng = np.random.default_rng(config.seed)
    for row in [r for r in rows if r["candidate"]]:
        label = row["cluster"].label
        positions = sorted(row["boxes"])
        if len(positions) > config.max_tested:
            positions = sorted(int(p) for p in rng.choice(positions, config.max_tested, replace=False))
        images = _images(dataset, positions, config.device)
        others = np.array([p for p in boxed if labels[p] != label], int)
        if not len(others):
            others = np.flatnonzero(correct & (labels != label))
        chosen = [int(j) for j in others[rng.integers(len(others), size=len(positions))]] if len(others) else []
        recipients = [(dataset[j].image.to(config.device), scale(boxed[j]) if j in boxed else None) for j in chosen]
        recipients += [None] * (len(positions) - len(recipients))
        with autocast(config.device, config.precision):
            effects = edit_effects(model, images, predictions[positions], [scale(row["boxes"][p]) for p in positions],
                                   [scale(row["controls"][p]) for p in positions], recipients, label,
                                   seed=config.seed, batch_size=config.batch_size)
        seed = config.seed + 700 + 10 * row["number"]
        test = {kind: _estimate(effects[kind], seed + k, config).as_dict()
                for k, kind in enumerate(("removal", "control_removal", "transplant", "control_transplant"))}
        removal = _estimate(effects["removal"] - effects["control_removal"], seed + 5, config)
        transplant = _estimate(effects["transplant"] - effects["control_transplant"], seed + 6, config)
        test["removal_beyond_control"], test["transplant_beyond_control"] = removal.as_dict(), transplant.as_dict()
        spread = dispersion(images, [scale(row["boxes"][p]) for p in positions])
        control_spread = dispersion(images, [scale(row["controls"][p]) for p in positions])
        ratio = spread / control_spread if control_spread > 0 else (0.0 if spread == 0 else float("inf"))
        test["dispersion"] = {"candidate": spread, "control": control_spread, "ratio": ratio}
        threshold = config.effect_threshold
        # Removal alone cannot tell an artefact from the object's most telling part, and a transplant
        # misses artefacts the model needs but does not follow alone (decoy MNIST); so: the region must
        # matter beyond its control by either edit AND repeat itself across the images (causal.py).
        matters = removal.low > threshold or (transplant.samples > 0 and transplant.low > threshold)
        repeats = spread <= config.max_dispersion and ratio <= config.max_dispersion_ratio
        shortcut = matters and repeats
        test["rule"] = (f"removal beyond control {removal.value:.3f} [{removal.low:.3f}, {removal.high:.3f}], "
                        f"transplant beyond control {transplant.value:.3f} [{transplant.low:.3f}, {transplant.high:.3f}] "
                        f"(a lower end above {threshold:g}: {'yes' if matters else 'no'}); content dispersion "
                        f"{spread:.3f} <= {config.max_dispersion:g}, vs control {control_spread:.3f} (ratio {ratio:.2f} <= "
                        f"{config.max_dispersion_ratio:g}): "
                        f"{'yes' if repeats else 'no'})")
        row["test"], row["shortcut"] = test, bool(shortcut)


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


def _recommendation(localised: list[dict], global_signals: list[str], data_spec: str, checkpoint: str | None,
                    out_dir: str | None, arch: str) -> dict:
    ckpt = checkpoint or "MODEL.safetensors"
    stem = ckpt.rsplit(".", 1)[0]
    if localised:
        data = out_dir or "DISCOVERED"
        return {"method": "auto", "kind": "localised",
                "reason": "a localised shortcut: repair with the proposed masks, TAP first and RRR if TAP fails "
                          "(docs/repair.md, which method for which shortcut), proved on the masked validation split",
                "command": f"auditkit repair {ckpt} --data {data} --method auto --fail-on-shortcut --out {stem}-repaired.safetensors"}
    if global_signals:
        return {"method": "tea", "kind": "global",
                "reason": f"a global shortcut ({', '.join(global_signals)}): no region to mask; TEA distils the "
                          "explanations of a teacher trained on a small clean split (seed 004)",
                "command": (f"auditkit train --data CLEAN_DATA --arch {arch} --fraction 0.1 --out teacher.safetensors && "
                            f"auditkit repair {ckpt} --data {data_spec} --method tea --teacher teacher.safetensors "
                            f"--out {stem}-repaired.safetensors")}
    return {"method": "none", "kind": "none", "reason": "no candidate region beat its control and no global probe "
            "pointed at a signal", "command": None}


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
    global probes, the verdict ("shortcut found" / "no shortcut found") and the recommendation
    (``data["recommendation"]["method"]``: auto, tea or none, and the next command). ``out_dir``
    only names the folder the recommendation's command reads. Raises AuditkitError for empty data
    and ParameterError for bad settings. The model is explained in eval mode and left as it was.
    Source: SpRAy (Lapuschkin et al. 2019), the audit's counterfactuals, docs/discover.md."""
    config = config or DiscoveryConfig()
    context = context or Context()
    config.validate()
    if len(dataset) == 0:
        raise AuditkitError("the data has no samples to analyse (check the split asked for)")
    device = device_for(model, config.device, "discovery")
    config = replace(config, device=str(device), precision=resolve_precision(config.precision, device))
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
        cluster_entries = []
        for row in rows:
            cluster, region = row["cluster"], row["region"]
            cluster_entries.append({
                "class": int(cluster.label), "class_name": dataset.classes[cluster.label], "cluster": cluster.number,
                "size": len(cluster.members), "accuracy": row["accuracy"], "eigengap": cluster.eigengap,
                "region_area": region.area, "agreement": region.agreement, "box_area": row.get("box_area"),
                "candidate": row["candidate"], "shortcut": row.get("shortcut", False), "test": row.get("test"),
                "masked": len(row["boxes"]) if row.get("shortcut") else 0,
                "mean_heatmap": _heat_entry(region.mean_map),
                "exemplars": _exemplars(dataset, row, distributions, size, config.exemplars),
            })
        masks = {position: box_mask(scale_box(box, size, dataset.image_size), dataset.image_size)
                 for row in rows if row.get("shortcut") for position, box in row["boxes"].items()}
        confirmed = [e for e in cluster_entries if e["shortcut"]]
        global_signals = sorted({p["points_at"] for p in probes if p.get("points_at")})
        found = bool(confirmed or global_signals)
        tested = (f"{len(clusters)} strategy clusters in {len(np.unique(labels))} classes, "
                  f"{sum(r['candidate'] for r in rows)} candidate regions causally tested, "
                  f"{sum(p['applicable'] for p in probes)} global probes")
        if confirmed:
            summary = (f"a localised shortcut: {len(confirmed)} of {len(clusters)} strategy clusters rely on a small "
                       f"region ({len(masks)} images masked)")
        elif global_signals:
            summary = f"a global shortcut: the probes point at {', '.join(global_signals)}"
        else:
            summary = f"no shortcut found ({tested})"
        recommendation = _recommendation(confirmed, global_signals, data_spec or dataset.info.name, checkpoint, out_dir,
                                         model.meta.arch)
        lap("report")
    finally:
        model.train(was_training)
    meta = model.meta
    document = {
        "schema": SCHEMA,
        "auditkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": {"path": checkpoint, "arch": meta.arch, "classes": list(meta.class_names),
                       "input_size": list(meta.input_size), "in_channels": meta.in_channels},
        "data": {"spec": data_spec or dataset.info.name, "fingerprint": dataset.fingerprint(), "samples": len(dataset),
                 "splits": sorted({r.split for r in dataset.records}), "analysis_size": list(size)},
        "config": {k: v for k, v in config.__dict__.items()},
        "accuracy": float(np.mean(predictions == labels)),
        "clusters": cluster_entries,
        "probes": probes,
        "verdict": {"label": SHORTCUT_FOUND if found else NO_SHORTCUT, "summary": summary, "tested": tested,
                    "localised": bool(confirmed), "global": global_signals},
        "recommendation": recommendation,
        "masks": {"images": len(masks), "mean_area": float(np.mean([m.mean() for m in masks.values()])) if masks else None},
        "seconds": round(time.perf_counter() - start, 2),
        "timings": timings,
    }
    return DiscoveryReport(document, masks)


def proposed_dataset(dataset: AuditDataset, report: DiscoveryReport) -> AuditDataset:
    """``dataset`` with the proposed masks (mask = 1 on the suspected artefact, ``mask_meaning``
    "spurious"): what ``auditkit repair --data`` and ``auditkit audit --data`` read. Images without a
    proposed mask keep none; the records' splits, variants and groups are kept."""
    records = [
        Record(record.image, record.label, (report.masks[k] * 255).astype(np.uint8) if k in report.masks else None,
               record.variant, record.group, record.split)
        for k, record in enumerate(dataset.records)
    ]
    info = DatasetInfo(f"{dataset.info.name} (discovered masks)", dataset.info.source, dataset.classes,
                       mask_meaning="spurious")
    return AuditDataset(records, info, channels=dataset.channels, image_size=dataset.image_size)
