"""Issue 29, kind 2: a model's input normalisation is read where it is recorded, given with
--normalize, and never assumed silently (auditkit/models/normalization.py)."""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.data import open_dataset
from auditkit.errors import ParameterError
from auditkit.models import (
    NormalizationWarning,
    build_model,
    check_normalization,
    load_checkpoint,
    save_checkpoint,
)
from auditkit.models.normalization import (
    CHECK_SAMPLES,
    PRESETS,
    _sample,
    parse_normalize,
    recorded_normalization,
)
from auditkit.models.zoo import TapCNN
from auditkit.training import TrainConfig, align_dataset_to_model, train_model

runner = CliRunner()
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 16


def _images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 "dark" (brightness 0.55-0.65), class 1 "bright" (0.85-0.95), RGB, balanced.

    Both classes lie above ImageNet's mean, so a network trained on ImageNet-normalised inputs puts
    its threshold near 1.1 (normalised units); 0.5/0.5 normalisation maps both classes below it
    (0.1-0.3 and 0.7-0.9): every image looks dark, accuracy 0.5.
    """
    labels = np.arange(n) % 2
    brightness = np.where(labels == 1, rng.uniform(0.85, 0.95, n), rng.uniform(0.55, 0.65, n))
    noise = rng.normal(0, 0.02, (n, SIZE, SIZE, 3))
    return np.clip(brightness[:, None, None, None] + noise, 0, 1).astype(np.float32), labels


def _users_accuracy(net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, mean, std) -> float:
    """Accuracy as the user's own loop computes it: NCHW tensor, (x - mean) / std, argmax."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return float((net(x).argmax(dim=1).numpy() == labels).mean())


