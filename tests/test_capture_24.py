"""Issue 24, item 5: layer capture is right or refused for every use of a module.

A module called once, one modified in place, one called several times in one forward (a block in a
loop, a shared activation, weight-tied layers) and one that runs a different number of times per
forward; through each consumer of the one capture mechanism (auditkit/models/hooks.py): Grad-CAM,
TAP's training objective, the audit's activation share, the receptive fields TAP's dilation reads,
and the presets found by probing. Every captured value is compared with a manual forward that
records each call itself, without hooks.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditkit.audit.shared import activation_shares as _activation_shares
from auditkit.data.dataset import Batch
from auditkit.errors import ModelError
from auditkit.explain import attribute
from auditkit.models import build_model, capture_activations, run_capturing
from auditkit.models.hooks import resolve_layer_calls, split_call
from auditkit.models.presets import discover_presets, receptive_fields
from auditkit.ops import downscale_masks, tap_loss
from auditkit.repair.methods.tap import TapObjective


class Looped(nn.Module):
    """A stem, then one block applied ``times`` times, each call followed by one shared activation."""

    def __init__(self, times: int = 3, inplace: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        # Outputs of both signs, and a backward that does not need them (an in-place ReLU follows).
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
        self.act = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(4, 3)
        self.times = times

    def forward(self, x: torch.Tensor, record: dict | None = None) -> torch.Tensor:
        x = self.stem(x)
        if record is not None:
            record["stem"] = x
        for _ in range(self.times):
            x = self.block(x)
            if record is not None:  # the manual record of each call (a copy: the ReLU may be in place)
                record.setdefault("block", []).append(x.clone() if self.act.inplace else x)
            x = self.act(x)
        return self.head(x.mean(dim=(2, 3)))


class Tied(nn.Module):
    """One convolution registered under two names (weight tying) and applied twice."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(2, 2, 3, padding=1)
        self.dec = self.enc
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor, record: list | None = None) -> torch.Tensor:
        first = self.enc(x)
        second = self.dec(torch.tanh(first))
        if record is not None:
            record += [first, second]
        return self.head(second.mean(dim=(2, 3)))


def looped(times: int = 3, inplace: bool = False, seed: int = 0) -> Looped:
    torch.manual_seed(seed)
    return Looped(times, inplace).eval()


def images_and_masks(n: int = 4, side: int = 8):
    torch.manual_seed(1)
    images = torch.randn(n, 1, side, side)
    masks = torch.zeros(n, 1, side, side)
    masks[:, :, 1:4, 2:6] = 1.0
    return images, masks


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


AMBIGUOUS = r"layer 'block' ran 3 times in one forward pass, so its output is ambiguous; name one call: " \
            r"'block#1' \(the first\) to 'block#3' \(the last\)"


# ---- the names ---------------------------------------------------------------------------------------


def test_a_call_is_named_with_its_number_from_one():
    assert split_call("block#2") == ("block", 2)
    assert split_call("net.layer4") == ("net.layer4", None)
    for bad in ("block#0", "block#x", "block#", "block#-1"):
        with pytest.raises(ModelError, match="counted from 1") as error:
            split_call(bad)
        one_line(error)
    net = looped()
    assert resolve_layer_calls(net, ["block#2", "stem", "block.0#3"]) == ["block#2", "stem", "block.0#3"]
    with pytest.raises(ModelError, match="unknown layer 'blok'"):
        resolve_layer_calls(net, ["blok#2"])
    # A bare name is a module's only call, so it and "#1" are the same layer.
    with pytest.raises(ModelError, match="layer 'stem#1' is listed twice"):
        resolve_layer_calls(net, ["stem", "stem#1"])


def test_a_module_called_once_is_captured_as_before_and_as_its_first_call():
    net, (images, _) = looped(times=1), images_and_masks()
    record: dict = {}
    with torch.no_grad():
        net(images, record)
        with capture_activations(net, ["stem", "block"]) as captured:
            net(images)
        with capture_activations(net, ["block#1"]) as first_call:
            net(images)
    torch.testing.assert_close(captured[0], record["stem"])
    torch.testing.assert_close(captured[1], record["block"][0])
    torch.testing.assert_close(first_call[0], record["block"][0])


# ---- capture itself ------------------------------------------------------------------------------------


def test_each_call_of_a_block_in_a_loop_is_captured():
    net, (images, _) = looped(), images_and_masks()
    record: dict = {}
    with torch.no_grad():
        net(images, record)
        with capture_activations(net, ["block#3", "block#1", "block#2", "block.0#2"]) as captured:
            net(images)
    for slot, call in enumerate((3, 1, 2)):
        torch.testing.assert_close(captured[slot], record["block"][call - 1])
    # A submodule of the block runs once per call of the block: its second call feeds block#2.
    torch.testing.assert_close(net.block[1](captured[3]), record["block"][1])


