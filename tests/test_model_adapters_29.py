"""How auditkit wraps and probes the user's own model (issue 29, kinds 4, 7, 8 and 9): any output
container gives the plain model's logits in every command, a torch.compile'd model is explained as
its original module, presets are probed at the size the model runs at, and transformers (and any
layer that is not a spatial map) are refused in one line."""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from auditkit.cli import app
from auditkit.errors import ModelError, ParameterError
from auditkit.explain import attribute
from auditkit.models import build_model, capture_activations, load_checkpoint, save_checkpoint
from auditkit.models.checkpoint import align_keys
from auditkit.models.outputs import OutputError, select_logits
from auditkit.models.presets import discover_presets, discover_presets_at, probe_sizes, receptive_fields

runner = CliRunner()

# The user's own module, imported by name as `auditkit train --arch adapters29:NAME` would.
USER_MODULE = textwrap.dedent('''
    import collections, dataclasses
    import torch
    from torch import nn

    class Small(nn.Module):
        """Runs at any size (adaptive pooling): the output containers below wrap its logits."""
        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU())
            self.pool = nn.MaxPool2d(2)
            self.conv2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
            self.fc = nn.Linear(8, num_classes)
        def features(self, x):
            return self.conv2(self.pool(self.conv1(x)))
        def forward(self, x):
            return self.fc(self.features(x).mean(dim=(2, 3)))

    Pair = collections.namedtuple("Pair", "logits aux")

    @dataclasses.dataclass
    class Out:
        loss: object
        logits: torch.Tensor

    class HFOutput(collections.OrderedDict):
        """Like transformers' ModelOutput: a mapping whose keys are the fields that are set."""

    class AsDict(Small):
        def forward(self, x):
            f = self.features(x)
            return {"features": f, "logits": self.fc(f.mean(dim=(2, 3)))}

    class AsTuple(Small):  # features first, as some training code returns them
        def forward(self, x):
            f = self.features(x)
            return f.mean(dim=(2, 3)), self.fc(f.mean(dim=(2, 3)))

    class AsNamedTuple(Small):
        def forward(self, x):
            logits = super().forward(x)
            return Pair(logits, logits * 0.5)

    class AsDataclass(Small):
        def forward(self, x):
            return Out(None, super().forward(x))

    class AsHF(Small):
        def forward(self, x):
            f = self.features(x)
            return HFOutput(logits=self.fc(f.mean(dim=(2, 3))), hidden_states=(f,))

    class Ambiguous(Small):  # two (N, classes) heads, neither named like logits
        def forward(self, x):
            logits = super().forward(x)
            return {"head_a": -logits, "head_b": logits}

    def plain(num_classes=10, in_channels=1): return Small(num_classes, in_channels)
    def as_dict(num_classes=10, in_channels=1): return AsDict(num_classes, in_channels)
    def as_tuple(num_classes=10, in_channels=1): return AsTuple(num_classes, in_channels)
    def as_namedtuple(num_classes=10, in_channels=1): return AsNamedTuple(num_classes, in_channels)
    def as_dataclass(num_classes=10, in_channels=1): return AsDataclass(num_classes, in_channels)
    def as_hf(num_classes=10, in_channels=1): return AsHF(num_classes, in_channels)
    def ambiguous(num_classes=10, in_channels=1): return Ambiguous(num_classes, in_channels)
    def compiled(num_classes=10, in_channels=1):
        return torch.compile(Small(num_classes, in_channels), backend="eager")

    class LeNet(nn.Module):
        """The classic: its Linear takes exactly 16*4*4 features, so it runs at 28x28 only."""
        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                                          nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, num_classes))
        def forward(self, x):
            return self.head(self.features(x))

    def lenet(num_classes=10, in_channels=1): return LeNet(num_classes, in_channels)

    def odd(num_classes=10, in_channels=1):
        net = LeNet(num_classes, in_channels)
        net.head[1] = nn.Linear(16 * 11 * 11, 32)  # needs 56x56 inputs: no size auditkit tries
        return net

    class Tokens(nn.Module):
        """A transformer by shape, not by name: a patch embedding, then layers on token sequences."""
        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.patch = nn.Conv2d(in_channels, 8, 4, stride=4)
            self.mix = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8))
            self.fc = nn.Linear(8, num_classes)
        def forward(self, x):
            tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, L, D)
            return self.fc(self.mix(tokens).mean(dim=1))

    def tokens(num_classes=10, in_channels=1): return Tokens(num_classes, in_channels)

    class ChannelAttention(nn.Module):
        """CBAM's channel attention: a CNN block named like attention that keeps spatial maps."""
        def __init__(self, channels):
            super().__init__()
            self.gate = nn.Sequential(nn.Linear(channels, channels), nn.Sigmoid())
        def forward(self, x):
            return x * self.gate(x.mean(dim=(2, 3)))[:, :, None, None]

    class WithCbam(Small):
        def __init__(self, num_classes=10, in_channels=1):
            super().__init__(num_classes, in_channels)
            self.conv2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), ChannelAttention(8))

    def with_cbam(num_classes=10, in_channels=1): return WithCbam(num_classes, in_channels)

    def vit(num_classes=10):
        from torchvision.models import VisionTransformer
        return VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                                 num_classes=num_classes)

    def timm_vit(num_classes=10, in_chans=1):
        from timm.models.vision_transformer import VisionTransformer
        return VisionTransformer(img_size=32, patch_size=8, in_chans=in_chans, num_classes=num_classes, embed_dim=16,
                                 depth=1, num_heads=2)
''')

