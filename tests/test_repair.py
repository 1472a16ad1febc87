"""`auditkit repair` and its trainer: resume, interruption, NaN, bad input, sweep, annotate, torchrun,
and the decoy-MNIST repair the issue asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.ops.dilation import SCHEDULES
from auditkit.data import open_dataset
from auditkit.models import load_checkpoint, save_checkpoint
from auditkit.repair import METHODS, RepairConfig, TapObjective
from auditkit.training import Interrupted, Objective, TrainConfig, TrainingStopped, fit

from .conftest import train_digits_model
from .test_cli_data_train import error_line
from .test_report_schemas import validate_repair_document

runner = CliRunner()


@pytest.fixture(scope="module")
def digits():
    return open_dataset("builtin:decoy-digits")


@pytest.fixture(scope="module")
def digits_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    return {name: save_checkpoint(train_digits_model(variant, epochs=2), folder / f"{name}.safetensors")
            for name, variant in (("shortcut", "contaminated"), ("teacher", "clean"))}


def small_training_set(digits):
    return digits.select(split="train", variant="contaminated").select(indices=range(256))


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_ctrl_c_equals_an_uninterrupted_run(digits, digits_models, tmp_path):
    train = small_training_set(digits)
    # Cosine schedule and clipping on: the resumed run must continue the lr curve exactly.
    config = TrainConfig(epochs=2, batch_size=32, lr=1e-3, seed=3, schedule="cosine", grad_clip=1.0)
    objective = TapObjective(layers=("net.conv1", "net.conv2"))
    objective.lam = 0.1

    straight = load_checkpoint(digits_models["shortcut"])
    fit(straight, train, objective, config, show_progress=False)

    def stop(epoch, step):
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt

    state = tmp_path / "run.state.pt"
    interrupted = load_checkpoint(digits_models["shortcut"])
    with pytest.raises(Interrupted, match="resume"):
        fit(interrupted, train, objective, config, state_path=state, show_progress=False, on_step=stop)
    assert state.is_file()
    resumed = load_checkpoint(digits_models["shortcut"])
    history = fit(resumed, train, objective, config, state_path=state, resume=True, show_progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    for key, value in weights(straight).items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


class ExplodingObjective(Objective):
    name = "exploding"

    def __init__(self):
        self.calls = 0

    def loss(self, model, batch, logits, activations):
        self.calls += 1
        return logits.new_tensor(float("nan") if self.calls > 10 else 0.0)


def test_nan_loss_stops_with_the_last_good_state(digits, digits_models, tmp_path):
    train = small_training_set(digits)
    state = tmp_path / "run.state.pt"
    model = load_checkpoint(digits_models["shortcut"])
    with pytest.raises(TrainingStopped,
                       match=r"loss became nan at epoch 2, step 3; the last good state \(end of epoch 1\)"):
        fit(model, train, ExplodingObjective(), TrainConfig(epochs=3, batch_size=32), state_path=state,
            show_progress=False)
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 1 and saved["step"] == 0  # the end of the last complete epoch


def repair(*args):
    return runner.invoke(app, ["repair", *map(str, args)])


def test_repair_cli_writes_the_checkpoint_and_the_proof(digits_models, tmp_path):
    out = tmp_path / "fixed.safetensors"
    result = repair(digits_models["shortcut"], "--data", "builtin:decoy-digits", "--out", out, "--epochs", "1",
                    "--quiet", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["schema"] == "auditkit.repair/1"
    validate_repair_document(document)
    assert document["before"]["verdict"] in ("reliant", "inconclusive", "not reliant")
    assert document["after_audit"]["schema"] == "auditkit.audit/1"
    for suffix in (".audit.json", ".audit.html", ".state.pt"):
        assert (tmp_path / f"fixed.safetensors{suffix}").is_file()
    repaired = load_checkpoint(out)
    from auditkit.models import read_checkpoint_meta

    assert read_checkpoint_meta(out)["extra"]["repair"]["method"] == "tap"
    assert repaired.meta.class_names == load_checkpoint(digits_models["shortcut"]).meta.class_names


def test_repair_shift_moves_masks_with_images_and_is_recorded(digits_models, tmp_path):
    out = tmp_path / "shifted.safetensors"
    result = repair(digits_models["shortcut"], "--data", "builtin:decoy-digits", "--out", out, "--epochs", "1",
                    "--shift", "2", "--audit-split", "none", "--quiet", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["training"]["shift"] == 2
    bad = repair(digits_models["shortcut"], "--data", "builtin:decoy-digits", "--out", tmp_path / "bad.safetensors",
                 "--shift", "-1", "--quiet")
    assert bad.exit_code != 0 and "shift" in bad.output and "Traceback" not in bad.output


@pytest.mark.parametrize("method", ["tap", "tea", "rrr", "energy", "masktune"])
def test_every_method_runs_from_the_cli(method, digits_models, tmp_path):
    out = tmp_path / f"{method}.safetensors"
    teacher = ["--teacher", digits_models["teacher"]] if method == "tea" else []
    result = repair(digits_models["shortcut"], "--data", "builtin:decoy-digits", "--method", method, *teacher, "--out",
                    out,
                    "--epochs", "1", "--audit-split", "none", "--quiet", "--json", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["method"] == method and len(document["history"]) == 1
    assert document["history"][0]["explanation_loss"] >= 0 or method == "energy"  # energy's loss is -EPG
    before, after = load_checkpoint(digits_models["shortcut"]).state_dict(), load_checkpoint(out).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the repair changed no weight"


def test_repair_bad_input(digits_models, tmp_path):
    shortcut = digits_models["shortcut"]

    def fails(*args):
        result = repair(*args)
        assert result.exit_code == 2, result.output
        return error_line(result)

    assert "never overwrites" in fails(shortcut, "--data", "builtin:decoy-digits", "--out", shortcut, "--force")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"mine")
    assert "already exists" in fails(shortcut, "--data", "builtin:decoy-digits", "--out", existing)
    assert existing.read_bytes() == b"mine"
    assert "needs masks" in fails(shortcut, "--data", "builtin:digits", "--out", tmp_path / "a.pt")
    assert "needs a teacher" in fails(shortcut, "--data", "builtin:decoy-digits", "--method", "tea", "--out",
                                      tmp_path / "b.pt")
    assert "--lambda must be a number or auto" in fails(shortcut, "--data", "builtin:decoy-digits", "--lambda", "big",
                                                        "--out", tmp_path / "c.pt")
    assert "no saved state" in fails(shortcut, "--data", "builtin:decoy-digits", "--resume", "--out", tmp_path / "d.pt")
    assert "--schedule must be one of" in fails(shortcut, "--data", "builtin:decoy-digits", "--schedule", "step",
                                                "--out", tmp_path / "f.pt")
    assert "--grad-clip must be" in fails(shortcut, "--data", "builtin:decoy-digits", "--grad-clip", "-1", "--out",
                                          tmp_path / "g.pt")
    assert "--method must be one of" in fails(shortcut, "--data", "builtin:decoy-digits", "--method", "magic", "--out",
                                              tmp_path / "e.pt")
    tea = (shortcut, "--data", "builtin:decoy-digits", "--method", "tea", "--teacher", digits_models["teacher"])
    assert "--tea-classes must be at least 1" in fails(*tea, "--tea-classes", "0", "--out", tmp_path / "h.pt")
    assert "--distill-weight must be" in fails(*tea, "--distill-weight", "-1", "--out", tmp_path / "i.pt")
    assert "--temperature must be" in fails(*tea, "--temperature", "0", "--out", tmp_path / "j.pt")


def test_lambda_auto_sweeps_and_reports(digits_models, tmp_path):
    result = repair(digits_models["shortcut"], "--data", "builtin:decoy-digits", "--out", tmp_path / "s.pt",
                    "--lambda", "auto", "--epochs", "1", "--audit-split", "none", "--quiet", "--json",
                    tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "s.json").read_text())
    validate_repair_document(document)
    first = [row for row in document["sweep"] if row["round"] == 1]
    # Every lambda with every dilation schedule (TAP sweeps the dilation too), one short run each;
    # the best third run once more, and the best of those is kept.
    assert sorted((row["lambda"], row["dilation"]) for row in first) == sorted(
        (lam, schedule) for lam in METHODS["tap"].sweep for schedule in SCHEDULES)
    second = [row for row in document["sweep"] if row["round"] == 2]
    assert len(second) == len(first) // 3
    best = min(second, key=lambda row: (-round(row["val_accuracy"] * 200), row["val_loss"]))
    assert (document["lambda"], document["options"]["dilation"]) == (best["lambda"], best["dilation"])
    assert "chose lambda" in result.output and "dilation" in result.output


def test_lambda_auto_keeps_an_option_the_user_set(digits_models, tmp_path):
    result = repair(digits_models["shortcut"], "--data", "builtin:decoy-digits", "--out", tmp_path / "s.pt",
                    "--lambda", "auto", "--dilation", "cumulative", "--epochs", "1", "--audit-split", "none",
                    "--quiet", "--json", tmp_path / "s.json")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "s.json").read_text())
    first = [row for row in document["sweep"] if row["round"] == 1]
    assert [row["lambda"] for row in first] == list(METHODS["tap"].sweep) and "dilation" not in first[0]
    assert document["options"]["dilation"] == "cumulative"


def test_teacher_masks_are_cached_and_scored_against_ground_truth(digits_models, tmp_path):
    out = tmp_path / "masks"
    result = runner.invoke(app,
                           ["annotate", "--teacher", str(digits_models["teacher"]), "--data", "builtin:decoy-digits",
                                 "--tau", "0.2", "--out", str(out), "--json", str(tmp_path / "a.json")])
    assert result.exit_code == 0, result.output
    stats = json.loads((tmp_path / "a.json").read_text())
    assert 0 <= stats["recall"] <= 1 and 0 <= stats["precision"] <= 1 and 0 < stats["mean_mask_area"] < 1
    annotated = open_dataset(out)
    assert annotated.has_masks and len(annotated) == len(open_dataset("builtin:decoy-digits", split="train"))
    cache = tmp_path / "cache"
    for _ in range(2):  # the second run reads the cached masks
        result = repair(digits_models["shortcut"], "--data", "builtin:decoy-digits", "--out", tmp_path / "t.pt",
                        "--force",
                        "--teacher", digits_models["teacher"], "--tau", "0.2", "--epochs", "1", "--audit-split", "none",
                        "--cache-dir", cache, "--quiet", "--json", tmp_path / "t.json")
        assert result.exit_code == 0, result.output
    assert len(list(cache.glob("annotations-*.npz"))) == 1
    assert json.loads((tmp_path / "t.json").read_text())["annotation"]["cached"]


def test_torchrun_two_process_repair(digits_models, tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "auditkit",
         "repair", str(digits_models["shortcut"]), "--data", "builtin:decoy-digits", "--out", str(out), "--epochs", "1",
         "--audit-split", "none", "--quiet"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert load_checkpoint(out).meta.arch == "tap-cnn"


@pytest.mark.slow
def test_demo_trains_audits_repairs_with_tap_and_proves_it(decoy_mnist_models, tmp_path):
    """`auditkit demo` = `train` + `repair --method tap` on decoy MNIST (the issue's done-when): the
    shortcut model is called reliant, the repaired one not reliant, with permuted and clean accuracy
    within 3 points of the model trained on clean data."""
    _, clean_accuracy = decoy_mnist_models["clean"]
    out = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(out), "--quiet", "--json", str(tmp_path / "demo.json")])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "demo.json").read_text())
    assert document["before"]["label"] == "reliant" and document["after"]["label"] == "not reliant"
    assert (out / "repaired.safetensors.audit.html").is_file() and "before/after report" in result.output
    after = document["accuracy"]["after"]
    for variant in ("permuted", "clean"):
        assert after[variant] >= clean_accuracy[variant] - 0.03, (variant, after, clean_accuracy)
    again = runner.invoke(app, ["demo", "--out", str(out), "--quiet"])
    assert again.exit_code == 2 and "not empty" in error_line(again)  # never overwrites a finished demo


def test_tap_default_lambda_is_lower_with_teacher_masks():
    from auditkit.repair import AnnotationConfig, default_lambda

    assert default_lambda(RepairConfig(method="tap")) == METHODS["tap"].default_lambda == 0.1
    with_teacher_masks = RepairConfig(method="tap", annotation=AnnotationConfig(tau=0.1))
    assert default_lambda(with_teacher_masks) == METHODS["tap"].teacher_mask_lambda == 0.01
    assert default_lambda(RepairConfig(method="rrr",
                                       annotation=AnnotationConfig(tau=0.1))) == METHODS["rrr"].default_lambda


def test_tap_default_lambda_on_a_vision_transformer_is_its_measured_one():
    from auditkit.models import build_model
    from auditkit.repair import default_lambda

    vit, cnn = build_model("vit-digits", 10, 1, (28, 28)), build_model("tap-cnn", 10, 1, (28, 28))
    assert default_lambda(RepairConfig(method="tap"), vit) == METHODS["tap"].transformer_lambda == 1.5
    assert default_lambda(RepairConfig(method="tap"), cnn) == 0.1
    assert default_lambda(RepairConfig(method="rrr"), vit) == METHODS["rrr"].default_lambda  # none measured


def test_a_new_method_is_one_spec_and_run_repair_reads_nothing_else(digits, digits_models, monkeypatch, tmp_path):
    """The runner and the CLI take any MethodSpec from the registry: a method defined in one place
    (here a test's spec, in a real one a file of auditkit/repair/methods/) runs end to end."""
    from dataclasses import dataclass

    from auditkit.repair import MethodSpec, run_repair

    @dataclass
    class HalfTask(Objective):
        name = "half"
        task_weight: float = 0.5

    @dataclass(frozen=True)
    class HalfOptions:
        weight: float = 0.5

    spec = MethodSpec(name="half", summary="cross-entropy at half weight", masks=None, teacher="none",
                      default_lambda=0.0, sweep=(0.0,), build=lambda model, options, teacher: HalfTask(options.weight),
                      options=HalfOptions, training={"epochs": 1}, doc="docs/methods/none.md")
    monkeypatch.setitem(METHODS, "half", spec)
    model = load_checkpoint(digits_models["shortcut"])
    before = weights(model)
    config = RepairConfig(method="half", options={"weight": 0.25}, audit=None)
    result = run_repair(model, digits, config, show_progress=False)
    assert result.document["method"] == "half" and result.document["options"] == {"weight": 0.25}
    assert len(result.history) == 1
    # Nothing given is changed: the input model (a copy is repaired), the frozen config.
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert any(not torch.equal(result.model.state_dict()[k].cpu(), v) for k, v in before.items())
    assert config.options == {"weight": 0.25} and config.training is None
    out = tmp_path / "half.safetensors"
    cli = repair(digits_models["shortcut"], "--data", "builtin:decoy-digits", "--method", "half", "-o", "weight=0.5",
                 "--out", out, "--audit-split", "none", "--quiet")
    assert cli.exit_code == 0, cli.output
    bad = repair(digits_models["shortcut"], "--data", "builtin:decoy-digits", "--method", "half", "-o", "nope=1",
                 "--out", tmp_path / "x.pt", "--quiet")
    assert bad.exit_code == 2 and "--option has 'nope', which half does not take (its options: weight)" in bad.output


def test_every_registered_method_documents_itself():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    assert list(METHODS) == ["tap", "rrr", "energy", "tea", "masktune"]
    for spec in METHODS.values():
        assert (root / spec.doc).is_file(), spec.doc
        assert spec.summary and spec.masks in (None, "spurious", "object")
        assert spec.teacher in ("none", "annotates", "required")
        spec.make_options({})  # the defaults are valid


def test_teacher_mode_is_restored_after_a_tea_repair(digits, digits_models):
    from auditkit.repair import run_repair

    teacher = load_checkpoint(digits_models["teacher"]).train()
    config = RepairConfig(method="tea", teacher=teacher, training=TrainConfig(epochs=1, data_order="permutation"),
                          audit=None)
    run_repair(load_checkpoint(digits_models["shortcut"]), digits.select(split="train").select(indices=range(128)),
               config, show_progress=False)
    assert teacher.training
