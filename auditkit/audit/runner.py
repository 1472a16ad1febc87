"""The audit: stream the data once, measure every sample, aggregate, judge.

Work is split into fixed batches of fixed samples (the same batches however many processes run),
so under ``torchrun`` each rank takes every N-th batch, computes exactly what one process would
for those samples, and the per-sample results are gathered to every rank before anything is
aggregated: the report is identical to a single-process run. Memory stays bounded: only a few
numbers per sample are kept, never images or maps.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .. import __version__
from .._progress import progress_bar
from ..data import AuditDataset, collate, to_uint8
from ..data.contaminations import make_contamination
from ..data.dataset import Record
from ..device import autocast, device_for, resolve_precision
from ..distributed import Context, gather
from ..errors import AuditkitError, ParameterError
from ..explain import METHODS, attribute
from ..models import run_capturing
from ..ops import downscale_masks, weighted_relu_sum
from . import metrics as M
from .tiles import example_tiles
from .verdict import Evidence, Thresholds, decide, judge

SCHEMA = "auditkit.audit/1"
LOCALISATION_KEYS = ("energy_in_mask", "top_quartile_recall", "top_quartile_precision", "iou")


@dataclass
class AuditConfig:
    methods: tuple[str, ...] = ("gradcam", "lrp_epsilon", "gradient")
    task: str = "auto"
    thresholds: Thresholds = field(default_factory=Thresholds)
    batch_size: int = 128
    device: str = "auto"  # where the model is ("auto"), or cpu | cuda | cuda:N: the model must be there
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: autocast of the model's forward passes
    seed: int = 0
    bootstrap: int = 1000
    confidence: float = 0.95
    counterfactuals: bool = True
    epsilon: float = 0.01  # LRP-epsilon stabiliser for the audit's maps
    layers: tuple[str, ...] | None = None  # activation-share layers (default: the model's TAP targets)
    examples: int = 8  # per variant: this many correct and this many wrong predictions in the HTML

    def validate(self, model) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise AuditkitError(f"unknown method {unknown[0]!r}; methods: {', '.join(METHODS)}")
        if self.examples < 0:
            raise ParameterError("examples", f"must be at least 0; got {self.examples}")
        if self.batch_size < 1 or self.bootstrap < 1 or not 0 < self.confidence < 1:
            bad = next(name for name, ok in (("batch_size", self.batch_size >= 1), ("bootstrap", self.bootstrap >= 1),
                                             ("confidence", 0 < self.confidence < 1)) if not ok)
            raise ParameterError(bad, "must be at least 1" if bad != "confidence" else "must lie in (0, 1)")
        if self.task not in M.TASKS:
            raise ParameterError("task", f"must be one of {', '.join(M.TASKS)}; got {self.task!r}")


@dataclass
class AuditReport:
    """The audit's result: ``data`` is the JSON document (see docs/audit.md for its schema), example
    pictures included: ``auditkit.audit.render_html(report.data)`` needs nothing else."""

    data: dict

    @property
    def verdict(self) -> str:
        return self.data["verdict"]["label"]

    def exit_code(self, fail_on_shortcut: bool) -> int:
        return 1 if fail_on_shortcut and self.verdict == "reliant" else 0


# ---- preparing the data --------------------------------------------------------------------


def reference_variant(dataset: AuditDataset) -> str:
    for name in ("contaminated", "original"):
        if name in dataset.variants:
            return name
    return dataset.variants[0]


def add_permuted_variant(dataset: AuditDataset, seed: int) -> AuditDataset:
    """Re-contaminates the clean images with permuted labels when the data has a generator and a
    clean variant but no permuted one."""
    kind = dataset.info.generator.get("kind")
    if not kind or "permuted" in dataset.variants or "clean" not in dataset.variants:
        return dataset
    params = {k: v for k, v in dataset.info.generator.items() if k not in ("kind", "seed")}
    contamination = make_contamination(kind, **params)
    clean = [k for k, r in enumerate(dataset.records) if r.variant == "clean"]
    images = torch.stack([dataset[k].image for k in clean])
    labels = torch.tensor([dataset.records[k].label for k in clean])
    out, masks = contamination.apply(images, labels, "permuted", np.random.default_rng(seed), dataset.num_classes)
    pixels, mask_pixels = to_uint8(out), to_uint8(masks)
    extra = [
        Record(pixels[j], dataset.records[k].label, mask_pixels[j], "permuted", dataset.records[k].group,
               dataset.records[k].split)
        for j, k in enumerate(clean)
    ]
    return AuditDataset(dataset.records + extra, dataset.info, channels=dataset.channels, image_size=dataset.image_size)


def swap_partners(dataset: AuditDataset, indices: list[int], seed: int) -> dict[int, int]:
    """For each masked sample, a masked sample of another class (seeded, from labels alone)."""
    rng = np.random.default_rng(seed)
    masked = [i for i in indices if dataset.records[i].mask is not None]
    labels = np.array([dataset.records[i].label for i in masked])
    partners = {}
    for position, i in enumerate(masked):
        others = np.flatnonzero(labels != labels[position])
        if len(others):
            partners[i] = masked[int(others[rng.integers(len(others))])]
    return partners


# ---- measuring --------------------------------------------------------------------------------------


def _activation_shares(model, layers, images, masks):
    """Per layer: share of the channel-summed ReLU activation inside D(M), and D's mean (chance)."""
    with torch.no_grad():
        _, captured, _ = run_capturing(model, layers, lambda: model(images))
        activations = [a for a in captured]
    if hasattr(model, "masks_for_network"):
        masks = model.masks_for_network(masks)  # at the resolution the network sees
    weights = downscale_masks(masks, [tuple(a.shape[-2:]) for a in activations])
    shares, coverages = [], []
    for activation, weight in zip(activations, weights):
        inside = weighted_relu_sum(activation, weight)
        total = weighted_relu_sum(activation, torch.ones_like(weight))
        shares.append(torch.where(total > 0, inside / total, torch.full_like(total, float("nan"))))
        coverages.append(weight.mean(dim=(1, 2)))
    return torch.stack(shares, 1), torch.stack(coverages, 1)


