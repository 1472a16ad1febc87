"""Saving and loading checkpoints safely (auditkit.models.checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from auditkit import __version__
from auditkit.errors import AuditkitError, CheckpointError, OutputExistsError, ParameterError
from auditkit.models import (
    AuditModel,
    build_model,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)

from .conftest import DEVICES

SUFFIXES = [".safetensors", ".pt", ".pth"]
EXTRA = {"data": {"fingerprint": "sha256:abc123", "n_train": 60000}, "summary": {"epochs": 3, "accuracy": 0.987}}


class TinyNet(nn.Module):
    """A user's own architecture: pickling it stores a reference to this class."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture
def tap_model() -> AuditModel:
    return build_model(
        "tap-cnn",
        num_classes=3,
        in_channels=1,
        input_size=(28, 28),
        mean=0.1307,
        std=0.3081,
        class_names=("red", "green", "blue"),
        target_layers=["conv2"],
    ).eval()


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 1, 28, 28)


def assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def outputs(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip_keeps_outputs_and_meta(tmp_path, tap_model, images, suffix):
    path = save_checkpoint(tap_model, tmp_path / f"model{suffix}", extra=EXTRA)
    loaded = load_checkpoint(path)
    assert loaded.meta == tap_model.meta
    assert loaded.meta.target_layers == ("net.conv2",)
    assert torch.equal(outputs(loaded.eval(), images), outputs(tap_model, images))
    meta = read_checkpoint_meta(path)
    assert meta["extra"] == EXTRA
    assert meta["format_version"] == 1 and meta["auditkit_version"] == __version__
    assert meta["class_names"] == ["red", "green", "blue"] and meta["input_size"] == [28, 28]


def test_both_formats_store_the_same_meta(tmp_path, tap_model):
    safetensors_meta = read_checkpoint_meta(save_checkpoint(tap_model, tmp_path / "m.safetensors", extra=EXTRA))
    torch_meta = read_checkpoint_meta(save_checkpoint(tap_model, tmp_path / "m.pt", extra=EXTRA))
    assert safetensors_meta == torch_meta


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_keeps_batch_norm_statistics(tmp_path, suffix):
    model = build_model("resnet18", 2, 3, (32, 32))
    model(torch.rand(4, 3, 32, 32))  # a train-mode forward moves the running statistics off their defaults
    model.eval()
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / f"r{suffix}")).eval()
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(outputs(loaded, images), outputs(model, images))
    assert torch.equal(loaded.net.bn1.running_mean, model.net.bn1.running_mean)


def test_pt_checkpoint_is_readable_with_weights_only(tmp_path, tap_model):
    payload = torch.load(save_checkpoint(tap_model, tmp_path / "m.pt"), weights_only=True)
    assert payload["format"] == "auditkit" and set(payload) == {"format", "meta", "state_dict"}
    assert all(key.startswith("net.") for key in payload["state_dict"])


def test_extra_must_be_json(tmp_path, tap_model):
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tap_model, tmp_path / "m.safetensors", extra={"when": object()})


# --------------------------------------------------------------------------- writing safely


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_no_overwrite_without_permission(tmp_path, tap_model, suffix):
    path = save_checkpoint(tap_model, tmp_path / f"m{suffix}")
    before = path.read_bytes()
    other = build_model("tap-cnn", 3, 1, (28, 28))
    with pytest.raises(OutputExistsError, match="`overwrite` is off and .* already exists") as info:
        save_checkpoint(other, path)
    assert_one_line(info)
    assert path.read_bytes() == before
    save_checkpoint(other, path, overwrite=True)
    assert path.read_bytes() != before


def test_saving_leaves_no_temporary_files(tmp_path, tap_model):
    for suffix in SUFFIXES:
        save_checkpoint(tap_model, tmp_path / "sub" / f"m{suffix}")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.pt", "m.pth", "m.safetensors"]


def test_a_failed_write_leaves_nothing_behind(tmp_path, tap_model, monkeypatch):
    def crash_halfway(obj, path):
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tap_model, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def _fill_the_disk(monkeypatch, error: Exception, free: int) -> None:
    """torch.save writes part of the file, then fails as it does on a full disk."""
    import shutil

    def write_then_fail(obj, path):
        Path(path).write_bytes(b"PK\x03\x04 part of a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", write_then_fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - free, free))


