"""Token maps: a transformer layer's output seen as an (N, C, gh, gw) feature map.

Everything that reads a layer's activations (TAP's penalty, Grad-CAM, the audit's activation share,
discovery) reads (N, C, h, w) maps through :mod:`auditkit.models.hooks`, which applies the views
here, so a vision transformer's layers serve them like a CNN's. A view only slices, reshapes and
permutes: a penalty on the map backpropagates into the network.

* Sequences (N, T, C) (ViT, DeiT, DeiT-3, ViT with register tokens, EVA-02, ConViT): the prefix
  tokens (class, distillation, register) are the first ``T - gh*gw`` and are stripped; the rest,
  row by row, is the grid: token ``prefix + i*gw + j`` lands at ``map[:, :, i, j]``. The grid
  (gh, gw) and the number of prefix tokens are read from the model where it says them (timm:
  ``num_prefix_tokens``, ``patch_embed.patch_size``, ``patch_embed.dynamic_feat_size``;
  torchvision ``VisionTransformer``: ``patch_size``, one class token), with the grid computed from
  the (H, W) of the input that model receives in the current forward (non-square inputs and dynamic
  image sizes). ``T - gh*gw`` must be 0 (before the prefix tokens are added, e.g. ConViT's local
  blocks) or the model's count; anything else is refused in one line naming the layer.
  A sequence in a network that states neither is read by the probe pass: two probe sizes, the
  patch size p and prefix k solving ``T = k + (H//p)(W//p)`` at both.
* Channels-last maps (N, H, W, C) (timm Swin stages and blocks, torchvision swin_t's features,
  timm ViT's ``patch_embed`` with ``dynamic_img_size``): permuted to (N, C, H, W). Which dim holds
  the channels is decided per layer by the probe pass at two input sizes (the channel dim is the one
  that does not change), never by comparing sizes at one shape.

A network without transformer modules (:func:`is_transformer`) gets no view: its outputs are the
layers' own tensors, as before.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..ops.tap import mark_token_map
from .layer_names import call_name, split_call
from .probing import ProbeFailed, network_size, run_probe

# Module class names of transformers: torchvision's and timm's VisionTransformer, Swin's WindowAttention,
# EVA's EvaAttention, MaxViT's PartitionAttentionCl, a plain "Attention" block: any class name with
# "Transformer" or "Attention" in it, except the CNN attention blocks that keep spatial maps (CBAM's
# ChannelAttention and SpatialAttention, attention gates).
_TRANSFORMER_CLASS = re.compile(r"Transformer|Attention")
_CNN_ATTENTION_CLASS = re.compile(r"(Channel|Spatial)Attention|AttentionGate|GateAttention")
# Layers whose 4-D output is (N, C, H, W) by definition: no probe needed.
_NCHW_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def is_transformer(net: nn.Module) -> bool:
    """Whether ``net`` holds transformer layers: nn.MultiheadAttention, a class name matching
    _TRANSFORMER_CLASS (CNN attention blocks excepted) or a module that states a
    :class:`SequenceGrid` (timm's ConViT, whose classes are GPSA, MHSA and ConVit)."""
    return any(isinstance(m, nn.MultiheadAttention)
               or (_TRANSFORMER_CLASS.search(type(m).__name__) and not _CNN_ATTENTION_CLASS.search(type(m).__name__))
               or sequence_grid(m) is not None
               for m in net.modules())


@dataclass(frozen=True)
class SequenceGrid:
    """What a ViT says about its token sequences: ``prefix`` tokens before the patch tokens, and
    how its (H, W) input becomes the grid."""

    prefix: int
    patch: tuple[int, int]
    feat_size: Any = None  # timm's patch_embed.dynamic_feat_size, else None (floor division by patch)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """(gh, gw) for an (H, W) input to the ViT."""
        if self.feat_size is not None:
            gh, gw = self.feat_size((height, width))
            return int(gh), int(gw)
        return height // self.patch[0], width // self.patch[1]


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def sequence_grid(module: nn.Module) -> SequenceGrid | None:
    """The :class:`SequenceGrid` ``module`` states when it is a ViT (timm: ``num_prefix_tokens`` and
    ``patch_embed.patch_size``; torchvision ``VisionTransformer``: ``patch_size``, one class
    token), else None."""
    embed = getattr(module, "patch_embed", None)
    if isinstance(getattr(module, "num_prefix_tokens", None), int) and hasattr(embed, "patch_size"):
        return SequenceGrid(int(module.num_prefix_tokens), _pair(embed.patch_size),
                            getattr(embed, "dynamic_feat_size", None))
    if type(module).__name__ == "VisionTransformer" and type(module).__module__.startswith("torchvision") \
            and isinstance(getattr(module, "patch_size", None), int):
        return SequenceGrid(1, _pair(module.patch_size))
    return None


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int], prefixes: Sequence[int] = (0, 1),
                  layer: str = "layer") -> torch.Tensor:
    """(N, C, gh, gw) from a sequence ``tokens`` (N, T, C): the first ``T - gh*gw`` tokens (which
    must be one of ``prefixes``) stripped, token ``prefix + i*gw + j`` at [:, :, i, j]. A view
    (slice, reshape, permute): gradients flow. ModelError in one line naming ``layer`` otherwise."""
    n, count, channels = tokens.shape
    gh, gw = grid
    prefix = count - gh * gw
    if prefix not in tuple(prefixes):
        raise ModelError(f"layer '{layer}' gives {count} tokens, which is not a {gh}x{gw} grid of patches plus "
                         f"{' or '.join(str(p) for p in prefixes)} prefix token(s); it cannot be read as a feature map")
    return tokens[:, prefix:].reshape(n, gh, gw, channels).permute(0, 3, 1, 2)


