"""Explanations: auditkit vs zennit, captum and pytorch-grad-cam, measured side by side.

Shapes: the TAP two-layer CNN on 256 images of 28x28 and ResNet-18 on 16 images of 224x224,
float32, random weights with realistic batch-norm statistics. Every library explains the same
network (``model.net``, normalised input) with the same epsilon; their results are compared with
ours (max |difference| / max |ours|) and printed beside the times.

Batch-norm eps is set to 0 in the benchmark's ResNet-18: zennit merges batch norm into the
convolution but leaves a batch norm that still divides by sqrt(1 + eps), a 5e-6 relative error per
layer that compounds over 20 layers (our merge is exact); with eps = 0 both are exact.

Agreement is reported twice: in float32 on the benchmark batch, and in float64 on two images.
LRP-epsilon divides by z + eps sign z, so where z is near 0 float32 rounding is amplified by 1/eps;
the libraries compute z along different, equally valid paths (the batch-norm output here, the
merged convolution in zennit), so float32 agreement depends on eps (ResNet-18: 3e-3 at eps = 1e-6,
2e-5 at 1e-2), while float64 shows whether the rules are the same (1e-9 and 0).

Goals (CPU; reported, not asserted): forward + LRP <= 1.10 x forward + input gradient at every batch
size (ResNet-18 at 1x112^2, 8x112^2 and 16x224^2, the two-layer CNN at 1x28^2 and 256x28^2);
<= 0.5 x zennit's time and <= 0.6 x captum's; K targets from one forward <= forward + 1.1 K
input-gradient backwards; Grad-CAM <= 1.05 x forward + backward to its layer; every method's peak
memory <= 3 x the input gradient's (Integrated Gradients batches its steps under a pixel budget).

Allocator noise at 256x28^2: each call allocates ~190 MB in 25.7 MB tensors, and whether glibc
serves them from memory it kept or from freshly mapped pages (page faults) depends on the process's
history, not on the code: the same code measures 0.98-1.24 across processes (median ~1.05). To
measure the computation alone, keep freed memory in the process for both sides:
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python -m pytest benchmarks/test_explain_bench.py ...
(0.96x there, three runs of three; benchmarks/RESULTS.md).

Run: make bench   (or: python -m pytest benchmarks/test_explain_bench.py -q)
LRP's fast and general paths, and an older commit's LRP, paired: python -m benchmarks.lrp_paths --help
"""

from __future__ import annotations

import copy
import pytest
import torch
from torch import nn

from auditkit.explain import attribute
from auditkit.models import build_model

from ._timing import DEVICES, interleaved_ratio, synchronize
from .conftest import REPORTS, device_name, median_seconds

EPSILON = 0.01  # TEA's value; timings do not depend on it (see the docstring for agreement)
K = 3
CONFIGS = {
    # name: (arch, batch, channels, size)
    "two_layer_cnn_1x28": ("tap-cnn", 1, 1, 28),
    "two_layer_cnn_256x28": ("tap-cnn", 256, 1, 28),
    "resnet18_1x112": ("resnet18", 1, 3, 112),
    "resnet18_8x112": ("resnet18", 8, 3, 112),
    "resnet18_16x224": ("resnet18", 16, 3, 224),
    "resnet50_4x224": ("resnet50", 4, 3, 224),
    "efficientnet_b0_4x224": ("efficientnet_b0", 4, 3, 224),
    "convnext_tiny_4x224": ("convnext_tiny", 4, 3, 224),
}
ROUNDS = {"cpu": 5, "cuda": 50}
_CACHE: dict = {}


def setup(config: str, device: str):
    key = (config, device)
    if key not in _CACHE:
        arch, batch, channels, size = CONFIGS[config]
        torch.manual_seed(0)
        model = build_model(arch, num_classes=10, in_channels=channels, input_size=(size, size)).eval()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.eps = 0.0  # see the module docstring
        net = model.net.to(device)
        _GRADCAM_LAYERS[id(net)] = model.meta.gradcam_layer.removeprefix("net.")
        x = torch.randn(batch, channels, size, size, device=device)
        targets = torch.randint(0, 10, (batch,), device=device)
        _CACHE[key] = (net, x, targets)
    return _CACHE[key]



def input_gradient(net, x, targets, k=1):
    inputs = x.detach().requires_grad_(True)
    logits = net(inputs)
    for j in range(k):
        torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), inputs, retain_graph=j + 1 < k)