def test_a_bare_name_for_a_module_run_several_times_is_refused_in_one_line():
    net, (images, _) = looped(), images_and_masks()
    with pytest.raises(ModelError, match=AMBIGUOUS) as error, torch.no_grad():
        with capture_activations(net, ["block"]):
            net(images)
    one_line(error)
    with pytest.raises(ModelError, match=r"layer 'block#4' names call 4, but 'block' ran 3 time\(s\)"), \
            torch.no_grad(), capture_activations(net, ["block#4"]):
        net(images)
    assert not net._forward_hooks and not net.block._forward_hooks  # removed on the error too


def test_a_call_modified_in_place_later_is_captured_from_a_copy():
    net, (images, _) = looped(inplace=True), images_and_masks()
    record: dict = {}
    with torch.no_grad():
        reference = net(images, record)
        with pytest.raises(ModelError, match="the output of layer 'block#2' is modified in place"):
            with capture_activations(net, ["block#2"]):
                net(images)
        logits, captured, copy = run_capturing(net, ["stem", "block#2"], lambda: net(images))
    assert copy == (1,)
    torch.testing.assert_close(captured[1], record["block"][1])  # before the ReLU, as the block gave it
    assert (captured[1] < 0).any()
    torch.testing.assert_close(logits, reference)  # the network went on with the copy: the same result


def test_a_module_that_runs_a_different_number_of_times_per_forward_is_refused():
    net, (images, _) = looped(), images_and_masks()
    with torch.no_grad(), pytest.raises(ModelError) as error:
        with capture_activations(net, ["block#2"]):
            net(images)
            net.times = 2
            net(images)
    assert one_line(error) == ("layer 'block' ran 2 times in this forward pass but 3 in an earlier one, so "
                               "'block#2' does not name the same call in each; capture a module that runs a "
                               "fixed number of times")


def test_weight_tied_layers_are_one_module_with_two_calls():
    torch.manual_seed(0)
    net, x = Tied().eval(), torch.randn(3, 2, 6, 6)
    record: list = []
    with torch.no_grad():
        net(x, record)
        with pytest.raises(ModelError, match=r"layer 'enc' ran 2 times .* 'enc#1' \(the first\) to 'enc#2'"):
            with capture_activations(net, ["dec"]):
                net(x)
        with capture_activations(net, ["dec#2", "enc#1"]) as captured:
            net(x)
    assert resolve_layer_calls(net, ["dec#2"]) == ["enc#2"]  # the second name is the first's
    torch.testing.assert_close(captured[0], record[1])
    torch.testing.assert_close(captured[1], record[0])


# ---- the consumers -------------------------------------------------------------------------------------


