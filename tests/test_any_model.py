"""Any model, any checkpoint (issue 16): every torchvision CNN family and the listed timm models, saved
the ways training code saves them, through inspect -> evaluate -> explain -> audit -> repair -> audit
from the command line, on a tiny dataset (random weights: the loop, not the accuracy, is tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.models import ARCHITECTURES, build_model, load_checkpoint, save_checkpoint
from auditkit.models.presets import discover_presets

runner = CliRunner()

# The smallest network of each torchvision classification CNN family, and the timm models the
# issue lists (timm's smallest of each).
TORCHVISION_FAMILIES = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s", "googlenet", "inception_v3",
    "mnasnet0_5", "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18",
    "resnext50_32x4d", "shufflenet_v2_x0_5", "squeezenet1_1", "vgg11_bn", "wide_resnet50_2",
]
TIMM_MODELS = ["timm:resnet18", "timm:efficientnet_b0", "timm:convnext_atto", "timm:regnetx_002",
               "timm:mobilenetv3_small_050"]
REPAIR_METHODS = ["tap", "rrr", "energy", "tea", "masktune"]
LAYOUTS = ["auditkit", "bare", "compiled", "ddp", "lightning", "model_state_dict", "ema", "nested"]


def save_as(model, layout: str, folder: Path) -> tuple[Path, list[str]]:
    """``model`` saved as ``layout``; returns the file and the CLI arguments it needs (--arch)."""
    weights = model.net.state_dict()
    arch = ["--arch", model.meta.arch]
    if layout == "auditkit":
        return save_checkpoint(model, folder / "model.safetensors"), []
    if layout == "bare":  # what torch.save(net.state_dict()) writes
        path = folder / "model.pth"
        torch.save(weights, path)
    elif layout == "compiled":  # a state_dict of a torch.compile'd network
        path = folder / "model.pt"
        torch.save({f"_orig_mod.{k}": v for k, v in weights.items()}, path)
    elif layout == "ddp":  # DistributedDataParallel's module. prefix, in a training script's dict
        path = folder / "model.pt"
        torch.save({"epoch": 3, "model": {f"module.{k}": v for k, v in weights.items()}, "best_acc": 0.91}, path)
    elif layout == "lightning":  # a LightningModule holding the network as self.model
        path = folder / "model.ckpt"
        torch.save({"epoch": 4, "global_step": 120, "pytorch-lightning_version": "2.4.0",
                    "state_dict": {f"model.{k}": v for k, v in weights.items()},
                    "hyper_parameters": {"lr": 1e-3, "arch": model.meta.arch},
                    "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}],
                    "lr_schedulers": [], "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 4}}}}},
                    path)
    elif layout == "model_state_dict":
        path = folder / "model.pth"
        torch.save({"model_state_dict": weights, "optimizer_state_dict": {"state": {}, "param_groups": []},
                    "epoch": 10, "loss": 0.12}, path)
    elif layout == "ema":  # EMA weights beside their step counter (a harmless non-tensor value)
        path = folder / "model.pt"
        torch.save({"ema": {**{f"module.{k}": v for k, v in weights.items()}, "n_averaged": 100}}, path)
    else:  # nested prefixes in another order
        path = folder / "model.pt"
        torch.save({"state_dict": {f"model._orig_mod.module.{k}": v for k, v in weights.items()}}, path)
    return path, arch


def ok(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code in (0, 1), result.output  # 1: an audit verdict with --fail-on-shortcut only
    assert result.exit_code == 0, result.output
    return result


def json_of(result) -> dict:
    return json.loads(result.output[result.output.index("{"):]) if "{" in result.output else {}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Decoy digits, 12 images per split and variant: every command runs in seconds on any network."""
    from auditkit.data import open_dataset, write_dataset

    dataset = open_dataset("builtin:decoy-digits")
    keep = []
    for split in dataset.splits:
        for variant in dataset.variants:
            keep += [i for i, r in enumerate(dataset.records) if r.split == split and r.variant == variant][:12]
    return write_dataset(dataset.select(indices=keep), tmp_path_factory.mktemp("tiny") / "digits")


