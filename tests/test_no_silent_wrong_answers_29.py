"""Issue 29, end to end from the command line: the user's own files never give a silently wrong verdict.

The headline case: a model that relies fully on a corner patch, audited on data that has no variants
(nothing to compare against but the masks), with the masks saved the most common way,
``(mask > 0).astype(np.uint8)`` — 0/1, not 0/255 — as PNG files and as an .npz array. Read on a 0–255
scale every mask was empty, the mask tests "cleared" and the shortcut model was judged not reliant
(exit 0 under --fail-on-shortcut). Right value: reliant, exit 1. All-empty masks: no test ran, so
never "not reliant" and never exit 0 under --fail-on-shortcut."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from auditkit.cli import app

runner = CliRunner()
N_IMAGES = 300  # of the contaminated test split: enough for the bootstrap intervals, seconds to audit


@pytest.fixture(scope="module")
def patch_test_images():
    """(images uint8 (N, 28, 28), labels, masks 0/1 uint8) of decoy MNIST's contaminated test split."""
    from auditkit.data import open_dataset

    data = open_dataset("builtin:decoy-mnist", split="test", variant="contaminated")
    samples = [data[k] for k in range(N_IMAGES)]
    images = np.stack([np.round(s.image[0].numpy() * 255).astype(np.uint8) for s in samples])
    masks = np.stack([(s.mask[0].numpy() > 0.5).astype(np.uint8) for s in samples])
    labels = np.array([s.label for s in samples], dtype=np.int64)
    assert masks.max() == 1 and (masks.reshape(N_IMAGES, -1).sum(1) > 0).all()  # every image has its patch
    return images, labels, masks


def write_png_dataset(folder, images, labels, masks):
    folder.mkdir()
    rows = ["path,label,mask"]
    for k, (image, label, mask) in enumerate(zip(images, labels, masks)):
        assert cv2.imwrite(str(folder / f"{k}.png"), image) and cv2.imwrite(str(folder / f"{k}_mask.png"), mask)
        rows.append(f"{k}.png,{label},{k}_mask.png")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    (folder / "dataset.json").write_text(json.dumps({"classes": [str(c) for c in range(10)]}))
    return folder


def audit(checkpoint, data, tmp_path):
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["audit", str(checkpoint), "--data", str(data), "--fail-on-shortcut",
                                 "--methods", "gradient", "--json", str(out)])
    assert "Traceback" not in result.output, result.output
    return result, json.loads(out.read_text()) if out.is_file() else None


@pytest.mark.parametrize("form", ["png", "npz"])
def test_a_shortcut_model_audited_with_0_1_masks_is_reliant(decoy_mnist_models, patch_test_images, tmp_path, form):
    images, labels, masks = patch_test_images
    if form == "png":
        data = write_png_dataset(tmp_path / "data", images, labels, masks)
    else:
        data = tmp_path / "data.npz"
        # The first 300 test images hold classes 0-2 only: the archive names all ten, as a user's would.
        np.savez(data, images=images, labels=labels, masks=masks, classes=np.array([str(c) for c in range(10)]))
    checkpoint, accuracy = decoy_mnist_models["shortcut"]
    assert accuracy["permuted"] < accuracy["contaminated"] - 0.1  # the fixture's model does rely on the patch
    result, report = audit(checkpoint, data, tmp_path)
    assert result.exit_code == 1, result.output
    assert report["verdict"]["label"] == "reliant"
    deciding = {e["test"] for e in report["verdict"]["evidence"] if e["finding"] == "shows reliance"}
    assert deciding & {"swap_flip_rate", "removal_drop"}, report["verdict"]


def test_all_empty_masks_are_never_evidence_of_no_shortcut(decoy_mnist_models, patch_test_images, tmp_path):
    images, labels, masks = patch_test_images
    data = tmp_path / "data.npz"
    np.savez(data, images=images, labels=labels, masks=np.zeros_like(masks),
             classes=np.array([str(c) for c in range(10)]))
    checkpoint, _ = decoy_mnist_models["shortcut"]
    result, report = audit(checkpoint, data, tmp_path)
    assert result.exit_code == 3, result.output  # the gate cannot pass what it did not test
    assert report["verdict"]["label"] == "inconclusive"
    assert "are all empty" in report["verdict"]["summary"]
    assert result.output.strip().splitlines()[-1].startswith("error: --fail-on-shortcut: nothing was tested")