def manual_gradcam(net: Looped, images: torch.Tensor, targets: torch.Tensor, call: int) -> torch.Tensor:
    record: dict = {}
    logits = net(images, record)
    activation = record["block"][call - 1]
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), activation)
    cam = F.relu((grad.mean(dim=(2, 3))[:, :, None, None] * activation).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("inplace", [False, True])
def test_gradcam_of_one_call(inplace):
    images, _ = images_and_masks()
    targets = torch.tensor([0, 1, 2, 1])
    reference = manual_gradcam(looped(), images, targets, call=2)  # the same weights, out of place
    net = looped(inplace=inplace)
    maps = attribute(net, images, targets, "gradcam", layer="block#2")
    torch.testing.assert_close(maps, reference.detach())
    assert not torch.allclose(maps, manual_gradcam(looped(), images, targets, call=3).detach())
    with pytest.raises(ModelError, match=AMBIGUOUS):
        attribute(net, images, targets, "gradcam", layer="block")


def tap_batch(images: torch.Tensor, masks: torch.Tensor) -> Batch:
    n = images.shape[0]
    return Batch(images, torch.zeros(n, dtype=torch.long), masks, torch.ones(n, dtype=torch.bool),
                 ["train"] * n, [""] * n, torch.arange(n))


def test_tap_penalty_of_one_call_and_its_gradient():
    images, masks = images_and_masks()
    objective = TapObjective(layers=("block#2", "stem"), kernel_size=(3, 3))
    net = looped()
    logits, loss = objective.forward_and_loss(net, tap_batch(images, masks))
    (0.1 * logits.square().sum() + loss).backward()  # a training step's total: the task's and TAP's
    mine = [p.grad.clone() for p in net.parameters()]
    reference_net = looped()
    record: dict = {}
    reference_logits = reference_net(images, record)
    expected = tap_loss([record["block"][1], record["stem"]], masks, [3, 3])
    (0.1 * reference_logits.square().sum() + expected).backward()
    torch.testing.assert_close(loss, expected)
    for grad, parameter in zip(mine, reference_net.parameters()):
        torch.testing.assert_close(grad, parameter.grad)


def test_tap_refuses_a_bare_name_and_a_count_that_changes_between_steps():
    images, masks = images_and_masks()
    batch, net = tap_batch(images, masks), looped()
    with pytest.raises(ModelError, match=AMBIGUOUS):
        TapObjective(layers=("block",), kernel_size=(3,)).forward_and_loss(net, batch)
    objective = TapObjective(layers=("block#2",), kernel_size=(3,))
    objective.forward_and_loss(net, batch)
    net.times = 4  # a later step runs the block once more: "block#2" would mean another depth
    with pytest.raises(ModelError, match="'block' ran 4 times in this forward pass but 3 in an earlier one"):
        objective.forward_and_loss(net, batch)


def test_audit_activation_share_of_one_call():
    images, masks = images_and_masks()
    net = looped()
    shares, coverages = _activation_shares(net, ["block#3", "stem"], images, masks)
    record: dict = {}
    with torch.no_grad():
        net(images, record)
    for position, activation in enumerate([record["block"][2], record["stem"]]):
        weight = downscale_masks(masks, [tuple(activation.shape[-2:])])[0]
        positive = activation.relu().sum(dim=1)
        torch.testing.assert_close(shares[:, position], (positive * weight).sum((1, 2)) / positive.sum((1, 2)))
        torch.testing.assert_close(coverages[:, position], weight.mean(dim=(1, 2)))
    with pytest.raises(ModelError, match=AMBIGUOUS):
        _activation_shares(net, ["block"], images, masks)
    calls: dict = {}  # the audit keeps it across batches
    _activation_shares(net, ["block#2"], images, masks, calls)
    net.times = 2
    with pytest.raises(ModelError, match="'block' ran 2 times in this forward pass but 3 in an earlier one"):
        _activation_shares(net, ["block#2"], images, masks, calls)


def test_receptive_fields_of_each_call():
    net = looped()
    # 3x3 convolutions, stride 1: the stem sees 3 pixels, each call of the block 2 more.
    assert receptive_fields(net, ["stem", "block#1", "block#2", "block#3"], 1, 16) == [3, 5, 7, 9]
    with pytest.raises(ModelError, match=AMBIGUOUS):
        receptive_fields(net, ["block"], 1, 16)


# ---- presets -------------------------------------------------------------------------------------------


class SharedActivation(nn.Module):
    """A flat CNN written with one ReLU and one pool used after each convolution (a common style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_presets_name_the_call_of_a_module_run_several_times():
    found = discover_presets(Looped(), 1, 32)
    assert found.tap_layers == ("block#3",) and found.gradcam_layer == "act#3"
    # Each stage closes with a call of the shared pool; the Grad-CAM layer is the ReLU after conv2.
    found = discover_presets(SharedActivation(), 1, 32)
    assert found.tap_layers == ("pool#1", "pool#2") and found.gradcam_layer == "relu#2"


# The user's own module, imported by name as `--arch capture24:looped` would (this file is its Looped).
USER_MODULE = f"""
from {__name__} import Looped


def looped(num_classes, in_channels):
    return Looped()
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "capture24.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("capture24", None)


def test_a_model_with_a_looped_block_gets_per_call_presets_every_consumer_reads(user_module):
    model = build_model("capture24:looped", 3, 1, (8, 8))
    assert model.meta.target_layers == ("net.block#3",) and model.meta.gradcam_layer == "net.act#3"
    images, masks = images_and_masks()
    with torch.no_grad():
        _, (captured,), _ = run_capturing(model, model.meta.target_layers, lambda: model(images))
    assert captured.shape == (4, 4, 8, 8)
    assert attribute(model, images, torch.tensor([0, 1, 2, 0]), "gradcam").shape == (4, 1, 8, 8)
    shares, _ = _activation_shares(model, list(model.meta.target_layers), images, masks)
    assert shares.shape == (4, 1) and torch.isfinite(shares).all()


def test_the_public_resolve_layers_names_calls():
    from auditkit.models import resolve_layers

    assert resolve_layers(looped(), ["block#2", "stem"]) == ["block#2", "stem"]


def test_per_call_presets_survive_a_checkpoint(user_module, tmp_path):
    from auditkit.models import load_checkpoint, save_checkpoint

    model = build_model("capture24:looped", 3, 1, (8, 8))
    save_checkpoint(model, tmp_path / "looped.safetensors")
    loaded = load_checkpoint(tmp_path / "looped.safetensors")
    assert loaded.meta.target_layers == ("net.block#3",) and loaded.meta.gradcam_layer == "net.act#3"
