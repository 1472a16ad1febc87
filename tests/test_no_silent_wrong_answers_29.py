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
        np.savez(data, images=images, labels=labels, masks=masks)
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
    np.savez(data, images=images, labels=labels, masks=np.zeros_like(masks))
    checkpoint, _ = decoy_mnist_models["shortcut"]
    result, report = audit(checkpoint, data, tmp_path)
    assert result.exit_code != 0, result.output  # the gate cannot pass what it did not test
    if report is not None:
        assert report["verdict"]["label"] != "not reliant"
        assert "empty" in json.dumps(report["verdict"]).lower()