def _measure_batch(model, dataset, indices, variant, config, layers, partners, is_reference):
    device = config.device
    batch = collate([dataset[i] for i in indices]).to(device)
    with torch.no_grad():
        predictions = model(batch.images).argmax(1)
    records = [
        {"index": int(i), "variant": variant, "label": int(batch.labels[j]), "prediction": int(predictions[j]),
         "has_mask": bool(batch.has_mask[j]), "mask_area": None, "localisation": {}, "share": None,
         "coverage": None, "removed_prediction": None, "swap_prediction": None, "partner_label": None}
        for j, i in enumerate(indices)
    ]
    masked = torch.nonzero(batch.has_mask).flatten()
    if len(masked) == 0:
        return records
    images, masks, targets = batch.images[masked], batch.masks[masked], predictions[masked]
    mask_areas = (masks[:, 0] > 0.5).float().mean(dim=(1, 2)).tolist()
    per_method = {}
    for method in config.methods:
        options = {"epsilon": config.epsilon} if method == "lrp_epsilon" else {}
        maps = attribute(model, images, targets, method, **options)[:, 0]
        per_method[method] = M.localisation(maps, masks[:, 0])
    shares, coverages = _activation_shares(model, layers, images, masks) if layers else (None, None)
    removed_pred = swap_pred = partner_labels = None
    if is_reference and config.counterfactuals:
        seeds = [config.seed * 1_000_003 + int(indices[int(j)]) for j in masked]
        removed = torch.stack([M.remove_region(images[k], masks[k], seeds[k]) for k in range(len(masked))])
        swapped, has_partner, partner_labels = [], [], []
        for k, j in enumerate(masked.tolist()):
            partner = partners.get(indices[j])
            has_partner.append(partner is not None)
            if partner is None:
                swapped.append(removed[k])
                partner_labels.append(-1)
                continue
            donor = dataset[partner]
            swapped.append(M.paste_region(removed[k], donor.image.to(device), donor.mask.to(device)))
            partner_labels.append(donor.label)
        with torch.no_grad():
            removed_pred = model(removed).argmax(1).tolist()
            swap_pred = [p if ok else None for p, ok in zip(model(torch.stack(swapped)).argmax(1).tolist(), has_partner)]
    for k, j in enumerate(masked.tolist()):
        record = records[j]
        record["mask_area"] = float(mask_areas[k])
        record["localisation"] = {
            method: {key: float(values[key][k]) for key in LOCALISATION_KEYS} for method, values in per_method.items()
        }
        if shares is not None:
            record["share"] = shares[k].tolist()
            record["coverage"] = coverages[k].tolist()
        if removed_pred is not None:
            record["removed_prediction"] = removed_pred[k]
            record["swap_prediction"] = swap_pred[k]
            record["partner_label"] = partner_labels[k] if partner_labels[k] >= 0 else None
    return records


