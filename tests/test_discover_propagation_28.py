"""Issue 28, item 2: discovery masks every image that carries a confirmed artefact, not only the members of
the strategy clusters that revealed it, and says how many carry it and at what match score; a global
shortcut (coloured backgrounds) stays global, with no mask.

The marker model is a tap-cnn trained for two epochs on the built-in marker MNIST (a class-coded bar on
the left border in 90 % of the images: the unmarked tenth is the false-mask yardstick); discovery runs on
500 of its test images with masks withheld. The colour model is built by hand (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch

import auditkit
from auditkit.data import AuditDataset, DatasetInfo, Record, open_dataset
from auditkit.discover import DiscoveryConfig, box_iou, run_discovery
from auditkit.discover.propagate import Template, build_templates, find_matches, ncc_windows
from auditkit.errors import ParameterError
from auditkit.models import build_model

FAST = dict(bootstrap=200, probe_samples=200, seed=0)
TEST_IMAGES = 500
SCHEMA = json.loads((Path(auditkit.__file__).parent / "discover" / "discovery.schema.json").read_text())


def _stripped(dataset: AuditDataset) -> AuditDataset:
    return AuditDataset([Record(r.image, r.label, None, r.variant, r.group, r.split) for r in dataset.records],
                        dataset.info, channels=dataset.channels, image_size=dataset.image_size)


@pytest.fixture(scope="module")
def marker_run():
    from auditkit.training import TrainConfig, train_model

    data = open_dataset("builtin:marker-mnist")
    model = train_model(data, "tap-cnn", TrainConfig(epochs=2, seed=0), variant="contaminated", val_split=None).model
    truth = data.select(split="test", variant="contaminated").select(indices=list(range(TEST_IMAGES)))
    return run_discovery(model, _stripped(truth), DiscoveryConfig(**FAST)), truth


def _coverage(report, truth) -> tuple[float, float, int]:
    """(share of marked images masked with IoU >= 0.5, share of unmarked images masked, unmarked count)."""
    marked, unmarked = [], []
    for k in range(len(truth)):
        mask = truth[k].mask
        (marked if mask is not None and (mask > 0.5).any() else unmarked).append(k)
    good = sum(k in report.masks and box_iou(report.masks[k], truth[k].mask[0].numpy()) >= 0.5 for k in marked)
    return good / len(marked), sum(k in report.masks for k in unmarked) / len(unmarked), len(unmarked)


def test_a_confirmed_marker_is_masked_on_every_image_that_carries_it(marker_run):
    report, truth = marker_run
    doc = report.data
    assert doc["verdict"]["localised"], doc["verdict"]
    coverage, false_rate, unmarked = _coverage(report, truth)
    assert unmarked >= 20
    assert coverage >= 0.80, f"{coverage:.3f} of the marked images masked with IoU >= 0.5"
    assert false_rate <= 0.05, f"{false_rate:.3f} of the unmarked images masked"
    propagation = doc["propagation"]
    # More than the confirming clusters' members: the point of propagating.
    assert propagation["beyond_clusters"] > 0 and propagation["images"] == len(report.masks)
    assert propagation["in_clusters"] + propagation["beyond_clusters"] == propagation["images"]
    assert propagation["score"]["min"] >= propagation["threshold"] == 0.9
    assert f"{propagation['images']} of {TEST_IMAGES} images carry the artefact" in doc["verdict"]["summary"]
    assert sum(c["masked"] for c in doc["clusters"]) == len(report.masks)  # every mask is some cluster's member
    jsonschema.validate(json.loads(json.dumps(doc)), SCHEMA)


def test_a_global_colour_shortcut_stays_global_with_no_mask():
    """A hand-built colour reader: class 0 = red background, class 1 = green, a grey blob the model ignores."""
    side, n = 16, 60
    rng = np.random.default_rng(0)
    records = []
    for k in range(n):
        label = k % 2
        image = rng.random((3, side, side)).astype(np.float32) * 0.2
        image[label] += 0.7  # the background colour gives the class
        top, left = rng.integers(3, 9, size=2)
        image[:, top : top + 5, left : left + 5] = 0.5
        records.append(Record(image.transpose(1, 2, 0), label, None, "original", "", "test"))
    data = AuditDataset(records, DatasetInfo("colours", "synthetic", ("red", "green")), channels=3,
                        image_size=(side, side))
    model = build_model("tap-cnn", 2, 3, (side, side), class_names=("red", "green"))
    net = model.net
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.zero_()
        for channel in (0, 1):
            net.conv1[0].weight[channel, channel] = 1.0 / 9
            net.conv2[0].weight[channel, channel] = 1.0 / 9
        weights = net.fc.weight.view(2, 64, 7, 7)
        weights[0, 0], weights[1, 1] = 1.0, 1.0
    model.eval()
    report = run_discovery(model, data, DiscoveryConfig(**FAST))
    doc = report.data
    assert doc["verdict"]["global"] and not doc["verdict"]["localised"], doc["verdict"]
    assert not report.masks and doc["masks"]["images"] == 0 and doc["propagation"] is None
    assert doc["recommendation"]["method"] == "tea"
    jsonschema.validate(json.loads(json.dumps(doc)), SCHEMA)


# ---- pieces ---------------------------------------------------------------------------------------


def test_ncc_is_blind_to_brightness_and_scores_flat_windows_zero():
    template = torch.zeros(1, 4, 4)
    template[:, 1:3, 1:3] = 0.9  # a patch with its context ring
    images = torch.zeros(3, 1, 10, 10)
    images[0, :, 3:5, 3:5] = 0.9
    images[1, :, 6:8, 2:4] = 0.15  # the same patch, darker: NCC does not care
    score, spread = ncc_windows(images, template)
    assert score[0, 2, 2] == pytest.approx(1.0, abs=1e-5) and score[1, 5, 1] == pytest.approx(1.0, abs=1e-5)
    assert score[2].abs().max() == 0 and spread[2].max() == 0  # a flat image matches nowhere


def test_templates_of_the_same_artefact_are_one_and_matches_need_contrast():
    images = torch.zeros(8, 1, 12, 12)
    images[:, :, 2:7, 0] = 1.0  # a bar on the left border
    rows = [{"shortcut": True, "number": n, "boxes": {p: (2, 0, 5, 1) for p in range(4 * n, 4 * n + 4)}}
            for n in (0, 1)]
    templates = build_templates(lambda positions: images[list(positions)], rows, (12, 12), 1, 0.9)
    assert len(templates) == 1 and templates[0].clusters == [0, 1] and templates[0].members == 8
    probe = torch.zeros(3, 1, 12, 12)
    probe[0, :, 6:11, 0] = 1.0  # the bar, lower: found where it is
    probe[1, :, 6:11, 0] = 0.02  # a trace of it: too faint to count at contrast 0.1
    probe[2, :, :, 5:8] = 1.0  # a thick stroke: no context ring of its own
    matches = find_matches(probe, templates, (12, 12), 1, threshold=0.9, contrast=0.1)
    assert matches[0] is not None and matches[0].box == (6, 0, 5, 1) and matches[0].score > 0.99
    assert matches[1] is None and matches[2] is None
    assert isinstance(templates[0], Template)


def test_match_settings_are_checked():
    with pytest.raises(ParameterError, match="match_margin"):
        DiscoveryConfig(match_margin=0).validate()
    with pytest.raises(ParameterError, match="match_threshold"):
        DiscoveryConfig(match_threshold=0).validate()
