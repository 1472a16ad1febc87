"""Issue 29, kinds 3 and 6: class order as the user's loader had it, and files as people save them.

Kind 3: folders named 0..11 get torchvision ImageFolder's indices (text order), dataset.json and
`classes=`/`--classes` fix the order for every layout, and a checkpoint whose class names are the
data's in another order is scored by name, never by position. Kind 6: Excel CSVs (BOM, Windows-1252,
UTF-16, semicolons), checkpoints read by content (safetensors named .pth, TorchScript), folders.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.data import open_dataset
from auditkit.errors import CheckpointError, DataError
from auditkit.models import build_model, load_checkpoint, read_checkpoint_meta, save_checkpoint
from auditkit.models.checkpoint import PickleRefused, checkpoint_format
from auditkit.models.zoo import CUSTOM_ARCH, AuditModel, ModelMeta
from auditkit.training import align_dataset_to_model, evaluate

runner = CliRunner()
NUMERIC = tuple(str(k) for k in range(12))
STEP = 20  # class k's images are uniform grey k*STEP/255: the oracle below reads the class off the pixels


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    """The single line a failing command printed (exit 2, no traceback)."""
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def write_png(path, value: int, size: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((size, size), value, np.uint8))


@pytest.fixture
def digit_tree(tmp_path):
    """root/<split>/<k>/*.png for k = 0..11: the layout that made 10 of 12 indices differ."""
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for k in range(12):
            for j in range(2):
                write_png(root / split / str(k) / f"{split}{j}.png", k * STEP)
    return root


class Oracle(nn.Module):
    """Reads class k off a uniform grey image (k*STEP/255) and puts all its logit at ``position[k]``:
    a perfect classifier whose output order is ``position``."""

    def __init__(self, position: list[int]):
        super().__init__()
        self.register_buffer("position", torch.tensor(position))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        k = (x.mean(dim=(1, 2, 3)) * 255 / STEP).round().long().clamp(0, len(self.position) - 1)
        return nn.functional.one_hot(self.position[k], len(self.position)).float() * self.scale


def oracle_model(output_order: tuple[str, ...], *, names_recorded: bool) -> AuditModel:
    meta = ModelMeta(arch=CUSTOM_ARCH, num_classes=12, in_channels=1, input_size=(6, 6), mean=(0.0,), std=(1.0,),
                     class_names=output_order if names_recorded else NUMERIC, target_layers=(), gradcam_layer="",
                     normalization="option")
    model = AuditModel(Oracle([output_order.index(str(k)) for k in range(12)]), meta, min_input_size=1).eval()
    if not names_recorded:
        model.adopt_from_data = ("class_names",)
    return model


# ---- kind 3: class order ---------------------------------------------------------------------


def test_folders_0_to_11_get_imagefolder_indices(digit_tree):
    import torchvision

    dataset = open_dataset(digit_tree, split="train")
    reference = torchvision.datasets.ImageFolder(digit_tree / "train")
    assert dataset.classes == tuple(reference.classes)
    assert dataset.classes[:5] == ("0", "1", "10", "11", "2")
    # Every file carries ImageFolder's target for it.
    theirs = {(Path(path).parent.name, Path(path).name): target for path, target in reference.samples}
    ours = {(r.image.parent.name, r.image.name): r.label for r in dataset.records}
    assert ours == theirs and len(ours) == 24
    assert "ImageFolder" in dataset.info.class_order


def test_a_model_trained_with_imagefolder_scores_as_in_the_users_loop(digit_tree):
    # Bare weights (no class names in the file) trained by ImageFolder: outputs in text order.
    model = oracle_model(tuple(sorted(NUMERIC)), names_recorded=False)
    dataset = align_dataset_to_model(open_dataset(digit_tree, split="test"), model)
    assert evaluate(model, dataset)["original"].accuracy == 1.0
    assert model.meta.class_names == tuple(sorted(NUMERIC))


def test_same_classes_in_another_order_are_reindexed_by_name(digit_tree):
    # A checkpoint that records its classes in numeric order, data in ImageFolder order: scored by name.
    model = oracle_model(NUMERIC, names_recorded=True)
    data = open_dataset(digit_tree, split="test")
    with pytest.warns(UserWarning, match="re-indexed by name"):
        aligned = align_dataset_to_model(data, model)
    assert aligned.classes == NUMERIC
    assert all(aligned.classes[r.label] == r.image.parent.name for r in aligned.records)
    assert evaluate(model, aligned)["original"].accuracy == 1.0  # by position it would be 2/12


def test_other_classes_are_still_refused(digit_tree):
    model = oracle_model(NUMERIC, names_recorded=True)
    model.meta = dataclasses.replace(model.meta, class_names=tuple(f"c{k}" for k in range(12)))
    with pytest.raises(DataError, match="do not match the checkpoint's"):
        align_dataset_to_model(open_dataset(digit_tree), model)


def test_dataset_json_and_the_classes_option_order_a_folder_tree(digit_tree):
    (digit_tree / "dataset.json").write_text(json.dumps({"classes": list(NUMERIC)}))
    dataset = open_dataset(digit_tree)
    assert dataset.classes == NUMERIC and "dataset.json" in dataset.info.class_order
    assert all(dataset.classes[r.label] == r.image.parent.name for r in dataset.records)
    reverse = tuple(reversed(NUMERIC))
    assert open_dataset(digit_tree, classes=",".join(reverse)).classes == reverse  # the option wins
    with pytest.raises(DataError, match="class folders 10, 11 are not among the declared classes"):
        open_dataset(digit_tree, classes=[str(k) for k in range(10)])
    with pytest.raises(DataError, match="'3' is named twice"):
        open_dataset(digit_tree, classes="0,1,2,3,3")


def _manifest_folder(tmp_path, labels, text=None, encoding="utf-8"):
    folder = tmp_path / "manifest"
    for j, label in enumerate(labels):
        write_png(folder / f"{j}.png", 10 * j)
    text = text or "path,label\n" + "".join(f"{j}.png,{label}\n" for j, label in enumerate(labels))
    (folder / "manifest.csv").write_bytes(text.encode(encoding))
    return folder


def test_classes_for_every_layout(tmp_path):
    # Manifest: numeric labels sort as numbers (as pandas/LabelEncoder read them); dataset.json reorders.
    folder = _manifest_folder(tmp_path, ["10", "2", "1"])
    assert open_dataset(folder).classes == ("1", "2", "10")
    (folder / "dataset.json").write_text(json.dumps({"classes": ["10", "2", "1"]}))
    assert [open_dataset(folder).classes[r.label] for r in open_dataset(folder).records] == ["10", "2", "1"]
    # Integer labels with declared names: the integers are indices into them.
    named = open_dataset(folder, classes=["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"])
    assert [named.classes[r.label] for r in named.records] == ["k", "c", "b"]

    # Box CSV: a dataset.json beside it, or the option.
    boxes = tmp_path / "boxes"
    for name in ("a.png", "b.png"):
        write_png(boxes / name, 0)
    (boxes / "boxes.csv").write_text("path,label,x0,y0,x1,y1\na.png,cat,0,0,2,2\nb.png,dog,,,,\n")
    assert open_dataset(boxes / "boxes.csv").classes == ("cat", "dog")
    (boxes / "dataset.json").write_text(json.dumps({"classes": ["dog", "cat"]}))
    ds = open_dataset(boxes / "boxes.csv")
    assert ds.classes == ("dog", "cat") and [r.label for r in ds.records] == [1, 0]
    assert open_dataset(boxes / "boxes.csv", classes="cat,dog").classes == ("cat", "dog")

    # npz folder (dataset.npz + dataset.json): integer labels named by dataset.json.
    npz = tmp_path / "arrays"
    npz.mkdir()
    np.savez(npz / "dataset.npz", images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, 2, 1]))
    assert open_dataset(npz).classes == ("0", "1", "2")
    (npz / "dataset.json").write_text(json.dumps({"classes": ["x", "y", "z"]}))
    ds = open_dataset(npz)
    assert [ds.classes[r.label] for r in ds.records] == ["x", "z", "y"]
    # Named labels in the archive, reordered by the option.
    np.savez(tmp_path / "named.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 1]),
             classes=np.array(["cat", "dog"]))
    ds = open_dataset(tmp_path / "named.npz", classes=["dog", "cat"])
    assert ds.classes == ("dog", "cat") and [r.label for r in ds.records] == [1, 0]

    # Built-in data: reordered by name.
    digits = open_dataset("builtin:decoy-digits", split="test", classes=[str(k) for k in range(9, -1, -1)])
    plain = open_dataset("builtin:decoy-digits", split="test")
    assert [9 - r.label for r in digits.records[:50]] == [r.label for r in plain.records[:50]]


def test_cli_shows_the_class_order_and_takes_classes(digit_tree):
    shown = run("data", "show", digit_tree, "--json", "-")
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    assert summary["classes"][:4] == ["0", "1", "10", "11"] and "ImageFolder" in summary["class_order"]
    printed = run("data", "show", digit_tree, "--classes", ",".join(NUMERIC))
    assert printed.exit_code == 0 and "2=2, 3=3" in printed.output.replace("\n", " ")
    assert "not among the declared classes" in error_line(run("data", "show", digit_tree, "--classes", "a,b"))


# ---- kind 6: CSV files as Excel saves them ---------------------------------------------------------


@pytest.mark.parametrize(
    "encoding, text",
    [
        ("utf-8-sig", "path,label\n0.png,café\n1.png,thé\n"),  # "CSV UTF-8": a byte-order mark
        ("utf-16", "path\tlabel\r\n0.png\tcafé\r\n1.png\tthé\r\n"),  # "Unicode text": UTF-16 + BOM, tabs
        ("utf-8", "Path;Label\r\n0.png;café\r\n1.png;thé\r\n;;\r\n"),  # European Excel: ';', a blank row
        ("cp1252", "path,label\n0.png,café\n1.png,thé\n"),  # "CSV (comma delimited)": Windows-1252
    ],
)
def test_csv_as_excel_saves_it(tmp_path, encoding, text):
    folder = _manifest_folder(tmp_path, ["x", "y"], text=text, encoding=encoding)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = open_dataset(folder)
    assert dataset.classes == ("café", "thé") and len(dataset) == 2
    noted = [str(w.message) for w in caught if "Windows-1252" in str(w.message)]
    assert bool(noted) == (encoding == "cp1252")


def test_csv_without_the_columns_still_says_so(tmp_path):
    folder = _manifest_folder(tmp_path, ["x"], text="file,class\n0.png,x\n", encoding="utf-8-sig")
    with pytest.raises(DataError, match="missing column\\(s\\) path, label; has file, class"):
        open_dataset(folder)


# ---- kind 6: checkpoints by content ------------------------------------------------------------------


@pytest.fixture
def tap_model():
    torch.manual_seed(0)
    return build_model("tap-cnn", 3, 1, (28, 28)).eval()


def test_checkpoints_are_read_by_content_not_suffix(tmp_path, tap_model):
    images = torch.rand(2, 1, 28, 28)
    expected = tap_model(images)
    safetensors = save_checkpoint(tap_model, tmp_path / "m.safetensors")
    torch_zip = save_checkpoint(tap_model, tmp_path / "m.pt")
    for source, name, fmt in [(safetensors, "named.pth", "safetensors"), (torch_zip, "named.bin", "PyTorch zip"),
                              (torch_zip, "named.ckpt", "PyTorch zip"), (safetensors, "named.weights", "safetensors")]:
        shutil.copy(source, tmp_path / name)
        assert checkpoint_format(tmp_path / name).startswith(fmt)
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.meta.class_names == tap_model.meta.class_names
        assert torch.allclose(loaded(images), expected, atol=1e-6)
        assert read_checkpoint_meta(tmp_path / name)["arch"] == "tap-cnn"


def test_foreign_files_are_named(tmp_path):
    with open(tmp_path / "arrays.pt", "wb") as file:  # a path np.savez would give .npz
        np.savez(file, x=np.zeros(3))
    (tmp_path / "lfs.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(CheckpointError, match="a zip archive without torch's data.pkl"):
        load_checkpoint(tmp_path / "arrays.pt")
    with pytest.raises(CheckpointError, match="a Git LFS pointer"):
        load_checkpoint(tmp_path / "lfs.pth")


def _scripted(tmp_path, net, name="scripted.pt"):
    path = tmp_path / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notices for torch.jit
        torch.jit.save(torch.jit.trace(net, torch.rand(1, 1, 28, 28)), str(path))
    return path


def test_torchscript_is_named_and_loads_behind_trust_pickle(tmp_path, tap_model, digit_tree):
    path = _scripted(tmp_path, tap_model.net)
    assert checkpoint_format(path) == "TorchScript archive (torch.jit.save)"
    for read in (load_checkpoint, read_checkpoint_meta):
        with pytest.raises(PickleRefused, match="is a TorchScript archive") as info:
            read(path)
        assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    images = torch.rand(3, 1, 28, 28)
    with pytest.warns(UserWarning, match="TorchScript"):
        sealed = load_checkpoint(path, trust_pickle=True)
    # The scripted network runs as is (no normalisation recorded: mean 0, std 1 assumed).
    assert (sealed.meta.arch, sealed.meta.in_channels, sealed.meta.num_classes) == ("custom", 1, 3)
    assert torch.allclose(sealed(images), tap_model.net(images), atol=1e-5)
    # With --arch its weights go into auditkit's network: the same outputs as the original model.
    rebuilt = load_checkpoint(path, trust_pickle=True, arch="tap-cnn", input_size=(28, 28), normalize="0.5/0.5")
    assert torch.allclose(rebuilt(images), tap_model(images), atol=1e-5)
    # It evaluates on data.
    three = tmp_path / "three"
    for k in range(3):
        write_png(three / str(k) / "a.png", 50 * k, size=28)
    results = evaluate(sealed, align_dataset_to_model(open_dataset(three), sealed))
    assert results["original"].samples == 3


def test_a_folder_gets_one_line_naming_its_weights(tmp_path):
    folder = tmp_path / "hf-model"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="holds none") as info:
        load_checkpoint(folder)
    assert "no Hugging Face or timm model folder" in str(info.value) and "\n" not in str(info.value)
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="it holds model.safetensors"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{}")  # a model folder now (issue 26): its config must say what it is
    with pytest.raises(CheckpointError, match="neither a Hugging Face model's"):
        load_checkpoint(folder)


def test_cli_checkpoint_files(tmp_path, tap_model, digit_tree):
    shutil.copy(save_checkpoint(tap_model, tmp_path / "m.safetensors"), tmp_path / "model.pth")
    shown = run("inspect", tmp_path / "model.pth", "--json", "-")
    assert shown.exit_code == 0, shown.output
    report = json.loads(shown.output)
    assert report["format"] == "safetensors" and report["class_names"] == ["0", "1", "2"]
    printed = run("inspect", tmp_path / "model.pth")
    assert "format: safetensors" in printed.output and "0=0, 1=1, 2=2" in printed.output

    scripted = _scripted(tmp_path, tap_model.net)
    line = error_line(run("inspect", scripted))
    assert "TorchScript archive" in line and "--trust-pickle is off" in line
    trusted = run("inspect", scripted, "--trust-pickle", "--json", "-")
    assert trusted.exit_code == 0, trusted.output
    assert json.loads(trusted.output[trusted.output.index("{"):])["format"].startswith("TorchScript")

    (tmp_path / "folder").mkdir()
    assert "no Hugging Face or timm model folder" in error_line(run("inspect", tmp_path / "folder"))
    bad = _manifest_folder(tmp_path, ["x"], text="\ufefffile,label\n0.png,x\n")
    assert "missing column(s) path" in error_line(
        run("evaluate", tmp_path / "model.pth", "--data", bad, "--split", "all"))
