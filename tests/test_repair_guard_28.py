"""Issue 28, item 1: a repair is judged on the accuracy the shortcut did not give.

The example from the issue: RRR left the model not reliant on validation (contaminated 0.962,
permuted 0.950, clean 0.954 — clean went up) and the run failed because contaminated accuracy fell
by 0.031 > 0.03. Removing a shortcut must lower the contaminated accuracy it inflated."""

from __future__ import annotations

import pytest

from auditkit.cli.repair import _guarded_change, _still_reliant_line
from auditkit.repair import RepairConfig, repair_decision
from auditkit.repair.auto import _judged, guarded_accuracy

from .conftest import train_digits_model


def numbers(verdict, removal=None, **accuracy):
    return {"verdict": verdict, "val_accuracy": accuracy, "reference_variant": "contaminated",
            "removal_accuracy": removal}


def test_the_issue_example_succeeds_on_clean_accuracy():
    before = numbers("reliant", contaminated=0.993, permuted=0.720, clean=0.700)
    after = numbers("not reliant", contaminated=0.962, permuted=0.950, clean=0.954)
    judged = _judged(before, after, 0.03)
    # Contaminated fell by 0.031 (> 0.03): the old rule failed this repair. Clean rose by 0.254.
    assert judged["guarded"]["accuracy"] == "clean"
    assert judged["accuracy_drop"] == pytest.approx(-0.254)
    assert judged["succeeded"] is True
    assert _guarded_change({**judged}) == "clean accuracy +0.254"


def test_the_guard_prefers_clean_then_permuted_then_removal_then_contaminated():
    assert guarded_accuracy(numbers("reliant", 0.5, contaminated=0.9, permuted=0.6, clean=0.7))["accuracy"] == "clean"
    assert guarded_accuracy(numbers("reliant", 0.5, contaminated=0.9, permuted=0.6))["accuracy"] == "permuted"
    removal = guarded_accuracy(numbers("reliant", 0.5, contaminated=0.9))
    assert (removal["accuracy"], removal["value"]) == ("removal counterfactual", 0.5)
    last = guarded_accuracy(numbers("reliant", None, contaminated=0.9))
    assert (last["accuracy"], last["value"]) == ("contaminated", 0.9)
    assert "includes what the shortcut contributes" in last["why"]


def test_a_collapse_still_fails_on_the_guarded_accuracy():
    before = numbers("reliant", contaminated=0.98, permuted=0.80, clean=0.70)
    collapsed = numbers("not reliant", contaminated=0.10, permuted=0.10, clean=0.10)
    judged = _judged(before, collapsed, 0.03)
    assert judged["accuracy_drop"] == pytest.approx(0.60) and judged["succeeded"] is False
    line = _still_reliant_line({"decision": {**collapsed, **judged}}, "tap", "tap")
    assert line.startswith("the repair lost 0.600 clean validation accuracy") and "clean variant" in line
    # Removal counterfactual as the guard: a repair that keeps it within the bound succeeds.
    masked_only_before = numbers("reliant", removal=0.60, contaminated=0.98)
    masked_only_after = numbers("not reliant", removal=0.90, contaminated=0.91)
    judged = _judged(masked_only_before, masked_only_after, 0.03)
    assert judged["guarded"]["accuracy"] == "removal counterfactual" and judged["succeeded"] is True
    # Nothing comparable measured after: never a success.
    judged = _judged(before, numbers("not reliant", contaminated=0.9, permuted=0.9, clean=None), 0.03)
    assert judged["accuracy_drop"] is None and judged["succeeded"] is False


def test_a_model_whose_contaminated_accuracy_falls_while_clean_rises_is_kept():
    """Real models: the shortcut model (trained on contaminated digits) before, a model trained on
    clean digits after. Contaminated accuracy falls, clean accuracy rises: the guard reads clean."""
    from auditkit.data import open_dataset

    before = train_digits_model("contaminated", epochs=3)
    after = train_digits_model("clean", epochs=3)
    data = open_dataset("builtin:decoy-digits")
    decision = repair_decision(before, after, data, RepairConfig(method="tap"), 0.03)
    accuracy_before = repair_decision(before, before, data, RepairConfig(method="tap"), 0.03)["val_accuracy"]
    assert decision["guarded"]["accuracy"] == "clean"
    assert decision["val_accuracy"]["clean"] > accuracy_before["clean"]
    assert decision["val_accuracy"]["contaminated"] < accuracy_before["contaminated"]
    expected = round(accuracy_before["clean"] - decision["val_accuracy"]["clean"], 4)
    assert decision["accuracy_drop"] == pytest.approx(expected, abs=1e-4) and decision["accuracy_drop"] < 0
    assert decision["succeeded"] == (decision["verdict"] == "not reliant")