@pytest.mark.parametrize("error", [
    OSError(28, "No space left on device"),
    # what torch.save raises on a full disk: its zip writer's check, not an OSError
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000148160 vs 1000148048"),
], ids=["ENOSPC", "torch-zip-writer"])
def test_a_full_disk_is_one_line_and_the_old_file_survives(tmp_path, tap_model, monkeypatch, error):
    path = save_checkpoint(tap_model, tmp_path / "m.pt")
    before = path.read_bytes()
    _fill_the_disk(monkeypatch, error, free=4096)
    with pytest.raises(AuditkitError,
                       match=r"could not write .*m\.pt: no space left on its disk \(0 MiB free\)") as info:
        save_checkpoint(tap_model, path, overwrite=True)
    assert_one_line(info)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_a_write_error_that_is_not_the_disk_keeps_its_cause(tmp_path, tap_model, monkeypatch):
    _fill_the_disk(monkeypatch, PermissionError(13, "Permission denied"), free=10**9)
    with pytest.raises(AuditkitError, match=r"could not write .*m\.pt: Permission denied$"):
        save_checkpoint(tap_model, tmp_path / "m.pt")
    _fill_the_disk(monkeypatch, RuntimeError("a bug of ours"), free=10**9)  # not a write failure: raised as it is
    with pytest.raises(RuntimeError, match="^a bug of ours$"):
        save_checkpoint(tap_model, tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_the_cli_says_a_full_disk_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from auditkit.cli import app

    _fill_the_disk(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
                   free=0)
    out = tmp_path / "m.pt"
    result = CliRunner().invoke(app, ["train", "--data", "builtin:decoy-digits", "--arch", "tap-cnn", "--epochs", "1",
                                      "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    last = result.output.strip().splitlines()[-1]
    assert "could not write" in last and "no space left on its disk" in last and "Traceback" not in result.output
    assert not out.exists()


def test_unsupported_suffix(tmp_path, tap_model):
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint suffix '\.bin' for saving"):
        save_checkpoint(tap_model, tmp_path / "m.bin")
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint suffix '\.ckpt' for saving"):
        save_checkpoint(tap_model, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="m.onnx: no such file"):
        load_checkpoint(tmp_path / "m.onnx")
    # Files are read by content (issue 29): one that is none of the formats says which to use.
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    with pytest.raises(CheckpointError, match="use .safetensors"):
        load_checkpoint(tmp_path / "m.onnx")


def test_custom_models_cannot_be_saved(tmp_path, tap_model):
    custom = AuditModel(TinyNet(), dataclasses.replace(tap_model.meta, arch="custom"))
    with pytest.raises(CheckpointError, match="cannot save a 'custom' model"):
        save_checkpoint(custom, tmp_path / "m.safetensors")


# --------------------------------------------------------------------------- bare state_dicts


@pytest.fixture(scope="module")
def torchvision_resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None, num_classes=5).eval()


def test_bare_torchvision_state_dict_loads_with_arch(tmp_path, torchvision_resnet18):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet18.state_dict(), path)
    model = load_checkpoint(path, arch="resnet18").eval()
    assert (model.meta.arch, model.meta.num_classes, model.meta.in_channels) == ("resnet18", 5, 3)
    assert model.meta.input_size == (224, 224)
    assert model.meta.target_layers == ("net.layer1", "net.layer2", "net.layer3", "net.layer4")
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(outputs(model.net, images), outputs(torchvision_resnet18, images))
    assert read_checkpoint_meta(path) == {}


def test_bare_state_dict_without_arch_asks_for_it(tmp_path, torchvision_resnet18):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet18.state_dict(), path)
    with pytest.raises(ParameterError,
                       match=r"`arch` must be given: .* holds weights without auditkit metadata") as info:
        load_checkpoint(path)
    assert_one_line(info)


@pytest.mark.parametrize("prefix", ["", "net.", "module."])
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_bare_state_dict_infers_sizes_and_accepts_prefixes(tmp_path, tap_model, images, prefix, suffix):
    state_dict = {prefix + key.removeprefix("net."): value for key, value in tap_model.state_dict().items()}
    path = tmp_path / f"bare{suffix}"
    if suffix == ".pt":
        torch.save(state_dict, path)
    else:
        save_file(state_dict, path)  # no auditkit metadata
    model = load_checkpoint(path, arch="tap-cnn", input_size=(28, 28))
    assert (model.meta.num_classes, model.meta.in_channels, model.meta.input_size) == (3, 1, (28, 28))
    assert torch.equal(model.net.fc.weight, tap_model.net.fc.weight)


def test_state_dict_without_batch_norm_step_counters_loads(tmp_path, torchvision_resnet18):
    state_dict = {k: v for k, v in torchvision_resnet18.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state_dict, tmp_path / "old.pth")
    model = load_checkpoint(tmp_path / "old.pth", arch="resnet18")
    assert torch.equal(model.net.fc.bias, torchvision_resnet18.fc.bias)


# --------------------------------------------------------------------------- pickles


def test_pickled_module_is_refused_then_loads_when_trusted(tmp_path, torchvision_resnet18):
    path = tmp_path / "whole.pt"
    torch.save(torchvision_resnet18, path)
    with pytest.raises(CheckpointError, match="`trust_pickle` is off and .* contains pickled Python objects") as info:
        load_checkpoint(path)
    assert_one_line(info)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        read_checkpoint_meta(path)

    with pytest.warns(UserWarning, match="arbitrary code"):
        custom = load_checkpoint(path, trust_pickle=True)
    assert (custom.meta.arch, custom.meta.num_classes, custom.meta.in_channels) == ("custom", 5, 3)
    # Presets found by a probe pass (issue 16), no normalisation.
    assert custom.meta.target_layers == tuple(f"net.layer{i}" for i in range(1, 5))
    assert custom.meta.mean == (0.0, 0.0, 0.0)
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(outputs(custom.eval(), images), outputs(torchvision_resnet18, images))

    with pytest.warns(UserWarning, match="arbitrary code"):
        rebuilt = load_checkpoint(path, arch="resnet18", trust_pickle=True)
    assert rebuilt.meta.arch == "resnet18" and rebuilt.meta.gradcam_layer == "net.layer4"


