"""Issue 29, discovery: every limit that kept a strategy cluster from the causal test is stated (count,
value, flag) in discovery.json, the summary and the page; large regions are tested (a ruler covering a
fifth of the image was silently skipped under the old --max-area 0.1); "no shortcut found" is never
said while clusters went untested; an empty proposed mask is never written.

The model is built by hand (no training): a tap-cnn whose class-0 logit reads the top 7 rows of a 32x32
image and whose class-1 logit the bottom 7 rows, where each class has a bright bar (7 x 32 px: 22 % of
the image), beside a random blob the model ignores. The bar is the whole decision: a shortcut."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.data import AuditDataset, DatasetInfo, Record, open_dataset, write_dataset
from auditkit.discover import (
    NO_SHORTCUT,
    NOT_ALL_TESTED,
    SHORTCUT_FOUND,
    DiscoveryConfig,
    DiscoveryReport,
    proposed_dataset,
    real_masks,
    run_discovery,
)
from auditkit.discover.html import render_discovery_html
from auditkit.discover.regions import box_overlap, control_box, overlapping_control_box
from auditkit.discover.summary import print_discovery
from auditkit.errors import DataError
from auditkit.models import build_model, save_checkpoint

SIDE, BAR, PER_CLASS = 32, 7, 40
FAST = dict(bootstrap=200, probe_samples=80, seed=0)
LIMITS = {"min_cluster", "max_area", "boxed_members", "max_control_overlap", "max_clusters", "max_tested",
          "probe_samples"}


def bar_rows(label: int) -> slice:
    return slice(0, BAR) if label == 0 else slice(SIDE - BAR, SIDE)


def bars_dataset(seed: int = 0) -> AuditDataset:
    rng = np.random.default_rng(seed)
    records = []
    for k in range(2 * PER_CLASS):
        label = k % 2
        image = rng.random((SIDE, SIDE)) * 0.3  # dark noise: below the model's threshold
        top, left = rng.integers(10, 18), rng.integers(2, 24)
        image[top : top + 6, left : left + 6] = 0.9  # an object the model ignores
        image[bar_rows(label)] = 1.0
        records.append(Record(image.astype(np.float32), label, None, "original", "", "test"))
    return AuditDataset(records, DatasetInfo("bars", "synthetic", ("top", "bottom")), channels=1,
                        image_size=(SIDE, SIDE))


def bar_model():
    """Inputs are normalised with mean/std 0.5, so the dark noise maps below 0 and dies at the ReLU; the
    3x3 averaging convolutions spread the relevance over the bar (a one-pixel kernel would put it on the
    max-pool winners alone, 1 pixel in 16)."""
    model = build_model("tap-cnn", 2, 1, (SIDE, SIDE), class_names=("top", "bottom"))
    net = model.net
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.zero_()
        net.conv1[0].weight[0, 0] = 1.0 / 9
        net.conv2[0].weight[0, 0] = 1.0 / 9
        weights = net.fc.weight.view(2, 64, 7, 7)
        weights[0, 0, :2, :] = 1.0  # the top 7x7 cells cover input rows 0-11
        weights[1, 0, 5:, :] = 1.0
    return model.eval()


@pytest.fixture(scope="module")
def bars():
    return bars_dataset()


@pytest.fixture(scope="module")
def model():
    return bar_model()


@pytest.fixture(scope="module")
def default_run(model, bars):
    return run_discovery(model, bars, DiscoveryConfig(**FAST))


@pytest.fixture(scope="module")
def small_area_run(model, bars):
    return run_discovery(model, bars, DiscoveryConfig(max_area=0.1, **FAST))


def by_limit(doc: dict) -> dict:
    return {entry["limit"]: entry for entry in doc["limits"]}


def test_the_model_decides_by_the_bar_alone(model, bars):
    images = torch.stack([bars[k].image for k in range(len(bars))])
    labels = torch.tensor([r.label for r in bars.records])
    assert (model(images).argmax(1) == labels).all()
    swapped = images.clone()
    swapped[:, :, bar_rows(0)], swapped[:, :, bar_rows(1)] = images[:, :, bar_rows(1)], images[:, :, bar_rows(0)]
    assert (model(swapped).argmax(1) == 1 - labels).all()  # move the bar and the answer follows it


def test_a_ruler_covering_a_fifth_of_the_image_is_found_by_default(default_run, bars):
    doc = default_run.data
    assert doc["verdict"]["label"] == SHORTCUT_FOUND and doc["verdict"]["localised"], doc["verdict"]
    assert doc["verdict"]["complete"] and doc["skipped"] == []
    confirmed = [c for c in doc["clusters"] if c["shortcut"]]
    assert confirmed and all(c["box_area"] > 0.1 for c in confirmed)  # larger than the old limit
    assert by_limit(doc)["max_area"] == {**by_limit(doc)["max_area"], "value": 0.5, "clusters": 0, "images": 0}
    # Every image is masked, and the masks lie on its own bar.
    assert len(default_run.masks) == len(bars) and doc["masks"]["without_mask"] == 0
    for k, mask in default_run.masks.items():
        on_bar = mask[bar_rows(bars.records[k].label)].sum()
        assert mask.sum() > 0 and on_bar / mask.sum() >= 0.9, (k, on_bar, mask.sum())
    assert doc["recommendation"]["method"] == "auto"


def test_the_area_limit_is_stated_with_its_count_and_flag_and_never_called_no_shortcut(small_area_run, model, bars):
    doc = small_area_run.data
    clusters = len(doc["clusters"])
    assert doc["verdict"]["label"] == NOT_ALL_TESTED != NO_SHORTCUT
    assert not doc["verdict"]["complete"]
    summary = doc["verdict"]["summary"]
    assert summary.startswith("no shortcut among the tested candidates;") and "no shortcut found" not in summary
    assert f"{clusters} of {clusters} strategy clusters were not tested" in summary and "--max-area" in summary
    area = by_limit(doc)["max_area"]
    assert (area["flag"], area["value"], area["clusters"], area["images"], area["skips"]) == (
        "--max-area", 0.1, clusters, len(bars), True)
    largest = max(max(c["region_area"], c["box_area"] or 0) for c in doc["clusters"])
    assert largest <= area["lift"] <= largest + 0.01
    assert [s["limit"] for s in doc["skipped"]] == ["max_area"] * clusters
    assert sum(s["size"] for s in doc["skipped"]) == len(bars)
    assert f"--max-area {area['lift']:g}" in doc["recommendation"]["command"]
    assert not small_area_run.masks and doc["masks"]["images"] == 0 and doc["masks"]["without_mask"] == len(bars)
    json.loads(json.dumps(doc))
    # The rerun it names tests them and finds the bar.
    rerun = run_discovery(model, bars, DiscoveryConfig(max_area=area["lift"], **FAST))
    assert rerun.data["verdict"]["label"] == SHORTCUT_FOUND and rerun.data["verdict"]["complete"]


def test_small_clusters_are_listed_as_untested_with_the_flag_that_lifts_them(model, bars):
    doc = run_discovery(model, bars, DiscoveryConfig(min_cluster=PER_CLASS + 1, **FAST)).data
    small = by_limit(doc)["min_cluster"]
    sizes = [c["size"] for c in doc["clusters"]]
    assert (small["flag"], small["value"], small["clusters"], small["images"]) == (
        "--min-cluster", PER_CLASS + 1, len(sizes), len(bars))
    assert small["lift"] == min(sizes)
    assert doc["verdict"]["label"] == NOT_ALL_TESTED and f"--min-cluster {min(sizes)}" in doc["verdict"]["summary"]


def test_every_limit_is_listed_with_what_it_did(model, bars):
    doc = run_discovery(model, bars, DiscoveryConfig(max_tested=15, probe_samples=50, bootstrap=200)).data
    limits = by_limit(doc)
    assert set(limits) == LIMITS
    for name, entry in limits.items():
        assert entry["value"] == doc["config"][name if name != "boxed_members" else "min_cluster"]
        assert entry["flag"] == (None if name == "max_control_overlap" else
                                 "--min-cluster" if name == "boxed_members" else "--" + name.replace("_", "-"))
    tested = [c for c in doc["clusters"] if c["candidate"]]
    over = [c for c in tested if c["test"]["boxed_images"] > 15]
    assert over and limits["max_tested"]["clusters"] == len(over)
    assert limits["max_tested"]["images"] == sum(c["test"]["boxed_images"] - 15 for c in over)
    assert all(c["test"]["images"] == min(15, c["test"]["boxed_images"]) for c in tested)
    assert limits["probe_samples"]["images"] == len(bars) - 50 and limits["probe_samples"]["lift"] == len(bars)
    assert not limits["max_tested"]["skips"] and not limits["probe_samples"]["skips"]  # samples, not skips
    assert doc["verdict"]["label"] == SHORTCUT_FOUND and doc["verdict"]["complete"]


def test_summary_and_page_state_the_limits(small_area_run):
    console = Console(record=True, width=250)
    print_discovery(small_area_run.data, console)
    text = console.export_text()
    assert "NO SHORTCUT AMONG THE TESTED CANDIDATES" in text and "NO SHORTCUT FOUND" not in text
    assert "not tested:" in text and "by --max-area 0.1" in text and "lifts it" in text
    page = render_discovery_html(small_area_run.data)
    assert "<h2>Limits</h2>" in page and "Not tested:" in page and "--max-area" in page
    assert "verdict inconclusive" in page and "no shortcut found" not in page


def test_a_box_without_room_for_a_disjoint_control_gets_the_least_overlapping_one():
    distribution = np.zeros((13, 13))
    box = (3, 3, 7, 7)  # taller and wider than half the image: no disjoint place for a 7x7 control
    assert control_box(distribution, box) is None
    control, shared = overlapping_control_box(distribution, box)
    assert control == (0, 0, 7, 7) and shared == pytest.approx(16 / 49)  # rows 3-6 x cols 3-6 shared
    assert box_overlap(control, box) == pytest.approx(shared)
    assert overlapping_control_box(distribution, box, max_overlap=0.3) is None
    distribution[12, 12] = 1.0  # four corners share the fewest pixels: the most relevant of them
    assert overlapping_control_box(distribution, box) == ((6, 6, 7, 7), pytest.approx(16 / 49))
    assert overlapping_control_box(distribution, (0, 0, 13, 13)) is None  # the whole image: nothing else


def test_empty_proposed_masks_are_never_masks(bars):
    full = np.zeros((SIDE, SIDE), np.float32)
    full[:BAR] = 1.0
    kept, dropped = real_masks({0: np.zeros((SIDE, SIDE), np.float32), 2: full, 4: np.full((SIDE, SIDE), 0.4)})
    assert sorted(kept) == [2] and dropped == 2
    report = DiscoveryReport({}, {0: np.zeros((SIDE, SIDE), np.float32), 2: full})
    data = proposed_dataset(bars, report)
    assert [k for k, r in enumerate(data.records) if r.mask is not None] == [2]
    assert torch.equal(data[2].mask[0], torch.from_numpy(full))
    with pytest.raises(DataError, match="does not fit this data"):
        proposed_dataset(bars, DiscoveryReport({}, {1: np.ones((8, 8), np.float32)}))


def test_cli_states_the_limit_then_finds_the_ruler_when_it_is_lifted(model, bars, tmp_path):
    checkpoint = save_checkpoint(model, tmp_path / "bars.safetensors")
    write_dataset(bars, tmp_path / "images")
    runner = CliRunner()
    common = [str(checkpoint), "--data", str(tmp_path / "images"), "--quiet", "--probe-samples", "80"]
    limited = runner.invoke(app, ["discover", *common, "--out", str(tmp_path / "limited"), "--max-area", "0.1",
                                  "--fail-on-shortcut"])
    # A gate cannot pass what it did not test: exit 3, and the last line names the limit and its flag.
    assert limited.exit_code == 3, limited.output
    assert limited.output.strip().splitlines()[-1].startswith("error: --fail-on-shortcut: ")
    assert "--max-area" in limited.output.strip().splitlines()[-1]
    output = " ".join(limited.output.split())
    assert "NO SHORTCUT AMONG THE TESTED CANDIDATES" in output and "NO SHORTCUT FOUND" not in output
    assert "were not tested because" in output and "--max-area" in output
    assert f"0 proposed masks; {len(bars)} images have no proposed region" in output
    doc = json.loads((tmp_path / "limited" / "discovery.json").read_text())
    assert by_limit(doc)["max_area"]["clusters"] == len(doc["clusters"]) == len(doc["skipped"])
    assert not open_dataset(str(tmp_path / "limited")).has_masks  # no empty mask written for anyone
    found = runner.invoke(app, ["discover", *common, "--out", str(tmp_path / "found"), "--fail-on-shortcut"])
    assert found.exit_code == 1, found.output
    data = open_dataset(str(tmp_path / "found"))
    masks = [data[k].mask for k in range(len(data))]
    assert all(m is not None and m.sum() > 0 for m in masks)
    assert bad_flag_is_one_line(runner, common + ["--out", str(tmp_path / "bad"), "--min-cluster", "0"])


def bad_flag_is_one_line(runner, args) -> bool:
    result = runner.invoke(app, ["discover", *args])
    return result.exit_code == 2 and "--min-cluster" in result.output and "Traceback" not in result.output
