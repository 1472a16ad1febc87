"""Attribution methods: LRP-epsilon rules in matrix form, LRP-0 = input x gradient, conservation,
differentiability for TEA, Grad-CAM from its definition, batching, and no side effects."""

from __future__ import annotations

import copy


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditkit.explain import METHODS, UnsupportedLayerError, attribute
from auditkit.explain.lrp import propagate, run_forward, trace
from auditkit.errors import ParameterError
from auditkit.models import ARCHITECTURES, build_model

from ._lrp_paths import lrp_path  # noqa: F401  (LRP tests run on both paths: usefixtures("lrp_path"))

both_lrp_paths = pytest.mark.usefixtures("lrp_path")


def stabilise(z, eps):
    return z + eps * torch.where(z >= 0, 1.0, -1.0).double()


def jacobian_matrix(fn, a):
    """d fn(a) / d a as a (outputs, inputs) matrix (float64)."""
    return torch.autograd.functional.jacobian(fn, a).reshape(fn(a).numel(), a.numel())


def lrp_matrix_form(fn, a, relevance, eps):
    """R_in = a * J^T (R / (z + eps sign z)) for an affine map z = fn(a)."""
    z = fn(a)
    s = relevance.reshape(-1) / stabilise(z.reshape(-1), eps)
    return (a.reshape(-1) * (jacobian_matrix(fn, a).t() @ s)).reshape(a.shape)


def rule_output(net, a, relevance, eps):
    """Our propagation of ``relevance`` (given at the network output) back to its input."""
    traced = trace(net)
    _, env = run_forward(traced, a)
    return propagate(traced, env, relevance, k=1, epsilon=eps, create_graph=False)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def seeded(module, seed=0):
    torch.manual_seed(seed)
    return module.double().eval()


def randomise_batch_norm(net):
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.3, 0.3)
    return net


# ---- each rule in matrix form --------------------------------------------------------------

AFFINE_LAYERS = {
    "conv": lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
    "grouped dilated conv": lambda: nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2),
    "conv + batch norm (merged)": lambda: randomise_batch_norm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                                                             nn.BatchNorm2d(4))),
    "batch norm alone": lambda: randomise_batch_norm(nn.Sequential(nn.BatchNorm2d(3))),
    "average pool": lambda: nn.AvgPool2d(2),
    "adaptive average pool": lambda: nn.AdaptiveAvgPool2d((3, 2)),
    "linear": lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 5)),
    "residual sum": Residual,
}


@both_lrp_paths
@pytest.mark.parametrize("name", list(AFFINE_LAYERS))
def test_epsilon_rule_equals_its_matrix_form(name):
    net = seeded(AFFINE_LAYERS[name]())
    channels = 4 if "grouped" in name else 3
    a = torch.randn(1, channels, 6, 6, dtype=torch.float64).relu()
    z = net(a)
    relevance = torch.randn_like(z)
    eps = 0.05
    got = rule_output(net, a, relevance, eps)
    if name == "residual sum":  # R_i = a_i R / stab(z), then each branch's conv rule
        s = relevance / stabilise(z, eps)
        expected = sum(lrp_matrix_form(branch, a, branch(a) * s, eps) for branch in (net.a, net.b))
    else:
        expected = lrp_matrix_form(net, a, relevance, eps)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@both_lrp_paths
def test_max_pool_gives_relevance_to_the_winner():
    net = nn.MaxPool2d(3, stride=2, padding=1)  # overlapping windows, as in ResNet
    a = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    relevance = torch.randn_like(net(a))
    expected = (jacobian_matrix(net, a).t() @ relevance.reshape(-1)).reshape(a.shape)
    torch.testing.assert_close(rule_output(net, a, relevance, 1e-6), expected)


@both_lrp_paths
def test_activations_and_reshapes_pass_relevance_through():
    net = nn.Sequential(nn.ReLU(), nn.Dropout(0.5), nn.Flatten())
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    relevance = torch.randn(2, 48, dtype=torch.float64)
    torch.testing.assert_close(rule_output(net.eval(), a, relevance, 1e-6), relevance.view(2, 3, 4, 4))


# ---- whole networks ---------------------------------------------------------------------------