def measure(model, dataset: AuditDataset, config: AuditConfig, context: Context, show_progress: bool) -> list[dict]:
    """Per-sample records for every sample of every variant (gathered from all ranks)."""
    reference = reference_variant(dataset)
    by_variant: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(dataset.records):
        by_variant[record.variant].append(index)
    batches = [
        (variant, indices[start : start + config.batch_size])
        for variant in dataset.variants
        for indices in [by_variant[variant]]
        for start in range(0, len(indices), config.batch_size)
    ]
    mine = batches[context.rank :: context.world_size]
    partners = swap_partners(dataset, by_variant[reference], config.seed) if config.counterfactuals else {}
    layers = list(config.layers) if config.layers is not None else list(getattr(model.meta, "target_layers", ()))
    records = []
    with progress_bar("auditing", total=sum(len(i) for _, i in mine), enabled=show_progress and context.is_main) as bar:
        for variant, indices in mine:
            with autocast(config.device, config.precision):
                records += _measure_batch(model, dataset, indices, variant, config, layers, partners, variant == reference)
            bar.advance(len(indices))
    records = gather(context, records)
    records.sort(key=lambda r: r["index"])
    return records


# ---- aggregating --------------------------------------------------------------------------------


def _aligned(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x["label"] == y["label"] for x, y in zip(a, b))


def aggregate(records: list[dict], dataset: AuditDataset, config: AuditConfig, layers: list[str]) -> tuple[dict, dict]:
    task = M.resolve_task(config.task, dataset.num_classes)
    metric = M.METRIC_OF_TASK[task]
    reference = reference_variant(dataset)
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_variant[record["variant"]].append(record)
    stats = dict(resamples=config.bootstrap, confidence=config.confidence)

    def labels_predictions(rows):
        return np.array([r["label"] for r in rows], int), np.array([r["prediction"] for r in rows], int)

    per_variant = {}
    for number, variant in enumerate(dataset.variants):
        rows = by_variant[variant]
        labels, predictions = labels_predictions(rows)
        estimate = M.bootstrap_metric(task, labels, predictions, seed=config.seed + number, **stats)
        per_variant[variant] = {**estimate.as_dict(),
                                "confusion": M.confusion_matrix(labels, predictions, dataset.num_classes)}

    evidence: list[Evidence] = []
    degradation = {}
    for number, other in enumerate(("permuted", "clean")):
        if other not in by_variant or reference not in ("contaminated",):
            continue
        estimate = M.bootstrap_degradation(
            task, labels_predictions(by_variant[reference]), labels_predictions(by_variant[other]),
            paired=_aligned(by_variant[reference], by_variant[other]), seed=config.seed + 101 + number, **stats,
        )
        degradation[other] = {**estimate.as_dict(), "paired": _aligned(by_variant[reference], by_variant[other])}
        evidence.append(judge(f"degradation_to_{other}", estimate, config.thresholds.degradation,
                              f"{metric} degradation from contaminated to {other} data"))

    counterfactual = {}
    swapped = [r for r in by_variant[reference] if r["swap_prediction"] is not None]
    removed = [r for r in by_variant[reference] if r["removed_prediction"] is not None]
    if swapped:
        flips = [float(r["swap_prediction"] != r["prediction"]) for r in swapped]
        follows = [float(r["swap_prediction"] == r["partner_label"]) for r in swapped]
        flip = M.bootstrap_mean(flips, seed=config.seed + 201, **stats)
        counterfactual["swap"] = {"flip_rate": flip.as_dict(),
                                  "follow_rate": M.bootstrap_mean(follows, seed=config.seed + 202, **stats).as_dict()}
        evidence.append(judge("swap_flip_rate", flip, config.thresholds.swap_flip_rate,
                              "share of predictions changed by swapping in another class's masked region"))
    if removed:
        labels, before = labels_predictions(removed)
        after = np.array([r["removed_prediction"] for r in removed], int)
        drop = M.bootstrap_degradation(task, (labels, before), (labels, after), paired=True, seed=config.seed + 203, **stats)
        counterfactual["removal"] = {
            "before": M.task_metric(task, labels, before), "after": M.task_metric(task, labels, after),
            "drop": drop.as_dict(),
        }
        evidence.append(judge("removal_drop", drop, config.thresholds.removal_drop,
                              f"{metric} drop when the masked region is filled with background"))

    localisation = {}
    for method in config.methods:
        localisation[method] = {}
        for number, variant in enumerate(dataset.variants):
            rows = [r for r in by_variant[variant] if r["localisation"]]
            if not rows:
                continue
            entry = {key: M.bootstrap_mean([r["localisation"][method][key] for r in rows],
                                           seed=config.seed + 300 + number, **stats).as_dict()
                     for key in LOCALISATION_KEYS}
            area = float(np.mean([r["mask_area"] for r in rows]))
            entry["chance"] = {"energy_in_mask": area, "top_quartile_recall": 0.25, "top_quartile_precision": area}
            localisation[method][variant] = entry

    shares = []
    reference_rows = [r for r in by_variant[reference] if r["share"] is not None]
    for position, name in enumerate(layers):
        if not reference_rows:
            break
        values = [r["share"][position] for r in reference_rows]
        shares.append({
            "layer": name,
            "share": M.bootstrap_mean(values, seed=config.seed + 400 + position, **stats).as_dict(),
            "chance": float(np.mean([r["coverage"][position] for r in reference_rows])),
        })

    verdict, summary = decide(evidence)
    supporting = []
    for method, variants in localisation.items():
        entry = variants.get(reference)
        if entry and entry["energy_in_mask"]["value"] is not None:
            supporting.append(
                f"{method}: {entry['energy_in_mask']['value']:.2f} of the positive attribution lies in the mask "
                f"(chance {entry['chance']['energy_in_mask']:.2f})"
            )
    for share in shares:
        if share["share"]["value"] is not None:
            supporting.append(f"{share['layer']}: {share['share']['value']:.2f} of the activation lies in the mask "
                              f"(chance {share['chance']:.2f})")

    examples = {}
    for variant in dataset.variants:
        rows = by_variant[variant]
        examples[variant] = {
            "correct": [r["index"] for r in rows if r["prediction"] == r["label"]][: config.examples],
            "wrong": [r["index"] for r in rows if r["prediction"] != r["label"]][: config.examples],
        }
    report = {
        "task": {"type": task, "metric": metric, "higher_is_better": M.higher_is_better(task), "per_variant": per_variant},
        "reference_variant": reference,
        "degradation": degradation,
        "counterfactual": counterfactual,
        "localisation": localisation,
        "activation_share": shares,
        "verdict": {"label": verdict, "summary": summary, "evidence": [e.as_dict() for e in evidence],
                    "supporting": supporting, "thresholds": config.thresholds.as_dict()},
    }
    return report, examples


