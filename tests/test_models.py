"""Architectures, the AuditModel wrapper and activation capture (auditkit.models)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from auditkit.errors import ModelError
from auditkit.models import ARCHITECTURES, AuditModel, build_model, capture_activations, resolve_layers

from .conftest import DEVICES

ALL_ARCHS = list(ARCHITECTURES)
SMALL_CNNS = ["tap-cnn", "shortcut-cnn"]
# (in_channels, num_classes): the input-conv swap and the classifier size are
# independent adaptations, so two pairs exercise both values of each.
CHANNELS_AND_CLASSES = [(1, 2), (3, 10)]


@pytest.fixture(scope="module")
def models():
    """Builds each (arch, in_channels, num_classes) once per module: VGG-16 alone takes seconds to initialise."""
    cache: dict[tuple[str, int, int], AuditModel] = {}

    def get(arch: str, in_channels: int, num_classes: int) -> AuditModel:
        key = (arch, in_channels, num_classes)
        if key not in cache:
            cache[key] = build_model(arch, num_classes, in_channels, (32, 32)).eval()
        return cache[key]

    yield get
    cache.clear()


def count_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def spatial_sizes(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    return [tuple(t.shape[-2:]) for t in tensors]


# --------------------------------------------------------------------------- building and forward


@pytest.mark.parametrize("in_channels, num_classes", CHANNELS_AND_CLASSES)
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_every_architecture_builds_and_classifies(models, arch, in_channels, num_classes):
    model = models(arch, in_channels, num_classes)
    with torch.no_grad():
        logits = model(torch.rand(2, in_channels, 32, 32))
    assert logits.shape == (2, num_classes)
    assert torch.isfinite(logits).all()
    meta = model.meta
    assert (meta.arch, meta.num_classes, meta.in_channels) == (arch, num_classes, in_channels)
    assert meta.input_size == (32, 32)
    assert meta.mean == (0.5,) * in_channels and meta.std == (0.5,) * in_channels
    assert meta.class_names == tuple(str(i) for i in range(num_classes))
    assert meta.target_layers == tuple(f"net.{name}" for name in ARCHITECTURES[arch].tap_layers)
    first_conv = next(m for m in model.net.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels


@pytest.mark.parametrize("arch", SMALL_CNNS)
def test_small_cnns_take_28px_digits_without_resizing(arch):
    model = build_model(arch, 10, 1, (28, 28)).eval()
    with capture_activations(model, ["conv1", "conv2"]) as activations, torch.no_grad():
        logits = model(torch.rand(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    assert spatial_sizes(activations) == [(28, 28), (14, 14)]


def test_torchvision_net_upsamples_small_inputs_inside_the_model():
    model = build_model("resnet18", 2, 1, (28, 28)).eval()
    images = torch.rand(2, 1, 28, 28)
    with capture_activations(model, ["conv1"]) as activations, torch.no_grad():
        logits = model(images)
        expected = model.net(F.interpolate((images - 0.5) / 0.5, size=(32, 32), mode="bilinear", align_corners=False))
    assert logits.shape == (2, 2)
    assert spatial_sizes(activations) == [(16, 16)]  # stride-2 stem on a 32x32 image
    torch.testing.assert_close(logits, expected)


def test_upsampling_keeps_the_aspect_ratio():
    model = build_model("resnet18", 2, 3, (28, 56)).eval()
    with capture_activations(model, ["conv1"]) as activations, torch.no_grad():
        model(torch.rand(1, 3, 28, 56))
    assert spatial_sizes(activations) == [(16, 32)]  # the network saw 32x64


def test_inputs_at_least_the_minimum_size_are_not_resized(models):
    model = models("resnet18", 3, 10)
    with capture_activations(model, ["conv1"]) as activations, torch.no_grad():
        model(torch.rand(1, 3, 40, 36))
    assert spatial_sizes(activations) == [(20, 18)]


def test_forward_normalises_with_mean_and_std():
    model = build_model("tap-cnn", 2, 3, (8, 8), mean=(0.1, 0.2, 0.3), std=0.25).eval()
    images = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model.net((images - mean) / 0.25))
    # The statistics live in meta, not in the state_dict: it is the network's, under "net.".
    assert all(key.startswith("net.") for key in model.state_dict())
    assert model.to(torch.float64).mean.dtype == torch.float64


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 32, 32), (2, 2, 32, 32)])
def test_wrong_input_channels_raise_value_error_naming_both(shape):
    model = build_model("tap-cnn", 10, 1, (32, 32))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\).*got shape \(" + ", ".join(map(str, shape))):
        model(torch.rand(shape))


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(ModelError) as info:
        build_model("resnet19", 2, 3, (32, 32))
    message = str(info.value)
    assert "did you mean 'resnet18'" in message
    assert all(name in message for name in ARCHITECTURES)
    assert "\n" not in message


@pytest.mark.parametrize(
    "bad_args, match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(in_channels=2.5), "in_channels"),
        (dict(input_size=(32,)), "input_size"),
        (dict(mean=(0.5, 0.5)), "mean has 2 value"),
        (dict(std=(0.5, 0.0, 0.5)), "std must be positive"),
        (dict(class_names=("cat",)), "1 class name"),
        (dict(target_layers=[]), "target_layers is empty"),
    ],
)
def test_bad_build_arguments_raise_model_error(bad_args, match):
    args = dict(arch="tap-cnn", num_classes=2, in_channels=3, input_size=(32, 32)) | bad_args
    with pytest.raises(ModelError, match=match):
        build_model(**args)


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_preset_layers_are_captured_and_shrink_with_depth(models, arch):
    model = models(arch, 3, 10)
    with capture_activations(model, model.meta.target_layers) as activations, torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert len(activations) == len(ARCHITECTURES[arch].tap_layers) >= 2
    assert all(isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[0] == 2 for a in activations)
    heights = [h for h, _ in spatial_sizes(activations)]
    if arch == "vit-digits":  # a ViT keeps one token grid: 8x8 patches of 4 px (tests/test_tokens_25.py)
        assert heights == [8] * len(heights), heights
    else:
        assert all(deeper < shallower for shallower, deeper in zip(heights, heights[1:])), heights
    # The Grad-CAM layer exists and produces a feature map.
    (gradcam_layer,) = resolve_layers(model, [model.meta.gradcam_layer])
    with capture_activations(model, [gradcam_layer]) as activations, torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert activations[0].dim() == 4


def test_resnet18_tap_layers_at_224px_match_the_paper():
    model = build_model("resnet18", 2, 3, (224, 224)).eval()
    with capture_activations(model, model.meta.target_layers) as activations, torch.no_grad():
        model(torch.rand(1, 3, 224, 224))
    shapes = [tuple(a.shape) for a in activations]
    assert shapes == [(1, 64, 56, 56), (1, 128, 28, 28), (1, 256, 14, 14), (1, 512, 7, 7)]


@pytest.mark.parametrize("arch, first_conv, classifier", [("tap-cnn", "conv1.0", "fc"), ("resnet18", "conv1", "fc")])
def test_gradients_flow_from_a_captured_activation_into_the_network(arch, first_conv, classifier):
    model = build_model(arch, 2, 3, (32, 32))
    with capture_activations(model, model.meta.target_layers) as activations:
        model(torch.rand(2, 3, 32, 32))
        activations[0].relu().sum().backward()  # a TAP-like penalty on the first target layer
    assert model.net.get_submodule(first_conv).weight.grad.abs().sum() > 0
    # Only the activation was differentiated, not the logits.
    assert model.net.get_submodule(classifier).weight.grad is None


def test_captured_list_is_reset_at_each_forward_and_follows_the_given_order():
    model = build_model("tap-cnn", 2, 3, (32, 32)).eval()
    with capture_activations(model, ["conv2", "net.conv1"]) as activations, torch.no_grad():
        model(torch.rand(4, 3, 32, 32))
        first_batch = list(activations)
        model(torch.rand(2, 3, 16, 16))
    assert [a.shape[0] for a in first_batch] == [4, 4]
    assert [tuple(a.shape) for a in activations] == [(2, 64, 8, 8), (2, 32, 16, 16)]


@pytest.mark.parametrize("device", DEVICES)
def test_capture_and_normalisation_follow_the_model_to_its_device(device):
    model = build_model("resnet18", 2, 3, (32, 32)).to(device).eval()
    with capture_activations(model, model.meta.target_layers) as activations, torch.no_grad():
        logits = model(torch.rand(2, 3, 28, 28, device=device))
    assert logits.device.type == device
    assert all(a.device.type == device for a in activations)


def test_hooks_are_removed_after_the_block():
    model = build_model("resnet18", 2, 3, (32, 32))
    with capture_activations(model, model.meta.target_layers):
        assert count_hooks(model) > 0
    assert count_hooks(model) == 0
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_hooks_are_removed_after_an_exception_in_the_block():
    model = build_model("tap-cnn", 2, 3, (32, 32))
    with pytest.raises(ValueError, match="channel"):
        with capture_activations(model, ["conv1", "conv2"]):
            model(torch.rand(2, 1, 32, 32))  # wrong channel count
    assert count_hooks(model) == 0


def test_unknown_layer_raises_with_the_closest_names():
    model = build_model("resnet18", 2, 3, (32, 32))
    with pytest.raises(ModelError, match=r"unknown layer 'layr4' in resnet18; closest: net\.layer4"):
        with capture_activations(model, ["layer1", "layr4"]):
            pass
    assert count_hooks(model) == 0
    with pytest.raises(ModelError, match=r"closest: net\.features\.denseblock4"):
        build_model("densenet121", 2, 3, (32, 32), target_layers=["net.features.denseblok4"])
    with pytest.raises(ModelError, match=r"no similar names \(top-level modules: net, net\.conv1"):
        resolve_layers(model, ["zzzzzz"])


def test_target_layer_override_with_and_without_the_net_prefix():
    model = build_model("resnet18", 2, 3, (32, 32), target_layers=["layer2", "net.layer3.1"], gradcam_layer="layer3")
    assert model.meta.target_layers == ("net.layer2", "net.layer3.1")
    assert model.meta.gradcam_layer == "net.layer3"
    assert resolve_layers(model, "layer1") == ["net.layer1"]
    with pytest.raises(ModelError, match="listed twice"):
        build_model("resnet18", 2, 3, (32, 32), target_layers=["layer2", "net.layer2"])


def test_capture_works_on_plain_modules_and_reports_layers_that_never_run():
    class PartlyUsed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    net = PartlyUsed()
    with capture_activations(net, ["used"]) as activations:
        net(torch.rand(3, 4))
    assert activations[0].shape == (3, 4)
    with pytest.raises(ModelError, match="'unused' did not run"):
        with capture_activations(net, ["used", "unused"]):
            net(torch.rand(3, 4))
    assert count_hooks(net) == 0