class BiasFreeNet(nn.Module):
    """Conv / ReLU / max pool / residual sum / average pool / linear, no biases anywhere."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(6 * 2 * 2, 4, bias=False)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool(x)
        x = F.relu(self.conv2(x) + x)
        x = F.adaptive_avg_pool2d(x, 2)
        return self.head(torch.flatten(x, 1))


@both_lrp_paths
def test_lrp_zero_equals_input_times_gradient_on_a_bias_free_relu_net():
    net = seeded(BiasFreeNet())
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])
    lrp = attribute(net, x, targets, "lrp_epsilon", epsilon=1e-12)
    ixg = attribute(net, x, targets, "input_x_gradient")
    torch.testing.assert_close(lrp, ixg, rtol=1e-6, atol=1e-9)


@both_lrp_paths
def test_relevance_is_conserved_when_biases_are_zero():
    net = seeded(BiasFreeNet())
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    targets = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]])
    heatmaps = attribute(net, x, targets, "lrp_epsilon", epsilon=1e-9)
    logits = net(x).gather(1, targets)
    torch.testing.assert_close(heatmaps.sum(dim=(2, 3)), logits, rtol=1e-6, atol=1e-9)


@both_lrp_paths
@pytest.mark.parametrize("arch", ["vgg16", "resnet18", "densenet121"])
def test_conservation_on_zoo_networks_with_biases_zeroed(arch):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=5, in_channels=3, input_size=(32, 32)).double().eval()
    randomise_batch_norm(model)
    for module in model.modules():  # zero every additive term, batch-norm shifts included
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.zero_()
            nn.init.zeros_(module.bias)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    heatmaps = attribute(model, x, torch.tensor([1, 4]), "lrp_epsilon", epsilon=1e-12)
    logits = model(x).gather(1, torch.tensor([[1], [4]]))
    torch.testing.assert_close(heatmaps.sum(dim=(2, 3)), logits, rtol=1e-5, atol=1e-10)


@both_lrp_paths
def test_targets_batched_in_one_pass_equal_separate_calls():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=6, in_channels=3, input_size=(32, 32)).eval()
    x = torch.rand(3, 3, 32, 32)
    targets = torch.tensor([[0, 5, 2], [1, 1, 3], [4, 2, 0]])
    for method in ("lrp_epsilon", "gradient", "gradcam"):
        together = attribute(model, x, targets, method)
        for k in range(3):
            alone = attribute(model, x, targets[:, k], method)
            torch.testing.assert_close(together[:, k : k + 1], alone, rtol=1e-4, atol=1e-7)


@both_lrp_paths
def test_heatmap_is_differentiable_for_tea_gradcheck():
    net = seeded(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                               nn.Linear(3 * 9, 4)))
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    names = ["0.weight", "4.weight"]

    def heatmap(conv_weight, linear_weight):
        params = {**dict(net.named_parameters()), **dict(zip(names, (conv_weight, linear_weight)))}
        with torch.nn.utils.stateless._reparametrize_module(net, params):
            return attribute(net, x, torch.tensor([1, 3]), "lrp_epsilon", epsilon=0.5, create_graph=True)

    weights = [dict(net.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(heatmap, weights, atol=1e-6)


class ReluBlocks(nn.Module):
    """conv -> ReLU, conv -> batch norm -> relu(), a residual sum -> F.relu, linear -> .relu(): every way a
    layer's output can feed a ReLU. ``relu`` swaps in for the ReLU (LeakyReLU(0) computes the same)."""

    def __init__(self, relu=nn.ReLU):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(2, 4, 3, padding=1), relu()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), relu()
        self.conv3, self.act3 = nn.Conv2d(4, 4, 1), relu()
        self.fc1, self.act4, self.fc2 = nn.Linear(4 * 16, 8), relu(), nn.Linear(8, 3)

    def forward(self, x):
        x = self.act1(self.conv1(x))
        y = self.act2(self.bn2(self.conv2(x)))
        x = self.act3(self.conv3(y) + x)
        x = F.max_pool2d(x, 2).flatten(1)
        return self.fc2(self.act4(self.fc1(x)))


