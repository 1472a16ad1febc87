"""Discovery (auditkit.discover, `auditkit discover`): SpRAy clusters, candidate regions, the causal test
against a control, global probes, proposed masks, and the CLI flow discover -> repair -> audit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.data import AuditDataset, Record, open_dataset
from auditkit.discover import (
    PROBES,
    DiscoveryConfig,
    box_iou,
    eigengap_count,
    proposed_dataset,
    run_discovery,
    run_probes,
    strategy_clusters,
)
from auditkit.discover.causal import dispersion, paste_box
from auditkit.discover.regions import control_box, proposed_box, scale_box, top_region
from auditkit.discover.spray import affinity, relevance_distribution
from auditkit.models import load_checkpoint

# ---- pieces -------------------------------------------------------------------------------------


def test_eigengap_counts_the_blocks_of_a_block_diagonal_affinity():
    for blocks in (1, 2, 3, 5):
        weights = np.kron(np.eye(blocks), np.ones((6, 6))) - np.eye(6 * blocks)
        assert eigengap_count(weights, max_clusters=8)[0] == blocks


def test_spray_splits_a_class_by_where_its_relevance_lies():
    """Two strategies in one class (relevance in the top-left or the bottom-right corner, with noise),
    one in another: three clusters, each pure."""
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.random((90, 16, 16)) * 0.05)
    maps[:30, :4, :4] += 1.0
    maps[30:60, -4:, -4:] += 1.0
    maps[60:, 6:10, 6:10] += 1.0
    labels = np.array([0] * 60 + [1] * 30)
    clusters = strategy_clusters(relevance_distribution(maps), labels, seed=0)
    assert sorted((c.label, len(c.members)) for c in clusters) == [(0, 30), (0, 30), (1, 30)]
    for c in clusters:
        assert len({int(m) // 30 for m in c.members}) == 1


def test_relevance_distribution_sums_to_one_and_handles_maps_without_positive_relevance():
    maps = torch.zeros(2, 4, 4)
    maps[0, 1, 1] = 3.0
    maps[0, 2, 2] = -5.0
    out = relevance_distribution(maps)
    assert torch.allclose(out.sum(dim=(1, 2)), torch.ones(2, dtype=out.dtype))
    assert out[0, 1, 1] == 1.0 and out[0, 2, 2] == 0.0
    assert torch.allclose(out[1], torch.full((4, 4), 1 / 16, dtype=out.dtype))


def test_affinity_is_symmetric_without_self_loops():
    features = np.random.default_rng(1).random((20, 5))
    weights = affinity(features, 4)
    assert np.array_equal(weights, weights.T) and not np.diag(weights).any()
    assert (weights.sum(1) >= 4).all()


def test_top_region_is_the_fewest_pixels_holding_the_mass():
    distribution = np.zeros((4, 4))
    distribution[0, 0], distribution[0, 1], distribution[3, 3] = 0.5, 0.3, 0.2
    assert top_region(distribution, 0.5).sum() == 1
    assert top_region(distribution, 0.7).sum() == 2
    assert top_region(distribution, 1.0)[3, 3]


def test_proposed_box_boxes_the_strong_pixels_inside_the_region():
    distribution = np.zeros((12, 12))
    distribution[1:4, 8:11] = 1.0  # the artefact, 3x3
    distribution[9, 1] = 5.0  # strong relevance outside the region: ignored
    region = np.zeros((12, 12), bool)
    region[0:5, 7:12] = True
    assert proposed_box(distribution, region) == (1, 8, 3, 3)
    assert proposed_box(np.zeros((12, 12)), region) is None
    stripe = np.zeros((12, 12))  # a one-pixel stripe lit at every other row: boxed whole
    stripe[[0, 2, 4, 6, 8, 10, 11], 10] = 1.0
    column = np.zeros((12, 12), bool)
    column[:, 10] = True
    assert proposed_box(stripe, column) == (0, 10, 12, 1)
    apart = np.zeros((12, 12))  # a second relevant spot in the region, not connected: left out
    apart[1:3, 1:3], apart[9, 9] = 1.0, 0.8
    assert proposed_box(apart, np.ones((12, 12), bool)) == (1, 1, 2, 2)


def test_control_box_has_the_same_size_keeps_away_and_seeks_relevance():
    distribution = np.zeros((12, 12))
    distribution[1:4, 8:11] = 1.0
    distribution[8:11, 2:5] = 0.5
    box = (1, 8, 3, 3)
    assert control_box(distribution, box) == (8, 2, 3, 3)
    top, left, h, w = control_box(np.zeros((12, 12)), box)
    assert (h, w) == (3, 3)
    assert top + h < 1 - 1 + 1 or top > 1 + 3 or left + w < 8 or left > 8 + 3  # at least one pixel apart
    assert control_box(np.zeros((4, 4)), (0, 0, 4, 4)) is None
    # The rest of the same artefact (inside the cluster's region) is no control.
    stripe = np.zeros((12, 12))
    stripe[:, 10] = 1.0
    stripe[6, 2] = 0.5
    column = np.zeros((12, 12), bool)
    column[:, 10] = True
    top, left, _, _ = control_box(stripe, (0, 10, 3, 1), avoid=column)
    assert left == 2 and top <= 6 < top + 3  # on the most relevant pixel outside the region


def test_scale_box_rounds_outwards_and_stays_inside():
    assert scale_box((1, 2, 3, 4), (10, 10), (20, 20)) == (2, 4, 6, 8)
    assert scale_box((7, 7, 3, 3), (10, 10), (15, 15)) == (10, 10, 5, 5)
    top, left, h, w = scale_box((9, 9, 1, 1), (10, 10), (15, 15))
    assert top + h <= 15 and left + w <= 15


def test_dispersion_is_zero_for_a_repeated_stamp_and_large_for_varying_content():
    rng = np.random.default_rng(2)
    images = torch.from_numpy(rng.random((10, 1, 12, 12))).float()
    images[:, :, 0:3, 0:3] = 0.7
    assert dispersion(images, [(0, 0, 3, 3)] * 10) == pytest.approx(0.0, abs=1e-6)
    assert dispersion(images, [(6, 6, 3, 3)] * 10) > 0.15


def test_paste_box_moves_and_resizes_the_donor_region():
    image, donor = torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)
    donor[:, 0:2, 0:2] = 1.0
    out = paste_box(image, (4, 4, 4, 4), donor, (0, 0, 2, 2))
    assert out[:, 4:8, 4:8].eq(1.0).all() and out.sum() == 16 and image.sum() == 0


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_probe_edits_keep_shape_and_range(probe):
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = probe.edit(x, 0)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, x)


def test_probe_edits_do_what_they_say():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    grey = PROBES[0].edit(x, 0)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    from auditkit.discover.probes import hue_rotation, patch_shuffle

    assert torch.allclose(hue_rotation(x, 0, degrees=0.0), x, atol=1e-6)
    assert torch.allclose(hue_rotation(x, 0, degrees=360.0), x, atol=1e-5)
    shuffled = patch_shuffle(x, 3)
    assert torch.equal(shuffled.flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # a permutation of tiles


def _colour_images(n=400, seed=0):
    """Classes 0/1: a red or a green background behind a random blob; a colour reader and a shape reader."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    x = torch.from_numpy(rng.random((n, 3, 16, 16)) * 0.2).float()
    x[labels == 0, 0] += 0.6
    x[labels == 1, 1] += 0.6
    return x, labels


