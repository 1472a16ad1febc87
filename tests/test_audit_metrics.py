"""Audit metrics and verdict rules against hand-computed values on tiny inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from auditkit.audit import metrics as M
from auditkit.audit.verdict import INCONCLUSIVE, NOT_RELIANT, RELIANT, decide, judge


def test_task_metrics_by_hand():
    labels = np.array([0, 1, 1, 0, 1])
    predictions = np.array([0, 1, 0, 1, 1])
    assert M.task_metric("multiclass", labels, predictions) == pytest.approx(3 / 5)
    # positive class 1: TP = 2, predicted positives 3, actual positives 3 -> F1 = 2*2 / (3 + 3)
    assert M.task_metric("binary", labels, predictions) == pytest.approx(4 / 6)
    assert M.task_metric("ordinal", np.array([0, 2, 4]), np.array([1, 2, 1])) == pytest.approx((1 + 0 + 3) / 3)
    assert math.isnan(M.task_metric("multiclass", np.array([]), np.array([])))
    assert M.confusion_matrix([0, 1, 1, 2], [0, 2, 1, 2], 3) == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    assert M.resolve_task("auto", 2) == "binary" and M.resolve_task("auto", 5) == "multiclass"


def test_bootstrap_interval_brackets_the_value_and_is_repeatable():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    predictions = np.where(rng.random(400) < 0.8, labels, (labels + 1) % 3)
    a = M.bootstrap_metric("multiclass", labels, predictions, resamples=500, confidence=0.95, seed=3)
    b = M.bootstrap_metric("multiclass", labels, predictions, resamples=500, confidence=0.95, seed=3)
    assert a == b and a.low < a.value < a.high and a.samples == 400
    assert 0.02 < a.high - a.low < 0.12  # about 4 standard errors of a proportion near 0.8 with n = 400


def test_degradation_sign_and_pairing():
    labels = np.arange(200) % 4
    reference = labels.copy()  # all right
    worse = np.where(np.arange(200) < 50, (labels + 1) % 4, labels)  # 25 % wrong
    paired = M.bootstrap_degradation("multiclass", (labels, reference), (labels, worse), paired=True,
                                     resamples=300, confidence=0.95, seed=0)
    assert paired.value == pytest.approx(0.25) and paired.low > 0.15
    independent = M.bootstrap_degradation("multiclass", (labels, reference), (labels, worse), paired=False,
                                          resamples=300, confidence=0.95, seed=0)
    assert independent.value == pytest.approx(0.25)
    # For MAE (lower is better) a larger error on the other variant is still a positive degradation.
    mae = M.bootstrap_degradation("ordinal", (labels, labels), (labels, labels + 1), paired=True,
                                  resamples=50, confidence=0.95, seed=0)
    assert mae.value == pytest.approx(1.0)


def test_localisation_by_hand():
    # 4x4 map; the mask is the top-left 2x2 block (4 of 16 pixels).
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1
    attribution = torch.zeros(1, 4, 4)
    attribution[0, 0, 0] = 3.0   # inside, positive
    attribution[0, 0, 1] = -1.0  # inside, negative
    attribution[0, 3, 3] = 1.0   # outside, positive
    attribution[0, 2, 2] = -0.5  # outside
    result = M.localisation(attribution, mask)
    assert result["energy_in_mask"].item() == pytest.approx(3 / 4)  # positive mass inside / all positive mass
    # top quartile: 4 largest |A| pixels = (0,0), (0,1), (3,3), (2,2); 2 of them inside the 4-pixel mask
    assert result["top_quartile_recall"].item() == pytest.approx(2 / 4)
    assert result["top_quartile_precision"].item() == pytest.approx(2 / 4)
    assert result["iou"].item() == pytest.approx(2 / 6)
    assert result["mask_area"].item() == pytest.approx(4 / 16)


def test_localisation_of_an_all_negative_map_and_an_empty_mask():
    result = M.localisation(-torch.ones(1, 4, 4), torch.zeros(1, 4, 4))
    assert math.isnan(result["energy_in_mask"].item()) and math.isnan(result["top_quartile_recall"].item())
    assert result["top_quartile_precision"].item() == 0


def test_removal_fills_with_the_images_own_statistics_and_paste_blends():
    image = torch.full((1, 8, 8), 0.2)
    image[0, 4:, :] = 0.6  # outside pixels: half 0.2, half 0.6 below the mask... mean ~0.4
    mask = torch.zeros(1, 8, 8)
    mask[0, :2, :2] = 1
    image[0, :2, :2] = 1.0  # the artifact
    filled = M.remove_region(image, mask, seed=1)
    outside = image[0][mask[0] == 0]
    assert torch.equal(filled[0][mask[0] == 0], outside)  # untouched outside the mask
    inside = filled[0][mask[0] == 1]
    assert (inside >= 0).all() and (inside <= 1).all() and abs(inside.mean() - outside.mean()) < 0.3
    assert torch.equal(M.remove_region(image, mask, seed=1), filled)  # seeded
    donor = torch.ones(1, 8, 8)
    pasted = M.paste_region(image, donor, mask)
    assert torch.equal(pasted[0][mask[0] == 1], torch.ones(4)) and torch.equal(pasted[0][mask[0] == 0], outside)


def estimate(value, low, high, n=100):
    return M.Estimate(value, low, high, n)


def test_judge_compares_the_interval_with_the_threshold():
    assert judge("t", estimate(0.2, 0.1, 0.3), 0.05, "x").finding == "shows reliance"
    assert judge("t", estimate(0.0, -0.02, 0.03), 0.05, "x").finding == "clears"
    assert judge("t", estimate(0.05, 0.01, 0.09), 0.05, "x").finding == "inconclusive"
    assert judge("t", M.EMPTY, 0.05, "x").finding == "not run"


def test_verdict_rules():
    shows = judge("a", estimate(0.2, 0.1, 0.3), 0.05, "a")
    clears = judge("b", estimate(0.0, -0.01, 0.01), 0.05, "b")
    unsure = judge("c", estimate(0.05, 0.0, 0.1), 0.05, "c")
    missing = judge("d", M.EMPTY, 0.05, "d")
    assert decide([shows, clears, unsure])[0] == RELIANT  # any test showing reliance decides
    assert decide([clears, clears, missing])[0] == NOT_RELIANT
    assert decide([clears, unsure])[0] == INCONCLUSIVE
    label, summary = decide([missing])
    assert label == INCONCLUSIVE and "No behavioural test" in summary


def test_degradation_decides_when_it_ran_and_counterfactuals_otherwise():
    degradation_clears = judge("degradation_to_permuted", estimate(0.01, -0.01, 0.03), 0.05, "d")
    degradation_shows = judge("degradation_to_clean", estimate(0.2, 0.1, 0.3), 0.05, "d")
    swap_shows = judge("swap_flip_rate", estimate(0.9, 0.8, 0.95), 0.1, "s")
    swap_clears = judge("swap_flip_rate", estimate(0.01, 0.0, 0.02), 0.1, "s")
    label, summary = decide([degradation_clears, swap_shows])
    assert label == NOT_RELIANT and "swap" not in summary and "d " in summary
    assert decide([degradation_shows, swap_clears])[0] == RELIANT
    assert decide([judge("degradation_to_permuted", M.EMPTY, 0.05, "d"), swap_shows])[0] == RELIANT
    assert decide([swap_clears])[0] == NOT_RELIANT