@both_lrp_paths
def test_a_layer_feeding_a_relu_keeps_relu_of_its_output_with_the_same_heatmaps_and_gradients():
    """run_forward keeps relu(z) in place of z for a layer whose only user is a ReLU (memory); the
    LRP-epsilon heatmaps and their weight gradients must equal those computed from z itself."""
    torch.manual_seed(5)
    net = ReluBlocks().double().train()  # train mode: batch norm uses the batch's statistics
    oracle = ReluBlocks(relu=lambda: nn.LeakyReLU(0.0)).double().train()  # not aliased: LRP reads z
    oracle.load_state_dict(net.state_dict())
    x = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    traced = trace(net)
    _, env = run_forward(traced, x)
    nodes = {n.name: n for n in traced.graph.nodes}
    assert env[nodes["conv1"]] is env[nodes["act1"]] and env[nodes["add"]] is env[nodes["act3"]]
    assert (env[nodes["act1"]] == 0).any()  # some z < 0: the substitution is exercised
    targets = torch.tensor([[0, 2], [1, 0], [2, 1]])
    # The internal entry point keeps the model's mode (as TEA's student in training does); the public
    # lrp_epsilon would explain in eval mode, with running statistics the first forward above changed.
    from auditkit.explain.lrp import lrp_epsilon_and_logits

    maps = lrp_epsilon_and_logits(net, x, targets, epsilon=0.05, create_graph=True)[0]
    expected = lrp_epsilon_and_logits(oracle, x, targets, epsilon=0.05, create_graph=True)[0]
    torch.testing.assert_close(maps, expected, rtol=1e-10, atol=1e-12)
    target_maps = torch.randn_like(maps)
    grads = torch.autograd.grad((maps - target_maps).abs().sum(), list(net.parameters()))
    expected_grads = torch.autograd.grad((expected - target_maps).abs().sum(), list(oracle.parameters()))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@both_lrp_paths
def test_tea_style_loss_trains_every_layer_of_a_resnet():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, in_channels=1, input_size=(32, 32))
    x = torch.rand(2, 1, 32, 32)
    heatmaps = attribute(model.eval(), x, torch.tensor([0, 2]), "lrp_epsilon", epsilon=0.01, create_graph=True)
    loss = (heatmaps - torch.rand_like(heatmaps)).abs().mean()
    grads = torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)
    conv_grads = [g for (name, _), g in zip(model.named_parameters(), grads) if name.endswith("conv1.weight")]
    assert conv_grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in conv_grads)


def test_gradcam_equals_its_definition():
    torch.manual_seed(0)
    model = build_model("tap-cnn", num_classes=10, in_channels=1, input_size=(28, 28)).eval()
    x = torch.rand(3, 1, 28, 28)
    targets = torch.tensor([1, 7, 3])
    got = attribute(model, x, targets, "gradcam")
    layer = model.get_submodule(model.meta.gradcam_layer)
    captured = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), captured[0])
    cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * captured[0]).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=(28, 28), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, expected.detach())


def test_integrated_gradients_is_complete():
    net = seeded(nn.Sequential(nn.Conv2d(1, 4, 3), nn.Softplus(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)))
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    maps = attribute(net, x, torch.tensor([0, 2]), "integrated_gradients", steps=256)
    difference = (net(x).gather(1, torch.tensor([[0], [2]]))
                  - net(torch.zeros_like(x)).gather(1, torch.tensor([[0], [2]])))
    torch.testing.assert_close(maps.sum(dim=(2, 3)), difference, rtol=1e-4, atol=1e-6)


# ---- every method on every architecture -------------------------------------------------------


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_method_on_every_architecture(arch):
    torch.manual_seed(0)
    size = 28 if arch in ("tap-cnn", "shortcut-cnn", "vgg16") else 32  # 28 exercises the model's upsampling
    model = build_model(arch, num_classes=4, in_channels=3, input_size=(size, size)).eval()
    x = torch.rand(2, 3, size, size)
    for method in METHODS:
        options = {"steps": 4} if method == "integrated_gradients" else {}
        maps = attribute(model, x, "pred", method, **options)
        assert maps.shape == (2, 1, size, size), (arch, method)
        assert torch.isfinite(maps).all(), (arch, method)