@pytest.fixture(scope="module")
def users_model(tmp_path_factory):
    """A tiny CNN trained in the user's own loop on ImageNet-normalised inputs, saved as bare weights."""
    folder = tmp_path_factory.mktemp("normalization")
    rng = np.random.default_rng(0)
    train_x, train_y = _images(rng, 128)
    test_x, test_y = _images(rng, 64)
    torch.manual_seed(0)
    net = TapCNN(3, 2)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = (torch.from_numpy(train_x).permute(0, 3, 1, 2) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    y = torch.from_numpy(train_y)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = torch.randint(0, len(x), (32,), generator=generator)
        loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    weights = folder / "weights.pt"
    torch.save(net.state_dict(), weights)
    data = folder / "data.npz"
    np.savez(data, images=np.concatenate([train_x, test_x]), labels=np.concatenate([train_y, test_y]),
             splits=np.array(["train"] * len(train_x) + ["test"] * len(test_x)), classes=np.array(["dark", "bright"]))
    truth = {
        "test_imagenet": _users_accuracy(net, test_x, test_y, IMAGENET_MEAN, IMAGENET_STD),
        "test_half": _users_accuracy(net, test_x, test_y, (0.5,) * 3, (0.5,) * 3),
        "train_imagenet": _users_accuracy(net, train_x, train_y, IMAGENET_MEAN, IMAGENET_STD),
        "train_half": _users_accuracy(net, train_x, train_y, (0.5,) * 3, (0.5,) * 3),
        "train_none": _users_accuracy(net, train_x, train_y, (0.0,) * 3, (1.0,) * 3),
    }
    # The 64 train images the check looks at on the CPU (evenly spaced).
    picked = _sample(train_x, CHECK_SAMPLES["cpu"])
    truth["sample_half"] = _users_accuracy(net, train_x[picked], train_y[picked], (0.5,) * 3, (0.5,) * 3)
    truth["sample_imagenet"] = _users_accuracy(net, train_x[picked], train_y[picked], IMAGENET_MEAN, IMAGENET_STD)
    # The premise: the user's loop scores the model perfectly, the 0.5 assumption at chance.
    assert truth["test_imagenet"] == 1.0 and truth["train_imagenet"] == 1.0
    assert truth["test_half"] <= 0.6 and truth["train_half"] <= 0.6
    return {"folder": folder, "weights": weights, "data": data, "net": net, "truth": truth}


def _evaluate(users_model, *options):
    out = users_model["folder"] / "evaluate.json"
    result = runner.invoke(app, ["evaluate", str(users_model["weights"]), "--arch", "tap-cnn", "--data",
                                 str(users_model["data"]), "--device", "cpu", "--json", str(out), *options])
    return result, (json.loads(out.read_text()) if result.exit_code == 0 else None)


def test_normalize_imagenet_scores_as_the_users_loop(users_model):
    result, report = _evaluate(users_model, "--normalize", "imagenet")
    assert result.exit_code == 0, result.output
    assert report["results"]["original"]["accuracy"] == users_model["truth"]["test_imagenet"] == 1.0
    assert "warning" not in result.output


def test_the_same_statistics_as_numbers_score_the_same(users_model):
    result, report = _evaluate(users_model, "--normalize", "0.485,0.456,0.406/0.229,0.224,0.225")
    assert result.exit_code == 0, result.output
    assert report["results"]["original"]["accuracy"] == 1.0


def test_without_the_option_the_cli_warns_and_names_the_fix(users_model):
    result, report = _evaluate(users_model)
    assert result.exit_code == 0, result.output
    truth = users_model["truth"]
    # What the assumption really gives (the user's loop with 0.5/0.5): the number is not hidden.
    assert report["results"]["original"]["accuracy"] == pytest.approx(truth["test_half"])
    lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(lines) == 2, result.output
    assert lines[0].startswith("warning: assumed input normalisation mean 0.5 std 0.5 for weights.pt")
    assert lines[0].endswith("pass --normalize imagenet")
    # The check ran on the train split (64 of its 128 images on the CPU) and measured the user's accuracies.
    assert (f"accuracy {truth['sample_half']:.2f} with the assumed normalisation (mean 0.5 std 0.5), "
            f"{truth['sample_imagenet']:.2f} with imagenet on 64 images of the train split") in lines[1]
    assert lines[1].endswith("; pass --normalize imagenet")
    assert "Traceback" not in result.output and "normalize='" not in result.output


def test_audit_prints_the_same_lines_and_records_the_source(users_model, tmp_path):
    result = runner.invoke(app, ["audit", str(users_model["weights"]), "--arch", "tap-cnn", "--data",
                                 str(users_model["data"]), "--device", "cpu", "--normalize", "imagenet",
                                 "--bootstrap", "10", "--examples", "1", "--json", str(tmp_path / "r.json"), "--quiet"])
    assert result.exit_code in (0, 1), result.output
    assert "warning: assumed" not in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["checkpoint"]["normalization"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                                     "source": "option: imagenet"}


def test_library_warns_in_its_own_words_and_records_the_source(users_model):
    with pytest.warns(NormalizationWarning, match=r"mean 0\.5 std 0\.5 .*give normalize='imagenet'"):
        model = load_checkpoint(users_model["weights"], arch="tap-cnn")
    assert model.meta.normalization == "assumed"
    assert model.meta.mean == (0.5, 0.5, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormalizationWarning)
        chosen = load_checkpoint(users_model["weights"], arch="tap-cnn", normalize="imagenet")
    assert chosen.meta.normalization == "option: imagenet"
    assert chosen.meta.mean == IMAGENET_MEAN and chosen.meta.std == IMAGENET_STD
    assert torch.equal(chosen.mean.flatten(), torch.tensor(IMAGENET_MEAN))


def test_the_check_measures_each_candidate(users_model):
    with pytest.warns(NormalizationWarning):
        model = load_checkpoint(users_model["weights"], arch="tap-cnn")
    with pytest.warns(NormalizationWarning, match="1.00 with imagenet on 64 images of the train split"):
        train = align_dataset_to_model(open_dataset(users_model["data"], split="train"), model)
    result = check_normalization(model, train, samples=256)  # all 128 train images
    truth = users_model["truth"]
    assert result.samples == 128 and result.chance == 0.5
    assert result.accuracy["current"] == pytest.approx(truth["train_half"])
    assert result.accuracy["imagenet"] == pytest.approx(truth["train_imagenet"])
    assert result.accuracy["none"] == pytest.approx(truth["train_none"])
    assert "inception" not in result.accuracy  # 0.5/0.5 is the assumption itself
    assert result.suggestion == "imagenet"
    assert model.meta.mean == (0.5, 0.5, 0.5)  # the check never changes the model


def test_without_a_train_split_the_evaluated_data_is_checked(users_model):
    with pytest.warns(NormalizationWarning):
        model = load_checkpoint(users_model["weights"], arch="tap-cnn")
    with pytest.warns(NormalizationWarning, match="with imagenet on 64 images of the data"):
        align_dataset_to_model(open_dataset(users_model["data"], split="test"), model)
    # check_on: the train split of the whole data, though only the test split is evaluated.
    with pytest.warns(NormalizationWarning, match="of the train split"):
        align_dataset_to_model(open_dataset(users_model["data"], split="test"), model,
                               check_on=open_dataset(users_model["data"]))


def test_no_suggestion_when_the_normalisation_fits(users_model):
    model = load_checkpoint(users_model["weights"], arch="tap-cnn", normalize="imagenet")
    train = align_dataset_to_model(open_dataset(users_model["data"], split="train"), model)
    result = check_normalization(model, train)
    assert result.accuracy == {"current": 1.0} and result.suggestion is None  # one pass: nothing else tried


def test_records_in_files(users_model, tmp_path):
    state = users_model["net"].state_dict()
    cfg = {"mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    # A dict with a timm pretrained_cfg beside the weights.
    torch.save({"state_dict": state, "pretrained_cfg": cfg}, tmp_path / "cfg.pt")
    model = load_checkpoint(tmp_path / "cfg.pt", arch="tap-cnn")
    assert (model.meta.mean, model.meta.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert model.meta.normalization == "checkpoint: 'pretrained_cfg'"
    # The option beats the record.
    assert load_checkpoint(tmp_path / "cfg.pt", arch="tap-cnn", normalize="none").meta.mean == (0.0, 0.0, 0.0)
    # A timm training checkpoint (train.py's keys) without --mean: timm's defaults for args.model.
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": state, "args": {"model": "resnet18", "mean": None}},
               tmp_path / "timm.pth")
    model = load_checkpoint(tmp_path / "timm.pth", arch="tap-cnn")
    assert model.meta.mean == IMAGENET_MEAN and model.meta.normalization.startswith("checkpoint: timm training args")
    # ... with --mean/--std given to timm's train.py (an argparse Namespace: a pickle).
    args = argparse.Namespace(model="resnet18", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    torch.save({"arch": "resnet18", "state_dict": state, "args": args}, tmp_path / "timm_args.pth")
    with pytest.warns(UserWarning, match="arbitrary code"):
        model = load_checkpoint(tmp_path / "timm_args.pth", arch="tap-cnn", trust_pickle=True)
    assert model.meta.std == (0.25, 0.25, 0.25) and model.meta.normalization == "checkpoint: 'args'"
    # Lightning's hyper_parameters.
    torch.save({"state_dict": state, "hyper_parameters": {"lr": 0.1, "mean": [0.3] * 3, "std": [0.2] * 3}},
               tmp_path / "lightning.ckpt")
    assert load_checkpoint(tmp_path / "lightning.ckpt", arch="tap-cnn").meta.mean == (0.3, 0.3, 0.3)
    # A Hugging Face preprocessor_config.json beside bare safetensors weights.
    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    model = load_checkpoint(folder / "model.safetensors", arch="tap-cnn")
    assert model.meta.mean == IMAGENET_MEAN and model.meta.normalization == "checkpoint: preprocessor_config.json"


def test_a_pickled_timm_module_brings_its_pretrained_cfg(tmp_path):
    net = TapCNN(3, 2)
    net.pretrained_cfg = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    torch.save(net, tmp_path / "module.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the trust_pickle warning
        model = load_checkpoint(tmp_path / "module.pt", trust_pickle=True)
    assert model.meta.mean == IMAGENET_MEAN and model.meta.normalization == "checkpoint: the module's pretrained_cfg"
    # Without a record a pickled module is fed [0, 1] pixels (0/1), and loading says it assumed so.
    del net.pretrained_cfg
    torch.save(net, tmp_path / "plain.pt")
    with pytest.warns(NormalizationWarning, match="mean 0 std 1"):
        warnings.filterwarnings("ignore", "unpickling", UserWarning)
        model = load_checkpoint(tmp_path / "plain.pt", trust_pickle=True)
    assert model.meta.normalization == "assumed"


def test_tensors_named_mean_and_std_are_weights_not_a_record():
    assert recorded_normalization({"mean": torch.zeros(3), "std": torch.ones(3), "conv.weight": torch.zeros(1)}) is None
    assert recorded_normalization({"state_dict": {}, "config": "a string"}) is None


def test_auditkit_checkpoints_keep_their_record_and_the_option_wins(tmp_path):
    model = build_model("tap-cnn", 2, 1, (12, 12), mean=0.1307, std=0.3081)
    assert model.meta.normalization == "option"
    save_checkpoint(model, tmp_path / "m.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormalizationWarning)
        loaded = load_checkpoint(tmp_path / "m.safetensors")
    # The recorded source survives the round trip; a file from before the field says "checkpoint".
    assert loaded.meta.mean == (0.1307,) and loaded.meta.normalization == "option"
    save_checkpoint(model, tmp_path / "old.pt")
    payload = torch.load(tmp_path / "old.pt", weights_only=True)
    del payload["meta"]["normalization"]
    torch.save(payload, tmp_path / "old.pt")
    old = load_checkpoint(tmp_path / "old.pt")
    assert old.meta.mean == (0.1307,) and old.meta.normalization == "checkpoint"
    # A model built without mean/std uses auditkit's default: no assumption about foreign weights, no warning.
    default = build_model("tap-cnn", 2, 3, (12, 12))
    assert default.meta.normalization == "default"
    save_checkpoint(default, tmp_path / "d.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NormalizationWarning)
        assert load_checkpoint(tmp_path / "d.safetensors").meta.normalization == "default"
    chosen = load_checkpoint(tmp_path / "m.safetensors", normalize="imagenet")
    # A greyscale model given ImageNet's RGB statistics: their average.
    assert chosen.meta.mean == (0.449,) and chosen.meta.std == (0.226,)
    assert chosen(torch.full((1, 1, 12, 12), 0.449)).shape == (1, 2)
    assert torch.equal(chosen.mean.flatten(), torch.tensor([0.449]))


def test_parse_normalize_grammar():
    assert parse_normalize(None, 3) is None
    assert parse_normalize("ImageNet", 3).mean == IMAGENET_MEAN
    assert parse_normalize("none", 1).std == (1.0,)
    half = parse_normalize("0.5/0.25", 3)
    assert (half.mean, half.std, half.label) == ((0.5,) * 3, (0.25,) * 3, "option")
    assert parse_normalize("0.1,0.2,0.3/1,2,3", 3).std == (1.0, 2.0, 3.0)
    assert parse_normalize(((0.1, 0.2, 0.3), 0.5), 3).std == (0.5,) * 3
    assert parse_normalize({"mean": 0.2, "std": 0.4}, 1).mean == (0.2,)
    assert PRESETS["inception"] == ((0.5,) * 3, (0.5,) * 3)
    for bad, words in [("foo", "must be imagenet"), ("0.5", "must be imagenet"), ("1/0", "positive std"),
                       ("a/b", "must be imagenet"), ("0.1,0.2/1", "2 mean value"), ("1/2/3", "must be imagenet"),
                       ("nan/1", "not finite")]:
        with pytest.raises(ParameterError, match=words):
            parse_normalize(bad, 3)


def test_cli_bad_normalize_is_one_line(users_model):
    result, _ = _evaluate(users_model, "--normalize", "0.5")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith("error: --normalize must be imagenet")
    assert "Traceback" not in result.output


def test_inspect_shows_the_source(users_model):
    result = runner.invoke(app, ["inspect", str(users_model["weights"]), "--arch", "tap-cnn"])
    assert result.exit_code == 0, result.output
    assert "normalised with mean 0.5 std 0.5 (ASSUMED)" in " ".join(result.output.split())
    result = runner.invoke(app, ["inspect", str(users_model["weights"]), "--arch", "tap-cnn", "--normalize", "imagenet",
                                 "--json", "-"])
    shown = json.loads(result.stdout)
    assert shown["normalization"] == "option: imagenet" and shown["mean"] == list(IMAGENET_MEAN)


def test_train_takes_the_same_option(users_model):
    dataset = open_dataset(users_model["data"])
    config = TrainConfig(epochs=1, batch_size=64, device="cpu", precision="fp32")
    named = train_model(dataset, "tap-cnn", config, normalize="imagenet", val_split=None).model
    assert named.meta.mean == IMAGENET_MEAN and named.meta.normalization == "option: imagenet"
    own = train_model(dataset, "tap-cnn", config, val_split=None).model
    assert own.meta.normalization == "training data"
    assert own.meta.mean == dataset.select(split="train").channel_stats()[0]
    with pytest.raises(ParameterError, match="must be imagenet"):
        train_model(dataset, "tap-cnn", config, normalize="datset", val_split=None)
