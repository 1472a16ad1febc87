"""The audit: stream the data once, measure every sample, aggregate, judge.

Work is split into fixed batches of fixed samples (the same batches however many processes run),
so under ``torchrun`` each rank takes every N-th batch, computes exactly what one process would
for those samples, and the per-sample results are gathered to every rank before anything is
aggregated: the report is identical to a single-process run. Memory stays bounded: only a few
numbers per sample are kept, never images or maps.

A mask with no pixel above 0.5 at the model's input size is *empty*: it marks nothing, so the image
takes no part in the mask-based measurements (removal, swap, localisation, activation share) — it is
counted and excluded, never measured as "no effect". The swap runs after a first pass, once it is
known which masks are empty, so a donor's region is never an empty one.

What the masks mark (``dataset.info.mask_meaning``, auditkit/data/meaning.py) decides what is measured:
masks of the artefact get every test; masks of the object get localisation and activation share as
the share inside the object, and no swap or removal, which need the artefact's region (removing or
swapping everything but the object changes far more than a shortcut, so its effect would prove none).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .. import __version__
from .._json import finite
from .._progress import progress_bar
from ..data import AuditDataset, collate, to_uint8
from ..data.contaminations import make_contamination
from ..data.dataset import Record
from ..data.masks import annotated
from ..data.meaning import OBJECT, SPURIOUS, meaning_of
from ..device import autocast, device_for, resolve_precision
from ..distributed import Context, gather
from ..errors import AuditkitError, ParameterError
from ..explain import METHODS, attribute
from ..explain.defaults import EPSILON_AUDIT
from ..training.classifier import check_label_kind  # one check of model head vs data labels
from . import metrics as M
from .records import ActivationShare, CheckpointSection, DataSection, RunSection, SampleRecord, SwapResult
from .shared import (  # noqa: F401 (SCHEMA and AuditReport re-exported: auditkit.audit.runner names them)
    LOCALISATION_KEYS,
    NO_POSITIVE,
    SCHEMA,
    AuditReport,
    activation_shares,
    reference_variant,
)
from .tiles import example_tiles
from .verdict import Evidence, Thresholds, at_chance, decide, judge, not_run

# Why swap and removal do not run on object masks: one line naming the option that says what masks mark.
OBJECT_MASKS = ("the masks mark the object (mask_meaning 'object'), and swap and removal need the artefact's "
                "region; if the masks mark the artefact, set mask_meaning (--masks-mark) to artefact")


def _marks_artefact(dataset: AuditDataset) -> bool:
    return meaning_of(dataset) == SPURIOUS


@dataclass
class AuditConfig:
    methods: tuple[str, ...] = ("gradcam", "lrp_epsilon", "gradient")
    task: str = "auto"
    thresholds: Thresholds = field(default_factory=Thresholds)
    batch_size: int = 128
    # where the model is ("auto"), or cpu | cuda | cuda:N or a torch.device: the model must be there
    device: str | torch.device = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 | fp16: autocast of the model's forward passes
    seed: int = 0
    bootstrap: int = 1000
    confidence: float = 0.95
    counterfactuals: bool = True
    epsilon: float = EPSILON_AUDIT  # LRP-epsilon stabiliser for the audit's maps (explain/defaults.py)
    layers: tuple[str, ...] | None = None  # activation-share layers (default: the model's TAP targets)
    examples: int = 8  # per variant: this many correct and this many wrong predictions in the HTML
    # Binary task: the class whose F-score is the metric, a name or an index; None = the minority class
    # of the audited (reference) split, ties -> class 1 (see metrics.resolve_positive).
    positive_class: int | str | None = None

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


# ---- preparing the data --------------------------------------------------------------------


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


def swap_partners(masked: list[int], labels: list[int], seed: int) -> dict[int, int]:
    """For each sample of ``masked`` (dataset indices of the samples with a non-empty mask, in
    order; ``labels`` their classes), a sample of ``masked`` of another class (seeded, from labels
    alone). A sample with no such partner (every masked sample of its class) has none."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    partners = {}
    for position, i in enumerate(masked):
        others = np.flatnonzero(labels != labels[position])
        if len(others):
            partners[i] = masked[int(others[rng.integers(len(others))])]
    return partners