def test_custom_class_is_refused_then_wrapped_when_trusted(tmp_path):
    net = TinyNet().eval()
    path = tmp_path / "tiny.pth"
    torch.save(net, path)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="trust_pickle"):
        model = load_checkpoint(path, trust_pickle=True)
    assert isinstance(model.net, TinyNet)
    assert (model.meta.in_channels, model.meta.num_classes) == (2, 5)
    images = torch.rand(1, 2, 8, 8)
    assert torch.equal(outputs(model, images), outputs(net, images))  # mean 0, std 1: images pass unchanged


def test_pickled_audit_model_is_returned_as_is_when_trusted(tmp_path, tap_model, images):
    path = tmp_path / "audit.pt"
    torch.save(tap_model, path)
    with pytest.raises(CheckpointError, match="trust_pickle"):
        load_checkpoint(path)
    with pytest.warns(UserWarning):
        model = load_checkpoint(path, trust_pickle=True)
    assert model.meta == tap_model.meta
    assert torch.equal(outputs(model, images), outputs(tap_model, images))


def test_trusted_loading_does_not_warn_for_safe_files(tmp_path, tap_model, recwarn):
    load_checkpoint(save_checkpoint(tap_model, tmp_path / "m.pt"), trust_pickle=True)
    assert not [w for w in recwarn if "arbitrary code" in str(w.message)]


# --------------------------------------------------------------------------- broken files


def write_truncated(path: Path, model: AuditModel) -> None:
    save_checkpoint(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_random_bytes(path: Path, _model: AuditModel) -> None:
    data = random.Random(7).randbytes(4096)
    assert data[:1] != b"\x80"  # a pickle header would (rightly) be reported as a pickle
    path.write_bytes(data)


BROKEN_FILES = {
    "truncated": write_truncated,
    "empty": lambda path, _model: path.write_bytes(b""),
    "random": write_random_bytes,
    "text": lambda path, _model: path.write_text("this is not a checkpoint\n"),
}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("kind", list(BROKEN_FILES))
def test_broken_files_raise_one_line_checkpoint_errors(tmp_path, tap_model, kind, suffix):
    path = tmp_path / f"broken{suffix}"
    BROKEN_FILES[kind](path, tap_model)
    for read in (load_checkpoint, read_checkpoint_meta):
        with pytest.raises(CheckpointError, match=r"is not a readable checkpoint \(.+\)") as info:
            read(path)
        assert_one_line(info)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint(tmp_path / "dir.pt")


def test_unknown_format_version_is_refused(tmp_path, tap_model):
    state_dict = {k: v.contiguous() for k, v in tap_model.state_dict().items()}
    meta = json.loads(json.dumps(read_checkpoint_meta(save_checkpoint(tap_model, tmp_path / "m.safetensors"))))
    meta["format_version"] = 99
    save_file(state_dict, tmp_path / "future.safetensors", metadata={"auditkit": json.dumps(meta)})
    torch.save({"format": "auditkit", "meta": meta, "state_dict": state_dict}, tmp_path / "future.pt")
    for name in ("future.safetensors", "future.pt"):
        with pytest.raises(CheckpointError, match="format_version 99"):
            load_checkpoint(tmp_path / name)


# --------------------------------------------------------------------------- mismatches


def test_checkpoint_loaded_as_another_arch_names_a_key(tmp_path, tap_model):
    path = save_checkpoint(tap_model, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match=r"does not match resnet18 .*missing key 'net\.conv1\.weight'") as info:
        load_checkpoint(path, arch="resnet18")
    assert_one_line(info)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_wrong_num_classes_names_the_key_and_shapes(tmp_path, tap_model, suffix):
    path = save_checkpoint(tap_model, tmp_path / f"m{suffix}")
    with pytest.raises(CheckpointError, match=r"'net\.fc\.weight' has shape \(3, 3136\) in the file, \(7, 3136\)"):
        load_checkpoint(path, num_classes=7)


def test_bare_state_dict_with_wrong_in_channels(tmp_path, torchvision_resnet18):
    torch.save(torchvision_resnet18.state_dict(), tmp_path / "r.pth")
    with pytest.raises(CheckpointError, match=r"in_channels=1.*'net\.conv1\.weight'"):
        load_checkpoint(tmp_path / "r.pth", arch="resnet18", in_channels=1)


@pytest.mark.parametrize("device", DEVICES)
def test_map_location_moves_the_model(tmp_path, tap_model, device):
    model = load_checkpoint(save_checkpoint(tap_model, tmp_path / "m.safetensors"), map_location=device)
    assert model.net.fc.weight.device.type == device and model.mean.device.type == device