def test_a_split_holding_some_of_the_classes_is_reindexed_by_name():
    """Classes missing from a split: data that names three of a 10-class checkpoint's classes ("0", "2",
    "7", declared) is read as the model's classes 0, 2 and 7, never as indices 0, 1, 2. Numbers inferred
    from integer labels cannot say which classes they are: refused in one line naming the fix."""
    from auditkit.data.dataset import AuditDataset, DatasetInfo, Record
    from auditkit.data.readers import ORDER_DECLARED, ORDER_INDEX
    from auditkit.errors import DataError
    from auditkit.models import build_model
    from auditkit.training import align_dataset_to_model

    records = [Record(np.zeros((8, 8), np.uint8), label) for label in (0, 1, 2, 1)]
    declared = DatasetInfo(name="part", source="", classes=("0", "2", "7"),
                           class_order=ORDER_DECLARED.format("dataset.json"))
    model = build_model("tap-cnn", 10, 1, (8, 8))
    with pytest.warns(UserWarning, match="3 of the checkpoint's 10 classes"):
        aligned = align_dataset_to_model(AuditDataset(records, declared), model)
    assert aligned.classes == tuple(str(k) for k in range(10))
    assert [r.label for r in aligned.records] == [0, 2, 7, 2]
    named = build_model("tap-cnn", 3, 1, (8, 8), class_names=["cat", "dog", "owl"])
    with pytest.warns(UserWarning, match="2 of the checkpoint's 3 classes"):
        aligned = align_dataset_to_model(AuditDataset(records[:2], DatasetInfo("n", "", ("cat", "owl"))), named)
    assert [r.label for r in aligned.records] == [0, 2]
    inferred = DatasetInfo(name="part", source="", classes=("0", "1", "2"), class_order=ORDER_INDEX)
    with pytest.raises(DataError, match=r"are 3 of the checkpoint's 10 .* declare them all"):
        align_dataset_to_model(AuditDataset(records, inferred), model)
    # An .npz whose archive names its classes declares them: indices into ("0", "2", "7").
    import tempfile
    from pathlib import Path

    from auditkit.data import open_dataset

    with tempfile.TemporaryDirectory() as folder:
        archive = Path(folder) / "part.npz"
        np.savez(archive, images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 2, 1]),
                 classes=np.array(["0", "2", "7"]))
        with pytest.warns(UserWarning, match="3 of the checkpoint's 10 classes"):
            aligned = align_dataset_to_model(open_dataset(archive), model)
        assert [r.label for r in aligned.records] == [0, 2, 7, 2]
    other = AuditDataset(records[:1], DatasetInfo(name="other", source="", classes=("cat",)))
    with pytest.raises(DataError, match="do not match"):
        align_dataset_to_model(other, model)


def test_a_teacher_with_the_classes_in_another_order_is_refused():
    """TEA compares teacher and student outputs class by class: a teacher ordered differently would
    teach the wrong class without a word."""
    from auditkit.errors import ParameterError
    from auditkit.models import build_model
    from auditkit.repair.teacher import same_classes_as_student

    student = build_model("tap-cnn", 3, 1, (8, 8), class_names=["a", "b", "c"])
    same_classes_as_student(build_model("tap-cnn", 3, 1, (8, 8), class_names=["a", "b", "c"]), student)
    with pytest.raises(ParameterError, match="in another order"):
        same_classes_as_student(build_model("tap-cnn", 3, 1, (8, 8), class_names=["b", "a", "c"]), student)
    with pytest.raises(ParameterError, match="other classes"):
        same_classes_as_student(build_model("tap-cnn", 4, 1, (8, 8), class_names=["a", "b", "c", "d"]), student)


def test_a_model_that_predicts_one_class_is_never_cleared():
    """A constant model reads no signal: every behavioural test "clears" it, which proves nothing about
    this signal. Right value: inconclusive with that reason, never "not reliant" (exit 3 under the gate)."""
    import torch

    from auditkit.audit import AuditConfig, run_audit
    from auditkit.data import open_dataset
    from auditkit.models import build_model
    from auditkit.training import align_dataset_to_model

    data = open_dataset("builtin:decoy-digits", split="test")
    model = build_model("tap-cnn", 10, 1, tuple(data.image_size), class_names=list(data.classes)).eval()
    with torch.no_grad():
        model.net.fc.weight.zero_()
        model.net.fc.bias.copy_(torch.arange(10, dtype=torch.float32))  # always class '9'
    report = run_audit(model, align_dataset_to_model(data, model), AuditConfig(methods=(), bootstrap=200))
    assert report.verdict == "inconclusive"
    assert report.data["verdict"]["summary"].startswith("The model predicts '9' for every contaminated image")
    assert report.exit_code(True) == 3