CONTAINERS = ["as_dict", "as_tuple", "as_namedtuple", "as_dataclass", "as_hf"]


@pytest.fixture(scope="module", autouse=True)
def user_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "adapters29.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    yield
    sys.path.remove(str(folder))
    sys.modules.pop("adapters29", None)


@pytest.fixture(scope="module")
def tiny_digits(tmp_path_factory):
    """8x8 decoy digits, 8 images per split and variant: every command runs in a second or two."""
    from auditkit.data import open_dataset, write_dataset

    dataset = open_dataset("builtin:decoy-digits")
    keep = []
    for split in dataset.splits:
        for variant in dataset.variants:
            keep += [i for i, r in enumerate(dataset.records) if r.split == split and r.variant == variant][:8]
    return write_dataset(dataset.select(indices=keep), tmp_path_factory.mktemp("tiny") / "digits")


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok(*args):
    result = run(*args)
    assert result.exit_code in (0, 1), result.output  # 1: a verdict with --fail-on-shortcut only
    assert "Traceback" not in result.output
    return result


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:") or any(line.startswith("error:") for line in lines), result.output
    return " ".join(result.output.split())  # rich wraps long lines: compare on one line


def json_of(result) -> dict:
    return json.loads(result.output[result.output.index("{"):])


# --------------------------------------------------------------------------- kind 4: outputs


def test_the_rule_finds_the_logits_in_every_container():
    torch.manual_seed(0)
    logits, features = torch.randn(3, 5), torch.randn(3, 7)
    Pair = collections.namedtuple("Pair", "first second")

    @dataclasses.dataclass
    class Out:
        loss: object
        logits: torch.Tensor

    assert select_logits(logits) is logits
    assert select_logits({"features": features.view(3, 7, 1, 1), "logits": logits}) is logits
    assert select_logits({"only": logits}) is logits  # the one tensor, whatever its name
    assert select_logits(Out(None, logits)) is logits
    assert select_logits((logits, logits * 2)) is logits  # tuple: the first tensor (Inception's (logits, aux))
    assert select_logits((features, logits), num_classes=5) is logits  # the first (N, classes) one
    assert select_logits(Pair(logits, logits * 2)) is logits  # a namedtuple whose names decide nothing: order
    assert select_logits({"outputs": (logits, features)}) is logits  # nested: resolved by the same rule
    assert select_logits(({"logits": logits}, None)) is logits
    # Given: a key, a field, an index or a function; what it picks is resolved again.
    assert select_logits({"a": features, "b": logits}, "b") is logits
    assert select_logits(Out(None, logits), "logits") is logits
    assert select_logits((features, logits), 1) is logits
    assert select_logits({"head": {"logits": logits}}, lambda out: out["head"]) is logits


def test_a_name_or_index_on_a_model_that_returns_one_tensor_is_refused():
    # output[0] on a tensor is the first sample's logits, not an output: found in review, a silent (10,) result.
    logits = torch.randn(4, 10)
    for spec in (0, "logits"):
        with pytest.raises(OutputError, match=r"the model returns one tensor of shape \(4, 10\); leave it unset"):
            select_logits(logits, spec, num_classes=10)
    assert select_logits(logits, lambda out: out * 2, num_classes=10).shape == (4, 10)