# ---- measuring --------------------------------------------------------------------------------------


def _removal_seed(config: AuditConfig, index: int) -> int:
    return config.seed * 1_000_003 + int(index)


def _measure_batch(model, dataset, indices, variant, config, layers, is_reference, calls=None):
    device = config.device
    batch = collate([dataset[i] for i in indices]).to(device)
    with torch.no_grad():
        predictions = model(batch.images).argmax(1)
    records = [SampleRecord(int(i), variant, int(batch.labels[j]), int(predictions[j]), bool(batch.has_mask[j]))
               for j, i in enumerate(indices)]
    # The pixels the region tests use are those above 0.5 (remove_region, localisation's S); a mask
    # with none marks nothing: recorded as empty, and left out of every mask-based measurement.
    areas = annotated(batch.masks[:, 0]).float().mean(dim=(1, 2))
    for j in torch.nonzero(batch.has_mask).flatten().tolist():
        records[j].mask_area = float(areas[j])
        records[j].mask_empty = bool(areas[j] == 0)
    masked = torch.nonzero(batch.has_mask & (areas > 0)).flatten()
    if len(masked) == 0:
        return records
    images, masks, targets = batch.images[masked], batch.masks[masked], predictions[masked]
    per_method = {}
    for method in config.methods:
        options = {"epsilon": config.epsilon} if method == "lrp_epsilon" else {}
        maps = attribute(model, images, targets, method, **options)[:, 0]
        per_method[method] = M.localisation(maps, masks[:, 0])
    shares, coverages = activation_shares(model, layers, images, masks, calls) if layers else (None, None)
    removed_pred = None
    if is_reference and config.counterfactuals and _marks_artefact(dataset):
        seeds = [_removal_seed(config, indices[int(j)]) for j in masked]
        removed = torch.stack([M.remove_region(images[k], masks[k], seeds[k]) for k in range(len(masked))])
        with torch.no_grad():
            removed_pred = model(removed).argmax(1).tolist()
    for k, j in enumerate(masked.tolist()):
        record = records[j]
        record.localisation = {
            method: {key: float(values[key][k]) for key in LOCALISATION_KEYS} for method, values in per_method.items()
        }
        if shares is not None:
            record.share = shares[k].tolist()
            record.coverage = coverages[k].tolist()
        if removed_pred is not None:
            record.removed_prediction = removed_pred[k]
    return records


def _measure_swaps(model, dataset, indices, partners, config) -> list[SwapResult]:
    """The swap counterfactual of the samples ``indices`` (each with a partner): the masked region
    filled as by the removal test (same seed), then the partner's masked region pasted in."""
    device = config.device
    samples = [dataset[i] for i in indices]
    donors = [dataset[partners[i]] for i in indices]
    swapped = torch.stack([
        M.paste_region(M.remove_region(s.image.to(device), s.mask.to(device), _removal_seed(config, i)),
                       d.image.to(device), d.mask.to(device))
        for i, s, d in zip(indices, samples, donors)
    ])
    with torch.no_grad():
        predictions = model(swapped).argmax(1).tolist()
    return [SwapResult(int(i), int(p), int(d.label)) for i, p, d in zip(indices, predictions, donors)]