def test_probes_point_at_colour_for_a_colour_reader_and_not_for_a_model_blind_to_colour():
    x, labels = _colour_images()

    def colour_reader(edit):
        edited = x if edit is None else edit(x, 0)
        return (edited[:, 1].mean((1, 2)) > edited[:, 0].mean((1, 2))).long().numpy()

    rng = np.random.default_rng(3)
    blind = rng.integers(0, 2, len(labels))
    blind = np.where(rng.random(len(labels)) < 0.9, labels, blind)  # 90 % right whatever the edit

    rows = run_probes(colour_reader, labels, colour_reader(None), 2, channels=3, seed=0, resamples=200, confidence=0.95)
    by_name = {r["probe"]: r for r in rows}
    assert by_name["channel_permutation"]["points_at"] == "colour"
    assert by_name["hue_rotation"]["points_at"] == "colour"
    assert by_name["patch_shuffle"]["points_at"] is not None  # colour survives shuffling
    rows = run_probes(lambda edit: blind, labels, blind, 2, channels=3, seed=0, resamples=200, confidence=0.95)
    assert all(r["points_at"] is None for r in rows if r["probe"] != "patch_shuffle")
    rows = run_probes(colour_reader, labels, colour_reader(None), 2, channels=1, seed=0, resamples=200, confidence=0.95)
    assert [r["applicable"] for r in rows[:3]] == [False, False, False]


# ---- on decoy MNIST, as a user would -------------------------------------------------------------