def run_audit(
    model,
    dataset: AuditDataset,
    config: AuditConfig | None = None,
    *,
    context: Context | None = None,
    show_progress: bool = False,
    data_spec: str | None = None,
    checkpoint: str | None = None,
) -> AuditReport:
    """Audits ``model`` (an auditkit model, in its input format) on ``dataset``."""
    config = config or AuditConfig()
    context = context or Context()
    config.validate(model)
    device = device_for(model, config.device, "the audit")
    config = replace(config, device=str(device), precision=resolve_precision(config.precision, device))
    if len(dataset) == 0:
        raise AuditkitError("the audit data has no samples (check the split asked for)")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    layers = list(config.layers) if config.layers is not None else list(getattr(model.meta, "target_layers", ()))
    try:
        dataset = add_permuted_variant(dataset, config.seed)
        records = measure(model, dataset, config, context, show_progress)
        body, examples = aggregate(records, dataset, config, layers)
        # The pictures the report shows, kept in it: it renders from its JSON alone.
        tiles = example_tiles(model, dataset, examples, config.methods, config.epsilon, config.device, config.precision)
    finally:
        model.train(was_training)
    meta = model.meta
    document = {
        "schema": SCHEMA,
        "auditkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": {"path": checkpoint, "arch": meta.arch, "classes": list(meta.class_names),
                       "input_size": list(meta.input_size), "in_channels": meta.in_channels},
        "data": {"spec": data_spec or dataset.info.name, "fingerprint": dataset.fingerprint(),
                 "samples": len(dataset), "variants": {v: sum(r.variant == v for r in dataset.records) for v in dataset.variants},
                 "with_masks": sum(r.mask is not None for r in dataset.records), "mask_meaning": dataset.info.mask_meaning},
        "config": {"methods": list(config.methods), "task": config.task, "batch_size": config.batch_size,
                   "device": config.device, "precision": config.precision, "seed": config.seed, "bootstrap": config.bootstrap,
                   "confidence": config.confidence, "counterfactuals": config.counterfactuals,
                   "epsilon": config.epsilon, "processes": context.world_size},
        **body,
        "examples": tiles,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return AuditReport(document)