def zennit_lrp(net, x, targets):
    from zennit.attribution import Gradient
    from zennit.canonizers import SequentialMergeBatchNorm
    from zennit.composites import LayerMapComposite
    from zennit.layer import Sum
    from zennit.rules import Epsilon, Norm, Pass
    from zennit.torchvision import ResNetCanonizer
    from zennit.types import Activation, AvgPool, Convolution, Linear

    # zennit's ResNet canonizer (merged batch norms, the residual sum as a module with its own rule)
    # for both torchvision block types; other networks get its batch-norm merge only, so their
    # residual sums, SiLU gates and layer norms follow other rules than ours (timing, not equality).
    residual = any(type(m).__name__ in ("BasicBlock", "Bottleneck") for m in net.modules())
    canonizers = [ResNetCanonizer()] if residual else [SequentialMergeBatchNorm()]
    layer_map = [(Activation, Pass()), (Convolution, Epsilon(EPSILON)), (Linear, Epsilon(EPSILON)),
                 (AvgPool, Norm(EPSILON)), (Sum, Norm(EPSILON))]
    composite = LayerMapComposite(layer_map=layer_map, canonizers=canonizers)
    with torch.no_grad():
        logits = net(x)
    seed = torch.nn.functional.one_hot(targets, logits.shape[1]).to(logits.dtype) * logits  # R = z_c (Eq. A3)
    with Gradient(model=net, composite=composite) as attributor:
        _, relevance = attributor(x, seed)
    return relevance.sum(1)


def captum_lrp(net, x, targets):
    from captum.attr import LRP
    from captum.attr._utils.lrp_rules import EpsilonRule, IdentityRule

    net = copy.deepcopy(net)  # captum sets rules as attributes on the modules
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d)):
            module.rule = EpsilonRule(epsilon=EPSILON)
        elif isinstance(module, nn.Flatten):
            module.rule = IdentityRule()
    return LRP(net).attribute(x, target=targets).sum(1)


_GRADCAM_LAYERS: dict[int, str] = {}  # id(net) -> its Grad-CAM layer's name (the model's preset)


def gradcam_layer_name(net) -> str:
    return _GRADCAM_LAYERS.get(id(net), "layer4" if hasattr(net, "layer4") else "conv2")


def gradcam_layer(net):
    return net.get_submodule(gradcam_layer_name(net))


def pytorch_grad_cam(net, x, targets):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with GradCAM(model=net, target_layers=[gradcam_layer(net)]) as cam:
        return torch.from_numpy(cam(input_tensor=x, targets=[ClassifierOutputTarget(int(t)) for t in targets]))


def forward_backward_to_layer(net, x, targets):
    captured = []
    handle = gradcam_layer(net).register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        logits = net(x)
    finally:
        handle.remove()
    torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), captured[0])


def ours_gradcam(net, x, targets):
    name = gradcam_layer_name(net)
    return attribute(net, x, targets, "gradcam", layer=name)[:, 0]


def min_max(maps):
    flat = maps.flatten(1)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).view_as(maps)


def relative_difference(ours, theirs):
    ours, theirs = ours.detach().cpu(), theirs.detach().cpu().to(ours.dtype)
    return float((ours - theirs).abs().max() / ours.abs().max().clamp_min(1e-30))