def _without_annotations(dataset: AuditDataset) -> AuditDataset:
    """The contaminated images and labels alone: masks and the other variants withheld."""
    sub = dataset.select(variant="contaminated")
    return AuditDataset([Record(r.image, r.label, None, r.variant, r.group, r.split) for r in sub.records], sub.info,
                        channels=sub.channels, image_size=sub.image_size)


@pytest.fixture(scope="module")
def decoy():
    return open_dataset("builtin:decoy-mnist")


@pytest.fixture(scope="module")
def shortcut_discovery(decoy_mnist_models, decoy):
    model = load_checkpoint(decoy_mnist_models["shortcut"][0])
    return run_discovery(model, _without_annotations(decoy), data_spec="decoy"), decoy.select(variant="contaminated")


def test_discovery_finds_the_decoy_patch_and_proposes_masks_on_it(shortcut_discovery):
    report, truth = shortcut_discovery
    doc = report.data
    assert doc["verdict"]["label"] == "shortcut found" and doc["verdict"]["localised"]
    assert doc["recommendation"]["method"] == "auto"
    assert "--method auto" in doc["recommendation"]["command"]
    confirmed = [c for c in doc["clusters"] if c["shortcut"]]
    assert confirmed and all(c["test"]["dispersion"]["candidate"] <= 0.05 for c in confirmed)
    ious = np.array([box_iou(mask, truth[k].mask[0].numpy()) for k, mask in report.masks.items()])
    assert len(ious) >= 100
    assert (ious >= 0.5).mean() >= 0.8, f"IoU >= 0.5 on {(ious >= 0.5).mean():.2f} of the masked images"
    json.dumps(doc)  # the document is JSON


def test_discovery_reports_no_shortcut_for_the_clean_model(decoy_mnist_models, decoy):
    model = load_checkpoint(decoy_mnist_models["clean"][0])
    clean = decoy.select(variant="clean")
    stripped = AuditDataset([Record(r.image, r.label, None, r.variant, r.group, r.split) for r in clean.records],
                            clean.info, channels=clean.channels, image_size=clean.image_size)
    report = run_discovery(model, stripped)
    assert report.data["verdict"]["label"] == "no shortcut found", report.data["verdict"]
    assert report.data["recommendation"]["method"] == "none" and not report.masks


def test_proposed_dataset_keeps_records_and_adds_the_masks(shortcut_discovery, decoy):
    report, _ = shortcut_discovery
    data = proposed_dataset(_without_annotations(decoy), report)
    masked = [k for k, r in enumerate(data.records) if r.mask is not None]
    assert sorted(masked) == sorted(report.masks)
    k = masked[0]
    assert torch.equal(data[k].mask[0], torch.from_numpy(report.masks[k]))
    assert data.info.mask_meaning == "spurious" and not data.info.generator


def test_discovery_leaves_the_model_untouched_and_checks_its_input(decoy_mnist_models, decoy):
    from auditkit.discover import DiscoveryConfig
    from auditkit.errors import AuditkitError, ParameterError

    model = load_checkpoint(decoy_mnist_models["shortcut"][0]).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = _without_annotations(decoy.select(split="val"))
    run_discovery(model, small, DiscoveryConfig(probe_samples=50, bootstrap=50))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(AuditkitError, match="no samples"):
        run_discovery(model, small.select(indices=[]))
    with pytest.raises(ParameterError, match="max_area"):
        run_discovery(model, small, DiscoveryConfig(max_area=0))


