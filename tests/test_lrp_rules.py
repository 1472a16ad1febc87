"""LRP-epsilon's rule table: each rule against its matrix form in float64, conservation on
bias-free networks, modern CNN layers end to end, zennit where zennit covers the network, and the
way a user adds a rule (issue 15). Every test runs on both LRP paths (tests/_lrp_paths.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from auditkit.explain import UnsupportedLayerError, attribute, identity_rule, register_rule
from auditkit.explain.lrp import Step, general_path, lrp_epsilon_and_logits, rule_for, switch, unregister_rule

from ._lrp_paths import lrp_path  # noqa: F401  (the fixture below runs every test on both LRP paths)

pytestmark = pytest.mark.usefixtures("lrp_path")

EPS = 0.05


def stab(z: torch.Tensor) -> torch.Tensor:
    return z + EPS * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def matrix_form(f, a: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """R_in = a ⊙ Jᵀ (R / (z + ε sign z)) with the dense Jacobian J of the linear map f (float64)."""
    z = f(a)
    jacobian = torch.autograd.functional.jacobian(f, a).reshape(z.numel(), a.numel())
    s = (relevance / stab(z)).reshape(-1)
    return a * (jacobian.t() @ s).reshape(a.shape)


def run_rule(kind, target, args, kwargs, a, relevance, extra=None):
    z = (target(*args, **kwargs) if kind != "method" else getattr(args[0], target)(*args[1:], **kwargs))
    step = Step(kind, target, args, kwargs, [a], [None], z, relevance, 1, EPS, False, "test", extra or {})
    return rule_for(kind, target)(step)[0], z


LINEAR_MAPS = [
    ("method", "mean", lambda a: (a, (2, 3)), {}),
    ("method", "mean", lambda a: (a, (2, 3)), {"keepdim": True}),
    ("function", torch.mean, lambda a: (a, 1), {}),
    ("method", "sum", lambda a: (a, (1, 3)), {}),
    ("function", torch.sum, lambda a: (a,), {"dim": (2, 3)}),
    ("function", F.interpolate, lambda a: (a,), {"size": (7, 5), "mode": "bilinear", "align_corners": False}),
    ("function", F.interpolate, lambda a: (a,), {"scale_factor": 2, "mode": "nearest"}),
    ("function", F.adaptive_avg_pool2d, lambda a: (a, (2, 3)), {}),
    ("function", F.adaptive_avg_pool2d, lambda a: (a, 1), {}),
    ("function", F.avg_pool2d, lambda a: (a, 2), {}),
    ("function", F.avg_pool2d, lambda a: (a, 3, 2, 1), {"count_include_pad": False}),
]


@pytest.mark.parametrize("kind, target, make_args, kwargs", LINEAR_MAPS)
def test_linear_map_rules_equal_their_matrix_form(kind, target, make_args, kwargs):
    torch.manual_seed(0)
    a = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    args = make_args(a)

    def f(t):
        call_args = (t, *args[1:])
        return getattr(t, target)(*call_args[1:], **kwargs) if kind == "method" else target(*call_args, **kwargs)

    z = f(a)
    relevance = torch.randn_like(z)
    got, _ = run_rule(kind, target, args, kwargs, a, relevance)
    torch.testing.assert_close(got, matrix_form(f, a, relevance), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind, target, args, kwargs", [
    ("method", "permute", (0, 2, 3, 1), {}),
    ("function", torch.permute, ((0, 3, 1, 2),), {}),
    ("method", "transpose", (1, 3), {}),
    ("method", "flatten", (1,), {}),
    ("method", "view", (2, -1), {}),
    ("function", torch.flatten, (1,), {}),
    ("method", "unsqueeze", (1,), {}),
])
def test_rearrangements_move_relevance_back_exactly(kind, target, args, kwargs):
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    full = (a, *args)
    z = getattr(a, target)(*args, **kwargs) if kind == "method" else target(*full, **kwargs)
    relevance = torch.randn_like(z)
    got, _ = run_rule(kind, target, full, kwargs, a, relevance)
    # A rearrangement's Jacobian is a permutation: Jᵀ R puts every value back where it came from.
    f = (lambda t: getattr(t, target)(*args, **kwargs)) if kind == "method" else (lambda t: target(t, *args, **kwargs))
    jacobian = torch.autograd.functional.jacobian(f, a).reshape(z.numel(), a.numel())
    torch.testing.assert_close(got, (jacobian.t() @ relevance.reshape(-1)).reshape(a.shape), rtol=0, atol=0)
    assert got.sum().item() == pytest.approx(relevance.sum().item())


def test_permuting_the_batch_dimension_is_refused():
    a = torch.randn(2, 3, 4, 4)
    with pytest.raises(UnsupportedLayerError, match="batch dimension"):
        run_rule("method", "permute", (a, 1, 0, 2, 3), {}, a, torch.randn(3, 2, 4, 4))


def test_adaptive_max_pool_gives_each_maximum_its_relevance():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
            self.pool = nn.AdaptiveMaxPool2d(1)
            self.fc = nn.Linear(2, 2, bias=False)

        def forward(self, x):
            return self.fc(self.pool(F.relu(self.conv(x))).flatten(1))

    torch.manual_seed(1)
    net = Net().double().eval()
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    maps, logits = lrp_epsilon_and_logits(net, x, torch.tensor([[0], [1]]), epsilon=1e-9)
    # Bias-free with a tiny epsilon: the relevance of the explained logit is conserved.
    torch.testing.assert_close(maps.sum(dim=(2, 3))[:, 0], logits.gather(1, torch.tensor([[0], [1]]))[:, 0])


class ModernBlockNet(nn.Module):
    """Bias-free layers of modern CNNs: depthwise conv, channels-last LayerNorm and Linear (ConvNeXt),
    GELU, SiLU, Hardswish, squeeze-excitation gating, layer scale, GroupNorm, a residual addition,
    interpolation, and global average pooling written as x.mean((2, 3))."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.norm = nn.LayerNorm(8, elementwise_affine=False)
        self.pw1 = nn.Linear(8, 16, bias=False)
        self.act = nn.GELU()
        self.pw2 = nn.Linear(16, 8, bias=False)
        self.layer_scale = nn.Parameter(torch.full((8, 1, 1), 0.5))
        self.gn = nn.GroupNorm(2, 8, affine=False)
        self.se_reduce = nn.Conv2d(8, 4, 1, bias=False)
        self.se_expand = nn.Conv2d(4, 8, 1, bias=False)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        x = F.silu(self.stem(x))
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(self.act(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + self.layer_scale * y
        x = F.hardswish(self.gn(x))
        gate = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        x = x * gate
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.head(x.mean((2, 3)))


def test_modern_cnn_layers_are_covered_and_conserve_relevance_without_biases():
    torch.manual_seed(2)
    net = ModernBlockNet().double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    targets = torch.tensor([[0, 1], [2, 0], [1, 2]])
    maps, logits = lrp_epsilon_and_logits(net, x, targets, epsilon=1e-12)
    # The identity rules (activations, normalisations) and the gate rule pass relevance on as it is;
    # the epsilon rules conserve it in the limit of a small epsilon: the map sums to the logit.
    torch.testing.assert_close(maps.sum(dim=(2, 3)), logits.gather(1, targets), rtol=1e-6, atol=1e-9)
    same = attribute(net, x, targets, "lrp_epsilon", epsilon=1e-12)
    torch.testing.assert_close(same, maps)


def test_a_layer_without_a_rule_names_itself_and_how_to_register_one():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.odd = nn.Softmax2d()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(self.odd(self.conv(x)).mean((2, 3)))

    net = Odd().eval()
    x = torch.rand(1, 1, 5, 5)
    with pytest.raises(UnsupportedLayerError, match=r"no rule for module 'odd' \(Softmax2d\); register one with "
                                                    r"auditkit\.explain\.register_rule\(Softmax2d, rule\)"):
        attribute(net, x, 0, "lrp_epsilon")
    register_rule(nn.Softmax2d, identity_rule)
    try:
        assert attribute(net, x, 0, "lrp_epsilon").shape == (1, 1, 5, 5)
    finally:
        unregister_rule(nn.Softmax2d)


def test_a_registered_rule_is_used_for_subclasses_too():
    calls = []

    class MyNorm(nn.GroupNorm):
        pass

    def counting(step):
        calls.append(step.name)
        return identity_rule(step)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.norm = MyNorm(2, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.norm(self.conv(x)).mean((2, 3)))

    net = Net().eval()
    attribute(net, torch.rand(2, 1, 5, 5), 0, "lrp_epsilon")  # GroupNorm's identity rule covers MyNorm
    register_rule(MyNorm, counting)
    try:
        attribute(net, torch.rand(2, 1, 5, 5), 0, "lrp_epsilon")
    finally:
        unregister_rule(MyNorm)
    assert calls == ["norm"]


zennit = pytest.importorskip("zennit", reason="zennit is the comparison library (requirements.txt installs it)")


@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_equal_to_zennit_where_zennit_covers_the_network(arch):
    # zennit's epsilon composite with its canonizers (VGG: batch norm merging; ResNet: its canonizer);
    # float64, batch-norm eps 1e-12: zennit leaves a batch norm dividing by sqrt(1 + eps) after merging,
    # a relative 5e-13 here, far under the 1e-8 tolerance (eps 0 would be exact, but torch 2.11's
    # batch_norm refuses eps <= 0: found by the Python 3.12 + torch 2.11 rehearsal).
    import copy

    from benchmarks import test_explain_bench as bench
    from auditkit.models import build_model

    torch.manual_seed(3)
    model = build_model(arch, 10, 3, (32, 32)).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.eps = 1e-12
    net = copy.deepcopy(model.net).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([3, 7])
    ours = attribute(net, x, targets, "lrp_epsilon", epsilon=bench.EPSILON)[:, 0]
    theirs = bench.zennit_lrp(copy.deepcopy(net), x, targets)
    assert bench.relative_difference(ours, theirs) < 1e-8


@pytest.mark.parametrize("shape", [(1, 1, 28, 28), (2, 3, 8, 8), (64, 1, 28, 28)])
def test_k_targets_give_the_maps_of_k_single_target_calls(shape):
    # K targets run as one batch of K*N for tiny inputs (and on CUDA), as K passes otherwise; the
    # maps must be those of one call per target either way, and the logits those of the model.
    from auditkit.models import build_model

    torch.manual_seed(0)
    model = build_model("tap-cnn", 10, shape[1], tuple(shape[2:])).double().eval()
    x = torch.rand(shape, dtype=torch.float64)
    targets = torch.stack([torch.arange(shape[0]) % 10, (torch.arange(shape[0]) + 3) % 10, torch.full((shape[0],), 7)],
                          1)
    maps, logits = lrp_epsilon_and_logits(model, x, targets, epsilon=0.01)
    assert maps.shape == (shape[0], 3, *shape[2:])
    for j in range(3):
        single, _ = lrp_epsilon_and_logits(model, x, targets[:, j:j + 1], epsilon=0.01)
        torch.testing.assert_close(maps[:, j], single[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logits, model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch, channels, side", [("tap-cnn", 1, 28), ("resnet18", 3, 32), ("vgg11_bn", 3, 32)])
def test_the_general_path_gives_the_fast_paths_maps(arch, channels, side, request):
    # The fast path calls the builtin convolution, linear, max-pool, flatten, adaptive-pool and
    # identity rules' maths directly and runs a generated forward; the general path interprets every
    # node and sends it through its rule's Step. The maps must be the same.
    from auditkit.explain.lrp import SHORTCUTS, plan_for, trace
    from auditkit.models import build_model

    torch.manual_seed(0)
    model = build_model(arch, 10, channels, (side, side)).double().eval()
    x = torch.rand(2, channels, side, side, dtype=torch.float64)
    targets = torch.tensor([[1, 4], [7, 2]])
    runs = dict(switch.runs)
    with general_path():
        general, general_logits = lrp_epsilon_and_logits(model, x, targets, epsilon=0.01)
    assert switch.runs["forward"] > runs["forward"] and switch.runs["relevance"] > runs["relevance"]
    if request.getfixturevalue("lrp_path") == "fast":
        fast, fast_logits = lrp_epsilon_and_logits(model, x, targets, epsilon=0.01)
        traced = trace(model.net)
        used = {run for _node, run, _data, _releases in plan_for(traced, traced.bind(), general=False)}
        assert len(used & {shortcut.run for shortcut in SHORTCUTS.values()}) >= 3  # the shortcuts ran
        assert switch.runs["fast_forward"] > runs["fast_forward"]
        torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(fast_logits, general_logits, rtol=0, atol=0)