def test_an_output_the_rule_cannot_read_is_one_error_naming_the_fields_and_the_option():
    two = {"head_a": torch.randn(2, 4), "head_b": torch.randn(2, 4)}
    with pytest.raises(OutputError, match=r"`output` must name the logits: the model returns a dict with head_a "
                                          r"\[2, 4\], head_b \[2, 4\].*e.g. 'head_a'") as caught:
        select_logits(two, num_classes=4)
    assert isinstance(caught.value, ModelError) and isinstance(caught.value, ParameterError)
    assert caught.value.naming("--output").startswith("--output must name the logits")
    with pytest.raises(OutputError, match=r"none is \(N, 4\) logits"):
        select_logits((torch.randn(2, 7), torch.randn(2, 9)), num_classes=4)
    with pytest.raises(OutputError, match=r"= 'nope' does not pick anything from the model's dict output "
                                          r"\(fields: head_a, head_b\)"):
        select_logits(two, "nope")
    with pytest.raises(OutputError, match="not a tensor or a container of tensors"):
        select_logits("logits")


@pytest.mark.parametrize("factory", CONTAINERS)
def test_every_container_gives_the_plain_models_logits_maps_and_accuracy(factory, tiny_digits, tmp_path):
    torch.manual_seed(0)
    plain = build_model("adapters29:plain", 10, 1, (8, 8))
    wrapped = build_model(f"adapters29:{factory}", 10, 1, (8, 8))
    wrapped.load_state_dict(plain.state_dict())
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(wrapped(x), plain(x))  # AuditModel.forward reads the logits: every command
    assert wrapped.meta.target_layers == plain.meta.target_layers == ("net.conv1", "net.conv2")
    for method in ("gradcam", "lrp_epsilon", "gradient"):  # the same maps as the plain model's
        torch.testing.assert_close(attribute(wrapped.eval(), x, 1, method), attribute(plain.eval(), x, 1, method))

    paths = {}
    for name, model in (("plain", plain), (factory, wrapped)):
        paths[name] = save_checkpoint(model, tmp_path / f"{name}.safetensors")
    scores = {name: json_of(ok("evaluate", path, "--data", tiny_digits, "--json", "-"))["results"]
              for name, path in paths.items()}
    assert scores[factory] == scores["plain"]
    audits = {name: json_of(ok("audit", path, "--data", tiny_digits, "--bootstrap", "10", "--examples", "1",
                               "--quiet", "--json", "-")) for name, path in paths.items()}
    assert audits[factory]["verdict"]["label"] == audits["plain"]["verdict"]["label"]
    ok("explain", paths[factory], "--data", tiny_digits, "--method", "gradcam", "--n", "2", "--out", tmp_path / "heat")


def test_an_ambiguous_output_is_one_line_and_output_picks_it_and_persists(tiny_digits, tmp_path):
    torch.manual_seed(0)
    plain = build_model("adapters29:plain", 10, 1, (8, 8))
    model = build_model("adapters29:ambiguous", 10, 1, (8, 8))
    model.load_state_dict(plain.state_dict())
    path = save_checkpoint(model, tmp_path / "amb.safetensors")
    for command in (["evaluate", path, "--data", tiny_digits],
                    ["audit", path, "--data", tiny_digits, "--bootstrap", "10", "--quiet"]):
        message = one_line_error(run(*command))
        assert "--output must name the logits: the model returns a dict with head_a [" in message
        assert "head_b" in message
    expected = json_of(ok("evaluate", save_checkpoint(plain, tmp_path / "plain.safetensors"), "--data", tiny_digits,
                          "--json", "-"))["results"]
    got = json_of(ok("evaluate", path, "--data", tiny_digits, "--output", "head_b", "--json", "-"))["results"]
    assert got == expected
    # Chosen at training, it is stored: later commands need no --output.
    trained = tmp_path / "trained.safetensors"
    assert "--output must name the logits" in one_line_error(run(
        "train", "--data", tiny_digits, "--arch", "adapters29:ambiguous", "--epochs", "1", "--out", trained, "--quiet"))
    ok("train", "--data", tiny_digits, "--arch", "adapters29:ambiguous", "--output", "head_b", "--epochs", "1",
       "--val-split", "none", "--test-split", "none", "--out", trained, "--quiet")
    assert json_of(ok("inspect", trained, "--json", "-"))["output"] == "head_b"
    assert load_checkpoint(trained).meta.output == "head_b"
    ok("evaluate", trained, "--data", tiny_digits)
    assert "does not pick anything" in one_line_error(run("evaluate", trained, "--data", tiny_digits, "--output",
                                                          "nope"))


# --------------------------------------------------------------------------- kind 7: compiled models


