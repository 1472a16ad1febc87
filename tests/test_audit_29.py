"""Issue 29 in the audit: empty masks are "not run" (never "clear"), degenerate data gives null metrics
with true reasons (never NaN in JSON), and the binary F-score names its class (the minority by default).

The models are written by hand so their behaviour is known exactly: ``PatchReader`` predicts from
the top-left 2x2 patch alone (bright: class 1, dark: class 0) — a pure shortcut model — and
``ConstantModel`` always answers one class.
"""

from __future__ import annotations

import io
import json
import math

import jsonschema
import numpy as np
import pytest
import torch
from rich.console import Console
from sklearn.metrics import f1_score
from torch import nn
from typer.testing import CliRunner

from auditkit._json import dumps, finite
from auditkit.audit import AuditConfig, print_summary, render_html, run_audit
from auditkit.audit import metrics as M
from auditkit.audit.runner import swap_partners
from auditkit.cli import app
from auditkit.data.dataset import AuditDataset, DatasetInfo, Record
from auditkit.errors import ParameterError
from auditkit.models import AuditModel, ModelMeta

from .test_audit import SCHEMA

FAST = dict(methods=("gradient",), bootstrap=200, examples=1, seed=0)
SIDE = 8


class PatchReader(nn.Module):
    """Logits from the top-left 2x2 patch only: class 1 when it is bright, class 0 when dark."""

    def __init__(self, num_classes: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(1, num_classes, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.zero_()
            self.conv.weight[0, 0] = -1.0  # class 0: 0.5 - x
            self.conv.bias[0] = 0.5
            self.conv.weight[1, 0] = 1.0  # class 1: x - 0.5
            self.conv.bias[1] = -0.5

    def forward(self, x):
        return self.conv(x)[:, :, :2, :2].sum(dim=(2, 3)) * 10


class ConstantModel(nn.Module):
    """Always the class ``answer`` (the input still takes part, so gradients exist)."""

    def __init__(self, answer: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.logits = torch.zeros(num_classes)
        self.logits[answer] = 5.0

    def forward(self, x):
        return self.logits.to(x.device) + 0.0 * self.conv(x).sum(dim=(1, 2, 3))[:, None]


def audit_model(net: nn.Module, classes: tuple[str, ...]) -> AuditModel:
    meta = ModelMeta(arch="handmade", num_classes=len(classes), in_channels=1, input_size=(SIDE, SIDE), mean=(0.0,),
                     std=(1.0,), class_names=classes, target_layers=("net.conv",), gradcam_layer="net.conv")
    return AuditModel(net, meta).eval()


def patch_data(labels, classes=("a", "b"), empty=(), masked=True, seed=0) -> AuditDataset:
    """8x8 grey images, background uniform in [0.3, 0.7]; the top-left 2x2 patch is 0.95 for odd
    labels, 0.05 for even ones, and the mask marks it (all zero for the positions in ``empty``)."""
    rng = np.random.default_rng(seed)
    records = []
    for k, label in enumerate(labels):
        image = rng.uniform(0.3, 0.7, (SIDE, SIDE)).astype(np.float32)
        image[:2, :2] = 0.95 if label % 2 else 0.05
        mask = np.zeros((SIDE, SIDE), np.float32)
        if k not in empty:
            mask[:2, :2] = 1.0
        records.append(Record(image, int(label), mask if masked else None, "original", "", "test"))
    return AuditDataset(records, DatasetInfo("patch", "memory", tuple(classes)))


def evidence(report) -> dict[str, dict]:
    return {e["test"]: e for e in report.data["verdict"]["evidence"]}


def strict_json(report) -> dict:
    """report.data through JSON as a strict parser sees it (NaN/Infinity refused)."""
    text = json.dumps(report.data, allow_nan=False)

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# ---- 1. empty masks: "not run", never "clears" ----------------------------------------------------


def test_shortcut_model_with_real_masks_is_reliant():
    report = run_audit(audit_model(PatchReader(), ("a", "b")), patch_data([0, 1] * 20), AuditConfig(**FAST))
    tests = evidence(report)
    assert report.verdict == "reliant" and report.exit_code(True) == 1
    assert tests["swap_flip_rate"]["value"] == 1.0 and tests["swap_flip_rate"]["samples"] == 40  # every swap flips
    assert tests["swap_flip_rate"]["finding"] == tests["removal_drop"]["finding"] == "shows reliance"
    assert report.data["data"]["empty_masks"] == 0
    jsonschema.validate(strict_json(report), SCHEMA)


def test_all_empty_masks_are_not_run_never_clear():
    """The same shortcut model with every mask empty: no test ran, so never "not reliant", and a
    --fail-on-shortcut gate does not pass (exit 3)."""
    data = patch_data([0, 1] * 20, empty=range(40))
    report = run_audit(audit_model(PatchReader(), ("a", "b")), data, AuditConfig(**FAST))
    tests = evidence(report)
    assert report.verdict == "inconclusive" and not report.tested
    assert report.exit_code(True) == 3 and report.exit_code(False) == 0
    for name in ("swap_flip_rate", "removal_drop"):
        assert tests[name]["finding"] == "not run" and tests[name]["value"] is None
        assert tests[name]["reason"] == ("the masks of the 40 original images are all empty "
                                         "(no pixel above 0.5 at the model's input size)")
    summary = report.data["verdict"]["summary"]
    assert "are all empty" in summary and "no masks" not in summary
    assert report.data["localisation"]["gradient"] == {} and report.data["activation_share"] == []
    assert report.data["data"]["empty_masks"] == 40 and report.data["data"]["with_masks"] == 40
    assert any("are all empty" in line for line in report.data["verdict"]["supporting"])
    jsonschema.validate(strict_json(report), SCHEMA)


def test_images_with_an_empty_mask_are_excluded_and_counted():
    """Half the masks empty: the tests run on the other half only, and no swap takes its region
    from an empty mask (a flip rate of exactly 1.0: every donor patch has the other class's colour)."""
    labels = [0, 1] * 20
    empty = set(range(0, 40, 4)) | set(range(1, 40, 4))  # 20 of 40, both classes
    report = run_audit(audit_model(PatchReader(), ("a", "b")), patch_data(labels, empty=empty), AuditConfig(**FAST))
    swap = report.data["counterfactual"]["swap"]
    assert swap["flip_rate"]["value"] == 1.0 and swap["flip_rate"]["samples"] == 20
    assert swap["excluded_empty_masks"] == 20 and report.data["counterfactual"]["removal"]["drop"]["samples"] == 20
    assert "(20 of 40 images with an empty mask excluded)" in evidence(report)["swap_flip_rate"]["explanation"]
    assert report.verdict == "reliant" and report.data["data"]["empty_masks"] == 20
    # Localisation and activation share count the 20 images with a real mask only.
    assert report.data["localisation"]["gradient"]["original"]["top_quartile_recall"]["samples"] == 20
    assert report.data["activation_share"][0]["share"]["samples"] == 20


def test_swap_partners_come_from_the_given_masked_samples_of_another_class():
    partners = swap_partners([2, 5, 7, 9], [0, 0, 1, 1], seed=0)
    assert set(partners) == {2, 5, 7, 9}
    assert all(partners[i] in (7, 9) for i in (2, 5)) and all(partners[i] in (2, 5) for i in (7, 9))
    assert swap_partners([2, 5], [0, 0], seed=0) == {}  # one class: nobody to swap with


def test_cli_fail_on_shortcut_exits_3_when_every_mask_is_empty(digits_checkpoint, tmp_path):
    from auditkit.data import open_dataset

    digits = open_dataset("builtin:digits", split="test")
    images = np.stack([(digits[k].image[0].numpy() * 255).astype(np.uint8) for k in range(40)])
    labels = np.array([digits[k].label for k in range(40)])
    np.savez(tmp_path / "empty.npz", images=images, labels=labels, masks=np.zeros_like(images, dtype=np.float32),
             classes=np.array([str(k) for k in range(10)]))
    result = CliRunner().invoke(app, ["audit", str(digits_checkpoint), "--data", str(tmp_path / "empty.npz"), "--split",
                                      "all", "--methods", "gradient", "--bootstrap", "50", "--quiet", "--json",
                                      str(tmp_path / "r.json"), "--fail-on-shortcut"])
    assert result.exit_code == 3, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verdict"]["label"] == "inconclusive" and "are all empty" in report["verdict"]["summary"]
    assert "nothing was tested" in result.output


# ---- 2. degenerate data: null with a reason, never NaN -----------------------------------------------


def test_single_class_split_gives_null_metric_and_true_reasons():
    """The example of the issue: a binary model audited on a split holding only 'normal' images, each
    with a mask. F1 of the minority class ('pneumonia', absent) is undefined -> null with the reason;
    the verdict is inconclusive because of the one class, not because of "no masks"."""
    data = patch_data([0] * 30, classes=("normal", "pneumonia"))
    report = run_audit(audit_model(PatchReader(), ("normal", "pneumonia")), data, AuditConfig(**FAST))
    entry = report.data["task"]["per_variant"]["original"]
    assert entry["value"] is None and entry["ci"] == [None, None] and entry["samples"] == 30
    assert "one class ('normal')" in entry["reason"] and "F1 of 'pneumonia' is undefined" in entry["reason"]
    assert entry["missing_classes"] == ["pneumonia"]
    tests = evidence(report)
    for name in ("swap_flip_rate", "removal_drop"):
        assert tests[name]["finding"] == "not run" and "one class ('normal')" in tests[name]["reason"]
    summary = report.data["verdict"]["summary"]
    assert report.verdict == "inconclusive" and "one class" in summary
    assert "no mask" not in summary and "no permuted" not in summary  # every image has a mask: not the reason
    removal = report.data["counterfactual"]["removal"]
    assert removal["before"] is None and removal["after"] is None
    jsonschema.validate(strict_json(report), SCHEMA)


def test_single_class_split_multiclass_accuracy_is_computed_and_missing_classes_named():
    data = patch_data([0] * 20, classes=("a", "b", "c"))
    report = run_audit(audit_model(PatchReader(3), ("a", "b", "c")), data, AuditConfig(**FAST))
    entry = report.data["task"]["per_variant"]["original"]
    assert report.data["task"]["metric"] == "accuracy" and entry["value"] == 1.0 and "reason" not in entry
    assert entry["missing_classes"] == ["b", "c"]
    assert report.data["task"]["positive_class"] is None
    # Accuracy is defined: the removal test runs (the dark patch filled with ~0.5 noise changes answers).
    assert evidence(report)["removal_drop"]["finding"] != "not run"
    assert "one class ('a')" in evidence(report)["swap_flip_rate"]["reason"]
    strict_json(report)


def test_estimates_without_data_are_null_with_a_reason():
    empty = M.bootstrap_metric("binary", [], [], resamples=10, confidence=0.95, seed=0).as_dict()
    assert empty == {"value": None, "ci": [None, None], "samples": 0, "reason": "no data"}
    nan = M.Estimate(float("nan"), float("inf"), float("-inf"), 3, "why").as_dict()
    assert nan == {"value": None, "ci": [None, None], "samples": 3, "reason": "why"}
    assert M.undefined_reason("binary", [], 1, ("a", "b")) == "no samples"
    assert M.undefined_reason("binary", [0, 0, 1], 1, ("a", "b")) is None
    assert M.undefined_reason("multiclass", [0, 0], 1, ("a", "b")) is None


def test_json_writer_never_writes_nan_or_infinity(tmp_path):
    from auditkit.cli._common import write_json

    payload = {"a": float("nan"), "b": [1.5, float("inf"), np.float32("nan")],
               "c": (np.int64(3), np.float64(-math.inf))}
    assert finite(payload) == {"a": None, "b": [1.5, None, None], "c": [3, None]}
    assert json.loads(dumps(payload)) == {"a": None, "b": [1.5, None, None], "c": [3, None]}
    write_json(tmp_path / "x.json", payload)
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text and json.loads(text)["a"] is None


# ---- 3. binary metrics name their class: the minority by default --------------------------------


def test_minority_class_and_its_f1_match_sklearn():
    assert M.minority_class([0, 0, 1]) == 1 and M.minority_class([0, 1, 1]) == 0
    assert M.minority_class([0, 1]) == 1 and M.minority_class([]) == 1 and M.minority_class([1, 1]) == 0
    assert M.resolve_positive(None, "binary", ("x", "y"), [0, 1, 1, 0]) == (1, "tie")
    assert M.resolve_positive(None, "binary", ("x", "y"), [1, 1, 0]) == (0, "minority")
    assert M.resolve_positive(None, "binary", ("x", "y", "z"), [0, 0, 2]) == (1, "class 1")  # one-vs-rest
    assert M.resolve_positive("y", "binary", ("x", "y"), [1]) == (1, "given")
    assert M.resolve_positive(None, "multiclass", ("x", "y", "z"), [0]) == (None, "")
    rng = np.random.default_rng(7)
    labels = (rng.random(300) < 0.9).astype(int)  # class 0 is the minority (~10 %)
    predictions = np.where(rng.random(300) < 0.8, labels, 1 - labels)
    positive = M.minority_class(labels)
    assert positive == 0
    expected = f1_score(labels, predictions, pos_label=0)
    assert M.task_metric("binary", labels, predictions, positive) == pytest.approx(expected, abs=1e-12)
    assert M.task_metric("binary", labels, predictions, 1) == pytest.approx(f1_score(labels, predictions, pos_label=1))


def imbalanced():
    """95 'normal' and 5 'pneumonia', 'pneumonia' sorting first (index 0); no masks."""
    labels = [0] * 5 + [1] * 95
    return patch_data(labels, classes=("pneumonia", "normal"), masked=False)


def test_imbalanced_binary_f1_is_of_the_minority_class_and_named():
    """A model that never predicts pneumonia scores F1 0.0 on pneumonia, not 0.974 on 'normal'."""
    model = audit_model(ConstantModel(1, 2), ("pneumonia", "normal"))
    report = run_audit(model, imbalanced(), AuditConfig(**FAST))
    task = report.data["task"]
    labels, predictions = np.array([0] * 5 + [1] * 95), np.ones(100, int)
    assert task["per_variant"]["original"]["value"] == f1_score(labels, predictions, pos_label=0, zero_division=0) == 0
    assert task["metric_label"] == "F1 of 'pneumonia'"
    assert task["positive_class"] == {"index": 0, "name": "pneumonia", "chosen": "minority", "count": 5, "of": 100,
                                      "variant": "original"}
    console = Console(file=io.StringIO(), width=200, record=True)
    print_summary(report, console)
    printed = console.export_text()
    assert "F1 of 'pneumonia'" in printed and "minority class; 5 of 100" in printed
    page = render_html(report.data)
    assert "F1 of &#x27;pneumonia&#x27;" in page and "<b>pneumonia</b>" in page
    jsonschema.validate(strict_json(report), SCHEMA)
    # The override: the F-score of 'normal' as asked, by name or index -> sklearn's 2*95/(100+95).
    for given in ("normal", 1, "1"):
        other = run_audit(model, imbalanced(), AuditConfig(**FAST, positive_class=given)).data["task"]
        assert other["per_variant"]["original"]["value"] == pytest.approx(f1_score(labels, predictions, pos_label=1),
                                                                          abs=1e-6)
        assert other["positive_class"]["name"] == "normal" and other["positive_class"]["chosen"] == "given"


def test_positive_class_errors_are_one_clear_line(digits_checkpoint):
    model = audit_model(ConstantModel(1, 2), ("pneumonia", "normal"))
    with pytest.raises(ParameterError, match="must name one of the classes \\(pneumonia, normal\\)"):
        run_audit(model, imbalanced(), AuditConfig(**FAST, positive_class="bronchitis"))
    with pytest.raises(ParameterError, match="binary task"):
        run_audit(model, imbalanced(), AuditConfig(**FAST, task="multiclass", positive_class="normal"))
    result = CliRunner().invoke(app, ["audit", str(digits_checkpoint), "--data", "builtin:decoy-digits", "--task",
                                      "binary", "--positive-class", "eleven", "--quiet"])
    assert result.exit_code == 2 and "--positive-class must name one of the classes" in result.output, result.output


def test_degradation_on_single_class_variants_is_not_run_with_the_reason():
    """Contaminated and clean variants that both hold one class only: the degradation of the F-score
    of the absent class cannot be computed, and the verdict says so (not "no masks")."""
    base = patch_data([0] * 12, classes=("normal", "pneumonia"), masked=False)
    records = [r.__class__(r.image, r.label, None, variant, "", "test")
               for variant in ("contaminated", "clean") for r in base.records]
    data = AuditDataset(records, base.info)
    report = run_audit(audit_model(PatchReader(), ("normal", "pneumonia")), data,
                       AuditConfig(**FAST, counterfactuals=False))
    tests = evidence(report)
    assert tests["degradation_to_clean"]["finding"] == "not run"
    assert tests["degradation_to_clean"]["reason"].startswith("contaminated: F1 of 'pneumonia' is undefined: all 12")
    assert tests["swap_flip_rate"]["reason"] == "the counterfactual tests were switched off"
    summary = report.data["verdict"]["summary"]
    assert report.verdict == "inconclusive" and "one class ('normal')" in summary and "no masks" not in summary
    assert report.data["degradation"]["clean"]["value"] is None and report.exit_code(True) == 3
    jsonschema.validate(strict_json(report), SCHEMA)
