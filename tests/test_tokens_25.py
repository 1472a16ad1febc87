"""Issue 25 items 1, 2, 5 (built-in ViT): vision transformers' layers read as (N, C, gh, gw) maps
(auditkit/models/tokens.py through hooks.py), built at the data's size, their presets found."""

from __future__ import annotations

import io

import pytest
import timm
import torch
import torchvision
from torch import nn

from auditkit.errors import ModelError
from auditkit.explain import attribute
from auditkit.models import ARCHITECTURES, build_model, capture_activations, get_arch
from auditkit.models.architectures import torchvision_classifiers
from auditkit.models.presets import discover_presets
from auditkit.models.tokens import channels_last_to_map, map_to_tokens, tokens_to_map

TINY = {"embed_dim": 32, "depth": 4, "num_heads": 2}


def _timm(name: str, size=(32, 32), **kwargs) -> nn.Module:
    torch.manual_seed(0)
    options = {"pretrained": False, "num_classes": 3, "in_chans": 1, "img_size": size, **kwargs}
    return timm.create_model(name, **options).eval()


def _swin_timm(size=(32, 32)) -> nn.Module:
    return _timm("swin_tiny_patch4_window7_224", size, dynamic_img_size=True, embed_dim=16, depths=(1, 1, 1, 1),
                 num_heads=(1, 1, 1, 1))


def _vit_torchvision() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32,
                                                mlp_dim=64, num_classes=3).eval()


def _swin_torchvision() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1], num_heads=[1, 1, 1],
                                              window_size=[2, 2], num_classes=3).eval()


# name: (builder, in_channels, input (H, W), layer, expected map (C, gh, gw), prefix tokens stripped; None: NHWC)
KINDS = {
    "vit": (lambda: _timm("vit_tiny_patch16_224", dynamic_img_size=True, **TINY), 1, (32, 48), "blocks.1",
            (32, 2, 3), 1),
    "deit_distilled": (lambda: _timm("deit_tiny_distilled_patch16_224", dynamic_img_size=True, **TINY), 1, (32, 48),
                       "blocks.1", (32, 2, 3), 2),
    "reg4": (lambda: _timm("vit_small_patch14_reg4_dinov2", (28, 28), dynamic_img_size=True, **TINY), 1, (28, 42),
             "blocks.1", (32, 2, 3), 5),
    "eva02": (lambda: _timm("eva02_tiny_patch14_224", (28, 28), dynamic_img_size=True, **TINY), 1, (28, 42),
              "blocks.1", (32, 2, 3), 1),
    "convit_local": (lambda: _timm("convit_tiny", local_up_to_layer=1, **TINY), 1, (32, 32), "blocks.0",
                     (64, 2, 2), 0),  # ConViT's width is embed_dim * num_heads
    "convit_class": (lambda: _timm("convit_tiny", local_up_to_layer=1, **TINY), 1, (32, 32), "blocks.1",
                     (64, 2, 2), 1),
    "swin_timm": (_swin_timm, 1, (32, 64), "layers.1", (32, 4, 8), None),
    "vit_torchvision": (_vit_torchvision, 3, (32, 32), "encoder.layers.encoder_layer_1", (32, 4, 4), 1),
    "swin_torchvision": (_swin_torchvision, 3, (32, 48), "features.3", (32, 4, 6), None),
}


# --------------------------------------------------------------------------- the view's values


def test_token_at_grid_position_i_j_lands_at_map_i_j():
    n, prefix, (gh, gw), channels = 2, 2, (3, 4), 5
    tokens = torch.arange(n * (prefix + gh * gw) * channels, dtype=torch.float32).view(n, prefix + gh * gw, channels)
    feature_map = tokens_to_map(tokens, (gh, gw), (0, prefix))
    assert feature_map.shape == (n, channels, gh, gw)
    for i in range(gh):
        for j in range(gw):
            assert torch.equal(feature_map[:, :, i, j], tokens[:, prefix + i * gw + j])
    assert torch.equal(map_to_tokens(feature_map, tokens[:, :prefix]), tokens)  # the inverse, for the network
    nhwc = torch.randn(2, 3, 4, 5)
    assert torch.equal(channels_last_to_map(nhwc)[:, :, 1, 2], nhwc[:, 1, 2])