# ---- no side effects ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_the_model_is_never_changed(method):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, in_channels=3, input_size=(32, 32))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    parameter_ids = [id(p) for p in model.parameters()]
    model.eval()
    options = {"steps": 2} if method == "integrated_gradients" else {}
    attribute(model, torch.rand(2, 3, 32, 32), "pred", method, **options)
    assert [id(p) for p in model.parameters()] == parameter_ids
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks and not module._backward_hooks
    assert not model.training
    # An optimizer made before the attribution still trains the model after it.
    model.train()
    loss = model(torch.rand(4, 3, 32, 32)).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items() if "weight" in k)


@both_lrp_paths
def test_unsupported_layers_are_named():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.rnn_like = nn.Softmax2d()

        def forward(self, x):
            return torch.sin(self.rnn_like(self.conv(x))).flatten(1)

    with pytest.raises(UnsupportedLayerError, match="'sin'"):
        attribute(Odd().eval(), torch.rand(1, 1, 5, 5), 0, "lrp_epsilon")


def test_target_forms():
    torch.manual_seed(0)
    model = build_model("tap-cnn", num_classes=10, in_channels=1, input_size=(28, 28)).eval()
    x = torch.rand(2, 1, 28, 28)
    labels = torch.tensor([3, 4])
    by_label = attribute(model, x, "label", "gradient", labels=labels)
    torch.testing.assert_close(by_label, attribute(model, x, labels, "gradient"))
    torch.testing.assert_close(attribute(model, x, 3, "gradient")[:1], attribute(model, x[:1], [3], "gradient"))
    with pytest.raises(ParameterError, match="`labels` must be given with target='label'"):
        attribute(model, x, "label", "gradient")
    with pytest.raises(ParameterError, match="`method` must be one of"):
        attribute(model, x, 0, "shap")


@both_lrp_paths
@pytest.mark.parametrize("replace", ["weights", "stride", "activation"])
def test_a_module_replaced_after_an_explanation_is_explained_as_it_is_now(replace):
    # The trace, its compiled forward and its relevance pass are cached per network; a module the
    # user replaces afterwards must be the one explained next (compared with a fresh copy's maps).
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)).double().eval()
    x = torch.rand(2, 2, 8, 8, dtype=torch.float64)
    before = attribute(net, x, [1, 3], "lrp_epsilon", epsilon=0.01)
    new = {"weights": lambda: nn.Conv2d(4, 4, 3, padding=1),
           "stride": lambda: nn.Conv2d(4, 4, 3, stride=2, padding=1),
           "activation": lambda: nn.SiLU()}[replace]()
    torch.manual_seed(1)
    net[2 if replace != "activation" else 1] = new.double()
    after = attribute(net, x, [1, 3], "lrp_epsilon", epsilon=0.01)
    fresh = attribute(copy.deepcopy(net), x, [1, 3], "lrp_epsilon", epsilon=0.01)
    torch.testing.assert_close(after, fresh, rtol=0, atol=0)
    assert not torch.allclose(after, before)


@both_lrp_paths
def test_a_hooked_layer_runs_with_its_hooks():
    # The compiled forward runs builtin layers as their ops; a forward hook registered on one (here
    # one that changes the layer's output) must run as it does in model(x): the logits LRP explains
    # are the model's own, with and without the hook, and after it is removed.
    from auditkit.explain.lrp import lrp_epsilon_and_logits

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double().eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    targets = torch.tensor([[0], [2]])
    plain = lrp_epsilon_and_logits(net, x, targets)[1]
    handle = net[0].register_forward_hook(lambda module, args, output: output + 1.0)
    hooked = lrp_epsilon_and_logits(net, x, targets)[1]
    torch.testing.assert_close(hooked, net(x), rtol=0, atol=0)
    assert not torch.allclose(hooked, plain)
    handle.remove()
    torch.testing.assert_close(lrp_epsilon_and_logits(net, x, targets)[1], plain, rtol=0, atol=0)
    seen = []  # a global hook sees every layer LRP's forward runs (the network itself is not called)
    with torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: seen.append(module)):
        lrp_epsilon_and_logits(net, x, targets)
    assert seen == list(net)
