"""Issue 26: Hugging Face and timm model folders, read offline and safely.

Tiny random-weight folders made with the libraries' own config classes and ``save_pretrained`` /
timm's ``save_for_hf`` go inspect -> audit -> repair -> audit from the command line; the repaired
folder loads back with ``from_pretrained`` / timm and gives the repaired logits. Heads from
``problem_type``/``num_labels``, refusals (regression, remote code, missing weights, a hub id, no
transformers, pickled weights), no network, and AttnLRP through HF's sdpa and eager attention."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest
import torch
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")
import timm  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageClassification,
    ConvNextConfig,
    Dinov2Config,
    ResNetConfig,
    SiglipConfig,
    SwinConfig,
    ViTConfig,
)

from auditkit.cli import app  # noqa: E402
from auditkit.errors import CheckpointError  # noqa: E402
from auditkit.models.loading import ReadOptions, load_model  # noqa: E402

from .test_binary_head_27 import shortcut_data  # noqa: E402  (one generator of the shortcut data)

runner = CliRunner()
CLASSES = ("normal", "pneumonia")
LABELS = {"num_labels": 2, "id2label": {0: "normal", 1: "pneumonia"}, "label2id": {"normal": 0, "pneumonia": 1}}
MEAN, STD = 0.4, 0.3  # written to preprocessor_config.json: read, not assumed


def tiny(kind: str, **extra):
    """A tiny config of ``kind`` for 1-channel 16x16 images (two classes unless ``extra`` says)."""
    labels = {**LABELS, **extra}
    if kind == "vit":
        return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=16, patch_size=4, num_channels=1, **labels)
    if kind == "dinov2":
        return Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=16,
                            patch_size=4, num_channels=1, **labels)
    if kind == "swin":
        return SwinConfig(image_size=16, patch_size=2, num_channels=1, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                          window_size=2, **labels)
    if kind == "siglip":  # SigLIP's vision tower with a classification head
        return SiglipConfig(vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                           "num_attention_heads": 2, "num_channels": 1, "image_size": 16,
                                           "patch_size": 4},
                            text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "vocab_size": 100}, **labels)
    if kind == "convnext":
        return ConvNextConfig(num_channels=1, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=16,
                              **labels)
    return ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                        **labels)


def hf_folder(path, kind="vit", preprocessor=True, seed=0, **extra):
    """``save_pretrained`` of a random ``kind`` model at ``path`` (+ a preprocessor_config.json)."""
    torch.manual_seed(seed)
    AutoModelForImageClassification.from_config(tiny(kind, **extra)).save_pretrained(path)
    if preprocessor:
        (path / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "ViTImageProcessor", "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [MEAN], "image_std": [STD], "size": {"height": 16, "width": 16}}))
    return path


def shortcut_npz(path, n_train=64, n_test=16, seed=0):
    """16x16 grey images: a faint vertical (class 1) or horizontal (class 0) bar, and a bright 4x4
    corner marker on class 1 in the contaminated variant (the mask marks the corner): the binary-head
    tests' data (one generator), at the small sizes these tests need."""
    return shortcut_data(path.parent, seed, n_train, n_test, n_val=n_test, name=path.name)[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return shortcut_npz(tmp_path_factory.mktemp("data26") / "xray.npz")


def flat(text):
    return " ".join(text.split())


def invoke(*args, code=(0,)):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code in code, result.output
    return result


def x16(n=4, seed=1):
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def hf_logits(folder, x):
    """Logits of the folder as transformers loads it, on [0, 1] images normalised as recorded."""
    model = AutoModelForImageClassification.from_pretrained(folder, local_files_only=True).eval()
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    mean = torch.tensor(settings["image_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(settings["image_std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        return model(pixel_values=(x - mean) / std).logits


def audit(folder, data, out, methods="gradient"):
    invoke("audit", folder, "--data", data, "--methods", methods, "--bootstrap", "20", "--device", "cpu",
           "--json", out, code=(0, 1))
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- the CLI, each architecture


@pytest.mark.parametrize("kind", ["vit", "dinov2", "swin", "convnext", "resnet", "siglip"])
def test_hf_folder_inspect_audit_repair_audit(kind, data, tmp_path):
    folder = hf_folder(tmp_path / kind, kind)
    output = invoke("inspect", folder, "--json", "-").output
    report = json.loads(output[output.index("{"):])
    assert report["arch"] == f"hf:{type(AutoModelForImageClassification.from_config(tiny(kind))).__name__}"
    assert report["class_names"] == list(CLASSES) and report["head"] == "softmax"
    assert report["input_size"] == [16, 16] and report["in_channels"] == 1
    assert report["mean"] == [MEAN] and report["std"] == [STD]
    assert report["normalization"] == "checkpoint: preprocessor_config.json"
    assert report["target_layers"] and report["gradcam_layer"]
    assert report["extra"]["model_folder"]["kind"] == "hf"
    text = flat(invoke("inspect", folder).output)
    assert "Hugging Face transformers model folder" in text and "0=normal, 1=pneumonia" in text

    methods = "gradient,lrp_epsilon"
    before = audit(folder, data, tmp_path / "before.json", methods)
    assert sorted(before["localisation"]) == sorted(methods.split(","))  # LRP ran too, where asked
    # the token maps (or CNN maps) of every TAP layer were read
    assert [row["layer"] for row in before["activation_share"]] == report["target_layers"]
    assert before["checkpoint"]["arch"] == report["arch"]
    out = tmp_path / f"{kind}-repaired"
    invoke("repair", folder, "--data", data, "--method", "tap", "--epochs", "1", "--batch-size", "32",
           "--audit-methods", "gradient", "--audit-split", "none", "--device", "cpu", "--quiet", "--out", out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    after = audit(out, data, tmp_path / "after.json")
    assert after["checkpoint"]["classes"] == list(CLASSES) and after["checkpoint"]["normalization"]["mean"] == [MEAN]
    x = x16()
    repaired = load_model(out)
    with torch.no_grad():
        ours = repaired(x)
    # transformers reads the repaired folder as auditkit does, and the weights did change
    assert torch.allclose(hf_logits(out, x), ours, atol=1e-5)
    assert not torch.allclose(hf_logits(folder, x), ours, atol=1e-4)


def test_repaired_folder_reproduces_the_repaired_logits_and_auditkit_checkpoint(data, tmp_path):
    from auditkit.repair.checkpoint import CheckpointRepair, repair_checkpoint

    folder = hf_folder(tmp_path / "vit")
    out, copy = tmp_path / "repaired", tmp_path / "repaired.safetensors"
    done = repair_checkpoint(CheckpointRepair(folder, str(data), out, method="tap", training={"epochs": 1},
                                              audit_split="none", device="cpu", also_checkpoint=copy),
                             show_progress=False)
    assert done.path == out and done.document["auditkit_checkpoint"] == str(copy)
    x = x16()
    with torch.no_grad():
        expected = done.result.model.cpu().eval()(x)
    assert torch.allclose(hf_logits(out, x), expected, atol=1e-5)
    again = load_model(copy)  # auditkit's own checkpoint rebuilds the HF network from its stored config
    assert again.meta.arch == "hf:ViTForImageClassification" and again.meta.class_names == CLASSES
    with torch.no_grad():
        assert torch.allclose(again(x), expected, atol=1e-5)
    assert json.loads((out / "auditkit.json").read_text())["repair"]["method"] == "tap"


# --------------------------------------------------------------------------- timm folders


def timm_folder(path, seed=0):
    from timm.models._hub import save_for_hf

    torch.manual_seed(seed)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=2, in_chans=1)
    save_for_hf(net, str(path), model_config={"label_names": list(CLASSES)}, safe_serialization=True,
                data_config={"mean": (MEAN,), "std": (STD,), "input_size": (1, 16, 16)})
    return path, net


def test_timm_folder_inspect_audit_repair_audit(data, tmp_path):
    folder, net = timm_folder(tmp_path / "timm")
    model = load_model(folder)
    assert model.meta.arch == "timm:test_resnet" and model.meta.class_names == CLASSES
    assert model.meta.input_size == (16, 16) and model.meta.mean == (MEAN,) and model.meta.std == (STD,)
    x = x16()
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()((x - MEAN) / STD), atol=1e-6)
    assert "timm model folder (test_resnet; model.safetensors)" in flat(invoke("inspect", folder).output)
    audit(folder, data, tmp_path / "before.json", "gradient,lrp_epsilon")
    out = tmp_path / "timm-repaired"
    invoke("repair", folder, "--data", data, "--method", "tap", "--epochs", "1", "--audit-methods", "gradient",
           "--audit-split", "none", "--device", "cpu", "--quiet", "--out", out,
           "--also-checkpoint", tmp_path / "timm-repaired.safetensors")
    audit(out, data, tmp_path / "after.json")
    with torch.no_grad():  # auditkit's own checkpoint of the same repaired network, beside the folder
        assert torch.allclose(load_model(tmp_path / "timm-repaired.safetensors")(x), load_model(out)(x), atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["label_names"] == list(CLASSES)
    assert config["pretrained_cfg"]["mean"] == [MEAN] and config["pretrained_cfg"]["input_size"] == [1, 16, 16]
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm's own reader of the folder
    with torch.no_grad():
        assert torch.allclose(loaded((x - MEAN) / STD), load_model(out)(x), atol=1e-6)
        assert not torch.allclose(loaded((x - MEAN) / STD), net((x - MEAN) / STD), atol=1e-4)


# --------------------------------------------------------------------------- heads


def test_binary_single_label_one_output_is_binary(tmp_path):
    folder = hf_folder(tmp_path / "bin", num_labels=1, id2label={0: "pneumonia"}, label2id={"pneumonia": 0},
                       problem_type="single_label_classification")
    model = load_model(folder)
    assert model.meta.head == "binary" and model.meta.num_classes == 2
    assert "head: binary (one logit, sigmoid" in flat(invoke("inspect", folder).output)
    x = x16()
    with torch.no_grad():
        z = model.net(model._upsample_to_min_size((x - MEAN) / STD)).logits
        assert z.shape == (4, 1) and torch.allclose(model(x), torch.cat([-z / 2, z / 2], 1))


def test_one_label_without_problem_type_is_binary_and_said(tmp_path):
    folder = hf_folder(tmp_path / "unset", num_labels=1, id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0})
    assert json.loads((folder / "config.json").read_text()).get("problem_type") is None
    from auditkit.models.folders import read_folder

    facts = read_folder(folder)
    assert facts.head == "binary" and "regression" in facts.head_note and "problem_type" in facts.head_note
    with pytest.warns(UserWarning, match="num_labels 1 without problem_type"):
        assert load_model(folder).meta.head == "binary"


def test_regression_is_refused_in_one_line(tmp_path):
    folder = hf_folder(tmp_path / "reg", num_labels=1, id2label={0: "LABEL_0"}, label2id={"LABEL_0": 0},
                       problem_type="regression")
    with pytest.raises(CheckpointError, match="regression") as error:
        load_model(folder)
    assert "\n" not in str(error.value)
    result = invoke("inspect", folder, code=(2,))
    assert "regression" in result.output and len(result.output.strip().splitlines()) == 1


def test_multilabel_problem_type(tmp_path):
    folder = hf_folder(tmp_path / "multi", num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                       label2id={"a": 0, "b": 1, "c": 2}, problem_type="multi_label_classification")
    model = load_model(folder)
    assert model.meta.head == "multilabel" and model.meta.class_names == ("a", "b", "c")


def test_options_override_what_the_folder_says(tmp_path):
    folder = hf_folder(tmp_path / "vit")
    model = load_model(folder, ReadOptions(normalize="0.5/0.25", input_size=(32, 32)))
    assert model.meta.mean == (0.5,) and model.meta.std == (0.25,) and model.meta.input_size == (32, 32)
    assert model.meta.normalization.startswith("option")


# --------------------------------------------------------------------------- safety and offline


def test_remote_code_folder_is_refused_without_running_it(tmp_path):
    folder = hf_folder(tmp_path / "remote")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(CheckpointError, match="trust_remote_code") as error:
        load_model(folder)
    assert "modeling_evil.py" in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_missing_weights_and_hub_ids_say_what_is_missing(tmp_path):
    folder = hf_folder(tmp_path / "noweights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights: none of model.safetensors") as error:
        load_model(folder)
    assert "never downloads" in str(error.value) and "\n" not in str(error.value)
    result = invoke("inspect", "google/vit-base-patch16-224", code=(2,))
    assert "hub id" in flat(result.output) and "never downloads" in flat(result.output)


def test_pickled_bin_weights_are_not_unpickled(tmp_path):
    folder = hf_folder(tmp_path / "bin")
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"weights": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin holds pickled Python objects") as error:
        load_model(folder)
    assert "never unpickles" in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_pytorch_model_bin_loads_weights_only(tmp_path):
    folder = tmp_path / "legacy"
    torch.manual_seed(0)
    net = AutoModelForImageClassification.from_config(tiny("vit"))
    net.save_pretrained(folder, safe_serialization=False)
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    model = load_model(folder)
    x = x16()
    with torch.no_grad():
        assert torch.allclose(model(x), net.eval()(pixel_values=(x - 0.5) / 0.5).logits, atol=1e-6)


def test_no_network_and_the_environment_restored(tmp_path, monkeypatch):
    folder = hf_folder(tmp_path / "vit")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading a model folder")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    seen = {}
    from auditkit.models import folders

    original = folders.offline

    def spy():
        context = original()

        class Wrapped:
            def __enter__(self):
                context.__enter__()
                import huggingface_hub.constants

                seen["env"] = os.environ.get("HF_HUB_OFFLINE")
                seen["flag"] = huggingface_hub.constants.HF_HUB_OFFLINE

            def __exit__(self, *exc):
                return context.__exit__(*exc)

        return Wrapped()

    monkeypatch.setattr(folders, "offline", spy)
    assert load_model(folder).meta.arch == "hf:ViTForImageClassification"
    assert seen == {"env": "1", "flag": True}
    assert "HF_HUB_OFFLINE" not in os.environ


def test_without_transformers_one_line_names_the_extra(tmp_path, monkeypatch):
    folder = hf_folder(tmp_path / "vit")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(CheckpointError, match=r"pip install 'auditkit\[hf\]'") as error:
        load_model(folder)
    assert "\n" not in str(error.value)


def test_a_folder_without_config_is_still_named(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(CheckpointError, match="no Hugging Face or timm model folder"):
        load_model(tmp_path / "weights")


# --------------------------------------------------------------------------- AttnLRP through HF attention


def test_sdpa_and_eager_attention_give_the_same_attnlrp_maps(tmp_path):
    from auditkit.explain.lrp import lrp_epsilon
    from auditkit.explain.lrp.attention import uses_attention

    folder = hf_folder(tmp_path / "vit")
    sdpa = load_model(folder)
    eager = load_model(folder)
    eager.net.hf.set_attn_implementation("eager")
    assert sdpa.net.hf.config._attn_implementation == "sdpa" and eager.net.hf.config._attn_implementation == "eager"
    assert uses_attention(sdpa.net)
    x = x16(3).double()
    sdpa.double()
    eager.double()
    targets = torch.tensor([[0, 1], [1, 0], [0, 1]])
    maps_sdpa, maps_eager = lrp_epsilon(sdpa, x, targets), lrp_epsilon(eager, x, targets)
    assert maps_sdpa.shape == (3, 2, 16, 16) and maps_sdpa.abs().sum() > 0
    # HF's eager attention takes its softmax in float32 (the logits differ by ~1e-9 in float64): the maps
    # agree to that precision; a rule missing on either path (uniform rule on q.k and attention.v) is ~1
    assert torch.allclose(maps_sdpa, maps_eager, atol=1e-6 * float(maps_sdpa.abs().max()), rtol=0)
    # the rules act: the map is not the plain gradient x input
    xr = ((x - sdpa.mean) / sdpa.std).requires_grad_(True)
    logits = sdpa.net(xr).logits
    (grad,) = torch.autograd.grad(logits[:, 0].sum(), xr)
    assert not torch.allclose((xr * grad).sum(1)[0], maps_sdpa[0, 0], atol=1e-6)


def test_timm_vit_folder_gets_token_presets_and_attnlrp(tmp_path):
    from timm.models._hub import save_for_hf

    from auditkit.explain.lrp import lrp_epsilon

    torch.manual_seed(0)
    net = timm.create_model("test_vit", pretrained=False, num_classes=3, in_chans=1, img_size=32).eval()
    save_for_hf(net, str(tmp_path / "vit"), safe_serialization=True,
                data_config={"mean": (MEAN,), "std": (STD,), "input_size": (1, 32, 32)})
    model = load_model(tmp_path / "vit")
    assert model.meta.input_size == (32, 32) and model.meta.arch == "timm:test_vit"
    assert model.meta.target_layers[-1] == "net.blocks.5" and model.meta.gradcam_layer == "net.blocks.5.norm1"
    assert "class_names" in model.adopt_from_data  # no label_names: the data's
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net((x - MEAN) / STD), atol=1e-6)
    maps = lrp_epsilon(model, x, torch.tensor([[0], [2]]))
    assert maps.shape == (2, 1, 32, 32) and maps.abs().sum() > 0


def test_models_command_shows_a_folders_layers(tmp_path):
    folder = hf_folder(tmp_path / "swin", "swin")
    output = invoke("models", folder, "--json", "-").output
    rows = json.loads(output[output.index("["):])
    assert rows[0]["architecture"] == "hf:SwinForImageClassification" and rows[0]["source"] == "hf"
    assert rows[0]["tap_layers"] == ["net.hf.swin.encoder.layers.0.downsample", "net.hf.swin.layernorm"]
    assert rows[0]["gradcam_layer"] == "net.hf.swin.layernorm"


def test_save_folder_replaces_only_model_folders(tmp_path):
    from auditkit.models.folders import save_folder

    model = load_model(hf_folder(tmp_path / "vit"))
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a model folder"):
        save_folder(model, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    out = save_folder(model, tmp_path / "copy")
    with pytest.raises(FileExistsError):
        save_folder(model, out)
    torch.nn.init.zeros_(model.net.hf.classifier.weight)
    save_folder(model, out, overwrite=True)  # a model folder is replaced whole
    assert torch.equal(load_model(out).net.hf.classifier.weight, torch.zeros_like(model.net.hf.classifier.weight))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "notes", "vit"]  # no temporary folders left