def test_a_sequence_that_is_no_grid_is_refused_in_one_line():
    with pytest.raises(ModelError, match=r"layer 'blocks.3' gives 14 tokens, which is not a 3x4 grid") as info:
        tokens_to_map(torch.zeros(1, 14, 8), (3, 4), (0, 1), "blocks.3")
    assert "\n" not in str(info.value)
    net = _timm("vit_tiny_patch16_224", dynamic_img_size=True, **TINY)
    net.num_prefix_tokens = 3  # the model now says 3 prefix tokens, its sequences hold 1: refused, not guessed
    with pytest.raises(ModelError, match=r"layer 'blocks.0' gives 5 tokens, which is not a 2x2 grid of patches plus "
                                         r"0 or 3 prefix token"):
        with capture_activations(net, ["blocks.0"]):
            net(torch.zeros(1, 1, 32, 32))


@pytest.mark.parametrize("kind", KINDS)
def test_capture_gives_each_kind_as_a_map_of_its_tokens(kind):
    build, channels, size, layer, shape, prefix = KINDS[kind]
    net = build()
    raw = []
    handle = net.get_submodule(layer).register_forward_hook(lambda _m, _a, out: raw.append(out))
    torch.manual_seed(1)
    images = torch.randn(2, channels, *size)
    with torch.no_grad():
        expected_logits = net(images)
        with capture_activations(net, [layer]) as maps:
            logits = net(images)
    handle.remove()
    (feature_map,) = maps
    assert feature_map.shape == (2, *shape), kind
    own = raw[-1]
    if prefix is None:  # channels-last (N, H, W, C)
        assert torch.equal(feature_map, own.permute(0, 3, 1, 2))
    else:
        assert own.shape[1] == prefix + shape[1] * shape[2]
        assert torch.equal(feature_map, own[:, prefix:].reshape(2, shape[1], shape[2], shape[0]).permute(0, 3, 1, 2))
    assert torch.allclose(logits, expected_logits, atol=1e-6)  # the network goes on unchanged


def test_a_penalty_on_a_map_gives_the_model_gradients():
    net = _timm("vit_tiny_patch16_224", dynamic_img_size=True, **TINY).train()
    with capture_activations(net, ["blocks.1", "blocks.3.norm1"]) as maps:
        logits = net(torch.rand(2, 1, 32, 32))
    (maps[0].pow(2).mean() + maps[1].abs().mean()).backward()
    assert net.patch_embed.proj.weight.grad.abs().sum() > 0 and net.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert logits.shape == (2, 3)


def test_a_cnns_outputs_are_the_layers_own_tensors():
    model = build_model("tap-cnn", 2, 1, (28, 28))
    raw = []
    handle = model.net.conv2.register_forward_hook(lambda _m, _a, out: raw.append(out))
    with capture_activations(model, ["conv2"]) as maps:
        model(torch.rand(2, 1, 28, 28))
    handle.remove()
    assert maps[0] is raw[-1]


def test_an_unnamed_transformers_sequence_is_read_by_the_probe():
    class Plain(nn.Module):
        """A patch embedding, a class token and an nn.TransformerEncoderLayer: no ViT attributes."""

        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(1, 8, 4, stride=4)
            self.cls = nn.Parameter(torch.randn(1, 1, 8))
            self.encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            tokens = self.patch(x).flatten(2).transpose(1, 2)
            tokens = self.encoder(torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1))
            return self.fc(tokens[:, 0])

    torch.manual_seed(0)
    net = Plain().eval()
    with capture_activations(net, ["encoder"]) as maps:
        net(torch.rand(2, 1, 16, 24))
    assert maps[0].shape == (2, 8, 4, 6)


