"""The audit of a multilabel model (K independent sigmoids, one per finding), finding by finding.

Per finding k (its logit z_k; present when σ(z_k) > 0.5, z_k > 0, the model's threshold):

- on every variant: AUROC (scikit-learn's ``roc_auc_score``), sensitivity and specificity at the
  threshold, each with a percentile bootstrap interval over images;
- the AUROC gap from the contaminated variant to the permuted and to the clean one (positive = worse;
  a paired bootstrap when the variants hold the same images in the same order);
- the subgroup gap when the data says which images carry the artefact (``dataset.has_artefact``): on
  the reference variant, AUROC of the positives WITH the artefact against every negative minus AUROC
  of the positives WITHOUT it against every negative (the hidden-stratification comparison of chest
  X-ray audits: pneumothorax with and without a chest drain);
- where masks exist (reference variant, non-empty masks): the share of each method's positive
  attribution of z_k inside the mask (every masked image), and the share of the targeted layers'
  activation inside the mask over the masked images that have the finding.

Verdict per finding: a gap *shows reliance* when it exceeds the threshold (0.05, ``Thresholds.degradation``)
with its interval clear of 0, and *clears* the finding when its upper end is below the threshold;
the variant gaps decide when they ran, else the subgroup gap (as verdict.deciding does for the
single-label audit). A finding whose predictions are constant on the reference images (its labels
holding both values), or whose AUROC interval there holds 0.5, is degenerate: never "not reliant",
inconclusive with the reason in one line. The overall verdict is reliant when any finding is (naming
them), not reliant when every finding is, else inconclusive naming the findings that are.

Attribution methods, targets and rules are those of the single-label audit; what is explained is
each finding's logit z_k (``explained`` in the report).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

import numpy as np
import torch

from .. import __version__
from .._json import finite
from .._progress import progress_bar
from ..data import AuditDataset, collate
from ..data.masks import annotated
from ..explain import attribute
from . import metrics as M
from .records import CheckpointSection, DataSection, RunSection
from .shared import (LOCALISATION_KEYS, NO_POSITIVE, SCHEMA, AuditReport, activation_shares, aligned_labels,
                     reference_variant)
from .verdict import INCONCLUSIVE, NOT_RELIANT, RELIANT, Evidence, not_run

GAP_TESTS = ("auroc_gap_to_permuted", "auroc_gap_to_clean")
SUBGROUP_TEST = "subgroup_auroc_gap"
EXPLAINED = "each finding's logit z_k (sigmoid; present when z_k > 0)"


# ---- AUROC and rates under bootstrap weights ----------------------------------------------------------


def auroc(scores, labels) -> float:
    """AUROC of ``scores`` for binary ``labels`` (scikit-learn's roc_auc_score); NaN with one class."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels).astype(int)
    if len(labels) == 0 or labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=float)))


def weighted_auroc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC per row of ``weights`` (B, n) (bootstrap counts; 0 leaves an image out): the weighted
    Mann-Whitney statistic, ties counted half. NaN for a row without a positive or a negative. With
    weights of 1 it equals roc_auc_score."""
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], labels[order].astype(bool), weights[:, order].astype(float)
    starts = np.r_[True, s[1:] != s[:-1]]  # the first of each group of equal scores
    group = np.cumsum(starts) - 1
    negative = w * ~y
    cumulative = np.cumsum(negative, axis=1)
    group_end = np.r_[np.flatnonzero(starts)[1:] - 1, len(s) - 1]  # last index of each group
    group_start = np.flatnonzero(starts)
    below = np.where(group_start > 0, cumulative[:, np.maximum(group_start - 1, 0)], 0.0)  # (B, groups)
    within = cumulative[:, group_end] - below
    credit = (below + 0.5 * within)[:, group]  # (B, n): negatives beaten by each image's score
    pos_weight, neg_weight = (w * y).sum(1), negative.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = (w * y * credit).sum(1) / (pos_weight * neg_weight)
    return np.where((pos_weight > 0) & (neg_weight > 0), values, np.nan)


def _weights(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) bootstrap counts: each row a draw of n images with replacement."""
    draws = rng.integers(0, n, size=(resamples, n))
    weights = np.zeros((resamples, n), dtype=np.float32)
    np.add.at(weights, (np.repeat(np.arange(resamples), n), draws.ravel()), 1.0)
    return weights


