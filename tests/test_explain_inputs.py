"""Explanations that never lie (issue 15): one input check for every method, the model left exactly
as it was, captured layers exactly what was named, no leaks, bounded memory. Each bad input the issue
names is a test here with its right answer: the right map, or one clear line."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditkit.errors import ModelError, ParameterError
from auditkit.explain import METHODS, attribute
from auditkit.models import build_model, capture_activations

ALL = list(METHODS)


def four_class_model():
    torch.manual_seed(0)
    return build_model("tap-cnn", 4, 3, (16, 16)).eval()


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("target", [-1, 4, 5])
def test_a_target_outside_the_classes_is_one_clear_error_for_every_method(method, target):
    # The bug: LRP silently explained the last class for -1; the other methods raised raw index errors.
    model = four_class_model()
    with pytest.raises(ParameterError,
                       match=rf"`target` must be class indices in \[0, 4\) for this 4-class model; got {target}"):
        attribute(model, torch.rand(2, 3, 16, 16), target, method)


@pytest.mark.parametrize("method", ALL)
def test_a_batch_with_the_wrong_channel_count_is_refused_by_every_method(method):
    # The bug: LRP broadcast a 1-channel batch through the 3-channel normalisation and returned a map.
    model = four_class_model()
    with pytest.raises(ParameterError, match=r"`images` must have 3 channel\(s\) for this model; got 1"):
        attribute(model, torch.rand(2, 1, 16, 16), 0, method)


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("bad, message", [
    (torch.rand(3, 16, 16), r"`images` must have shape \(N, C, H, W\)"),
    (torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), "`images` must be floating"),
    (torch.rand(2, 3, 16, 16, dtype=torch.float64),
     "`images` have dtype torch.float64 but the model's parameters are torch.float32"),
    ([[0.0]], "`images` must be a torch.Tensor"),
])
def test_malformed_images_are_refused_alike(method, bad, message):
    with pytest.raises(ParameterError, match=message):
        attribute(four_class_model(), bad, 0, method)


def test_bad_target_forms_are_refused():
    model = four_class_model()
    x = torch.rand(2, 3, 16, 16)
    with pytest.raises(ParameterError, match="integer class indices"):
        attribute(model, x, torch.tensor([0.5, 1.0]), "gradient")
    with pytest.raises(ParameterError, match=r"one or K classes per sample \(shape \(2,\) or \(2, K\)\)"):
        attribute(model, x, [0, 1, 2], "lrp_epsilon")
    with pytest.raises(ParameterError, match="'pred' or 'label'"):
        attribute(model, x, "best", "gradient")


class DictOutput(nn.Module):
    """A model that returns a dict (as detection-style and multi-head models do)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        features = F.relu(self.conv(x))
        return {"features": features, "logits": self.fc(F.adaptive_avg_pool2d(features, 1).flatten(1))}


class PlainOutput(DictOutput):
    def forward(self, x):
        return super().forward(x)["logits"]


@pytest.mark.parametrize("method", ALL)
def test_a_model_with_another_output_needs_output_and_then_gives_the_plain_models_map(method):
    torch.manual_seed(1)
    dict_model, plain = DictOutput().eval(), PlainOutput().eval()
    plain.load_state_dict(dict_model.state_dict())
    x = torch.rand(2, 3, 12, 12)
    options = {"layer": "conv"} if method == "gradcam" else {}
    # Issue 29: a dict with one field named logits is read by the output adapter's rule
    # (auditkit/models/outputs.py); an output it cannot read still needs `output`.
    two_heads = lambda out: {"a": out["logits"], "b": out["logits"]}  # noqa: E731
    with pytest.raises(ParameterError, match="`output` must name the logits: the model returns a dict with a .*b "):
        attribute(dict_model, x, 1, method, output=two_heads, **options)
    for output in (None, "logits", lambda out: out["logits"]):
        got = attribute(dict_model, x, 1, method, output=output, **options)
        torch.testing.assert_close(got, attribute(plain, x, 1, method, **options))
    with pytest.raises(ParameterError, match="does not pick anything"):
        attribute(dict_model, x, 1, method, output="nope", **options)


