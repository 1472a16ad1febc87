"""TAP penalty: fused op vs the eager reference and torch.compile of it.

Shapes: the targeted layers of the TAP two-layer CNN (batch 256 at 28x28) and
ResNet-18's four residual-block outputs (batch 16 at 224x224), as in TAP
Table 1. Measures, per shape and device, in one run:
  * forward+backward time of L_TAP (Eq. 8) for fused / eager / torch.compile;
  * peak memory above the inputs (fused vs eager; the gradient is the floor);
  * forward bandwidth (activation bytes / time) beside torch.sum over the same
    tensors (the streaming limit) and, on CUDA, a device-to-device copy: for
    the streaming reduction alone (D(M) given) and for the whole forward,
    which also reads the input-resolution mask once per batch.

Run: make bench   (or: python -m pytest benchmarks -q)
"""

from __future__ import annotations

import pytest
import torch

from auditkit import ops
from auditkit.ops._reference import tap_penalty_reference

from ._memory import peak_bytes
from ._timing import DEVICES, synchronize
from .conftest import REPORTS, device_name, median_seconds

CONFIGS = {
    # (mask shape, targeted activation shapes)
    "two_layer_cnn_256x28": ((256, 1, 28, 28), [(256, 32, 28, 28), (256, 64, 14, 14)]),
    "resnet18_16x224": (
        (16, 1, 224, 224),
        [(16, 64, 56, 56), (16, 128, 28, 28), (16, 256, 14, 14), (16, 512, 7, 7)],
    ),
}
ROUNDS = {"cpu": 30, "cuda": 200}