def measure(model, dataset: AuditDataset, config: AuditConfig, context: Context,
            show_progress: bool) -> list[SampleRecord]:
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
    layers = list(config.layers) if config.layers is not None else list(getattr(model.meta, "target_layers", ()))
    records, calls = [], {}  # calls: how often each layer's module ran (the same in every batch)
    with progress_bar("auditing", total=sum(len(i) for _, i in mine), enabled=show_progress and context.is_main) as bar:
        for variant, indices in mine:
            with autocast(config.device, config.precision):
                records += _measure_batch(model, dataset, indices, variant, config, layers, variant == reference,
                                          calls)
            bar.advance(len(indices))
    records = gather(context, records)
    records.sort(key=lambda r: r.index)
    if config.counterfactuals and _marks_artefact(dataset):
        # Second pass, now that every rank knows which masks are empty: partners are drawn from
        # the reference samples with a non-empty mask only, the same on every rank.
        usable = [r for r in records if r.variant == reference and r.mask_empty is False]
        partners = swap_partners([r.index for r in usable], [r.label for r in usable], config.seed)
        todo = [r.index for r in usable if r.index in partners]
        swap_batches = [todo[start : start + config.batch_size] for start in range(0, len(todo), config.batch_size)]
        swaps = []
        for indices in swap_batches[context.rank :: context.world_size]:
            with autocast(config.device, config.precision):
                swaps += _measure_swaps(model, dataset, indices, partners, config)
        by_index = {s.index: s for s in gather(context, swaps)}
        for record in records:
            swap = by_index.get(record.index)
            if swap is not None:
                record.swap_prediction, record.partner_label = swap.swap_prediction, swap.partner_label
    return records


# ---- aggregating --------------------------------------------------------------------------------


def _aligned(a: list[SampleRecord], b: list[SampleRecord]) -> bool:
    return len(a) == len(b) and all(x.label == y.label for x, y in zip(a, b))


def explained_output(meta) -> str:
    """Which output the audit's maps explain, in words (the report's ``explained``)."""
    head = getattr(meta, "head", "softmax")
    if head == "binary":
        return "z, the one logit (as +z/2 for the predicted class 1, -z/2 for class 0)"
    if head == "multilabel":
        return "each finding's logit z_k (sigmoid; present when z_k > 0)"
    return "the predicted class's logit"


@dataclass(frozen=True)
class TaskSpec:
    """The task the audit scores: its type, metric, and for the binary F-score the class it scores."""

    type: str  # multiclass | binary | ordinal
    positive: int | None  # binary: the class whose F-score is the metric
    chosen: str  # how ``positive`` was chosen: "minority" | "tie" | "given" | "class 1" | ""

    @property
    def metric(self) -> str:
        return M.METRIC_OF_TASK[self.type]

    def label(self, classes) -> str:
        """The metric as people read it: "accuracy", "F1 of 'pneumonia'", "mae"."""
        return f"F1 of {classes[self.positive]!r}" if self.type == "binary" else self.metric


def task_spec(config: AuditConfig, dataset: AuditDataset) -> TaskSpec:
    """The task of ``config`` on ``dataset`` (labels read from its records, no pixels): the binary
    F-score's class is ``config.positive_class`` or the minority class of the reference variant."""
    task = M.resolve_task(config.task, dataset.num_classes)
    reference = reference_variant(dataset)
    labels = [r.label for r in dataset.records if r.variant == reference]
    positive, chosen = M.resolve_positive(config.positive_class, task, dataset.classes, labels)
    return TaskSpec(task, positive, chosen)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # null in JSON; the estimate beside it says why


def _mask_reason(rows: list[SampleRecord], variant: str) -> str | None:
    """Why the mask tests have nothing to measure on ``rows`` (the reference variant), or None."""
    with_mask = [r for r in rows if r.has_mask]
    if not with_mask:
        return f"none of the {len(rows)} {variant} images has a mask"
    if all(r.mask_empty for r in with_mask):
        return (f"the masks of the {len(with_mask)} {variant} images are all empty "
                "(no pixel above 0.5 at the model's input size)")
    return None