def test_a_compiled_model_gives_the_original_models_gradcam_with_or_without_orig_mod():
    torch.manual_seed(0)
    net = build_model("adapters29:plain", 10, 1, (8, 8)).net.eval()
    x = torch.rand(3, 1, 8, 8)
    expected = attribute(net, x, 2, "gradcam", layer="conv2")
    compiled = torch.compile(net, backend="eager")
    compiled(x)  # compiled before the hooks exist: they would never run in its code
    for layer in ("_orig_mod.conv2", "conv2", "_orig_mod.conv2.1"):
        got = attribute(compiled, x, 2, "gradcam", layer=layer)
        torch.testing.assert_close(got, expected if layer != "_orig_mod.conv2.1" else
                                   attribute(net, x, 2, "gradcam", layer="conv2.1"))
    with pytest.raises(ModelError, match="is torch.compile'd: hooks added after compiling do not run"):
        with capture_activations(compiled, ["conv2"]):
            pass


def test_a_factory_returning_a_compiled_module_is_wrapped_as_its_original():
    torch.manual_seed(0)
    model = build_model("adapters29:compiled", 10, 1, (8, 8))
    assert type(model.net).__name__ == "Small"
    assert not any("_orig_mod" in key for key in model.state_dict())
    assert model.meta.gradcam_layer == "net.conv2"
    x = torch.rand(2, 1, 8, 8)
    for layer in ("net._orig_mod.conv2", "_orig_mod.conv2", "conv2"):
        torch.testing.assert_close(attribute(model.eval(), x, 1, "gradcam", layer=layer),
                                   attribute(model, x, 1, "gradcam"))


def test_a_pickled_compiled_module_loads_and_explains_by_either_name(tiny_digits, tmp_path):
    import adapters29

    torch.manual_seed(0)
    compiled = adapters29.compiled(10, 1)
    torch.save(compiled, tmp_path / "compiled.pt")  # torch.save(torch.compile(net)): an OptimizedModule
    with pytest.warns(UserWarning, match="unpickling"):
        model = load_checkpoint(tmp_path / "compiled.pt", trust_pickle=True, input_size=(8, 8), normalize="none")
    assert type(model.net).__name__ == "Small" and model.meta.gradcam_layer == "net.conv2"
    x = torch.rand(2, 1, 8, 8)
    eager = compiled._orig_mod.eval()
    torch.testing.assert_close(model(x), eager(x))
    torch.testing.assert_close(attribute(model.eval(), x, 3, "gradcam", layer="_orig_mod.conv2"),
                               attribute(eager, x, 3, "gradcam", layer="conv2"))
    for layer in ("_orig_mod.conv2", "conv2"):
        ok("explain", tmp_path / "compiled.pt", "--trust-pickle", "--data", tiny_digits, "--method", "gradcam",
           "--layer", layer, "--n", "2", "--out", tmp_path / f"heat-{layer}", "--force")


def test_state_dicts_of_compiled_submodules_load():
    torch.manual_seed(0)
    model = build_model("adapters29:plain", 10, 1, (8, 8))
    weights = model.net.state_dict()
    inner = {key.replace("conv2.", "conv2._orig_mod.") for key in weights}  # model.conv2 = torch.compile(...)
    assert set(align_keys({k: None for k in inner}, set(weights))) == set(weights)
    outer = {f"module._orig_mod.{key}" for key in weights}
    assert set(align_keys({k: None for k in outer}, set(weights))) == set(weights)


# --------------------------------------------------------------------------- kind 8: probe sizes


def test_a_lenet_is_probed_at_its_own_size_and_trains_from_the_command_line(tmp_path):
    net = build_model("adapters29:lenet", 10, 1, (28, 28)).net
    presets, size = discover_presets_at(net, 1, probe_sizes((28, 28), 1))
    assert size == (28, 28) and presets.tap_layers == ("features.2", "features.5")
    assert presets.gradcam_layer == "features.4"
    with pytest.raises(ModelError, match=r"failed on a 224x224 probe image \(mat1 and mat2"):
        discover_presets(net, 1, 224)

    import numpy as np

    # 28x28 "digits" (a bright square in a class's corner on noise): 28x28 data is what matters here.
    rng = np.random.default_rng(0)
    labels = np.arange(48) % 2
    images = rng.integers(0, 60, (48, 28, 28)).astype(np.uint8)
    for k, label in enumerate(labels):
        images[k, 2 + 18 * label: 8 + 18 * label, 2:8] = 255
    digits = tmp_path / "digits.npz"
    np.savez(digits, images=images, labels=labels, splits=np.array(["train", "test"] * 24))
    out = tmp_path / "lenet.safetensors"
    ok("train", "--data", digits, "--arch", "adapters29:lenet", "--epochs", "1", "--val-split", "none", "--out", out,
       "--quiet")
    shown = json_of(ok("inspect", out, "--json", "-"))
    assert shown["input_size"] == [28, 28]
    assert shown["target_layers"] == ["net.features.2", "net.features.5"]
    assert shown["gradcam_layer"] == "net.features.4"
    # TAP's receptive fields probe it where it runs: conv 5 -> 5, pool 2 -> 6; conv 5 at step 2 -> 14, pool -> 18.
    model = load_checkpoint(out)
    assert receptive_fields(model, ["net.features.2", "net.features.5"], 1, 64) == [6.0, 18.0]
    # Its bare weights (no recorded size) load too, and score as the checkpoint does.
    torch.save(model.net.state_dict(), tmp_path / "bare.pt")
    scores = [json_of(ok("evaluate", path, *arch, "--data", digits, "--normalize", "none", "--json", "-"))["results"]
              for path, arch in ((out, []), (tmp_path / "bare.pt", ["--arch", "adapters29:lenet"]))]
    assert scores[0] == scores[1]