def make_inputs(config: str, device: str):
    generator = torch.Generator().manual_seed(0)
    mask_shape, shapes = CONFIGS[config]
    activations = [torch.randn(shape, generator=generator).to(device).requires_grad_(True) for shape in shapes]
    # A decoy-patch-like annotation: a square in one corner, 1/7 of the side.
    mask = torch.zeros(mask_shape)
    side = max(1, mask_shape[-1] // 7)
    mask[..., :side, :side] = 1.0
    return activations, mask.to(device)


def fused_loss(activations, mask):
    return ops.tap_loss(activations, mask)


def eager_loss(activations, mask):
    return sum(tap_penalty_reference(a, mask).mean() for a in activations) / len(activations)


_compiled = {}


def compiled_loss():
    if "loss" not in _compiled:
        _compiled["loss"] = torch.compile(eager_loss, dynamic=False)
    return _compiled["loss"]


LOSSES = {"fused": lambda: fused_loss, "eager": lambda: eager_loss, "compiled": compiled_loss}



def forward_backward(loss_fn, activations, mask, device):
    def run():
        loss = loss_fn(activations, mask)
        grads = torch.autograd.grad(loss, activations)
        synchronize(device)
        return grads

    return run


def forward_only(loss_fn, activations, mask, device):
    def run():
        with torch.no_grad():
            out = loss_fn(activations, mask)
        synchronize(device)
        return out

    return run


def total_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
def test_forward_backward(benchmark, record, impl, config, device):
    benchmark.group = f"fwd+bwd {config} {device}"
    activations, mask = make_inputs(config, device)
    run = forward_backward(LOSSES[impl](), activations, mask, device)
    run()  # compiles (torch.compile) and warms caches outside the timing
    benchmark.pedantic(run, rounds=ROUNDS[device], warmup_rounds=2, iterations=1)
    key = f"{config} [{device}]"
    record(key, "device", device_name(device))
    record(key, f"{impl}_fwd_bwd_s", median_seconds(benchmark))
    unmeasurable = impl == "compiled" and device == "cpu"
    record(key, f"{impl}_peak_bytes", None if unmeasurable else peak_bytes(run, device))
    record(key, "activation_bytes", total_bytes(activations))
    sizes = {tuple(a.shape[-2:]) for a in activations}
    record(key, "weights_bytes", sum(a.shape[0] * h * w * 4 for a in activations[:1] for h, w in sizes))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("impl", ["fused", "fused_reduction", "eager", "torch_sum", "device_copy"])
def test_forward_bandwidth(benchmark, record, impl, config, device):
    if impl == "device_copy" and device != "cuda":
        pytest.skip("the device-copy bandwidth is measured on CUDA only")
    benchmark.group = f"forward {config} {device}"
    activations, mask = make_inputs(config, device)
    if impl == "torch_sum":
        run = forward_only(lambda acts, _mask: sum(a.sum() for a in acts), activations, mask, device)
    elif impl == "device_copy":
        run = forward_only(lambda acts, _mask: [a.clone() for a in acts], activations, mask, device)
    elif impl == "fused_reduction":
        # The streaming pass alone: D(M) is computed once per batch for all
        # layers, outside this timing.
        weights = ops.downscale_masks(mask, [a.shape[-2:] for a in activations])
        run = forward_only(
            lambda acts, _mask: [ops.weighted_relu_sum(a, w) for a, w in zip(acts, weights)],
            activations,
            mask,
            device,
        )
    else:
        run = forward_only(LOSSES[impl](), activations, mask, device)
    run()
    benchmark.pedantic(run, rounds=ROUNDS[device] * 2, warmup_rounds=2, iterations=1)
    seconds = median_seconds(benchmark)
    # A copy reads and writes every byte; the others read it once.
    moved = total_bytes(activations) * (2 if impl == "device_copy" else 1)
    key = f"{config} [{device}]"
    record(key, f"{impl}_forward_s", seconds)
    record(key, f"{impl}_forward_GBps", moved / seconds / 1e9)


def _ratio(numerator, denominator):
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def _fmt(value, unit="x"):
    return "n/a" if value is None else f"{value:.2f}{unit}"


def _goal(value, threshold, higher_is_better=True):
    if value is None:
        return ""
    met = value >= threshold if higher_is_better else value <= threshold
    return "  (goal met)" if met else "  (goal MISSED)"


def report(terminal, results):
    terminal.write_sep("=", "auditkit TAP penalty: ratios measured in this run")
    for key, r in results.items():
        if "fused_fwd_bwd_s" not in r and "fused_forward_s" not in r:
            continue
        cpu = "[cpu]" in key
        terminal.write_line(f"{key} on {r.get('device')}")
        speedup_eager = _ratio(r.get("eager_fwd_bwd_s"), r.get("fused_fwd_bwd_s"))
        speedup_compiled = _ratio(r.get("compiled_fwd_bwd_s"), r.get("fused_fwd_bwd_s"))
        terminal.write_line(
            f"  fwd+bwd: fused {_fmt(r.get('fused_fwd_bwd_s', 0) * 1e3, ' ms')}; "
            f"eager/fused {_fmt(speedup_eager)}{_goal(speedup_eager, 3.0) if cpu else ''}; "
            f"compiled/fused {_fmt(speedup_compiled)}{_goal(speedup_compiled, 1.0) if cpu else ''}"
        )
        memory_vs_eager = _ratio(r.get("fused_peak_bytes"), r.get("eager_peak_bytes"))
        memory_vs_grad = _ratio(r.get("fused_peak_bytes"), r.get("activation_bytes"))
        # The floor: the activation gradient plus D(M) (N*h*w per layer size, 1/C of an activation).
        floor = (r.get("activation_bytes") or 0) + (r.get("weights_bytes") or 0)
        memory_vs_floor = _ratio(r.get("fused_peak_bytes"), floor)
        compiled_memory = ("n/a on CPU (allocates outside the dispatcher)" if cpu
                           else _fmt(_ratio(r.get("compiled_peak_bytes"), r.get("fused_peak_bytes")), "x fused"))
        terminal.write_line(
            f"  peak memory: fused/eager {_fmt(memory_vs_eager)}; fused/activation-gradient "
            f"{_fmt(memory_vs_grad)}, fused/(gradient + D(M)) {_fmt(memory_vs_floor)}"
            f"{_goal(memory_vs_floor, 1.0, higher_is_better=False)}; "
            f"compiled {compiled_memory}"
        )
        reduction = _ratio(r.get("fused_reduction_forward_GBps"), r.get("torch_sum_forward_GBps"))
        whole = _ratio(r.get("fused_forward_GBps"), r.get("torch_sum_forward_GBps"))
        line = (
            f"  forward bandwidth: torch.sum {_fmt(r.get('torch_sum_forward_GBps'), ' GB/s')}; "
            f"fused reduction {_fmt(r.get('fused_reduction_forward_GBps'), ' GB/s')} = {_fmt(reduction)}"
            f"{_goal(reduction, 0.7) if cpu else ''}; with D(M) for all layers "
            f"{_fmt(r.get('fused_forward_GBps'), ' GB/s')} = {_fmt(whole)}"
        )
        if r.get("device_copy_forward_GBps"):
            line += f"; device copy {_fmt(r['device_copy_forward_GBps'], ' GB/s')}"
        terminal.write_line(line)


REPORTS.append(report)