def map_to_tokens(feature_map: torch.Tensor, prefix_tokens: torch.Tensor) -> torch.Tensor:
    """The sequence (N, T, C) a map (N, C, gh, gw) came from, with ``prefix_tokens`` (N, k, C) in
    front: the inverse of :func:`tokens_to_map`, equal to the layer's output."""
    n, channels, gh, gw = feature_map.shape
    body = feature_map.permute(0, 2, 3, 1).reshape(n, gh * gw, channels)
    return torch.cat([prefix_tokens, body], dim=1) if prefix_tokens.shape[1] else body


def channels_last_to_map(output: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) from a channels-last (N, H, W, C) map: a permuted view."""
    return output.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- layouts, found by the probe


@dataclass(frozen=True)
class Layout:
    """How a layer's output becomes a map. ``kind``: "map" (NCHW, as it is), "channels_last",
    "sequence" (with ``prefixes`` allowed and, when no ViT states it, the probe's ``patch``), or
    "none" (not a spatial output: given as it is). ``problem``: why it cannot be read (one line)."""

    kind: str
    prefixes: tuple[int, ...] = ()
    patch: tuple[int, int] | None = None
    problem: str | None = None


def _solve_sequence(sizes, counts) -> tuple[int, int] | None:
    """(patch, prefix) with ``count = prefix + (H//p)(W//p)`` at both probe sizes, when exactly one
    square patch size up to 64 fits with a prefix of at most 16 tokens; else None."""
    fits = []
    for patch in range(1, 65):
        prefixes = {count - (h // patch) * (w // patch) for (h, w), count in zip(sizes, counts)}
        if len(prefixes) == 1 and 0 <= (prefix := prefixes.pop()) <= 16 and min(sizes[0]) // patch > 0:
            fits.append((patch, prefix))
    return fits[0] if len(fits) == 1 else None


def layout_of(name: str, module: nn.Module, owner: SequenceGrid | None, shapes: Sequence[tuple | None],
              sizes: Sequence[tuple[int, int]]) -> Layout:
    """The :class:`Layout` of layer ``name`` from its output ``shapes`` at the probe ``sizes``
    (the second may be None: the network did not run there)."""
    first = shapes[0]
    if first is None:
        return Layout("none")
    two = len(shapes) > 1 and shapes[1] is not None and len(shapes[1]) == len(first)
    if len(first) == 3:
        if owner is not None:
            return Layout("sequence", prefixes=tuple(sorted({0, owner.prefix})))
        solved = _solve_sequence(sizes, [s[1] for s in shapes]) if two and shapes[1][2] == first[2] else None
        if solved is None:
            return Layout("none")  # not a sequence of patches (or not one the probe can read): as it is
        return Layout("sequence", prefixes=(solved[1],), patch=(solved[0], solved[0]))
    if len(first) != 4 or isinstance(module, _NCHW_LAYERS):
        return Layout("map" if len(first) == 4 else "none")
    if not two:
        return Layout("none", problem=f"layer '{name}' gives a 4-D output {first} in a transformer, and the network "
                      f"runs only at {sizes[0][0]}x{sizes[0][1]}, so the probe cannot tell its channel dim from its "
                      "spatial dims; capture a layer that gives token sequences")
    changed = tuple(d for d in (1, 2, 3) if shapes[1][d] != first[d])
    if changed == (2, 3):
        return Layout("map")
    if changed == (1, 2):
        return Layout("channels_last")
    return Layout("none")


def _owners(model: nn.Module, name: str) -> tuple[nn.Module | None, SequenceGrid | None]:
    """The nearest module at or above layer ``name`` that states a :class:`SequenceGrid`."""
    parts = name.split(".") if name else []
    for end in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:end]))
        grid = sequence_grid(module)
        if grid is not None:
            return module, grid
    return None, None


def network_of(model: nn.Module) -> tuple[nn.Module, str, int, tuple[int, int]]:
    """(the network, the prefix of its layer names in ``model``, its in_channels, the (H, W) to probe
    it at): an AuditModel's ``net`` at the size it sees, else ``model`` at the size its ViT or
    patch embedding states (None when none: :data:`PROBE_SIZES` are tried)."""
    meta = getattr(model, "meta", None)
    if meta is not None and isinstance(getattr(model, "net", None), nn.Module):
        seen = network_size(meta.input_size, getattr(model, "min_input_size", 1))
        return model.net, "net.", int(meta.in_channels), seen
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_channels = conv.in_channels if conv is not None else 3
    size = None
    for module in model.modules():
        stated = getattr(getattr(module, "patch_embed", None), "img_size", None) or getattr(module, "image_size", None)
        if stated:
            size = _pair(stated)
            break
    return model, "", in_channels, size


def probe_shapes(net: nn.Module, in_channels: int, size: tuple[int, int],
                 modules: dict[str, nn.Module] | None = None) -> dict[str, tuple[int, ...]] | None:
    """{layer name ("name" or "name#k" for a module run several times): output shape} of the tensor
    outputs of ``modules`` (default: all of ``net``'s, by name) in one probe pass at ``size``; None
    when the network fails there."""
    modules = modules if modules is not None else {n: m for n, m in net.named_modules() if n}
    found: list[tuple[str, int, tuple[int, ...]]] = []
    calls: dict[str, int] = {}

    def record(name: str):
        def hook(_module, _args, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor):
                found.append((name, calls[name], tuple(output.shape)))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
    try:
        run_probe(net, in_channels, size)
    except ProbeFailed:
        return None
    finally:
        for handle in handles:
            handle.remove()
    return {call_name(n, c if calls[n] > 1 else None): shape for n, c, shape in found}


#: Probe sizes tried for a transformer that states no size, smallest that fits first (attention costs
#: grow with the square of the token count, and layouts do not depend on the size).
PROBE_SIZES = ((64, 64), (224, 224), (32, 32), (28, 28))


def second_size(size: tuple[int, int]) -> tuple[int, int]:
    """The second probe size: twice the first (keeps divisibility by patch and window sizes)."""
    return 2 * size[0], 2 * size[1]


def probe_layouts(net: nn.Module, in_channels: int,
                  size: tuple[int, int] | None) -> tuple[dict[str, tuple[int, ...]], dict[str, Layout]]:
    """({layer name: output shape at ``size``}, {layer name: :class:`Layout`}) of every module call of
    ``net`` (a transformer), from probe passes at ``size`` (None: the first of :data:`PROBE_SIZES`
    it runs at) and at :func:`second_size` (which a network of one fixed size fails: then its 4-D
    layers other than convolutions and poolings are left unread, with the reason). ProbeFailed in
    one line when it fails at ``size`` (at all of PROBE_SIZES)."""
    shapes = None
    for size in [size] if size is not None else PROBE_SIZES:
        shapes = probe_shapes(net, in_channels, size)
        if shapes is not None:
            break
    if shapes is None:
        run_probe(net, in_channels, size)  # raises the network's own one-line failure at its size
    sizes = [size, second_size(size)]
    later = probe_shapes(net, in_channels, sizes[1]) or {}
    found = {}
    for name, shape in shapes.items():
        module_name = split_call(name)[0]
        owner = _owners(net, module_name)[1]
        found[name] = layout_of(name, net.get_submodule(module_name), owner, [shape, later.get(name)], sizes)
    return shapes, found


# --------------------------------------------------------------------------- the view the capture applies

# Per network, found once: its layouts (shapes only: training does not change them) and whether it is a transformer.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[str, Layout]]" = weakref.WeakKeyDictionary()
_IS_TRANSFORMER: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


class MapViews:
    """The views :func:`auditkit.models.hooks.capture_activations` applies to ``names`` (full layer
    names in ``model``, "name#k" for a call): ``view(slot, output)`` gives the (N, C, h, w) map, or
    ``output`` itself (the same tensor) for a CNN's layer and anything not spatial. ``attach()``
    adds the pre-hooks that record the (H, W) each ViT receives (the grid of the current input)."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.layouts: list[Layout | None] = [None] * len(names)
        self.owners: list[tuple[nn.Module | None, SequenceGrid | None]] = [(None, None)] * len(names)
        self.names = list(names)
        self.inputs: dict[int, tuple[int, int]] = {}  # id(ViT) -> (H, W) of its latest input
        net, prefix, in_channels, size = network_of(model)
        if net not in _IS_TRANSFORMER:
            _IS_TRANSFORMER[net] = is_transformer(net)
        if not _IS_TRANSFORMER[net]:
            return
        if net not in _CACHE:
            _CACHE[net] = probe_layouts(net, in_channels, size)[1]
        cache = _CACHE[net]
        for slot, name in enumerate(names):
            self.layouts[slot] = cache.get(name.removeprefix(prefix), Layout("none"))
            if self.layouts[slot].kind == "sequence":
                owner = _owners(model, split_call(name)[0])
                self.owners[slot] = owner if owner[0] is not None else (net, None)  # the probe's patch: net's input

    @property
    def active(self) -> bool:
        return any(layout is not None and layout.kind != "map" for layout in self.layouts)

    def attach(self) -> list[Any]:
        """Forward pre-hooks on the ViTs the sequence layers belong to, recording their input's (H, W)."""
        handles, seen = [], set()
        for module, _grid in self.owners:
            if module is not None and id(module) not in seen:
                seen.add(id(module))
                handles.append(module.register_forward_pre_hook(self._record(id(module))))
        return handles

    def _record(self, key: int):
        def hook(_module, args):
            if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
                self.inputs[key] = (int(args[0].shape[-2]), int(args[0].shape[-1]))
        return hook

    def view(self, slot: int, output: Any, rebuild: bool = True) -> tuple[Any, torch.Tensor | None]:
        """(the (N, C, h, w) map of ``output``, the layer's own output, for ``slot``; the tensor the
        network continues with, rebuilt from the map, or None to keep ``output``). The network goes
        on from the map, so the logits depend on it (Grad-CAM differentiates them by it); the rebuilt
        tensor equals ``output`` (a permuted view, or the prefix tokens and the map concatenated).
        ``rebuild=False``: the network goes on from ``output`` itself (no copy), and a sequence's map
        is marked with its tokens (:func:`auditkit.ops.tap.mark_token_map`), so a penalty on the map
        can add its gradient to the tokens' in one pass (TAP on a ViT)."""
        layout = self.layouts[slot]
        if layout is None or layout.kind in ("map", "none") or not isinstance(output, torch.Tensor):
            if layout is not None and layout.problem and isinstance(output, torch.Tensor):
                raise ModelError(layout.problem)
            return output, None
        if layout.kind == "channels_last" and output.dim() == 4:
            feature_map = channels_last_to_map(output)
            return feature_map, feature_map.permute(0, 2, 3, 1)  # a view: no copy to spare
        if layout.kind == "sequence" and output.dim() == 3:
            feature_map = tokens_to_map(output, self._grid(slot), layout.prefixes, self.names[slot])
            prefix = output.shape[1] - feature_map.shape[2] * feature_map.shape[3]
            if not rebuild:
                return mark_token_map(feature_map, output, prefix), None
            return feature_map, map_to_tokens(feature_map, output[:, :prefix])
        return output, None

    def _grid(self, slot: int) -> tuple[int, int]:
        module, grid = self.owners[slot]
        layout = self.layouts[slot]
        size = self.inputs.get(id(module))
        if size is None:
            raise ModelError(f"layer '{self.names[slot]}' gives token sequences but its transformer's input was not "
                             "seen in this forward pass, so its grid is unknown; run the whole model")
        if grid is not None:
            return grid.grid(*size)
        return size[0] // layout.patch[0], size[1] // layout.patch[1]