def test_a_model_that_runs_at_no_size_tried_is_one_line():
    with pytest.raises(ModelError, match=r"LeNet runs at none of the probe sizes tried \(224x224, 28x28, 1x1, "
                                         r"32x32, .*\); at 28x28: mat1 and mat2 shapes cannot be multiplied"):
        build_model("adapters29:odd", 10, 1, (28, 28))
    message = one_line_error(run("models", "adapters29:odd"))
    assert "runs at none of the probe sizes tried (224x224, 1x1, 28x28" in message


def test_probe_sizes_put_the_standard_size_then_the_models_own():
    assert probe_sizes((28, 28), 1)[:3] == [(224, 224), (28, 28), (1, 1)]
    assert probe_sizes((8, 16), 32)[:3] == [(224, 224), (32, 64), (32, 32)]  # upsampled like AuditModel does
    assert probe_sizes(None, 299)[0] == (299, 299)


# --------------------------------------------------------------------------- kind 9: transformers


@pytest.mark.parametrize("factory", ["vit", "timm_vit"])
def test_a_user_factory_returning_a_vit_is_refused_in_one_line(factory, tiny_digits, tmp_path):
    with pytest.raises(ModelError, match=f"'adapters29:{factory}' is a vision transformer: .*not supported yet"):
        build_model(f"adapters29:{factory}", 10, 3, (32, 32))
    message = one_line_error(run("train", "--data", tiny_digits, "--arch", f"adapters29:{factory}", "--epochs", "1",
                                 "--out", tmp_path / "v.safetensors", "--quiet"))
    assert "is a vision transformer" in message and "not supported yet" in message


def test_a_pickled_vit_is_refused_in_the_same_one_line(tmp_path):
    import adapters29

    torch.save(adapters29.vit(), tmp_path / "vit.pt")
    with pytest.warns(UserWarning, match="unpickling"), pytest.raises(ModelError, match="is a vision transformer"):
        load_checkpoint(tmp_path / "vit.pt", trust_pickle=True, normalize="none")
    message = one_line_error(run("inspect", tmp_path / "vit.pt", "--trust-pickle"))
    assert "vit.pt (VisionTransformer)' is a vision transformer" in message and "not supported yet" in message


def test_a_cnn_with_attention_blocks_is_not_taken_for_a_transformer():
    model = build_model("adapters29:with_cbam", 10, 1, (8, 8))
    assert model.meta.gradcam_layer == "net.conv2" and model.meta.target_layers == ("net.conv1", "net.conv2")


def test_discovery_never_proposes_a_layer_that_is_not_a_spatial_map(tmp_path):
    net = build_model("adapters29:plain", 10, 1, (8, 8)).net  # a CNN still gets its presets
    assert discover_presets(net, 1, 32).gradcam_layer == "conv2"
    import adapters29

    with pytest.raises(ModelError, match=r"its last feature map 'patch' is followed by layers on token sequences "
                                         r"\('mix.0' gives \(1, 64, 8\)\)"):
        discover_presets(adapters29.tokens(), 1, 32)
    message = one_line_error(run("models", "adapters29:tokens"))
    assert "followed by layers on token sequences" in message
    # A pickled module of that kind (--trust-pickle) loads without presets instead of the patch embedding.
    torch.save(adapters29.tokens(), tmp_path / "tokens.pt")
    with pytest.warns(UserWarning, match="unpickling"):
        model = load_checkpoint(tmp_path / "tokens.pt", trust_pickle=True, input_size=(32, 32), normalize="none")
    assert model.meta.gradcam_layer == "" and model.meta.target_layers == ()
    shown = " ".join(ok("inspect", tmp_path / "tokens.pt", "--trust-pickle").output.split())
    assert "Grad-CAM layer: none" in shown and "patch" not in shown.split("Grad-CAM layer:")[1]
