"""`auditkit data`, `train`, `inspect`, `evaluate`, `models` from the command line, good and bad input."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.data import open_dataset
from auditkit.models import load_checkpoint, save_checkpoint
from auditkit.training import evaluate

from .conftest import train_digits_model

runner = CliRunner()


class Payload:
    """An arbitrary class: unpickling an instance runs an import of this module."""


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The single line a failing command printed (the CLI must not print tracebacks)."""
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "decoy-digits"
    result = run("data", "make", "decoy-patch", folder, "--source", "sklearn-digits", "--json",
                 folder.parent / "s.json")
    assert result.exit_code == 0, result.output
    return folder


@pytest.fixture(scope="module")
def trained(digits_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    result = run(
        "train", "--data", digits_folder, "--arch", "tap-cnn", "--out", out, "--epochs", "2", "--quiet", "--json", "-"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    return out, report


def test_data_make_writes_every_variant(digits_folder):
    summary = json.loads((digits_folder.parent / "s.json").read_text())
    assert set(summary["splits"]["test"]) == {"contaminated", "permuted", "clean"}
    assert (digits_folder / "manifest.csv").is_file() and (digits_folder / "dataset.json").is_file()


def test_data_make_refuses_to_overwrite_and_checks_parameters(digits_folder, tmp_path):
    assert "already exists" in error_line(run("data", "make", "decoy-patch", digits_folder, "--source",
                                              "sklearn-digits"))
    assert "unknown" in error_line(run("data", "make", "glitter", tmp_path / "x"))
    assert "step" in error_line(run("data", "make", "decoy-patch", tmp_path / "y", "--source", "sklearn-digits", "-p",
                                    "step=100"))
    assert "KEY=VALUE" in error_line(run("data", "make", "stripe", tmp_path / "z", "-p", "width"))
    assert not (tmp_path / "y").exists()


def test_an_operating_system_error_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    # Any file the system refuses (here a full disk while writing the npz) is one line, not a traceback.
    import numpy as np

    def full(path, **arrays):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(np, "savez_compressed", full)
    line = error_line(run("data", "make", "decoy-patch", tmp_path / "d", "--source", "sklearn-digits", "--format",
                          "npz"))
    assert line.endswith("dataset.npz: No space left on device"), line
    assert list(tmp_path.iterdir()) == []


def test_data_show_and_list():
    result = run("data", "show", "builtin:decoy-digits", "--json", "-")
    assert result.exit_code == 0 and json.loads(result.output)["classes"][0] == "0"
    listing = run("data", "list")
    assert listing.exit_code == 0
    assert "builtin:colored-mnist" in listing.output and "coloured-background" in listing.output
    assert "no such file" in error_line(run("data", "show", "/nonexistent/dataset"))


def test_train_writes_a_checkpoint_and_reports_every_test_variant(trained):
    out, report = trained
    assert out.is_file()
    assert set(report["test"]) == {"contaminated", "permuted", "clean"}
    assert report["training"]["variant"] == "contaminated" and len(report["training"]["history"]) == 2
    model = load_checkpoint(out)
    assert model.meta.arch == "tap-cnn" and model.meta.in_channels == 1 and tuple(model.meta.input_size) == (8, 8)
    assert model.meta.mean != (0.5,)  # normalised with the training images' statistics


def test_train_bad_input_is_one_line_with_exit_2(trained, digits_folder, tmp_path):
    out, _ = trained
    args = ("--data", digits_folder, "--epochs", "1", "--quiet")
    assert "already exists" in error_line(run("train", *args, "--arch", "tap-cnn", "--out", out))
    assert "did you mean" in error_line(run("train", *args, "--arch", "resnet", "--out", tmp_path / "a.safetensors"))
    assert "no such file" in error_line(run("train", "--data", tmp_path / "nope", "--arch", "tap-cnn", "--out",
                                            tmp_path / "b.pt"))
    assert "layer" in error_line(run("train", *args, "--arch", "tap-cnn", "--layers", "net.conv9", "--out",
                                     tmp_path / "c.pt"))
    assert "--lr" in error_line(run("train", *args, "--arch", "tap-cnn", "--lr", "-1", "--out", tmp_path / "d.pt"))
    assert "no variant" in error_line(run("train", *args, "--arch", "tap-cnn", "--variant", "x", "--out",
                                          tmp_path / "e.pt"))
    assert "cuda" in error_line(run("train", *args, "--arch", "tap-cnn", "--device", "cuda", "--out",
                                    tmp_path / "f.pt")) or torch.cuda.is_available()
    assert not any(tmp_path.iterdir())


def test_layer_override_is_stored(digits_folder, tmp_path):
    out = tmp_path / "m.pt"
    result = run("train", "--data", digits_folder, "--arch", "tap-cnn", "--layers", "conv1", "--epochs", "1", "--quiet",
                 "--out", out)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out).meta.target_layers == ("net.conv1",)


def test_inspect_and_evaluate_load_the_checkpoint(trained, digits_folder):
    out, report = trained
    shown = run("inspect", out, "--json", "-")
    assert shown.exit_code == 0 and json.loads(shown.output)["arch"] == "tap-cnn"
    scored = run("evaluate", out, "--data", digits_folder, "--json", "-")
    assert scored.exit_code == 0, scored.output
    results = json.loads(scored.output[scored.output.index("{") :])["results"]
    assert results["contaminated"]["accuracy"] == pytest.approx(report["test"]["contaminated"]["accuracy"])


def test_evaluate_refuses_data_with_other_classes(trained, tmp_path):
    import numpy as np

    out, _ = trained
    np.savez(tmp_path / "two.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0, 1]))
    assert "are 2 of the checkpoint's 10" in error_line(run("evaluate", out, "--data", tmp_path / "two.npz", "--split",
                                                            "all"))
    np.savez(tmp_path / "cats.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0, 1]),
             classes=np.array(["cat", "dog"]))
    assert "do not match the checkpoint's" in error_line(run("evaluate", out, "--data", tmp_path / "cats.npz",
                                                             "--split", "all"))


def test_unsafe_and_corrupt_checkpoints(trained, tmp_path):
    out, _ = trained
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(out.read_bytes()[:100])
    assert "not a readable checkpoint" in error_line(run("inspect", truncated))

    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(pickle.dumps({"state_dict": Payload()}))  # loading it needs this module's code
    assert "--trust-pickle" in error_line(run("inspect", pickled))

    whole = tmp_path / "whole.pt"
    torch.save(load_checkpoint(out), whole)
    assert "--trust-pickle" in error_line(run("inspect", whole))
    trusted = run("inspect", whole, "--trust-pickle")
    assert trusted.exit_code == 0, trusted.output


def test_models_lists_the_zoo():
    result = run("models")
    assert result.exit_code == 0 and "resnet18" in result.output and "layer4" in result.output


def test_python_api_round_trip(tmp_path):
    dataset = open_dataset("builtin:decoy-digits")
    model = train_digits_model()
    path = save_checkpoint(model, tmp_path / "m.safetensors", extra={"note": "api"})
    again = load_checkpoint(path).eval()
    test = dataset.select(split="test")
    assert ({k: v.accuracy for k, v in evaluate(model, test).items()}
            == {k: v.accuracy for k, v in evaluate(again, test).items()})


@pytest.mark.slow
def test_decoy_mnist_shortcut_model_from_the_cli(decoy_mnist_models):
    """The shortcut the audit must find (FINDINGS.md): accurate with the decoy, clearly worse without it;
    the clean-trained control is not."""
    _, shortcut = decoy_mnist_models["shortcut"]
    assert shortcut["contaminated"] > 0.95
    assert shortcut["permuted"] < shortcut["contaminated"] - 0.1 and shortcut["clean"] < shortcut["contaminated"] - 0.15
    _, clean = decoy_mnist_models["clean"]
    assert max(clean.values()) - min(clean.values()) < 0.03 and min(clean.values()) > 0.9


def test_random_shift_translates_each_image_and_repeats_the_edges():
    from auditkit.training import random_shift

    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    assert random_shift(images, 0, torch.Generator().manual_seed(0)) is images
    shifted = random_shift(images, 2, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate")
    for i in range(2):  # every output is one 5x5 window of the edge-padded image
        windows = [padded[i, :, dy:dy + 5, dx:dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(shifted[i], w) for w in windows)
    again = random_shift(images, 2, torch.Generator().manual_seed(1))
    assert torch.equal(shifted, again)  # seeded
    many = random_shift(images.repeat(16, 1, 1, 1), 2, torch.Generator().manual_seed(2))
    assert not all(torch.equal(many[0], m) for m in many[::2])  # offsets differ between images


def test_random_rotate_scale_keeps_a_uniform_background_and_turns_each_image_by_its_own_angle():
    from auditkit.training import random_rotate_scale

    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(8, 3, 16, 16)
    images[:, :] = torch.tensor([0.2, 0.5, 0.9])[:, None, None]  # a coloured background ...
    images[:, :, 2:14, 7:9] = 1.0  # ... with a vertical bar through the centre
    assert random_rotate_scale(images, 0.0, 0.0, generator) is images
    # Identity when the ranges are tiny: bilinear sampling at the pixel centres reproduces the image.
    assert torch.allclose(random_rotate_scale(images, 1e-6, 1e-6, generator), images, atol=1e-4)
    turned = random_rotate_scale(images, 90.0, 0.0, torch.Generator().manual_seed(1))
    # Border padding: the corners keep the background colour exactly (no black wedges).
    assert torch.allclose(turned[:, :, 0, 0], images[:, :, 0, 0])
    # The bar's mass stays (rotation about the centre), but where it lies differs between images.
    assert torch.allclose(turned.sum((1, 2, 3)), images.sum((1, 2, 3)), rtol=0.08)
    assert not all(torch.allclose(turned[0], t, atol=1e-3) for t in turned[1:])
    again = random_rotate_scale(images, 90.0, 0.0, torch.Generator().manual_seed(1))
    assert torch.equal(turned, again)  # seeded
    zoomed = random_rotate_scale(images, 0.0, 0.5, torch.Generator().manual_seed(4))
    bar_width = (zoomed[:, 0, 8] - 0.2).sum(1) / 0.8  # the bar's width (pixels) on the middle row follows the zoom
    assert bar_width.min() < 1.8 and bar_width.max() > 2.2 and (bar_width - 2).abs().max() <= 1.0 + 1e-4


def test_train_config_rejects_augmentation_out_of_range():
    from auditkit.errors import AuditkitError
    from auditkit.training import TrainConfig

    for bad in ({"rotate": -1.0}, {"rotate": 200.0}, {"scale": 1.0}, {"scale": -0.1}):
        with pytest.raises(AuditkitError):
            TrainConfig(**bad).validate()


def test_random_channel_shuffle_permutes_each_images_channels_on_its_own():
    from auditkit.training import TrainConfig, augment_batch, random_channel_shuffle

    images = torch.rand(32, 3, 5, 5)
    shuffled = random_channel_shuffle(images, torch.Generator().manual_seed(0))
    orders = set()
    for original, out in zip(images, shuffled):
        # Every output channel is one input channel, each used once: a permutation of the channels.
        order = tuple(next(c for c in range(3) if torch.equal(out[k], original[c])) for k in range(3))
        assert sorted(order) == [0, 1, 2]
        orders.add(order)
    assert len(orders) > 1  # images draw their own orders
    assert torch.equal(shuffled, random_channel_shuffle(images, torch.Generator().manual_seed(0)))  # seeded
    config = TrainConfig(channel_shuffle=True)
    # shift 0: nothing else
    assert torch.equal(augment_batch(images, config, torch.Generator().manual_seed(0)), shuffled)
    assert augment_batch(images, TrainConfig(), torch.Generator().manual_seed(0)) is images  # no augmentation asked


def test_augment_batch_moves_each_mask_with_its_image():
    # The annotation TAP/RRR/Energy penalise must follow the pixels: with the mask equal to the image,
    # any shift, turn or zoom leaves them equal, and the images are those drawn without masks.
    from auditkit.training import TrainConfig, augment_batch

    images = torch.rand(16, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    config = TrainConfig(shift=2, rotate=30.0, scale=0.2)
    moved, masks = augment_batch(images, config, torch.Generator().manual_seed(5), masks=images.clone())
    assert not torch.allclose(moved, images)
    assert torch.allclose(masks, moved, atol=1e-6)
    alone = augment_batch(images, config, torch.Generator().manual_seed(5))
    assert torch.allclose(alone, moved, atol=1e-6)
    # Channel orders change the images only; a boolean mask keeps its dtype.
    colour = torch.rand(8, 3, 6, 6)
    flags = torch.rand(8, 1, 6, 6) > 0.5
    _, kept = augment_batch(colour, TrainConfig(channel_shuffle=True), torch.Generator().manual_seed(0), masks=flags)
    assert kept.dtype == torch.bool and torch.equal(kept, flags)
