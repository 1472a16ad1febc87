"""Presets found, not written: TAP's target layers and the Grad-CAM layer of any CNN, from one probe
forward pass.

TAP §5.3 targets "the output of each of the four residual blocks" (ResNet-18), "of each of the four
dense blocks" (DenseNet-121), "after each of the MaxPool layers" (VGG-16) and both layers of the
two-layer CNN: the outputs of the network's stages, one per spatial resolution, spaced over its depth.
The rule that finds them:

1. The probe records every module's output during one forward pass of a 224x224 input (or the
   network's minimum, when larger): at that size the stages of an ImageNet-style network have
   distinct resolutions (at 32x32 the last ones shrink to 1x1 and merge), and the presets do not
   depend on the data's size, so weights loaded without their size find the same layers. A network
   that does not run at 224x224 (a LeNet whose ``Linear`` takes exactly 16*4*4 features, fixed
   position embeddings) is probed at the size it runs at: its data's or checkpoint's input size
   (brought up to its minimum), then its minimum and the common sizes :data:`FALLBACK_SIZES`
   (:func:`probe_sizes`); when none fits, one ModelError names the sizes tried and the error at
   the model's own size.
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
5. Every layer proposed gives a spatial (N, C, H, W) map, and the network stays spatial after the
   Grad-CAM layer: when layers that run later give token sequences (N, L, D) that are not a
   recognised transformer's (below), discovery refuses the network in one line instead of
   proposing the patch embedding.

Vision transformers (auditkit/models/tokens.py reads their layers as (N, C, gh, gw) maps) have rules
of their own (:func:`transformer_presets`):

* A ViT (a module that states its token grid: timm's VisionTransformer, DeiT, EVA, ConViT,
  torchvision's VisionTransformer): its *blocks* are the children of the container (under the ViT)
  with the most children of one class that give token sequences (timm ``blocks``, torchvision
  ``encoder.layers``). TAP's targets are the outputs of the blocks at about 1/2 and 3/4 of the depth
  and of the last block (blocks ceil(n/2), ceil(3n/4) and n, counted from 1: 6, 9, 12 of 12; 2, 3, 4
  of 4): the residual stream there, each token's features in its patch's place, as a CNN's stage
  outputs spaced over its depth. The Grad-CAM layer is the last block's first LayerNorm (timm
  ``blocks[-1].norm1``, torchvision ``ln_1``), pytorch-grad-cam's choice for ViTs: it is the
  residual stream entering the last block, normalised per token; the last block's own output is no
  use with a class-token head, which reads only the class token there, so the patch tokens'
  gradients (Grad-CAM's weights) are zero.
* A Swin (channels-last (N, H, W, C) maps, told apart by the probe at two sizes): rule 2 on its maps
  finds the stage container (timm ``layers``, torchvision ``features``); the targets are the last
  block without a convolution (a stage, not the patch-embedding stem) at each resolution (timm
  ``layers.0``-``layers.3``, torchvision ``features.1``, ``.3``, ``.5``, ``.7``), and the Grad-CAM
  layer is the last of them, the last stage before the final norm.

A module the probe's forward runs several times (a block applied in a loop, a ReLU shared by
several convolutions) gives one output per call; each is a layer of its own, named "name#k" (the k-th
call, auditkit/models/hooks.py), so a preset never stands for one call of many without saying which.

Equal to the hand presets of the architectures the TAP paper and auditkit name (tested).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError
from .hooks import calls_problem
from .layer_names import call_name, split_call
from .probing import ProbeFailed, _hw, network_size, run_probe
from .tokens import is_transformer, probe_layouts, probe_shapes, sequence_grid

PROBE_SIZE = 224
#: Sizes tried after the model's own size and minimum when a network does not run at PROBE_SIZE:
#: MNIST-style 28, CIFAR 32, and the sizes small medical and ImageNet-style models are trained at.
FALLBACK_SIZES = (28, 32, 64, 96, 128, 256, 299, 384)
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


def probe(net: nn.Module, in_channels: int, size=PROBE_SIZE, tokens: dict | None = None) -> dict[str, tuple[int, int]]:
    """{layer name: (H, W) of its output} for every module call whose output is one 4-D tensor, in
    the order the calls finished: the module's name, or "name#k" for each call of a module that ran
    several times. ``size``: one side or (H, W). ``tokens``, when given, receives {module name:
    (order, shape)} of the modules whose output is a 3-D token sequence (N, L, D) with L > 1,
    ``order`` counting the 4-D outputs finished before it."""
    finished: list[tuple[str, int, tuple[int, int]]] = []  # (module, its call, (H, W)) per 4-D output
    calls: dict[str, int] = {}
    handles = []

    def record(name: str):
        def hook(_module, _args, output):
            calls[name] = calls.get(name, 0) + 1  # every call counts, as the capture counts them
            if isinstance(output, torch.Tensor) and output.dim() == 4:
                finished.append((name, calls[name], (int(output.shape[2]), int(output.shape[3]))))
            elif tokens is not None and isinstance(output, torch.Tensor) and output.dim() == 3 and output.shape[1] > 1:
                tokens[name] = (len(finished), tuple(output.shape))

        return hook

    for name, module in net.named_modules():
        if name:
            handles.append(module.register_forward_hook(record(name)))
    try:
        run_probe(net, in_channels, size)
    finally:
        for handle in handles:
            handle.remove()
    return {call_name(name, call if calls[name] > 1 else None): shape for name, call, shape in finished}


def probe_sizes(input_size=None, min_input_size: int = 1) -> list[tuple[int, int]]:
    """The probe sizes (H, W) to try, in order: PROBE_SIZE (or ``min_input_size`` when larger; see
    the module docstring), the size the network sees for ``input_size`` (the model upsamples a
    shorter side below ``min_input_size`` to it, keeping the aspect ratio), ``min_input_size``, and
    FALLBACK_SIZES; each once."""
    minimum = max(1, int(min_input_size))
    sizes = [_hw(max(PROBE_SIZE, minimum))]
    if input_size is not None:
        sizes.append(network_size(input_size, minimum))
    sizes += [_hw(minimum)] + [_hw(side) for side in FALLBACK_SIZES if side >= minimum]
    return list(dict.fromkeys(sizes))


def discover_presets_at(net: nn.Module, in_channels: int, sizes,
                        own_size=None) -> tuple["Presets", tuple[int, int]]:
    """(presets, the probe size that worked): :func:`discover_presets` at the first of ``sizes`` the
    network runs at (:func:`probe_sizes`). When it fails on all of them: one ModelError naming the
    sizes tried and the error at ``own_size`` (the size the model should run at; default the first)."""
    failures: list[ProbeFailed] = []
    for size in sizes:
        try:
            return discover_presets(net, in_channels, size), _hw(size)
        except ProbeFailed as failed:
            failures.append(failed)
    tried = ", ".join(f"{h}x{w}" for h, w in (f.size for f in failures))
    shown = next((f for f in failures if own_size is not None and f.size == _hw(own_size)), failures[0])
    raise ModelError(f"{type(net).__name__} runs at none of the probe sizes tried ({tried}); at "
                     f"{shown.size[0]}x{shown.size[1]}: {shown.reason}. Give the model's input size (the data's, or "
                     "input_size for weights without it)")


def _children(net: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    container = net.get_submodule(prefix) if prefix else net
    return [(f"{prefix}.{name}" if prefix else name, child) for name, child in container.named_children()]


def discover_presets(net: nn.Module, in_channels: int, size=PROBE_SIZE) -> Presets:
    """TAP's target layers and the Grad-CAM layer of ``net`` (see the module docstring) from a probe
    at ``size`` (one side or (H, W)). Raises ModelError for a network without spatial feature maps
    (an MLP) or whose feature maps turn into token sequences (a vision transformer), and
    ProbeFailed (a ModelError) when the network fails on the probe image."""
    found = transformer_presets(net, in_channels, size)
    if found is not None:
        return found
    tokens: dict[str, tuple[int, tuple[int, ...]]] = {}
    shapes = probe(net, in_channels, size, tokens)
    order = {name: k for k, name in enumerate(shapes)}
    layers: dict[str, list[str]] = defaultdict(list)  # module name -> its layers: itself, or one per call
    for layer in shapes:
        layers[split_call(layer)[0]].append(layer)
    if not any(_has_conv(m) for name, m in net.named_modules() if name in layers):
        raise ModelError(f"{type(net).__name__} has no convolutional feature maps: TAP and Grad-CAM need a CNN "
                         "(vision transformers are not supported yet)")
    # 2. The stage container: the module whose children's outputs span the most resolutions.
    best, best_span = "", -1
    for name, module in [("", net), *net.named_modules()]:
        if name and name not in layers and not module._modules:
            continue
        children = [c for child, _ in _children(net, name) for c in layers.get(child, ())]
        span = len({shapes[c] for c in children})
        if span > best_span:
            best, best_span = name, span
    children = [(c, m) for child, m in _children(net, best) for c in layers.get(child, ())]
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
    # 5. Spatial to the end: no layer after the Grad-CAM layer works on token sequences.
    later = [(name, shape) for name, (finished, shape) in tokens.items() if finished > order[gradcam]]
    if later:
        raise ModelError(f"{type(net).__name__}: its last feature map '{gradcam}' is followed by layers on token "
                         f"sequences ('{later[0][0]}' gives {later[0][1]}), as in a vision transformer; TAP and "
                         "Grad-CAM need a CNN whose feature maps stay spatial (transformers are not supported yet)")
    return Presets(tuple(targets), gradcam)


def transformer_presets(net: nn.Module, in_channels: int, size=PROBE_SIZE) -> Presets | None:
    """The presets of a recognised vision transformer (ViT or Swin, module docstring) from probe
    passes at ``size`` (and twice it, for a Swin's layouts); None for a network that is not one
    (the CNN rules then apply). ProbeFailed when the network fails at ``size``."""

    if not is_transformer(net):
        return None
    vit = next((name for name, module in net.named_modules() if sequence_grid(module) is not None), None)
    if vit is not None:
        shapes = probe_shapes(net, in_channels, _hw(size))
        if shapes is None:
            run_probe(net, in_channels, size)  # raises the network's one-line failure
        return _vit_presets(net, vit, shapes)
    shapes, layouts = probe_layouts(net, in_channels, _hw(size))
    return _swin_presets(net, shapes, layouts)


def _vit_presets(net: nn.Module, vit: str, shapes: dict[str, tuple[int, ...]]) -> Presets | None:
    """TAP: the outputs of blocks ceil(n/2), ceil(3n/4), n; Grad-CAM: the last block's first LayerNorm."""
    best: list[str] = []
    for name, module in net.named_modules():
        if not (name == vit or name.startswith(f"{vit}.") or not vit):
            continue
        children = [(f"{name}.{c}" if name else c, m) for c, m in module.named_children()
                    if m._modules and len(shapes.get(f"{name}.{c}" if name else c, ())) == 3]
        kinds = [type(m) for _, m in children]
        common = max(set(kinds), key=kinds.count) if kinds else None
        blocks = [c for c, m in children if type(m) is common]
        if len(blocks) >= len(best):  # a tie goes to the inner container (timm's blocks of a depth-1 ViT)
            best = blocks
    if not best:
        return None
    count = len(best)
    picks = sorted({-(-count // 2) - 1, -(-3 * count // 4) - 1, count - 1})
    last = net.get_submodule(best[-1])
    norm = next((f"{best[-1]}.{n}" for n, m in last.named_modules() if isinstance(m, nn.LayerNorm)
                 and len(shapes.get(f"{best[-1]}.{n}", ())) == 3), None)
    gradcam = norm or (best[-2] if count > 1 else best[-1])
    return Presets(tuple(best[i] for i in picks), gradcam)


def _swin_presets(net: nn.Module, shapes, layouts) -> Presets | None:
    """Per resolution of the stage container's maps, its last block without a convolution."""
    spatial: dict[str, tuple[int, int]] = {}
    for name, shape in shapes.items():
        kind = layouts[name].kind
        if len(shape) == 4 and kind in ("map", "channels_last") and "#" not in name:
            spatial[name] = (shape[2], shape[3]) if kind == "map" else (shape[1], shape[2])
    best, best_span = "", 0
    for name, module in [("", net), *net.named_modules()]:
        if name and not module._modules:
            continue
        span = len({spatial[c] for c, _ in _children(net, name) if c in spatial})
        if span > best_span:
            best, best_span = name, span
    targets: dict[tuple[int, int], str] = {}
    for child, module in _children(net, best):
        if child in spatial and module._modules and not _has_conv(module):
            targets[spatial[child]] = child
    if best_span < 2 or not targets:
        return None
    return Presets(tuple(targets.values()), list(targets.values())[-1])


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def receptive_fields(net: nn.Module, layers, in_channels: int, size) -> list[float]:
    """The theoretical receptive field (input pixels, the larger of height and width) of a unit of
    each of ``layers`` (module names in ``net``), for a ``size`` x ``size`` input (or (H, W)). A
    network that does not run at that size (a LeNet whose ``Linear`` needs its own size) is probed
    at its ``meta.input_size`` when it has one (an AuditModel), brought up to its minimum.

    One probe forward pass records, in the order they run, every convolution and pooling layer
    (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d) with its input size; a layer's field is
    r = 1 + Σ d·(k − 1)·j over the ones that ran before its output, j = round(size / (that layer's
    input size)) being the input pixels per step there (the product of the strides before it)
    (Araujo et al. 2019, "Computing receptive fields of convolutional neural networks"). Exact for
    chains and residual networks (their shortcut convolutions are 1x1); parallel branches
    (Inception) are all counted, an upper bound; convolutions called as functions are not seen.
    Raises ModelError when the network fails on the probe (at every size tried).
    """
    growth: list[tuple[float, float]] = []  # per spatial layer run: (height, width) growth of r
    finished: dict[str, int] = {}  # layer name -> number of spatial layers run before its output
    wanted: dict[str, list[tuple[str, int | None]]] = defaultdict(list)  # module -> [(layer, its call)]
    for layer in layers:
        module, call = split_call(layer)
        wanted[module].append((layer, call))
    times: dict[str, int] = {}  # module -> how often it ran
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
            step_h, step_w = max(1, round(ran[0] / x.shape[2])), max(1, round(ran[1] / x.shape[3]))
            growth.append((dh * (kh - 1) * step_h, dw * (kw - 1) * step_w))

        return hook

    def target(name: str):
        def hook(_module, _args, _output):
            times[name] = times.get(name, 0) + 1
            for layer, call in wanted[name]:
                if call in (None, times[name]):  # a bare name that ran several times is refused below
                    finished[layer] = len(growth)

        return hook

    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            handles.append(module.register_forward_hook(spatial(module)))
        if name in wanted:  # full module names; "#k" names one call
            handles.append(module.register_forward_hook(target(name)))
    meta = getattr(net, "meta", None)
    sizes = [_hw(size)]
    if meta is not None and getattr(meta, "input_size", None):
        sizes.append(network_size(meta.input_size, getattr(net, "min_input_size", 1)))
    sizes = list(dict.fromkeys(sizes))
    ran = sizes[0]  # the probe size the hooks read (the one running)
    try:
        for attempt, ran in enumerate(sizes):
            growth.clear()
            finished.clear()
            times.clear()
            try:
                run_probe(net, in_channels, ran)
                break
            except ProbeFailed:
                if attempt == len(sizes) - 1:
                    raise
    finally:
        for handle in handles:
            handle.remove()
    for layer in layers:  # the capture's rule: a bare name for a module that ran once, else "name#k"
        problem = calls_problem(layer, times.get(split_call(layer)[0], 0))
        if problem:
            raise ModelError(problem)
    fields = []
    for name in layers:
        steps = growth[: finished[name]]
        fields.append(max(1 + sum(g[0] for g in steps), 1 + sum(g[1] for g in steps)))
    return fields
