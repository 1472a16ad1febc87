"""From measurements to a verdict: reliant, not reliant, or inconclusive — with the evidence named.

Only behavioural tests decide, because only they show what the model *does* with the signal:
- degradation (Δ-metric) from the contaminated data to the permuted and to the clean variants;
- the swap counterfactual: the rate at which the prediction changes when the masked region is
  replaced by another class's;
- the removal counterfactual: the drop in the task metric when the masked region is filled with
  the image's own background statistics.

A test *shows reliance* when the lower end of its confidence interval is above its threshold, and
*clears* the model when the upper end is below it. Degradation is the direct test — the same images
with the signal decorrelated from the label (TAP §5.2) — so when it ran, it alone decides and the
counterfactuals are reported beside it. They are proxies for data without permuted or clean variants
(the audit issue), and they change more than the signal when the mask covers much of the image: on
coloured MNIST the mask is the whole background, so pasting another image's "background" pastes its
digit strokes too, and a model that ignores colour still flips. The verdict, over the deciding tests, is
- **reliant** if any test shows reliance;
- **not reliant** if at least one test was possible and every test clears the model;
- **inconclusive** otherwise (an interval straddles its threshold, or no behavioural test was
  possible: then attribution localisation is reported, but it cannot decide on its own).

A test that could not run is "not run" with its true reason (no masks; masks that are all empty;
every masked image of one class; a metric undefined on a one-class split), never "clears": a test on
nothing is not evidence, so an audit whose masks are all empty cannot call a model "not reliant".

Attribution and activation localisation are listed as supporting evidence.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from .metrics import Estimate, _percentile_interval

RELIANT, NOT_RELIANT, INCONCLUSIVE = "reliant", "not reliant", "inconclusive"


@dataclass(frozen=True)
class Thresholds:
    """When a measured effect counts (all in the task metric's units, or rates)."""

    degradation: float = 0.05  # Δ-metric, contaminated -> permuted / clean
    swap_flip_rate: float = 0.10  # share of predictions changed by swapping the masked region
    removal_drop: float = 0.05  # drop of the task metric when the masked region is removed

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Evidence:
    test: str
    estimate: Estimate
    threshold: float
    finding: str  # "shows reliance" | "clears" | "inconclusive" | "not run"
    explanation: str

    def as_dict(self) -> dict:
        return {"test": self.test, **self.estimate.as_dict(), "threshold": self.threshold,
                "finding": self.finding, "explanation": self.explanation}


def judge(test: str, estimate: Estimate, threshold: float, what: str) -> Evidence:
    """Compare a confidence interval with a threshold; "not run" (with ``estimate.reason``) when the
    estimate has no value or no interval."""
    if estimate.samples == 0 or not all(math.isfinite(v) for v in (estimate.value, estimate.low, estimate.high)):
        return not_run(test, threshold, what, estimate.reason or "no data for this test", estimate)
    interval = f"{estimate.value:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"
    if estimate.low > threshold:
        return Evidence(test, estimate, threshold, "shows reliance", f"{what} {interval} is above {threshold:g}")
    if estimate.high < threshold:
        return Evidence(test, estimate, threshold, "clears", f"{what} {interval} is below {threshold:g}")
    return Evidence(test, estimate, threshold, "inconclusive", f"{what} {interval} straddles {threshold:g}")


def not_run(test: str, threshold: float, what: str, reason: str, estimate: Estimate | None = None) -> Evidence:
    """Evidence of a test that could not run, with the reason (never counted for or against)."""
    estimate = estimate if estimate is not None else Estimate(math.nan, math.nan, math.nan, 0)
    return Evidence(test, replace(estimate, reason=reason), threshold, "not run", f"{what}: not run: {reason}")


DIRECT_TESTS = ("degradation_to_permuted", "degradation_to_clean")


def deciding(evidence: list[Evidence]) -> list[Evidence]:
    """The tests that decide: the degradation tests when any ran, else every test."""
    direct = [e for e in evidence if e.test in DIRECT_TESTS and e.finding != "not run"]
    return direct or evidence


def at_chance(labels, predictions, *, reference: str = "contaminated", resamples: int = 1000,
              confidence: float = 0.95, seed: int = 0) -> str | None:
    """Why the model is at chance on the ``reference`` images (one sentence), or None: its balanced
    accuracy (the mean recall over the classes present; chance 1/K whatever the class balance, so a
    model that always answers the majority class is at chance too) has a bootstrap interval that
    holds chance. Such a model reads nothing the labels follow (a random or collapsed network, a
    one-logit model read with the wrong sign or threshold), so tests that find no reliance prove
    nothing about it. None with fewer than two classes among the labels."""
    labels, predictions = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    present = np.unique(labels)
    if len(labels) == 0 or len(present) < 2:
        return None

    def balanced(rows_labels: np.ndarray, rows_predictions: np.ndarray) -> np.ndarray:
        """Balanced accuracy of each row (a bootstrap draw); classes a draw lacks are left out."""
        recalls = []
        for c in present:
            members = rows_labels == c
            with np.errstate(invalid="ignore", divide="ignore"):
                recalls.append((members & (rows_predictions == c)).sum(-1) / members.sum(-1))
        return np.nanmean(np.stack(recalls), axis=0)

    chance = 1.0 / len(present)
    value = float(balanced(labels[None], predictions[None])[0])
    rng = np.random.default_rng(seed)
    step = max(1, 2_000_000 // len(labels))  # draws per chunk, drawn per chunk: memory bounded on large audits
    values = []
    for k in range(0, resamples, step):
        draws = rng.integers(0, len(labels), size=(min(step, resamples - k), len(labels)), dtype=np.int32)
        values.append(balanced(labels[draws], predictions[draws]))
    values = np.concatenate(values)
    low, high = _percentile_interval(values, confidence)
    if low > chance:
        return None
    # One-sided: a model below chance (a one-logit model read with the wrong sign, a K-class model
    # audited on a few of its classes) reads the labels no better than chance either.
    where = "holds" if high >= chance else "lies below"
    return (f"the model's balanced accuracy on the {len(labels)} {reference} images is {value:.3f} "
            f"[{low:.3f}, {high:.3f}], which {where} chance ({chance:.3f}): it cannot be told apart from a model "
            "that reads nothing the labels follow on these images (more images narrow the interval), so tests "
            "that find no reliance prove nothing")


def decide(evidence: list[Evidence], *, constant_prediction: str | None = None,
           reference: str = "contaminated", chance: str | None = None) -> tuple[str, str]:
    """(verdict, one-sentence summary) from behavioural evidence (see ``deciding``).

    ``constant_prediction``: the class the model gives every ``reference`` image (whose labels hold
    several classes), when it does. Such a model reads no signal, so tests that find no reliance prove
    nothing about this one: the verdict is then inconclusive, never "not reliant". ``chance``: the
    sentence of :func:`at_chance` when the model is at chance on the reference images: the same."""
    run = [e for e in deciding(evidence) if e.finding != "not run"]
    showing = [e for e in run if e.finding == "shows reliance"]
    if showing:
        return RELIANT, "The model relies on the annotated signal: " + "; ".join(e.explanation for e in showing) + "."
    if run and all(e.finding == "clears" for e in run):
        if constant_prediction is not None:
            return INCONCLUSIVE, (f"The model predicts {constant_prediction!r} for every {reference} image: it reads "
                                  "no signal at all (a collapsed model), so tests that find no reliance prove nothing.")
        if chance is not None:
            return INCONCLUSIVE, f"The model is at chance: {chance}."
        return NOT_RELIANT, "No reliance found: " + "; ".join(e.explanation for e in run) + "."
    if not run:
        # Name the real reasons: each test that could not run says why (empty masks, one class, ...).
        tests_of: dict[str, list[str]] = {}
        for e in evidence:
            if e.finding == "not run":
                tests_of.setdefault(e.estimate.reason or "no data", []).append(e.test)
        why = "; ".join(f"{', '.join(tests)}: {reason}" for reason, tests in tests_of.items())
        why = why or "the data has no permuted or clean variant and no masks"
        return INCONCLUSIVE, f"No behavioural test was possible ({why}); attribution localisation alone cannot decide."
    unsure = [e for e in run if e.finding == "inconclusive"]
    return INCONCLUSIVE, "Inconclusive: " + "; ".join(e.explanation for e in unsure) + "."