# --------------------------------------------------------------------------- Grad-CAM, presets, architectures


def test_gradcam_on_a_vit_gives_maps_at_the_input_size():
    torch.manual_seed(0)
    model = build_model("vit-digits", 10, 1, (28, 28))
    images = torch.rand(3, 1, 28, 28)
    cams = attribute(model, images, target="pred", method="gradcam")
    assert cams.shape == (3, 1, 28, 28) and torch.isfinite(cams).all() and cams.sum() > 0
    # Why the preset is the last block's norm1: after the last block only the class token reaches the head.
    assert attribute(model, images, target="pred", method="gradcam", layer="blocks.3").abs().sum() == 0


def test_gradcam_on_a_swin_gives_maps():
    net = _swin_timm((32, 48))
    cams = attribute(net, torch.rand(2, 1, 32, 48), target="pred", method="gradcam", layer="layers.3")
    assert cams.shape == (2, 1, 32, 48) and torch.isfinite(cams).all()


PRESETS = {
    "vit": (lambda: _timm("vit_tiny_patch16_224", dynamic_img_size=True, **TINY), 1, 32,
            ("blocks.1", "blocks.2", "blocks.3"), "blocks.3.norm1"),
    "deit_distilled": (lambda: _timm("deit_tiny_distilled_patch16_224", dynamic_img_size=True, **TINY), 1, 32,
                       ("blocks.1", "blocks.2", "blocks.3"), "blocks.3.norm1"),
    "reg4": (lambda: _timm("vit_small_patch14_reg4_dinov2", (28, 28), dynamic_img_size=True, **TINY), 1, 28,
             ("blocks.1", "blocks.2", "blocks.3"), "blocks.3.norm1"),
    "eva02": (lambda: _timm("eva02_tiny_patch14_224", (28, 28), dynamic_img_size=True, **TINY), 1, 28,
              ("blocks.1", "blocks.2", "blocks.3"), "blocks.3.norm1"),
    "convit": (lambda: _timm("convit_tiny", local_up_to_layer=2, **TINY), 1, 32,
               ("blocks.1", "blocks.2", "blocks.3"), "blocks.3.norm1"),
    "swin_timm": (_swin_timm, 1, 32, ("layers.0", "layers.1", "layers.2", "layers.3"), "layers.3"),
    "vit_torchvision": (_vit_torchvision, 3, 32, tuple(f"encoder.layers.encoder_layer_{k}" for k in (1, 2, 3)),
                        "encoder.layers.encoder_layer_3.ln_1"),
    "swin_torchvision": (_swin_torchvision, 3, 32, ("features.1", "features.3", "features.5"), "features.5"),
}


@pytest.mark.parametrize("kind", PRESETS)
def test_presets_are_found_for_each_kind(kind):
    build, channels, size, tap, gradcam = PRESETS[kind]
    found = discover_presets(build(), channels, size)
    assert (found.tap_layers, found.gradcam_layer) == (tap, gradcam)