def _rate(hits: np.ndarray, members: np.ndarray, weights: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        total = (weights * members).sum(1)
        return np.where(total > 0, (weights * (members & hits)).sum(1) / total, np.nan)


def _estimate(value: float, draws: np.ndarray, samples: int, confidence: float, reason: str | None) -> M.Estimate:
    low, high = M._percentile_interval(np.asarray(draws, dtype=float), confidence)
    if not math.isfinite(value):
        low = high = float("nan")
    return M.Estimate(value, low, high, samples, reason if not math.isfinite(value) else None)


def finding_metrics(scores, labels, *, resamples: int, confidence: float, seed: int, name: str = "the finding",
                    weights: np.ndarray | None = None) -> dict[str, M.Estimate]:
    """AUROC, sensitivity and specificity at z > 0 (probability 0.5) of one finding on one set of
    images (``scores``: its logits z; ``labels``: 0/1), with percentile bootstrap intervals."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels).astype(int)
    n = len(labels)
    if n == 0:
        return {key: M.EMPTY.because("no samples") for key in ("auroc", "sensitivity", "specificity")}
    w = _weights(n, resamples, np.random.default_rng(seed)) if weights is None else weights
    positive, predicted = labels == 1, scores > 0
    one_class = (f"AUROC of {name!r} is undefined: every one of the {n} images "
                 f"{'has' if positive.all() else 'lacks'} it")
    ones = np.ones((1, n), dtype=np.float32)
    return {
        "auroc": _estimate(auroc(scores, labels), weighted_auroc(scores, labels, w), n, confidence, one_class),
        "sensitivity": _estimate(float(_rate(predicted, positive, ones)[0]), _rate(predicted, positive, w), n,
                                 confidence, f"no image has {name!r}"),
        "specificity": _estimate(float(_rate(~predicted, ~positive, ones)[0]), _rate(~predicted, ~positive, w), n,
                                 confidence, f"every image has {name!r}"),
    }


def auroc_gap(reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray], *, paired: bool,
              resamples: int, confidence: float, seed: int) -> M.Estimate:
    """AUROC(reference) - AUROC(other) (positive = worse on ``other``) with a bootstrap interval
    (paired: the same draw of images on both, for variants of the same images in the same order)."""
    (rs, ry), (os_, oy) = reference, other
    if len(ry) == 0 or len(oy) == 0:
        return M.EMPTY.because("no samples")
    rng = np.random.default_rng(seed)
    rw = _weights(len(ry), resamples, rng)
    ow = rw if paired else _weights(len(oy), resamples, rng)
    value = auroc(rs, ry) - auroc(os_, oy)
    draws = weighted_auroc(rs, ry, rw) - weighted_auroc(os_, oy, ow)
    return _estimate(value, draws, min(len(ry), len(oy)), confidence, "AUROC undefined on one of the variants "
                     "(its images all have the finding, or none has)")


def subgroup_gap(scores, labels, artefact, *, resamples: int, confidence: float, seed: int
                 ) -> tuple[M.Estimate, M.Estimate, M.Estimate]:
    """(AUROC of the positives with the artefact against every negative, AUROC of the positives
    without it against every negative, their difference), with bootstrap intervals over the images."""
    scores, labels, artefact = np.asarray(scores, float), np.asarray(labels).astype(int), np.asarray(artefact, bool)
    n = len(labels)
    w = _weights(n, resamples, np.random.default_rng(seed))
    ones = np.ones((1, n), dtype=np.float32)
    positive = labels == 1
    keep_with = (~positive | artefact).astype(np.float32)  # negatives and the positives with the artefact
    keep_without = (~positive | ~artefact).astype(np.float32)
    values = [float(weighted_auroc(scores, labels, ones * keep)[0]) for keep in (keep_with, keep_without)]
    draws = [weighted_auroc(scores, labels, w * keep) for keep in (keep_with, keep_without)]
    reasons = [f"no positive image {'with' if k == 0 else 'without'} the artefact, or no negative" for k in (0, 1)]
    with_, without = (_estimate(v, d, n, confidence, r) for v, d, r in zip(values, draws, reasons))
    gap = _estimate(values[0] - values[1], draws[0] - draws[1], n, confidence, reasons[0] if math.isnan(values[0])
                    else reasons[1])
    return with_, without, gap


def judge_gap(test: str, estimate: M.Estimate, threshold: float, what: str) -> Evidence:
    """A gap shows reliance when it exceeds ``threshold`` with its interval clear of 0, clears when
    its interval's upper end is below ``threshold``; inconclusive otherwise."""
    if estimate.samples == 0 or not all(math.isfinite(v) for v in (estimate.value, estimate.low, estimate.high)):
        return not_run(test, threshold, what, estimate.reason or "no data for this test", estimate)
    interval = f"{estimate.value:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"
    if estimate.value > threshold and estimate.low > 0:
        return Evidence(test, estimate, threshold, "shows reliance",
                        f"{what} {interval} exceeds {threshold:g}, its interval clear of 0")
    if estimate.high < threshold:
        return Evidence(test, estimate, threshold, "clears", f"{what} {interval} is below {threshold:g}")
    return Evidence(test, estimate, threshold, "inconclusive", f"{what} {interval} straddles {threshold:g}")


def degenerate(name: str, scores, labels, auroc_estimate: M.Estimate, variant: str) -> str | None:
    """Why no test can clear finding ``name`` (one sentence), or None: its predictions (z > 0) are the
    same for every ``variant`` image while its labels hold both values, or its AUROC interval holds 0.5."""
    labels, predicted = np.asarray(labels).astype(int), np.asarray(scores, float) > 0
    if len(labels) and labels.min() != labels.max() and predicted.min() == predicted.max():
        said = "present" if predicted[0] else "absent"
        return (f"the model predicts {name!r} {said} for every one of the {len(labels)} {variant} images: it reads "
                "no signal for it at the threshold, so tests that find no reliance prove nothing")
    low, high = auroc_estimate.low, auroc_estimate.high
    if math.isfinite(low) and low <= 0.5 <= high:
        return (f"the AUROC of {name!r} on the {variant} images is {auroc_estimate.value:.3f} [{low:.3f}, {high:.3f}], "
                "which holds 0.5 (chance): tests that find no reliance prove nothing")
    return None


def decide_finding(name: str, evidence: list[Evidence], reason: str | None) -> tuple[str, str]:
    """(verdict, summary) of one finding from its evidence (module docstring)."""
    direct = [e for e in evidence if e.test in GAP_TESTS and e.finding != "not run"]
    run = direct or [e for e in evidence if e.finding != "not run"]
    showing = [e for e in run if e.finding == "shows reliance"]
    if showing:
        return RELIANT, f"{name}: relies on the annotated signal: " + "; ".join(e.explanation for e in showing)
    if reason is not None:
        return INCONCLUSIVE, f"{name}: {reason}"
    if not run:
        why = "; ".join(f"{e.test}: {e.estimate.reason}" for e in evidence) or "no permuted or clean variant"
        return INCONCLUSIVE, f"{name}: no behavioural test was possible ({why})"
    if all(e.finding == "clears" for e in run):
        return NOT_RELIANT, f"{name}: no reliance found: " + "; ".join(e.explanation for e in run)
    return INCONCLUSIVE, f"{name}: " + "; ".join(e.explanation for e in run if e.finding == "inconclusive")


# ---- measuring ---------------------------------------------------------------------------------------


def _measure(model, dataset: AuditDataset, config, layers, reference: str, show_progress: bool):
    """Per image: logits (K), and on the reference variant's non-empty masks, per finding and method
    the localisation of z_k's map, and per layer the activation share."""

    n, k = len(dataset), dataset.num_classes
    logits = np.zeros((n, k), dtype=np.float64)
    local = defaultdict(list)  # (finding, method) -> [(index, {key: value})]
    shares: list[tuple[int, list[float], list[float]]] = []
    calls: dict = {}
    with progress_bar("auditing", total=n, enabled=show_progress) as bar:
        for start in range(0, n, config.batch_size):
            indices = list(range(start, min(start + config.batch_size, n)))
            batch = collate([dataset[i] for i in indices]).to(config.device)
            with torch.no_grad():
                out = model(batch.images).float()
            logits[indices] = out.cpu().numpy()
            areas = annotated(batch.masks[:, 0]).float().mean(dim=(1, 2))
            masked = torch.nonzero(batch.has_mask & (areas > 0)).flatten()
            rows = [j for j in masked.tolist() if batch.variants[j] == reference]
            if rows:
                images, masks = batch.images[rows], batch.masks[rows]
                for finding in range(k):
                    for method in config.methods:
                        options = {"epsilon": config.epsilon} if method == "lrp_epsilon" else {}
                        maps = attribute(model, images, finding, method, **options)[:, 0]
                        values = M.localisation(maps, masks[:, 0])
                        for position, j in enumerate(rows):
                            local[(finding, method)].append(
                                (indices[j], {key: float(values[key][position]) for key in (*LOCALISATION_KEYS,
                                                                                            "mask_area")}))
                if layers:
                    share, coverage = activation_shares(model, layers, images, masks, calls)
                    shares += [(indices[j], share[p].tolist(), coverage[p].tolist()) for p, j in enumerate(rows)]
            bar.advance(len(indices))
    return logits, local, shares


# ---- the document ------------------------------------------------------------------------------------


def run_multilabel_audit(model, dataset: AuditDataset, config, *, show_progress: bool = False,
                         data_spec: str | None = None, checkpoint: str | None = None, processes: int = 1):
    """The audit of a multilabel ``model`` on multilabel ``dataset`` (module docstring): an AuditReport
    whose document has the single-label audit's sections (the task metric is the mean AUROC over the
    findings) and ``findings``, one entry per finding with its metrics, evidence and verdict."""

    start = time.perf_counter()
    names = tuple(dataset.classes)
    reference = reference_variant(dataset)
    layers = list(config.layers) if config.layers is not None else list(getattr(model.meta, "target_layers", ()))
    logits, local, shares = _measure(model, dataset, config, layers, reference, show_progress)
    labels = dataset.targets.numpy().astype(int)
    variant_of = np.array([r.variant for r in dataset.records])
    rows = {v: np.flatnonzero(variant_of == v) for v in dataset.variants}
    stats = dict(resamples=config.bootstrap, confidence=config.confidence)
    threshold = config.thresholds.degradation
    findings, evidence_all, per_variant_mean = [], [], defaultdict(list)
    for f, name in enumerate(names):
        entry: dict = {"name": name, "index": f, "explained": f"z of {name!r} (logit {f})", "per_variant": {}}
        for number, variant in enumerate(dataset.variants):
            at = rows[variant]
            measured = finding_metrics(logits[at, f], labels[at, f], seed=config.seed + 1000 * f + number, name=name,
                                       **stats)
            entry["per_variant"][variant] = {key: e.as_dict() for key, e in measured.items()} | {
                "samples": int(len(at)), "positives": int(labels[at, f].sum())}
            per_variant_mean[variant].append(measured["auroc"].value)
            if variant == reference:
                reference_auroc = measured["auroc"]
        evidence: list[Evidence] = []
        entry["auroc_gap"] = {}
        for number, other in enumerate(("permuted", "clean")):
            if other not in rows or reference != "contaminated":
                continue
            paired = aligned_labels(labels[rows[reference]], labels[rows[other]])
            gap = auroc_gap((logits[rows[reference], f], labels[rows[reference], f]),
                            (logits[rows[other], f], labels[rows[other], f]), paired=paired,
                            seed=config.seed + 1000 * f + 101 + number, **stats)
            entry["auroc_gap"][other] = {**gap.as_dict(), "paired": paired}
            evidence.append(judge_gap(f"auroc_gap_to_{other}", gap, threshold,
                                      f"{name}: AUROC gap from contaminated to {other} data"))
        entry["subgroups"] = None
        flags = dataset.has_artefact(f) if dataset.info.artefact_scope else None
        subgroup_what = f"{name}: AUROC gap between positives with and without the artefact ({reference} images)"
        if flags is not None:
            at = rows[reference]
            with_, without, gap = subgroup_gap(logits[at, f], labels[at, f], flags.numpy()[at],
                                               seed=config.seed + 1000 * f + 150, **stats)
            positive = labels[at, f] == 1
            entry["subgroups"] = {"variant": reference, "with_artefact": with_.as_dict(),
                                  "without_artefact": without.as_dict(), "gap": gap.as_dict(),
                                  "positives_with": int((positive & flags.numpy()[at]).sum()),
                                  "positives_without": int((positive & ~flags.numpy()[at]).sum())}
            evidence.append(judge_gap(SUBGROUP_TEST, gap, threshold, subgroup_what))
        else:
            evidence.append(not_run(SUBGROUP_TEST, threshold, subgroup_what,
                                    "the data does not say which images carry the artefact"))
        entry["localisation"] = {}
        for method in config.methods:
            measured = local.get((f, method), [])
            if not measured:
                continue
            values = {key: M.bootstrap_mean([m[key] for _, m in measured], seed=config.seed + 300 + f, **stats)
                      .because(NO_POSITIVE if key == "energy_in_mask" else None).as_dict() for key in LOCALISATION_KEYS}
            area = float(np.mean([m["mask_area"] for _, m in measured]))
            values["chance"] = {"energy_in_mask": area, "top_quartile_recall": 0.25, "top_quartile_precision": area}
            entry["localisation"][method] = {reference: values}
        entry["activation_share"] = []
        having = [s for s in shares if labels[s[0], f] == 1]
        for position, layer in enumerate(layers):
            if not having:
                break
            entry["activation_share"].append({
                "layer": layer, "images": len(having),
                "share": M.bootstrap_mean([s[1][position] for s in having], seed=config.seed + 400 + position,
                                          **stats).as_dict(),
                "chance": float(np.mean([s[2][position] for s in having]))})
        at = rows[reference]
        reason = degenerate(name, logits[at, f], labels[at, f], reference_auroc, reference)
        verdict, summary = decide_finding(name, evidence, reason)
        entry.update({"evidence": [{**e.as_dict(), "for": name} for e in evidence], "degenerate": reason,
                      "verdict": verdict, "summary": summary})
        evidence_all += entry["evidence"]
        findings.append(entry)

    reliant = [e["name"] for e in findings if e["verdict"] == RELIANT]
    unsure = [e["name"] for e in findings if e["verdict"] == INCONCLUSIVE]
    if reliant:
        label = RELIANT
        summary = (f"The model relies on the annotated signal for {', '.join(reliant)}: "
                   + "; ".join(x["explanation"] for e in findings if e["verdict"] == RELIANT for x in e["evidence"]
                               if x["finding"] == "shows reliance") + ".")
    elif not unsure:
        label, summary = NOT_RELIANT, f"No reliance found for any of the {len(names)} findings ({', '.join(names)})."
    else:
        label = INCONCLUSIVE
        summary = "Inconclusive for " + "; ".join(e["summary"] for e in findings if e["verdict"] == INCONCLUSIVE) + "."
    supporting = []
    for e in findings:
        for method, variants in e["localisation"].items():
            value = variants[reference]["energy_in_mask"]["value"]
            if value is not None:
                supporting.append(f"{e['name']}, {method}: {value:.3f} of the positive attribution of its logit lies "
                                  f"in the mask (chance {variants[reference]['chance']['energy_in_mask']:.3f})")
    per_variant = {}
    for variant, values in per_variant_mean.items():
        finite_values = [v for v in values if math.isfinite(v)]
        mean = float(np.mean(finite_values)) if finite_values else float("nan")
        per_variant[variant] = {"value": None if not finite_values else round(mean, 6), "ci": [None, None],
                                "samples": int(len(rows[variant])), "confusion": [],
                                "missing_classes": [n for n, v in zip(names, values) if not math.isfinite(v)]}
        if not finite_values:
            per_variant[variant]["reason"] = "AUROC undefined for every finding"
    degenerate_findings = {e["name"]: e["degenerate"] for e in findings if e["degenerate"]}
    document = {
        "schema": SCHEMA,
        "auditkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": CheckpointSection.of(model.meta, checkpoint).to_json(),
        "data": DataSection.of(dataset, [], data_spec).to_json(),
        "config": RunSection.of(config, processes).to_json(),
        "task": {"type": "multilabel", "metric": "auroc",
                 "metric_label": "mean AUROC over the findings (intervals per finding under findings)",
                 "positive_class": None, "higher_is_better": True, "per_variant": per_variant},
        "reference_variant": reference,
        "explained": EXPLAINED,
        "degradation": {},
        "counterfactual": {},
        "localisation": {},
        "activation_share": [],
        "findings": findings,
        "verdict": {"label": label, "summary": summary, "evidence": evidence_all, "supporting": supporting,
                    "thresholds": config.thresholds.as_dict(), "constant_prediction": None, "at_chance": None,
                    "reliant_findings": reliant, "degenerate": degenerate_findings},
        "examples": {},
        "seconds": round(time.perf_counter() - start, 2),
    }
    return AuditReport(finite(document))


__all__ = ["auroc", "auroc_gap", "finding_metrics", "run_multilabel_audit", "subgroup_gap", "weighted_auroc"]