class TrainSensitive(nn.Module):
    """Batch norm and dropout: a model whose train mode changes its output and its buffers."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = self.drop(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def snapshot(model: nn.Module):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()],
    }


def same(a: dict, b: dict) -> bool:
    return (a["modes"] == b["modes"] and a["requires_grad"] == b["requires_grad"] and a["hooks"] == b["hooks"]
            and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
            and all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
                    for x, y in zip(a["grads"], b["grads"])))


@pytest.mark.parametrize("method", ALL)
def test_the_model_is_left_exactly_as_it_was_and_explained_in_eval_mode(method):
    # The bug: a model in train mode had its running statistics updated and gave a different map at
    # every call (dropout), with no warning.
    torch.manual_seed(2)
    model = TrainSensitive().train()
    model.drop.eval()  # mixed modes must come back as they were
    model.conv.bias.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = snapshot(model)
    x = torch.rand(3, 3, 10, 10)
    options = {"layer": "conv"} if method == "gradcam" else {}
    maps = [attribute(model, x, 1, method, **options) for _ in range(2)]
    assert same(before, snapshot(model))
    torch.testing.assert_close(maps[0], maps[1], rtol=0, atol=0)  # no dropout, no batch statistics
    reference = TrainSensitive()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(maps[0], attribute(reference.eval(), x, 1, method, **options))


def test_a_loaded_checkpoint_comes_back_in_eval_mode(tmp_path):
    from auditkit.models import load_checkpoint, save_checkpoint

    model = build_model("resnet18", 2, 3, (32, 32)).train()
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    assert not any(m.training for m in loaded.modules())


class InplaceAfterConv(nn.Module):
    """A convolution whose output the next F.relu(..., inplace=True) overwrites."""

    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x), inplace=self.inplace)
        x = F.relu(self.conv2(x), inplace=self.inplace)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_gradcam_sees_the_layers_own_output_even_when_a_later_op_overwrites_it_in_place():
    # The bug: Grad-CAM at conv2 read the in-place ReLU's output instead (0.15 off the same network
    # written without in-place ops; one map all zeros).
    torch.manual_seed(3)
    inplace, plain = InplaceAfterConv(True).eval(), InplaceAfterConv(False).eval()
    plain.load_state_dict(inplace.state_dict())
    x = torch.rand(4, 3, 12, 12)
    got = attribute(inplace, x, "pred", "gradcam", layer="conv2")
    want = attribute(plain, x, "pred", "gradcam", layer="conv2")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert all(m.abs().sum() > 0 for m in got)


def test_capture_refuses_an_output_modified_in_place_naming_the_module():
    model = InplaceAfterConv(True).eval()
    with pytest.raises(ModelError, match="the output of layer 'conv2' is modified in place later in the forward pass"):
        with capture_activations(model, ["conv2"]):
            model(torch.rand(1, 3, 8, 8))
    with capture_activations(model, ["conv2"], copy=[0]) as captured:
        model(torch.rand(1, 3, 8, 8))
        assert (captured[0] < 0).any()  # the convolution's own output, negatives included


def test_networks_explained_with_lrp_are_freed_when_deleted():
    # The bug: the trace cache's value held its own key, so every explained network stayed alive.
    refs = []
    for _ in range(4):
        model = build_model("resnet18", 3, 3, (32, 32)).eval()
        attribute(model, torch.rand(1, 3, 32, 32), "pred", "lrp_epsilon")
        refs.append(weakref.ref(model))
        del model
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_integrated_gradients_batches_its_steps_under_a_budget_with_the_same_maps():
    # The bug: every step of the whole batch went through the network at once (one 384^2 image: 1.9 GB
    # against 88 MB for its gradient). Now the steps go in passes of a pixel budget, and any
    # internal_batch_size gives the same map.
    from auditkit.explain import gradients

    torch.manual_seed(4)
    model = build_model("tap-cnn", 3, 1, (28, 28)).eval()
    x = torch.rand(2, 1, 28, 28)
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    try:
        full = attribute(model, x, 1, "integrated_gradients", steps=16, internal_batch_size=32)
        assert max(seen) == 32
        seen.clear()
        small = attribute(model, x, 1, "integrated_gradients", steps=16, internal_batch_size=4)
        assert max(seen) == 4 and len(seen) >= 8
        seen.clear()
        big = torch.rand(1, 1, 384, 384)
        attribute(build_model("tap-cnn", 3, 1, (384, 384)).eval(), big, 1, "integrated_gradients", steps=32)
    finally:
        handle.remove()
    torch.testing.assert_close(full, small, rtol=1e-5, atol=1e-7)
    assert gradients.IG_PIXEL_BUDGET // (384 * 384) == 1  # one path image per pass at 384^2 by default
    with pytest.raises(ParameterError, match="`internal_batch_size` must be an integer >= 1"):
        attribute(model, x, 1, "integrated_gradients", internal_batch_size=0)