def aggregate(records: list[SampleRecord], dataset: AuditDataset, config: AuditConfig, layers: list[str],
              spec: TaskSpec | None = None) -> tuple[dict, dict]:
    spec = spec or task_spec(config, dataset)
    task, positive, classes = spec.type, spec.positive, dataset.classes
    scored = positive if positive is not None else 1  # the class an F-score scores (unused by other tasks)
    metric = spec.label(classes)
    reference = reference_variant(dataset)
    by_variant: dict[str, list[SampleRecord]] = defaultdict(list)
    for record in records:
        by_variant[record.variant].append(record)
    stats = dict(resamples=config.bootstrap, confidence=config.confidence, positive=scored)
    mean_stats = dict(resamples=config.bootstrap, confidence=config.confidence)

    def labels_predictions(rows):
        return np.array([r.label for r in rows], int), np.array([r.prediction for r in rows], int)

    def undefined(labels, variant):
        reason = M.undefined_reason(task, labels, scored, classes)
        return f"{variant}: {reason}" if reason else None

    per_variant = {}
    for number, variant in enumerate(dataset.variants):
        rows = by_variant[variant]
        labels, predictions = labels_predictions(rows)
        estimate = M.bootstrap_metric(task, labels, predictions, seed=config.seed + number, **stats)
        per_variant[variant] = {**estimate.because(M.undefined_reason(task, labels, scored, classes)).as_dict(),
                                "confusion": M.confusion_matrix(labels, predictions, dataset.num_classes),
                                "missing_classes": M.missing_classes(labels, classes)}

    evidence: list[Evidence] = []
    degradation = {}
    for number, other in enumerate(("permuted", "clean")):
        if other not in by_variant or reference not in ("contaminated",):
            continue
        (ref_labels, _), (other_labels, _) = (labels_predictions(by_variant[v]) for v in (reference, other))
        estimate = M.bootstrap_degradation(
            task, labels_predictions(by_variant[reference]), labels_predictions(by_variant[other]),
            paired=_aligned(by_variant[reference], by_variant[other]), seed=config.seed + 101 + number, **stats,
        ).because(undefined(ref_labels, reference) or undefined(other_labels, other))
        degradation[other] = {**estimate.as_dict(), "paired": _aligned(by_variant[reference], by_variant[other])}
        evidence.append(judge(f"degradation_to_{other}", estimate, config.thresholds.degradation,
                              f"{metric} degradation from contaminated to {other} data"))

    counterfactual = {}
    reference_rows = by_variant[reference]
    masked = [r for r in reference_rows if r.has_mask]
    empty = sum(bool(r.mask_empty) for r in masked)
    no_masks = _mask_reason(reference_rows, reference)
    # Images whose own mask is empty are not evidence: excluded, and the count said.
    excluded = f" ({empty} of {len(masked)} images with an empty mask excluded)" if empty and not no_masks else ""
    swap_what = "share of predictions changed by swapping in another class's masked region"
    removal_what = f"{metric} drop when the masked region is filled with background"
    if not config.counterfactuals:
        for test, threshold, what in (("swap_flip_rate", config.thresholds.swap_flip_rate, swap_what),
                                      ("removal_drop", config.thresholds.removal_drop, removal_what)):
            evidence.append(not_run(test, threshold, what, "the counterfactual tests were switched off"))
    elif no_masks or not _marks_artefact(dataset):
        why = no_masks or OBJECT_MASKS
        evidence.append(not_run("swap_flip_rate", config.thresholds.swap_flip_rate, swap_what, why))
        evidence.append(not_run("removal_drop", config.thresholds.removal_drop, removal_what, why))
    else:
        swapped = [r for r in reference_rows if r.swap_prediction is not None]
        removed = [r for r in reference_rows if r.removed_prediction is not None]
        if swapped:
            flips = [float(r.swap_prediction != r.prediction) for r in swapped]
            follows = [float(r.swap_prediction == r.partner_label) for r in swapped]
            flip = M.bootstrap_mean(flips, seed=config.seed + 201, **mean_stats)
            counterfactual["swap"] = {"flip_rate": flip.as_dict(), "excluded_empty_masks": empty,
                                      "follow_rate": M.bootstrap_mean(follows, seed=config.seed + 202,
                                                                      **mean_stats).as_dict()}
            evidence.append(judge("swap_flip_rate", flip, config.thresholds.swap_flip_rate, swap_what + excluded))
        else:
            names = sorted({classes[r.label] for r in masked if not r.mask_empty})
            evidence.append(not_run("swap_flip_rate", config.thresholds.swap_flip_rate, swap_what + excluded,
                                    f"every image with a non-empty mask is of one class ({names[0]!r}); "
                                    "a swap needs a masked image of another class"))
        labels, before = labels_predictions(removed)
        after = np.array([r.removed_prediction for r in removed], int)
        drop = M.bootstrap_degradation(task, (labels, before), (labels, after), paired=True, seed=config.seed + 203,
                                       **stats).because(undefined(labels, f"{reference} images with a mask"))
        counterfactual["removal"] = {
            "before": _finite(M.task_metric(task, labels, before, scored)),
            "after": _finite(M.task_metric(task, labels, after, scored)),
            "drop": drop.as_dict(), "excluded_empty_masks": empty,
        }
        evidence.append(judge("removal_drop", drop, config.thresholds.removal_drop, removal_what + excluded))

    localisation = {}
    for method in config.methods:
        localisation[method] = {}
        for number, variant in enumerate(dataset.variants):
            rows = [r for r in by_variant[variant] if r.localisation]
            if not rows:
                continue
            entry = {key: M.bootstrap_mean([r.localisation[method][key] for r in rows],
                                           seed=config.seed + 300 + number, **mean_stats)
                     .because(NO_POSITIVE if key == "energy_in_mask" else None).as_dict()
                     for key in LOCALISATION_KEYS}
            area = float(np.mean([r.mask_area for r in rows]))
            entry["chance"] = {"energy_in_mask": area, "top_quartile_recall": 0.25, "top_quartile_precision": area}
            localisation[method][variant] = entry

    shares = []
    share_rows = [r for r in reference_rows if r.share is not None]
    for position, name in enumerate(layers):
        if not share_rows:
            break
        values = [r.share[position] for r in share_rows]
        shares.append(ActivationShare(
            layer=name,
            share=M.bootstrap_mean(values, seed=config.seed + 400 + position, **mean_stats).as_dict(),
            chance=float(np.mean([r.coverage[position] for r in share_rows])),
        ).to_json())

    # A model that gives one class for every image reads no signal at all (a collapsed repair, say): tests
    # that find no reliance then prove nothing, so they cannot clear it (verdict.decide).
    predicted = {r.prediction for r in reference_rows}
    constant = classes[predicted.pop()] if len(predicted) == 1 and len({r.label for r in reference_rows}) > 1 \
        else None
    # A model at chance on the reference images reads nothing the labels follow: it cannot be cleared either.
    reference_labels, reference_predictions = labels_predictions(reference_rows)
    chance = None if constant else at_chance(reference_labels, reference_predictions, reference=reference,
                                             resamples=config.bootstrap, confidence=config.confidence,
                                             seed=config.seed + 501)
    verdict, summary = decide(evidence, constant_prediction=constant, reference=reference, chance=chance)
    supporting = []
    region = "the object" if meaning_of(dataset) == OBJECT else "the mask"  # what a high share means differs
    if no_masks and masked:  # masks given but all empty: say why localisation is missing
        supporting.append(f"localisation and activation share not computed: {no_masks}")
    for method, variants in localisation.items():
        entry = variants.get(reference)
        if entry and entry["energy_in_mask"]["value"] is not None:
            supporting.append(
                f"{method}: {entry['energy_in_mask']['value']:.2f} of the positive attribution lies in {region} "
                f"(chance {entry['chance']['energy_in_mask']:.2f})"
            )
    for share in shares:
        if share["share"]["value"] is not None:
            supporting.append(f"{share['layer']}: {share['share']['value']:.2f} of the activation lies in {region} "
                              f"(chance {share['chance']:.2f})")

    examples = {}
    for variant in dataset.variants:
        rows = by_variant[variant]
        examples[variant] = {
            "correct": [r.index for r in rows if r.prediction == r.label][: config.examples],
            "wrong": [r.index for r in rows if r.prediction != r.label][: config.examples],
        }
    positive_entry = None
    if task == "binary":
        reference_labels = [r.label for r in reference_rows]
        positive_entry = {"index": positive, "name": classes[positive], "chosen": spec.chosen,
                          "count": sum(label == positive for label in reference_labels),
                          "of": len(reference_labels), "variant": reference}
    report = {
        "task": {"type": task, "metric": spec.metric, "metric_label": metric, "positive_class": positive_entry,
                 "higher_is_better": M.higher_is_better(task), "per_variant": per_variant},
        "reference_variant": reference,
        "degradation": degradation,
        "counterfactual": counterfactual,
        "localisation": localisation,
        "activation_share": shares,
        "verdict": {"label": verdict, "summary": summary, "evidence": [e.as_dict() for e in evidence],
                    "supporting": supporting, "thresholds": config.thresholds.as_dict(),
                    "constant_prediction": constant, "at_chance": chance},
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
    """Audits ``model`` (an auditkit model, in its input format) on ``dataset``.

    Metrics that cannot be computed on this data (a one-class split for the F-score, a variant with
    no samples) are null with a ``reason``; mask tests on masks that are all empty are "not run".
    Raises AuditkitError for empty data, ParameterError for a bad config (e.g. a ``positive_class``
    the model does not have, or one given for a task that is not binary)."""
    config = config or AuditConfig()
    context = context or Context()
    config.validate(model)
    device = device_for(model, config.device, "the audit")
    config = replace(config, device=device, precision=resolve_precision(config.precision, device))
    if len(dataset) == 0:
        raise AuditkitError("the audit data has no samples (check the split asked for)")
    meaning_of(dataset)  # a mask_meaning that names neither meaning fails here, in one line
    if check_label_kind(dataset, model.meta):  # K sigmoids: the audit per finding (audit/multilabel.py)
        from .multilabel import run_multilabel_audit

        was_training = model.training
        model.eval()
        try:
            return run_multilabel_audit(model, dataset, config, show_progress=show_progress and context.is_main,
                                        data_spec=data_spec, checkpoint=checkpoint, processes=context.world_size)
        finally:
            model.train(was_training)
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    layers = list(config.layers) if config.layers is not None else list(getattr(model.meta, "target_layers", ()))
    try:
        dataset = add_permuted_variant(dataset, config.seed)
        spec = task_spec(config, dataset)  # a bad positive_class fails here, before any work
        records = measure(model, dataset, config, context, show_progress)
        body, examples = aggregate(records, dataset, config, layers, spec)
        # The pictures the report shows, kept in it: it renders from its JSON alone.
        tiles = example_tiles(model, dataset, examples, config.methods, config.epsilon, config.device, config.precision)
    finally:
        model.train(was_training)
    meta = model.meta
    document = {
        "schema": SCHEMA,
        "auditkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": CheckpointSection.of(meta, checkpoint).to_json(),
        "data": DataSection.of(dataset, records, data_spec).to_json(),
        "config": RunSection.of(config, context.world_size).to_json(),
        "explained": explained_output(meta),
        **body,
        "examples": tiles,
        "seconds": round(time.perf_counter() - start, 2),
    }
    # Every number is finite or null (non-finite ones carry their reason beside them already):
    # report.json must parse in JSON.parse and jq, not only in Python.
    return AuditReport(finite(document))