@pytest.mark.parametrize("arch", TORCHVISION_FAMILIES + TIMM_MODELS)
def test_the_whole_loop_on_every_family(arch, tiny_data, tmp_path):
    index = (TORCHVISION_FAMILIES + TIMM_MODELS).index(arch)
    layout = LAYOUTS[index % len(LAYOUTS)]
    method = REPAIR_METHODS[index % len(REPAIR_METHODS)]
    torch.manual_seed(index)
    model = build_model(arch, 10, 1, (8, 8))
    path, arch_args = save_as(model, layout, tmp_path)

    shown = json_of(ok("inspect", path, *arch_args, "--json", "-"))
    assert shown["num_classes"] == 10 and shown["in_channels"] == 1 and shown["target_layers"]
    ok("evaluate", path, "--data", tiny_data, *arch_args, "--batch-size", "16")
    for explained in ("lrp_epsilon", "gradcam", "gradient", "input_x_gradient", "integrated_gradients"):
        ok("explain", path, "--data", tiny_data, *arch_args, "--method", explained, "--n", "2", "--steps", "4",
           "--out", tmp_path / f"heat-{explained}")
    audit = json_of(ok("audit", path, "--data", tiny_data, *arch_args, "--bootstrap", "20", "--examples", "1",
                       "--quiet", "--json", "-"))
    assert audit["verdict"]["label"] in ("reliant", "not reliant", "inconclusive")
    teacher = []
    if method == "tea":
        teacher_path = save_checkpoint(build_model(arch, 10, 1, (8, 8)), tmp_path / "teacher.safetensors")
        teacher = ["--teacher", teacher_path]
    repaired = tmp_path / "repaired.safetensors"
    repair = ["repair", path, "--data", tiny_data, *arch_args, "--method", method, *teacher, "--epochs", "1",
              "--batch-size", "12", "--audit-split", "none", "--out", repaired, "--quiet"]
    if method in ("rrr", "energy") and "mobilenetv3" in arch.replace("_", ""):
        # PyTorch has no second derivative of hardsigmoid: the double-backward methods say so in one
        # line, and a first-order method repairs the network.
        refused = runner.invoke(app, [str(a) for a in repair])
        assert refused.exit_code == 2 and "PyTorch has none for" in refused.output, refused.output
        repair[repair.index(method)] = "tap"
    ok(*repair)
    again = json_of(ok("audit", repaired, "--data", tiny_data, "--bootstrap", "20", "--examples", "1", "--quiet",
                       "--json", "-"))
    assert again["checkpoint"]["arch"] == model.meta.arch


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_same_weights(layout, tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet18", 5, 3, (32, 32))
    path, arch_args = save_as(model, layout, tmp_path)
    loaded = load_checkpoint(path, arch=arch_args[1] if arch_args else None)
    assert loaded.meta.num_classes == 5 and loaded.meta.in_channels == 3  # the file's sizes, read off its weights
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("arch", TORCHVISION_FAMILIES + TIMM_MODELS)
def test_every_family_loads_from_every_layout(arch, tmp_path):
    # The loop above rotates layouts over families; loading is the part that depends on both (key
    # prefixes aligned against the network's own names, sizes read off the file by a probe), so every
    # family x layout pair is loaded here, as `auditkit inspect` loads it.
    torch.manual_seed(1)
    model = build_model(arch, 6, 2, (8, 8))
    expected = model.state_dict()
    for layout in LAYOUTS:
        folder = tmp_path / layout
        folder.mkdir()
        path, arch_args = save_as(model, layout, folder)
        loaded = load_checkpoint(path, arch=arch_args[1] if arch_args else None)
        assert (loaded.meta.num_classes, loaded.meta.in_channels) == (6, 2), (arch, layout)
        assert loaded.meta.target_layers == model.meta.target_layers, (arch, layout)
        got = loaded.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), (arch, layout)
        path.unlink()


def test_a_lightning_checkpoint_renamed_pt_loads_too(tmp_path):
    model = build_model("resnet18", 4, 3, (32, 32))
    path, _ = save_as(model, "lightning", tmp_path)
    renamed = path.rename(tmp_path / "renamed.pt")
    assert load_checkpoint(renamed, arch="resnet18").meta.num_classes == 4


def test_weights_that_match_nothing_name_the_files_keys_and_the_expected_ones(tmp_path):
    from auditkit.errors import CheckpointError

    model = build_model("resnet18", 4, 3, (32, 32))
    torch.save({"encoder." + k: v for k, v in model.net.state_dict().items()}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"none of the file's \d+ weights has a name the network expects; the "
                                              r"file's names start with encoder .*expected names like"):
        load_checkpoint(tmp_path / "odd.pt", arch="resnet18")
    torch.save({"epoch": 1, "config": {"lr": 0.1}}, tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="holds a dict with keys epoch, config; none of them holds a state_dict"):
        load_checkpoint(tmp_path / "none.pt", arch="resnet18")


def test_a_compiled_models_state_dict_reports_the_files_sizes(tmp_path):
    # The bug: "_orig_mod." keys were refused with a message quoting default sizes (3 channels, 2 classes).
    model = build_model("resnet18", 7, 1, (32, 32))
    torch.save({f"_orig_mod.{k}": v for k, v in model.net.state_dict().items()}, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt", arch="resnet18")
    assert (loaded.meta.in_channels, loaded.meta.num_classes) == (1, 7)


@pytest.mark.parametrize("name", ["vit_b_16", "swin_t", "timm:vit_tiny_patch16_224"])
def test_vision_transformers_are_listed_with_their_presets(name):
    # Issue 25: ViTs are supported (token maps, AttnLRP); they were refused before it.
    result = runner.invoke(app, ["models", name, "--json", "-"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert "vision transformer" in row["notes"] and "presets found" in row["notes"]
    assert row["tap_layers"] and row["gradcam_layer"], row


def test_maxvit_is_refused_in_one_line():
    result = runner.invoke(app, ["models", "maxvit_t"])
    assert result.exit_code == 2 and "MaxViT builds its attention for one fixed input size" in result.output


def test_found_presets_equal_the_hand_presets():
    for name, spec in ARCHITECTURES.items():
        found = discover_presets(spec.build(3, 10), 3)
        assert (found.tap_layers, found.gradcam_layer) == (spec.tap_layers, spec.gradcam_layer), name


def test_the_users_own_factory_and_layer_overrides(tmp_path, monkeypatch):
    package = tmp_path / "mynets"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import torch.nn as nn\n"
        "def small(num_classes=10, in_channels=3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),\n"
        "                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(16, num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "m.safetensors"
    ok("train", "--data", "builtin:decoy-digits", "--arch", "mynets:small", "--epochs", "1", "--out", out, "--quiet")
    shown = json_of(ok("inspect", out, "--json", "-"))
    assert shown["arch"] == "mynets:small" and shown["target_layers"] == ["net.2", "net.4"]
    ok("train", "--data", "builtin:decoy-digits", "--arch", "mynets:small", "--layers", "0", "--epochs", "1",
       "--out", tmp_path / "n.safetensors", "--quiet")
    assert json_of(ok("inspect", tmp_path / "n.safetensors", "--json", "-"))["target_layers"] == ["net.0"]
    result = runner.invoke(app, ["models", "mynets:nothing"])
    assert result.exit_code == 2 and "has no callable 'nothing'" in result.output
