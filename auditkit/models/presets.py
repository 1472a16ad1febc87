"""Presets found, not written: TAP's target layers and the Grad-CAM layer of any CNN, from one probe
forward pass.

TAP §5.3 targets "the output of each of the four residual blocks" (ResNet-18), "of each of the four
dense blocks" (DenseNet-121), "after each of the MaxPool layers" (VGG-16) and both layers of the
two-layer CNN: the outputs of the network's stages, one per spatial resolution, spaced over its depth.
The rule that finds them:

1. The probe records every module's output during one forward pass of a 224x224 (or larger, the
   network's minimum) input.
2. The *stage container* is the module whose direct children's outputs span the most spatial
   resolutions (a ResNet itself, VGG's and DenseNet's ``features``, RegNet's ``trunk_output``).
3. If some of its convolution-bearing children are blocks (containers: residual layers, dense blocks,
   conv+activation blocks), the targets are, for each resolution in order, the last block at that
   resolution; resolutions reached only by bare convolutions or layers without one (stems,
   normalisation, pooling) are skipped. If they are all bare layers (VGG's flat ``features``), each
   pooling layer (not a global one) closes a stage and the targets are the pooling layers' outputs,
   plus the last convolution's (or its activation's) when no pool follows it; without pooling
   layers, the last convolution (or the activation right after it) at each resolution.
4. The Grad-CAM layer is the last spatial feature map of the stages: the last convolution-bearing
   child of the stage container, or the activation right after it.

Equal to the hand presets of the architectures the TAP paper and auditkit name (tested).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError

PROBE_SIZE = 224
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.PReLU)


@dataclass(frozen=True)
class Presets:
    tap_layers: tuple[str, ...]
    gradcam_layer: str


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _is_block(module: nn.Module) -> bool:
    """A container of layers that holds a convolution (a bare Conv2d is a layer, not a block)."""
    return not isinstance(module, nn.Conv2d) and len(module._modules) > 0 and _has_conv(module)


def probe(net: nn.Module, in_channels: int, size: int = PROBE_SIZE) -> dict[str, tuple[int, int]]:
    """{module name: (H, W) of its output} for every module whose output is one 4-D tensor, in the
    order the modules finished (the last call counts for a module called more than once)."""
    shapes: dict[str, tuple[int, int]] = {}
    handles = []

    def record(name: str):
        def hook(_module, _args, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                shapes.pop(name, None)  # re-inserted: order of the last completion
                shapes[name] = (int(output.shape[2]), int(output.shape[3]))

        return hook

    for name, module in net.named_modules():
        if name:
            handles.append(module.register_forward_hook(record(name)))
    was_training = net.training
    parameter = next(iter(net.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, in_channels, size, size, device=device, dtype=dtype))
    except Exception as error:  # noqa: BLE001 - any failure of the user's network: one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{type(net).__name__} failed on a {size}x{size} probe image ({first[:160]})") from error
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    return shapes


def _children(net: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    container = net.get_submodule(prefix) if prefix else net
    return [(f"{prefix}.{name}" if prefix else name, child) for name, child in container.named_children()]


def discover_presets(net: nn.Module, in_channels: int, size: int = PROBE_SIZE) -> Presets:
    """TAP's target layers and the Grad-CAM layer of ``net`` (see the module docstring). Raises
    ModelError for a network without spatial feature maps (a vision transformer, an MLP)."""
    shapes = probe(net, in_channels, size)
    order = {name: k for k, name in enumerate(shapes)}
    if not any(_has_conv(m) for name, m in net.named_modules() if name in shapes):
        raise ModelError(f"{type(net).__name__} has no convolutional feature maps: TAP and Grad-CAM need a CNN "
                         "(vision transformers are not supported yet)")
    # 2. The stage container: the module whose children's outputs span the most resolutions.
    best, best_span = "", -1
    for name, module in [("", net), *net.named_modules()]:
        if name and name not in shapes and not module._modules:
            continue
        children = [c for c, _ in _children(net, name) if c in shapes]
        span = len({shapes[c] for c in children})
        if span > best_span:
            best, best_span = name, span
    children = [(c, m) for c, m in _children(net, best) if c in shapes]
    children.sort(key=lambda item: order[item[0]])
    convs = [(c, m) for c, m in children if _has_conv(m)]
    if not convs:
        raise ModelError(f"{type(net).__name__}: no convolution among the stages of '{best or 'the network'}'")
    by_resolution: dict[tuple[int, int], list[tuple[str, nn.Module]]] = defaultdict(list)
    for c, m in children:
        by_resolution[shapes[c]].append((c, m))

    def activation_after(name: str) -> str:
        """``name``, or the activation that follows it (through a normalisation in between)."""
        names = [c for c, _ in children]
        position = names.index(name) + 1
        while position < len(children) and isinstance(children[position][1], (nn.BatchNorm2d, nn.GroupNorm)):
            position += 1
        if position < len(children) and isinstance(children[position][1], _ACTIVATIONS):
            return children[position][0]
        return name

    # 3. The targets.
    if any(_is_block(m) for _, m in convs):
        targets = []
        for resolution, members in by_resolution.items():
            blocks = [c for c, m in members if _is_block(m)]
            if blocks:
                targets.append(blocks[-1])
    else:
        # Pools that close a stage (a global pooling to 1x1 is the head's, not a stage's).
        pools = [c for c, m in children if isinstance(m, _POOLS) and shapes[c] != (1, 1)]
        after_last_conv = [c for c in pools if order[c] > order[convs[-1][0]]]
        if pools:
            # Each pool closes a stage; a pool after the last convolution closes the last stage, else
            # the last convolution's output (or its activation) does.
            targets = [c for c in pools if order[c] <= order[after_last_conv[0]]] if after_last_conv else \
                pools + [activation_after(convs[-1][0])]
        else:
            targets = [activation_after([c for c, m in members if _has_conv(m)][-1])
                       for members in by_resolution.values() if any(_has_conv(m) for _, m in members)]
    # 4. The Grad-CAM layer.
    gradcam = activation_after(convs[-1][0])
    return Presets(tuple(targets), gradcam)


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def receptive_fields(net: nn.Module, layers, in_channels: int, size: int) -> list[float]:
    """The theoretical receptive field (input pixels, the larger of height and width) of a unit of
    each of ``layers`` (module names in ``net``), for a ``size`` x ``size`` input.

    One probe forward pass records, in the order they run, every convolution and pooling layer
    (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d) with its input size; a layer's field is
    r = 1 + Σ d·(k − 1)·j over the ones that ran before its output, j = round(size / (that layer's
    input size)) being the input pixels per step there (the product of the strides before it) (Araujo et al. 2019, "Computing receptive
    fields of convolutional neural networks"). Exact for chains and residual networks (their
    shortcut convolutions are 1x1); parallel branches (Inception) are all counted, an upper bound;
    convolutions called as functions are not seen. Raises ModelError when the network fails on
    the probe.
    """
    growth: list[tuple[float, float]] = []  # per spatial layer run: (height, width) growth of r
    finished: dict[str, int] = {}  # layer name -> number of spatial layers run before its output
    wanted = set(layers)
    handles = []

    def spatial(module):
        def hook(_module, args, _output):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                return
            kh, kw = _pair(module.kernel_size)
            dh, dw = _pair(getattr(module, "dilation", 1))
            # The step there, in input pixels: the product of the strides before it, read off the sizes
            # (rounded: an unpadded convolution makes 32 -> 14 for a stride of 2).
            step_h, step_w = max(1, round(size / x.shape[2])), max(1, round(size / x.shape[3]))
            growth.append((dh * (kh - 1) * step_h, dw * (kw - 1) * step_w))

        return hook

    def target(name: str):
        def hook(_module, _args, _output):
            finished[name] = len(growth)

        return hook

    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            handles.append(module.register_forward_hook(spatial(module)))
        if name in wanted:
            handles.append(module.register_forward_hook(target(name)))
    was_training = net.training
    parameter = next(iter(net.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, in_channels, size, size, device=device, dtype=dtype))
    except Exception as error:  # noqa: BLE001 - any failure of the user's network: one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"{type(net).__name__} failed on a {size}x{size} probe image ({first[:160]})") from error
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    missing = [name for name in layers if name not in finished]
    if missing:
        raise ModelError(f"layer {missing[0]!r} did not run in a forward pass of {type(net).__name__}")
    fields = []
    for name in layers:
        steps = growth[: finished[name]]
        fields.append(max(1 + sum(g[0] for g in steps), 1 + sum(g[1] for g in steps)))
    return fields