def test_vit_digits_builds_runs_and_trains_in_seconds():
    spec = ARCHITECTURES["vit-digits"]
    assert spec.tap_layers == ("blocks.1", "blocks.2", "blocks.3") and spec.gradcam_layer == "blocks.3.norm1"
    torch.manual_seed(0)
    model = build_model("vit-digits", 10, 1, (28, 28))
    assert model.meta.target_layers == ("net.blocks.1", "net.blocks.2", "net.blocks.3")
    found = discover_presets(model.net, 1, 28)  # the stated presets are the ones the rule finds
    assert (found.tap_layers, found.gradcam_layer) == (spec.tap_layers, spec.gradcam_layer)
    images, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        with capture_activations(model, model.meta.target_layers) as maps:
            loss = nn.functional.cross_entropy(model(images), labels) + 1e-3 * sum(m.pow(2).mean() for m in maps)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert [tuple(m.shape) for m in maps] == [(64, 64, 7, 7)] * 3
    # The whole model pickles (its classes are importable by name).
    buffer = io.BytesIO()
    torch.save(model.net, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    assert torch.equal(again.eval()(images[:2]), model.net.eval()(images[:2]))


def test_vit_digits_patch_embedding_is_a_per_patch_mlp_that_sees_only_its_own_patch():
    # Why the MLP and not a convolutional stem (docs/reproductions.md): a 3x3 stem lets a corner
    # artefact into the neighbouring tokens, where TAP on tokens could not remove it. Changing one
    # pixel may change only the token of the 4x4 patch that holds it, and non-linearly.
    torch.manual_seed(0)
    net = build_model("vit-digits", 10, 1, (28, 28)).net.eval()
    assert [type(m) for m in net.patch_embed.proj] == [nn.Conv2d, nn.GELU, nn.Conv2d]
    images = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    net = net.double()
    with torch.no_grad():
        before = net.patch_embed(images)  # (N, 7, 7, 64): dynamic_img_size keeps the grid
        for y, x in [(0, 0), (3, 3), (4, 3), (27, 27), (13, 17)]:
            changed = images.clone()
            changed[:, :, y, x] += 0.5
            moved = (net.patch_embed(changed) - before).abs().amax(-1) > 0  # (N, 7, 7)
            expected = torch.zeros(2, 7, 7, dtype=torch.bool)
            expected[:, y // 4, x // 4] = True
            assert torch.equal(moved, expected), (y, x)
        # non-linear: the response to twice the change is not twice the response
        changed = images.clone()
        changed[:, :, 0, 0] += 0.5
        twice = images.clone()
        twice[:, :, 0, 0] += 1.0
        one, two = net.patch_embed(changed) - before, net.patch_embed(twice) - before
        assert not torch.allclose(two, 2 * one, rtol=1e-6, atol=1e-9)


def test_torchvision_vit_is_built_at_the_datas_size():
    model = build_model("vit_b_16", 2, 1, (32, 32))
    assert model.net.image_size == 32 and model.meta.gradcam_layer == "net.encoder.layers.encoder_layer_11.ln_1"
    assert model.meta.target_layers[-1] == "net.encoder.layers.encoder_layer_11"
    with capture_activations(model, model.meta.target_layers[:1]) as maps:
        model(torch.rand(1, 1, 32, 32))
    assert maps[0].shape == (1, 768, 2, 2)


@pytest.mark.parametrize("arch, size, message", [
    ("vit_b_16", (40, 40), "'vit_b_16' cannot run at 40x40: torchvision's ViT needs square images whose side divides "
                           "by its patch size 16; 48x48 would work"),
    ("vit_b_16", (32, 48), "'vit_b_16' cannot run at 32x48: torchvision's ViT needs square images"),
    ("timm:eva02_tiny_patch14_224", (32, 32), "'timm:eva02_tiny_patch14_224' cannot run at 32x32: .*patch size "
                                              r"\(14\); 42x42 would work"),
    ("vit-digits", (30, 30), "'vit-digits' cannot run at 30x30: its 4x4 patches need sides that divide by 4; 32x32"),
    ("maxvit_t", (224, 224), "'maxvit_t' is not supported: MaxViT builds its attention for one fixed input size"),
])
def test_a_model_that_cannot_run_at_the_datas_size_is_refused_in_one_line(arch, size, message):
    with pytest.raises(ModelError, match=message) as info:
        build_model(arch, 2, 3, size)
    assert "\n" not in str(info.value)


def test_the_transformers_are_listed():
    assert "vit-digits" in ARCHITECTURES
    assert {"vit_b_16", "swin_t"} <= set(torchvision_classifiers())
    assert get_arch("timm:deit_tiny_distilled_patch16_224").min_input_size == 32
    assert get_arch("timm:eva02_tiny_patch14_224").min_input_size == 28  # 28x28 digits: 2x2 patches, no upsampling