IMPLEMENTATIONS = {
    "input_gradient": lambda net, x, t: input_gradient(net, x, t),
    "auditkit_lrp": lambda net, x, t: attribute(net, x, t, "lrp_epsilon", epsilon=EPSILON),
    "zennit_lrp": zennit_lrp,
    "captum_lrp": captum_lrp,
    f"input_gradient_k{K}": lambda net, x, t: input_gradient(net, x, t, k=K),
    f"auditkit_lrp_k{K}": lambda net, x, t: attribute(
        net, x, torch.stack([(t + j) % 10 for j in range(K)], 1), "lrp_epsilon", epsilon=EPSILON
    ),
    "forward_backward_to_layer": forward_backward_to_layer,
    "auditkit_gradcam": ours_gradcam,
    "pytorch_grad_cam": pytorch_grad_cam,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_explanation_speed(benchmark, record, impl, config, device):
    net, x, targets = setup(config, device)
    benchmark.group = f"explain {config} {device}"
    fn = IMPLEMENTATIONS[impl]
    key = f"{config} [{device}]"
    record(key, "device", device_name(device))
    try:
        result = fn(net, x, targets)  # warm-up, and the result to compare
    except Exception as error:  # a library that refuses the network is a result too
        record(key, f"{impl}_error", f"{type(error).__name__}: {str(error).splitlines()[0][:90]}")
        pytest.skip(f"{impl} refused {config}: {error}")

    def run():
        fn(net, x, targets)
        synchronize(device)

    benchmark.pedantic(run, rounds=ROUNDS[device], warmup_rounds=1, iterations=1)
    record(key, f"{impl}_s", median_seconds(benchmark))
    if impl in ("zennit_lrp", "captum_lrp"):
        ours = attribute(net, x, targets, "lrp_epsilon", epsilon=EPSILON)[:, 0]
        record(key, f"{impl}_difference", relative_difference(ours, result))
        exact = copy.deepcopy(net).double()
        x64, t64 = x[:2].double(), targets[:2]
        theirs = fn(exact, x64, t64)
        ours64 = attribute(exact, x64, t64, "lrp_epsilon", epsilon=EPSILON)[:, 0]
        record(key, f"{impl}_difference_float64", relative_difference(ours64.double(), theirs.double()))
    if impl == "pytorch_grad_cam":
        ours = min_max(ours_gradcam(net, x, targets))
        record(key, f"{impl}_difference", relative_difference(ours, result))


# Ratios against a baseline, measured interleaved (see _timing.interleaved_ratio).
RATIOS = {
    # name: (candidate, baseline, goal)
    "lrp_vs_gradient": ("auditkit_lrp", "input_gradient", 1.10),
    f"lrp_k{K}_vs_gradients": (f"auditkit_lrp_k{K}", f"input_gradient_k{K}", 1.10),
    "lrp_vs_zennit": ("auditkit_lrp", "zennit_lrp", 0.5),
    "lrp_vs_captum": ("auditkit_lrp", "captum_lrp", 0.6),
    "gradcam_vs_backward_to_layer": ("auditkit_gradcam", "forward_backward_to_layer", 1.05),
    "gradcam_vs_pytorch_grad_cam": ("auditkit_gradcam", "pytorch_grad_cam", None),
}
PAIRS = {"cpu": {"two_layer_cnn_1x28": 201, "two_layer_cnn_256x28": 41, "resnet18_1x112": 21, "resnet18_8x112": 11,
                 "resnet18_16x224": 5, "resnet50_4x224": 5, "efficientnet_b0_4x224": 7, "convnext_tiny_4x224": 5},
         "cuda": {name: 50 for name in CONFIGS}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(RATIOS))
def test_ratio(record, name, config, device):
    net, x, targets = setup(config, device)
    candidate, baseline, _goal_value = RATIOS[name]
    key = f"{config} [{device}]"
    functions = []
    for impl in (candidate, baseline):
        fn = IMPLEMENTATIONS[impl]
        try:
            fn(net, x, targets)  # warm-up
        except Exception as error:
            record(key, f"{name}_ratio", None)
            pytest.skip(f"{impl} refused {config}: {error}")
        functions.append(lambda fn=fn: fn(net, x, targets))
    record(key, f"{name}_ratio", interleaved_ratio(functions[0], functions[1], PAIRS[device][config], device))


MEMORY_METHODS = ("lrp_epsilon", "gradcam", "gradient", "input_x_gradient", "integrated_gradients")
MEMORY_GOAL = 3.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", ["two_layer_cnn_256x28", "resnet18_8x112"])
def test_peak_memory_against_the_input_gradient(record, config, device):
    """Peak memory of every method, as a multiple of forward + input gradient's (benchmarks/_memory.py)."""
    from ._memory import peak_bytes

    net, x, targets = setup(config, device)
    key = f"{config} [{device}]"
    baseline = peak_bytes(lambda: input_gradient(net, x, targets), device)
    for method in MEMORY_METHODS:
        options = {"layer": gradcam_layer_name(net)} if method == "gradcam" else {}
        peak = peak_bytes(lambda: attribute(net, x, targets, method, **options), device)
        record(key, f"{method}_memory_ratio", peak / baseline if baseline and peak is not None else None)


def _fmt(value, unit="x"):
    return "n/a" if value is None else f"{value:.2f}{unit}"


def _goal(value, limit):
    if value is None or limit is None:
        return ""
    return "  (goal met)" if value <= limit else "  (goal MISSED)"


def report(terminal, results):
    terminal.write_sep("=", "auditkit explanations: interleaved ratios measured in this run")
    for key, r in results.items():
        if not any(name.endswith("_ratio") or name.endswith("_s") for name in r):
            continue
        median = f": LRP-epsilon {r['auditkit_lrp_s'] * 1e3:.1f} ms (median)" if "auditkit_lrp_s" in r else ""
        terminal.write_line(f"{key} on {r.get('device', '')}{median}")
        for name, (_candidate, _baseline, goal) in RATIOS.items():
            ratio = r.get(f"{name}_ratio")
            library = "zennit" if "zennit" in name else "captum" if "captum" in name else None
            extra = ""
            if library and r.get(f"{library}_lrp_error"):
                terminal.write_line(f"  {name}: {library} refused or failed ({r[f'{library}_lrp_error']})")
                continue
            if library and r.get(f"{library}_lrp_difference") is not None:
                extra = (f", max relative difference {r[f'{library}_lrp_difference']:.1e} "
                         f"(float64: {r[f'{library}_lrp_difference_float64']:.1e})")
            if name == "gradcam_vs_pytorch_grad_cam" and r.get("pytorch_grad_cam_difference") is not None:
                extra = f", max difference of min-max maps {r['pytorch_grad_cam_difference']:.1e}"
            terminal.write_line(f"  {name}: {_fmt(ratio)}{_goal(ratio, goal)}{extra}")
        memory = [(m, r.get(f"{m}_memory_ratio")) for m in MEMORY_METHODS if r.get(f"{m}_memory_ratio") is not None]
        if memory:
            terminal.write_line("  peak memory / input gradient's: " + ", ".join(
                f"{m} {_fmt(v)}{_goal(v, MEMORY_GOAL)}" for m, v in memory))


REPORTS.append(report)
