"""Repairs that prove themselves (issue 17): TAP's dilation schedules and the receptive fields they
come from, the marker contamination, the λ × dilation sweep, --fail-on-shortcut, --method auto and
`reproduce kinds`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.data import make_contamination, open_dataset
from auditkit.models import build_model, save_checkpoint
from auditkit.models.presets import receptive_fields
from auditkit.ops.dilation import kernel_sizes
from auditkit.repair import METHODS, RepairConfig, decision_audit, run_repair
from auditkit.reproduce import Reproduction, kinds_markdown
from auditkit.training import TrainConfig, evaluate, train_model

from .conftest import train_digits_model
from .test_cli_data_train import error_line
from .test_report_schemas import validate_repair_document


def last_line(result) -> str:
    """The verdict line a command that ran printed after its report (no traceback)."""
    assert "Traceback" not in result.output
    return result.output.strip().splitlines()[-1]

runner = CliRunner()


# ---- receptive fields and dilation schedules -----------------------------------------------------


def test_receptive_fields_of_known_networks():
    # TAP CNN: conv 3x3 (r = 3); pool 2 (r = 4, step 2); conv 3x3 (r = 4 + 2*2 = 8).
    cnn = build_model("tap-cnn", 10, 1, (28, 28))
    assert receptive_fields(cnn, ["net.conv1", "net.conv2"], 1, 28) == [3.0, 8.0]
    # ResNet-18's stage outputs: 43, 99, 211 and 435 px (Araujo et al. 2019 give 435 for the last).
    resnet = build_model("resnet18", 10, 3, (64, 64))
    assert receptive_fields(resnet, list(resnet.meta.target_layers), 3, 64) == [43.0, 99.0, 211.0, 435.0]
    # A dilated convolution counts its dilation.
    chain = nn.Sequential(nn.Conv2d(1, 2, 3, dilation=2, padding=2), nn.Conv2d(2, 2, 5, stride=2), nn.Conv2d(2, 2, 3))
    assert receptive_fields(chain, ["0", "1", "2"], 1, 32) == [5.0, 9.0, 13.0]


def test_dilation_schedules_give_the_documented_kernel_sizes():
    cnn_sizes, fields = [(28, 28), (14, 14)], [3.0, 8.0]
    assert kernel_sizes("fixed", 3, (28, 28), cnn_sizes) == [3, 3]
    # The authors' code: no max pool before the first layer (same resolution as the input), then a
    # 3x3 at 28x28 before averaging to 14x14.
    assert kernel_sizes("cumulative", 3, (28, 28), cnn_sizes) == [1, 3]
    # A conv2 cell (2 px) sees (8 - 2) / 2 = 3 px beyond itself: k = 7.
    assert kernel_sizes("receptive", 3, (28, 28), cnn_sizes, fields) == [3, 7]
    # ResNet-18 at 224: 3x3 windows at 224, 56, 28 and 14 px resolution, cumulated.
    resnet = [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert kernel_sizes("cumulative", 3, (224, 224), resnet) == [3, 11, 27, 59]
    # Wider than 2 max(H, W) - 1 changes nothing, so it is clipped; given order is kept.
    at_64 = [(2, 2), (4, 4), (8, 8), (16, 16)]
    assert kernel_sizes("receptive", 3, (64, 64), at_64, [435.0, 211.0, 99.0, 43.0]) == [127, 127, 93, 41]
    with pytest.raises(ValueError, match="must be one of fixed, cumulative, receptive or auto"):
        kernel_sizes("wide", 3, (28, 28), cnn_sizes)
    # auto (the default): receptive where the receptive fields fit in the image, else fixed (the
    # cumulative scheme destroyed ResNet-18 on the stripe data: docs/repair.md).
    assert kernel_sizes("auto", 3, (28, 28), cnn_sizes, fields) == [3, 7]
    auto = kernel_sizes("auto", 3, (64, 64), at_64, [435.0, 211.0, 99.0, 43.0])
    assert auto == kernel_sizes("fixed", 3, (64, 64), at_64) == [3, 3, 3, 3]


def test_tap_objective_uses_the_schedule(tmp_path):
    from auditkit.data import collate

    model = build_model("tap-cnn", 10, 1, (28, 28))
    spec = METHODS["tap"]
    objective = spec.build(model, spec.make_options({"dilation": "receptive"}), None)
    assert objective.kernel_sizes_for((28, 28), [(28, 28), (14, 14)]) == [3, 7]
    data = open_dataset("builtin:marker-mnist").select(split="train", variant="contaminated").select(indices=range(8))
    batch = collate([data[k] for k in range(8)])
    _, loss = objective.forward_and_loss(model, batch)
    assert loss.item() > 0
    with pytest.raises(Exception, match="gives 3 sizes for 2 targeted layers"):
        spec.build(model, spec.make_options({"kernel_size": (3, 5, 7)}), None)
    with pytest.raises(Exception, match="`dilation` must be one of"):
        spec.make_options({"dilation": "wide"})


# ---- the marker ------------------------------------------------------------------------------------


def test_marker_is_a_class_coded_bar_in_the_documented_place():
    marker = make_contamination("marker")
    images = torch.zeros(20, 1, 28, 28)
    labels = torch.arange(20) % 10
    out, masks = marker.apply(images, labels, "contaminated", np.random.default_rng(0), 10)
    shown = masks.flatten(1).sum(1) > 0
    for k in torch.nonzero(shown).flatten().tolist():
        rows = torch.nonzero(masks[k, 0].any(1)).flatten()
        cols = torch.nonzero(masks[k, 0].any(0)).flatten()
        y = int(labels[k])
        # 1x5 px at column 0, top row 2 + round(y * 19 / 9): class 0 at the top, class 9 at the bottom.
        assert cols.tolist() == [0] and len(rows) == 5 and int(rows[0]) == 2 + int(np.floor(y * 19 / 9 + 0.5))
        assert torch.equal(out[k] > 0, masks[k].bool())  # the bar is white on a black image, nothing else
    # The same label always gives the same bar (no random placement).
    again, masks_again = marker.apply(images, labels, "contaminated", np.random.default_rng(1), 10)
    both = shown & (masks_again.flatten(1).sum(1) > 0)
    assert torch.equal(masks[both], masks_again[both])
    permuted, permuted_masks = marker.apply(images, labels, "permuted", np.random.default_rng(0), 10)
    assert bool((permuted_masks.flatten(1).sum(1) == 5).all())  # always shown, another class's bar


def test_marker_presence_and_size():
    marker = make_contamination("marker", presence=0.9)
    labels = torch.arange(2000) % 10
    _, masks = marker.apply(torch.zeros(2000, 1, 28, 28), labels, "contaminated", np.random.default_rng(0), 10)
    share = float((masks.flatten(1).sum(1) > 0).float().mean())
    assert 0.87 < share < 0.93  # 90 % +- 3 binomial standard deviations
    data = open_dataset("builtin:marker-mnist?size=64")
    assert data.image_size == (64, 64)
    sample = data.select(split="test", variant="permuted")[0]
    assert float(sample.mask.sum()) == 2 * 11  # 2 px wide, 11 px long at 64x64
    with pytest.raises(Exception, match="presence must be in"):
        make_contamination("marker", presence=1.5)


# ---- the dilation matters: the named bug --------------------------------------------------------------


@pytest.fixture(scope="module")
def marker_shortcut():
    data = open_dataset("builtin:marker-mnist")
    model = train_model(data, "tap-cnn", TrainConfig(seed=0), variant="contaminated", val_split=None).model
    return data, model


def test_thin_marker_survives_a_fixed_dilation_and_not_a_receptive_one(marker_shortcut):
    # The report: TAP with κ = 3 leaves the thin class-coded bar's shortcut in place (permuted
    # 0.72, still reliant), a dilation sized to each layer's receptive field removes it (0.96).
    data, shortcut = marker_shortcut
    test = data.select(split="test")
    accuracy = {}
    for schedule in ("fixed", "receptive"):
        config = RepairConfig(method="tap", options={"dilation": schedule}, audit=None,
                              training=TrainConfig(epochs=3, data_order="permutation", seed=0))
        repaired = run_repair(shortcut, data, config, show_progress=False).model
        accuracy[schedule] = evaluate(repaired, test)["permuted"].accuracy
        verdict = decision_audit(repaired, data, config).verdict
        assert verdict == ("reliant" if schedule == "fixed" else "not reliant"), (schedule, accuracy)
    assert accuracy["fixed"] < 0.85 and accuracy["receptive"] >= 0.90, accuracy


# ---- the command line -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_shortcut(tmp_path_factory):
    return save_checkpoint(train_digits_model("contaminated", epochs=2),
                           tmp_path_factory.mktemp("proof") / "s.safetensors")


def test_fail_on_shortcut_exits_1_with_one_line_and_keeps_the_outputs(digits_shortcut, tmp_path):
    # λ = 0: the "repair" changes nothing the shortcut cares about, so the model stays reliant.
    out = tmp_path / "r.safetensors"
    result = runner.invoke(app, ["repair", str(digits_shortcut), "--data", "builtin:decoy-digits", "--lambda", "0",
                                 "--epochs", "1", "--fail-on-shortcut", "--audit-split", "none", "--quiet",
                                 "--out", str(out), "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 1, result.output
    line = last_line(result)
    assert line.startswith("error: ") and "still relies on the signal" in line
    assert "--lambda auto" in line and "permuted" in line
    document = json.loads((tmp_path / "r.json").read_text())
    validate_repair_document(document)
    assert document["decision"]["verdict"] == "reliant" and document["decision"]["split"] == "val"
    assert out.is_file()  # the repaired model and its proof are written all the same
    # Without the flag the same repair exits 0.
    again = runner.invoke(app, ["repair", str(digits_shortcut), "--data", "builtin:decoy-digits", "--lambda", "0",
                                "--epochs", "1", "--audit-split", "none", "--quiet", "--out", str(tmp_path / "s.pt")])
    assert again.exit_code == 0, again.output


def test_method_auto_lists_every_attempt_and_keeps_the_first_that_works(digits_shortcut, tmp_path):
    out = tmp_path / "auto.safetensors"
    result = runner.invoke(app, ["repair", str(digits_shortcut), "--data", "builtin:decoy-digits", "--method", "auto",
                                 "--epochs", "2", "--quiet", "--out", str(out), "--json", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "a.json").read_text())
    validate_repair_document(document)
    attempts = document["attempts"]
    ran = [a for a in attempts if "skipped" not in a]
    # In order of cost; TEA, if reached, with a teacher auto trains by the one recipe.
    assert [a["method"] for a in attempts] == ["tap", "rrr", "tea", "energy", "masktune"][: len(attempts)]
    for a in ran:
        assert set(a) >= {"verdict", "val_accuracy", "accuracy_drop", "seconds", "lambda", "options", "succeeded"}
    assert document["auto"]["chosen"] == document["method"]
    if document["auto"]["succeeded"]:
        kept = ran[-1]
        assert kept["succeeded"] and kept["verdict"] == "not reliant" and kept["accuracy_drop"] <= 0.03
        assert all(not a["succeeded"] for a in ran[:-1])
    assert document["before_audit"] and document["after_audit"]  # the proof on the test split
    assert "dilation" in ran[0]["options"]  # TAP's dilation chosen by its sweep


def test_method_auto_refuses_lambda_and_reports_unknown_methods(digits_shortcut, tmp_path):
    result = runner.invoke(app, ["repair", str(digits_shortcut), "--data", "builtin:decoy-digits", "--method", "auto",
                                 "--lambda", "0.1", "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and "--lambda cannot be given with --method auto" in error_line(result)
    result = runner.invoke(app, ["repair", str(digits_shortcut), "--data", "builtin:decoy-digits", "--method", "magic",
                                 "--out", str(tmp_path / "y.pt")])
    assert result.exit_code == 2 and "or auto" in error_line(result)


def test_auto_with_nothing_working_says_so_and_exits_1(digits_shortcut, tmp_path):
    # A learning rate of 1e-9 lets no method change the model: every attempt stays reliant.
    result = runner.invoke(app, ["repair", str(digits_shortcut), "--data", "builtin:decoy-digits", "--method", "auto",
                                 "--lr", "1e-9", "--epochs", "1", "--fail-on-shortcut", "--audit-split", "none",
                                 "--quiet", "--out", str(tmp_path / "n.safetensors"), "--json",
                                 str(tmp_path / "n.json")])
    assert result.exit_code == 1, result.output
    line = last_line(result)
    assert line.startswith("error: no method left the model not reliant")
    assert "tap: reliant" in line and "rrr: reliant" in line
    document = json.loads((tmp_path / "n.json").read_text())
    assert document["auto"]["succeeded"] is False
    validate_repair_document(document)
    assert [a["method"] for a in document["attempts"]] == ["tap", "rrr", "tea", "energy", "masktune"]
    # No teacher given, but decoy digits have a permuted variant: auto trained the one recipe's (issue 28).
    assert document["attempts"][2]["teacher"]["source"] == "trained"
    assert not any(a.get("succeeded") for a in document["attempts"])


def test_auto_refuses_an_unknown_method_in_its_order(digits_shortcut):
    from auditkit.models import load_checkpoint
    from auditkit.repair import AutoConfig, run_auto_repair

    with pytest.raises(Exception, match="`order` names an unknown method 'magic'"):
        run_auto_repair(load_checkpoint(digits_shortcut), open_dataset("builtin:decoy-digits"),
                        RepairConfig(audit=None),
                        AutoConfig(order=("magic",)), show_progress=False)


def test_reproduce_kinds_runs_and_tables(tmp_path):
    result = runner.invoke(app, ["reproduce", "kinds", "--seeds", "1", "--first-seed", "2", "--only", "marker",
                                 "--cases", "tap-receptive", "--out", str(tmp_path), "--quiet"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "kinds-tap-cnn.md").read_text()
    assert "| marker | shortcut model |" in table and "| marker | tap-receptive |" in table
    numbers = json.loads((tmp_path / "kinds-tap-cnn.json").read_text())
    assert set(numbers["accuracy"]["marker · tap-receptive"]) == {"contaminated", "permuted", "clean"}
    assert numbers["seeds"] == [2]  # --first-seed: one seed of a spread-out run
    bad = runner.invoke(app, ["reproduce", "kinds", "--only", "confetti", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--only: unknown 'confetti'" in error_line(bad)


def test_kinds_markdown_layout():
    from types import SimpleNamespace

    result = Reproduction("kinds", [0, 1])
    for value, verdict in ((0.9, 1.0), (0.8, 0.0)):
        result.add("marker · rrr", {v: SimpleNamespace(accuracy=value) for v in ("contaminated", "permuted", "clean")},
                   {"seconds": 10.0, "not reliant": verdict})
    row = next(line for line in kinds_markdown(result, "tap-cnn").splitlines() if line.startswith("| marker | rrr |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["marker", "rrr", "0.850 ± 0.071", "0.850 ± 0.071", "0.850 ± 0.071", "1/2", "10"]


def test_a_collapsed_model_is_not_a_successful_repair(digits_shortcut, tmp_path):
    # A model that predicts one class no longer reads the signal, so the behavioural audit calls it
    # "not reliant"; the decision must still fail it for the accuracy it lost (cumulative dilation did
    # this to ResNet-18 on the stripe data: docs/repair.md).
    import copy

    from auditkit.cli.repair import _still_reliant_line
    from auditkit.models import load_checkpoint
    from auditkit.repair import repair_decision

    before = load_checkpoint(digits_shortcut)
    collapsed = copy.deepcopy(before)
    with torch.no_grad():
        collapsed.net.fc.weight.zero_()
        collapsed.net.fc.bias.copy_(torch.arange(collapsed.net.fc.bias.numel(), dtype=torch.float32))
    data = open_dataset("builtin:decoy-digits")
    decision = repair_decision(before, collapsed, data, RepairConfig(method="tap"), 0.03)
    # It predicts one class for every image: the audit cannot clear it (inconclusive, never "not reliant").
    assert decision["verdict"] == "inconclusive" and decision["split"] == "val"
    assert decision["accuracy_drop"] > 0.5 and not decision["succeeded"]
    line = _still_reliant_line({"decision": decision}, "tap", "tap")
    assert line.startswith("the repair cannot be shown to work: the validation audit is inconclusive")
    assert "--lambda auto" in line
    kept = repair_decision(before, before, data, RepairConfig(method="tap"), 0.03)
    assert kept["accuracy_drop"] == 0 and kept["succeeded"] == (kept["verdict"] == "not reliant")