def test_cli_discover_then_repair_then_audit_without_any_annotation(decoy_mnist_models, decoy, tmp_path):
    """Done-when of the discovery issue, from the CLI alone: masks and variants withheld; discover;
    repair with the discovered masks; the audit of the repaired model on the discovered data says
    not reliant, and on the full built-in data the repair holds permuted and clean accuracy >= 0.90."""
    from auditkit.data import write_dataset
    from auditkit.training import evaluate

    source = tmp_path / "images"
    write_dataset(_without_annotations(decoy), source)
    checkpoint = decoy_mnist_models["shortcut"][0]
    runner = CliRunner()
    found = runner.invoke(app, ["discover", str(checkpoint), "--data", str(source), "--out", str(tmp_path / "found"),
                                "--quiet", "--fail-on-shortcut"])
    assert found.exit_code == 1, found.output  # a shortcut was found
    assert "auditkit repair" in found.output
    doc = json.loads((tmp_path / "found" / "discovery.json").read_text())
    assert doc["schema"] == "auditkit.discover/1" and doc["recommendation"]["method"] == "auto"
    assert "data:image/png;base64," in (tmp_path / "found" / "discovery.html").read_text()
    page = runner.invoke(app, ["report", str(tmp_path / "found" / "discovery.json"), "--out", str(tmp_path / "d.html")])
    assert page.exit_code == 0 and "Shortcut discovery" in (tmp_path / "d.html").read_text()  # re-rendered from JSON
    again = runner.invoke(app, ["discover", str(checkpoint), "--data", str(source), "--out", str(tmp_path / "found")])
    assert again.exit_code == 2 and "already exists" in again.output  # nothing the user owns is overwritten

    found_data = open_dataset(str(tmp_path / "found"))
    assert found_data.has_masks and set(found_data.splits) == {"train", "val", "test"}
    repaired = tmp_path / "repaired.safetensors"
    result = runner.invoke(app, ["repair", str(checkpoint), "--data", str(tmp_path / "found"), "--method", "tap",
                                 "--out", str(repaired), "--quiet", "--fail-on-shortcut"])
    assert result.exit_code == 0, result.output
    audit = runner.invoke(app, ["audit", str(repaired), "--data", str(tmp_path / "found"), "--split", "val", "--quiet",
                                "--json", "-", "--fail-on-shortcut"])
    assert audit.exit_code == 0, audit.output
    assert json.loads(audit.output[audit.output.index("{"):])["verdict"]["label"] == "not reliant"
    accuracy = {k: v.accuracy for k, v in evaluate(load_checkpoint(repaired), decoy.select(split="test")).items()
                if k in ("contaminated", "permuted", "clean")}
    assert accuracy["permuted"] >= 0.90 and accuracy["clean"] >= 0.90, accuracy


def test_audit_discovers_when_the_data_has_no_masks_and_no_variants(decoy_mnist_models, decoy, tmp_path):
    from auditkit.data import write_dataset

    source = tmp_path / "images"
    write_dataset(_without_annotations(decoy.select(split="test")), source)
    result = CliRunner().invoke(app, ["audit", str(decoy_mnist_models["shortcut"][0]), "--data", str(source), "--quiet",
                                      "--report-dir", str(tmp_path / "report"), "--fail-on-shortcut"])
    assert "running discovery" in result.output
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    assert doc["schema"] == "auditkit.discover/1"
    found, complete = doc["verdict"]["label"] == "shortcut found", doc["verdict"].get("complete", True)
    assert result.exit_code == (1 if found else 0 if complete else 3)
    assert "inconclusive" not in doc["verdict"]["label"]


def test_no_probe_changes_the_images_it_edits():
    # Discovery decodes the probed images once and hands the same batch to every probe.
    from auditkit.discover.probes import PROBES

    torch.manual_seed(0)
    for channels in (1, 3):
        images = torch.rand(4, channels, 28, 28)
        before = images.clone()
        for probe in PROBES:
            if probe.needs_colour and channels != 3:
                continue
            edited = probe.edit(images, 0)
            assert edited.shape == images.shape and not edited.data_ptr() == images.data_ptr(), probe.name
            assert torch.equal(images, before), probe.name


def test_discovery_finds_the_global_colour_shortcut_of_coloured_mnist_and_recommends_tea():
    # Seed 004's coloured MNIST: the background colour gives the class in 95 % of the training images.
    # No region is to blame, so the probes must find it, and the repair must be TEA (no masks).
    from auditkit.training import TrainConfig, train_model

    data = open_dataset("builtin:colored-mnist")
    model = train_model(data, "tap-cnn", TrainConfig(epochs=2, seed=0), variant="contaminated", val_split=None).model
    test = _without_annotations(data.select(split="test"))
    report = run_discovery(model, test, DiscoveryConfig(bootstrap=300, seed=0))
    doc = report.data
    probes = {p["probe"]: p for p in doc["probes"]}
    assert probes["channel_permutation"]["points_at"] == "colour", probes["channel_permutation"]["rule"]
    assert doc["verdict"]["label"] == "shortcut found" and not doc["verdict"]["localised"], doc["verdict"]
    assert doc["recommendation"]["method"] == "tea" and "--method tea" in doc["recommendation"]["command"]
    assert not report.masks  # nothing local to mask
    assert set(doc["timings"]) == {"relevance_pass", "clustering", "causal_tests", "probes", "propagation", "report"}
    assert doc["propagation"] is None  # nothing local was confirmed, so nothing is propagated
