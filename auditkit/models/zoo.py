"""Architectures auditkit can build, their TAP presets, and the model wrapper.

Every model auditkit trains, audits or repairs is an :class:`AuditModel`: an
architecture (``.net``) plus the facts later stages need (``.meta``): the
input format, the normalisation, the class names and which layers TAP
penalises and Grad-CAM explains. The wrapper takes images in [0, 1] at the
data's own resolution, so annotation masks and explanations always live in
the data's pixel space; normalisation and any upsampling happen inside.

Torchvision networks are always built with ``weights=None``: auditkit never
downloads anything.
"""

from __future__ import annotations

import difflib
import functools
import numbers
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError
from .outputs import check_spec, select_logits

#: The arch name of a wrapped module auditkit cannot rebuild (a trusted pickle).
CUSTOM_ARCH = "custom"

#: Per-channel mean and std used when the caller gives none and the file records none. Models
#: built here start from random weights and `auditkit train` stores the training images' own
#: statistics, so ImageNet's have no special claim; 0.5/0.5 maps [0, 1] pixels to [-1, 1]. For
#: weights trained elsewhere it is an assumption: loading says so (auditkit/models/normalization.py).
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


@dataclass(frozen=True)
class ArchSpec:
    """An architecture and its presets.

    ``build(in_channels, num_classes)`` returns the bare network (randomly
    initialised). ``tap_layers`` and ``gradcam_layer`` are module names inside
    that network (``dict(net.named_modules())`` keys). ``min_input_size`` is the
    smallest side the network accepts; :class:`AuditModel` upsamples smaller
    images to it. ``lrp_notes`` lists what layer-wise relevance propagation
    must handle for this network.
    """

    name: str
    build: Callable[[int, int], nn.Module]
    tap_layers: tuple[str, ...] | None  # None: found by a probe forward pass (auditkit/models/presets.py)
    gradcam_layer: str | None
    min_input_size: int
    lrp_notes: str
    description: str
    source: str = "auditkit"  # auditkit (the zoo), torchvision, timm or user


# --------------------------------------------------------------------------- small CNNs


def _conv_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 same-padding convolution followed by ReLU: the module's output is the ReLU output."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.ReLU())


class TapCNN(nn.Sequential):
    """The TAP paper's two-layer CNN (App. B): two conv+ReLU layers with max pooling, one linear layer.

    ``conv1`` and ``conv2`` end with their ReLU, so TAP penalises exactly the
    post-ReLU activations. The adaptive average pool is the identity for
    28x28 inputs (the paper's setting) and makes the linear layer fit any
    input of at least 8 px.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(
            OrderedDict(
                conv1=_conv_relu(in_channels, 32),
                pool1=nn.MaxPool2d(2),
                conv2=_conv_relu(32, 64),
                pool2=nn.MaxPool2d(2),
                resize=nn.AdaptiveAvgPool2d((7, 7)),
                flatten=nn.Flatten(),
                fc=nn.Linear(64 * 7 * 7, num_classes),
            )
        )


class ShortcutCNN(nn.Sequential):
    """The "lazy artist" Colored-MNIST CNN (seed 004): two conv+ReLU layers, three linear layers.

    Same convolutional trunk as :class:`TapCNN`, with a deeper head that has
    the capacity to latch onto colour shortcuts.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(
            OrderedDict(
                conv1=_conv_relu(in_channels, 32),
                pool1=nn.MaxPool2d(2),
                conv2=_conv_relu(32, 64),
                pool2=nn.MaxPool2d(2),
                resize=nn.AdaptiveAvgPool2d((7, 7)),
                flatten=nn.Flatten(),
                fc1=nn.Sequential(nn.Linear(64 * 7 * 7, 128), nn.ReLU()),
                fc2=nn.Sequential(nn.Linear(128, 64), nn.ReLU()),
                fc3=nn.Linear(64, num_classes),
            )
        )


# --------------------------------------------------------------------------- torchvision networks


def first_conv_name(net: nn.Module) -> str:
    """Name of the network's input convolution (the first Conv2d in definition order)."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise ModelError(f"{type(net).__name__} has no Conv2d layer")


def classifier_name(net: nn.Module) -> str:
    """Name of the network's final linear layer (the last Linear in definition order)."""
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ModelError(f"{type(net).__name__} has no Linear layer")
    return names[-1]


def _replace_input_conv(net: nn.Module, in_channels: int, init_mode: str) -> None:
    """Swaps the input convolution for one with ``in_channels`` inputs and otherwise identical settings.

    The new weights are drawn the way torchvision initialises that network's
    convolutions (Kaiming normal with ``init_mode``), so a 1-channel network
    starts from the same distribution as the 3-channel one.
    """
    name = first_conv_name(net)
    old = net.get_submodule(name)
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    nn.init.kaiming_normal_(new.weight, mode=init_mode, nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name), attr, new)


def _build_torchvision(factory: str, init_mode: str, in_channels: int, num_classes: int) -> nn.Module:
    """A randomly initialised torchvision network adapted to ``in_channels`` and ``num_classes``."""
    from torchvision import models  # deferred: importing torchvision costs time the CLI rarely needs

    net = getattr(models, factory)(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_input_conv(net, in_channels, init_mode)
    return net


def _torchvision_spec(factory: str, init_mode: str, **fields: Any) -> ArchSpec:
    return ArchSpec(name=factory, build=functools.partial(_build_torchvision, factory, init_mode), **fields)


# --------------------------------------------------------------------------- registry

_ARCH_LIST = [
    ArchSpec(
        name="tap-cnn",
        build=TapCNN,
        tap_layers=("conv1", "conv2"),
        gradcam_layer="conv2",
        min_input_size=8,
        lrp_notes="conv/linear layers with ReLU; max pooling; adaptive average pool (identity at 28x28)",
        description="TAP paper's two-layer CNN (App. B): conv-ReLU-pool x2, one linear layer",
    ),
    ArchSpec(
        name="shortcut-cnn",
        build=ShortcutCNN,
        tap_layers=("conv1", "conv2"),
        gradcam_layer="conv2",
        min_input_size=8,
        lrp_notes="conv/linear layers with ReLU; max pooling; adaptive average pool (identity at 28x28)",
        description="Colored-MNIST 'lazy artist' CNN: conv-ReLU-pool x2, three linear layers",
    ),
    # TAP targets for the torchvision networks follow the TAP paper (Sec. 5.3):
    # the output of each stage, spaced over the network's depth.
    _torchvision_spec(
        "vgg16",
        "fan_out",
        tap_layers=("features.4", "features.9", "features.16", "features.23", "features.30"),
        gradcam_layer="features.29",
        min_input_size=32,
        lrp_notes="plain conv/ReLU/max-pool chain; adaptive average pool; dropout (identity in eval)",
        description="VGG-16 (torchvision, random init); TAP after each of its 5 max pools",
    ),
    _torchvision_spec(
        "resnet18",
        "fan_out",
        tap_layers=("layer1", "layer2", "layer3", "layer4"),
        gradcam_layer="layer4",
        min_input_size=32,
        lrp_notes="batch norm merged into the preceding conv; residual additions; 1x1 downsample shortcuts",
        description="ResNet-18 (torchvision, random init); TAP on its 4 residual stages",
    ),
    _torchvision_spec(
        "resnet50",
        "fan_out",
        tap_layers=("layer1", "layer2", "layer3", "layer4"),
        gradcam_layer="layer4",
        min_input_size=32,
        lrp_notes="batch norm merged into the preceding conv; bottleneck blocks; residual additions",
        description="ResNet-50 (torchvision, random init); TAP on its 4 residual stages",
    ),
    _torchvision_spec(
        "densenet121",
        "fan_in",
        tap_layers=("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.denseblock4"),
        # Not features.norm5: DenseNet.forward applies F.relu(inplace=True) to
        # norm5's output, so a hook there holds a tensor that is overwritten
        # afterwards. norm5 is a per-channel affine map of denseblock4, which
        # shifts the Grad-CAM map by a spatial constant and nothing else.
        gradcam_layer="features.denseblock4",
        min_input_size=32,
        lrp_notes="pre-activation BN-ReLU-conv (norm not mergeable into a preceding conv); "
        "channel concatenation; average-pool transitions",
        description="DenseNet-121 (torchvision, random init); TAP on its 4 dense blocks",
    ),
    _torchvision_spec(
        "efficientnet_b0",
        "fan_out",
        tap_layers=("features.1", "features.2", "features.3", "features.5", "features.8"),
        gradcam_layer="features.8",
        min_input_size=32,
        lrp_notes="batch norm merged into convs; SiLU activations; squeeze-excitation gating; "
        "depthwise convs; residual additions",
        description="EfficientNet-B0 (torchvision, random init); TAP on the last block of each resolution",
    ),
    _torchvision_spec(
        "mobilenet_v2",
        "fan_out",
        tap_layers=("features.1", "features.3", "features.6", "features.13", "features.18"),
        gradcam_layer="features.18",
        min_input_size=32,
        lrp_notes="batch norm merged into convs; ReLU6; depthwise convs; residual additions in linear bottlenecks",
        description="MobileNetV2 (torchvision, random init); TAP on the last block of each resolution",
    ),
]

#: Every architecture auditkit can build, by name.
ARCHITECTURES: dict[str, ArchSpec] = {spec.name: spec for spec in _ARCH_LIST}


# Families whose layers are attention, not convolution: refused (their own issue will add them).
_TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit")
_MIN_INPUT = {"inception_v3": 75, "alexnet": 64}
# torchvision networks whose auxiliary heads would change what forward returns in train mode.
_TORCHVISION_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True},
                        "inception_v3": {"aux_logits": False, "init_weights": True}}


def torchvision_classifiers() -> list[str]:
    """Every torchvision classification network auditkit can build (vision transformers excluded)."""
    from torchvision import models

    return [n for n in models.list_models(module=models) if not n.startswith(_TRANSFORMER_PREFIXES)]


def _refuse_transformer(name: str) -> None:
    raise ModelError(f"'{name}' is a vision transformer: auditkit needs convolutional feature maps (TAP, Grad-CAM, "
                     "its LRP rules); transformers are not supported yet")


# Module class names of transformers: torchvision's and timm's VisionTransformer, Hugging Face's
# ViTSelfAttention, Swin's WindowAttention, EVA's EvaAttention, MaxViT's PartitionAttentionCl, a plain
# "Attention" block: any class name with "Transformer" or "Attention" in it, except the CNN attention
# blocks that keep spatial maps (CBAM's ChannelAttention and SpatialAttention, attention gates): those
# CNNs are supported. timm's CNN attention layers are named "...Attn" (SplitAttn, CbamModule, EcaModule)
# and are not matched; transformers named only "...Attn" (CaiT, Twins) are refused by preset discovery,
# which never takes a layer followed by token sequences (presets.py).
_TRANSFORMER_CLASS = re.compile(r"Transformer|Attention")
_CNN_ATTENTION_CLASS = re.compile(r"(Channel|Spatial)Attention|AttentionGate|GateAttention")


def _is_transformer(net: nn.Module) -> bool:
    """Whether ``net`` holds transformer layers (see _TRANSFORMER_CLASS): named timm architectures,
    users' factories and pickled modules are judged by this one rule."""
    return any(isinstance(m, nn.MultiheadAttention)
               or (_TRANSFORMER_CLASS.search(type(m).__name__) and not _CNN_ATTENTION_CLASS.search(type(m).__name__))
               for m in net.modules())


def _build_torchvision_any(factory: str, in_channels: int, num_classes: int) -> nn.Module:
    from torchvision import models

    net = models.get_model(factory, weights=None, num_classes=num_classes, **_TORCHVISION_OPTIONS.get(factory, {}))
    if in_channels != 3:
        _replace_input_conv(net, in_channels, "fan_out")
    return net


def _timm_spec(model_name: str) -> ArchSpec:
    try:
        import timm
    except ImportError as error:  # pragma: no cover - timm is a dependency
        raise ModelError("timm architectures need the timm package (pip install timm)") from error
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=1)
        hint = f"; did you mean 'timm:{close[0]}'?" if close else ""
        raise ModelError(f"unknown timm architecture '{model_name}'{hint}")

    def build(in_channels: int, num_classes: int) -> nn.Module:
        # pretrained=False always: auditkit never downloads weights (bring them in a checkpoint file).
        net = timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        if _is_transformer(net):
            _refuse_transformer(f"timm:{model_name}")
        return net

    return ArchSpec(name=f"timm:{model_name}", build=build, tap_layers=None, gradcam_layer=None, min_input_size=32,
                    lrp_notes="found by tracing", description=f"timm {model_name} (random init; presets found)",
                    source="timm")


def _user_spec(reference: str) -> ArchSpec:
    """``package.module:factory``: the user's own network, imported from their environment (runs their code)."""
    import importlib
    import inspect

    module_name, _, attribute = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure of the user's code: one line
        raise ModelError(f"cannot import '{module_name}' for architecture '{reference}' ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from error
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelError(f"'{module_name}' has no callable '{attribute}' (architecture '{reference}')")

    def build(in_channels: int, num_classes: int) -> nn.Module:
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepted = {}
        kwargs = {}
        if "num_classes" in accepted:
            kwargs["num_classes"] = num_classes
        for key in ("in_channels", "in_chans"):
            if key in accepted:
                kwargs[key] = in_channels
        net = factory(**kwargs)
        if not isinstance(net, nn.Module):
            raise ModelError(f"'{reference}' returned a {type(net).__name__}, not a torch.nn.Module")
        net = unwrap_compiled(net, inner=True)
        if _is_transformer(net):  # the same line as a named transformer's, before anything runs it
            _refuse_transformer(reference)
        if not any(key in kwargs for key in ("in_channels", "in_chans")) and in_channels != 3:
            _replace_input_conv(net, in_channels, "fan_out")
        return net

    return ArchSpec(name=reference, build=build, tap_layers=None, gradcam_layer=None, min_input_size=1,
                    lrp_notes="found by tracing", description=f"user factory {reference} (presets found)",
                    source="user")


def get_arch(name: str) -> ArchSpec:
    """The :class:`ArchSpec` called ``name``: one of auditkit's zoo, any torchvision classification
    CNN (``torchvision.models.list_models``), ``timm:NAME`` or the user's ``package.module:factory``
    (imported and run: that executes the user's code). ModelError with the known names otherwise."""
    name = str(name)
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    if name.startswith("timm:"):
        return _timm_spec(name[len("timm:"):])
    if ":" in name:
        return _user_spec(name)
    if name.startswith(_TRANSFORMER_PREFIXES):
        _refuse_transformer(name)
    if name in torchvision_classifiers():
        return ArchSpec(name=name, build=functools.partial(_build_torchvision_any, name), tap_layers=None,
                        gradcam_layer=None, min_input_size=_MIN_INPUT.get(name, 32), lrp_notes="found by tracing",
                        description=f"{name} (torchvision, random init; presets found)", source="torchvision")
    close = difflib.get_close_matches(name, [*ARCHITECTURES, *torchvision_classifiers()], n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ModelError(f"unknown architecture '{name}'; {hint}known: {', '.join(ARCHITECTURES)}, any torchvision "
                     "classifier (auditkit models --all), timm:NAME or package.module:factory")


# --------------------------------------------------------------------------- the wrapper


@dataclass(frozen=True)
class ModelMeta:
    """What later stages need to know about a model. Layer names are relative to the :class:`AuditModel`."""

    arch: str
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]
    target_layers: tuple[str, ...]
    gradcam_layer: str
    # Where mean/std come from: "option", "checkpoint", "training data", "default" (a new model
    # built without them) or "assumed" (weights loaded without a record), optionally followed by
    # ": detail" (auditkit/models/normalization.py). "" for metadata older than the field.
    normalization: str = ""
    # Which part of the network's output is the logits when it is not one tensor: a key or field
    # name, or an index (auditkit/models/outputs.py); None: the stated rule finds them.
    output: str | int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


class AuditModel(nn.Module):
    """An architecture (``net``) with its input format and presets (``meta``).

    ``forward`` takes images in [0, 1] of shape (N, in_channels, H, W),
    normalises them with ``meta.mean``/``meta.std`` and, when the shorter side
    is below the architecture's ``min_input_size``, upsamples them bilinearly
    (keeping the aspect ratio) before the network sees them. Example: VGG-16
    needs at least 32 px, so 28x28 digits become 32x32 inside the model while
    masks and explanations stay at 28x28.

    ``mean``/``std`` are non-persistent buffers: they follow ``.to(device)``
    but are not in the state_dict (``meta`` is the record of them), so the
    state_dict is exactly the network's, under the prefix ``net.``.
    """

    # Metadata fields the file did not hold (weights without auditkit metadata): the data supplies
    # them when it is first aligned to the model (auditkit.training.align_dataset_to_model).
    adopt_from_data: tuple[str, ...] = ()

    def __init__(self, net: nn.Module, meta: ModelMeta, *, min_input_size: int | None = None) -> None:
        super().__init__()
        # A torch.compile'd network runs as its original module: capture hooks, double backward and
        # LRP's tracing need the eager module, and the state_dict then has no "_orig_mod." prefix.
        self.net = unwrap_compiled(net)
        self.meta = meta
        if min_input_size is None:
            spec = ARCHITECTURES.get(meta.arch)
            min_input_size = spec.min_input_size if spec is not None else 1
        self.min_input_size = int(min_input_size)
        self.register_buffer("mean", torch.tensor(meta.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(meta.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images in [0, 1] of shape (N, in_channels, H, W). A network that
        returns a dict, tuple, namedtuple or dataclass gives the logits ``meta.output`` names, or those
        auditkit.models.outputs' rule finds (OutputError in one line when it finds none)."""
        channels = self.meta.in_channels
        if images.dim() != 4 or images.shape[1] != channels:
            raise ValueError(
                f"{self.meta.arch} expects images of shape (N, {channels}, H, W) with {channels} channel(s), "
                f"got shape {tuple(images.shape)}"
            )
        normalised = (images - self.mean) / self.std
        return self.logits(self.net(self._upsample_to_min_size(normalised)))

    def logits(self, output: Any) -> torch.Tensor:
        """The (N, num_classes) logits in the network's ``output``: ``meta.output`` or the rule of
        auditkit/models/outputs.py (LRP, which runs the network itself, reads them here too)."""
        if type(output) is torch.Tensor and self.meta.output is None:  # the common case: no adapter call
            return output
        return select_logits(output, self.meta.output, num_classes=self.meta.num_classes)

    def masks_for_network(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks (N, 1, H, W) at the data's resolution, brought to the resolution the network sees (the
        model upsamples images below ``min_input_size``): TAP's D(M) and the audit's activation
        shares compare them with the network's activations."""
        return self._upsample_to_min_size(masks)

    def _upsample_to_min_size(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        shorter = min(height, width)
        if shorter >= self.min_input_size:
            return images
        # Integer ceil(side * min / shorter): the shorter side lands exactly on min_input_size.
        size = (-(-height * self.min_input_size // shorter), -(-width * self.min_input_size // shorter))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- building


def _layer_names_message(name: str, modules: Sequence[str], model: nn.Module) -> str:
    """One line: unknown ``name``, with the closest module names (matched with or without 'net.')."""
    owner = model.meta.arch if isinstance(model, AuditModel) else type(model).__name__
    by_short_name: dict[str, str] = {}
    for full in modules:
        by_short_name.setdefault(full, full)
        by_short_name.setdefault(full.removeprefix("net."), full)
    query = name.removeprefix("net.")
    close = difflib.get_close_matches(query, by_short_name, n=6, cutoff=0.6)
    suggestions = list(dict.fromkeys(by_short_name[match] for match in close))[:3]
    if suggestions:
        return f"unknown layer '{name}' in {owner}; closest: {', '.join(suggestions)}"
    top_level = [n for n in modules if n.count(".") <= (1 if n.startswith("net.") else 0)]
    shown = ", ".join(top_level[:12]) + (", ..." if len(top_level) > 12 else "")
    return f"unknown layer '{name}' in {owner}; no similar names (top-level modules: {shown})"


_COMPILED = "_orig_mod"  # the attribute under which torch.compile's OptimizedModule holds the original module


def _is_compiled(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, _COMPILED, None), nn.Module)


def unwrap_compiled(module: nn.Module, *, inner: bool = False) -> nn.Module:
    """The module a ``torch.compile`` wrapper (OptimizedModule) holds, or ``module`` itself. With
    ``inner``, compiled submodules inside it are replaced by their original modules too (in place).
    Hooks, double backward and torch.fx need the eager module; the weights are the same objects."""
    while _is_compiled(module):
        module = getattr(module, _COMPILED)
    if inner:
        for parent in list(module.modules()):
            for name, child in list(parent._modules.items()):
                if child is not None and _is_compiled(child):
                    parent._modules[name] = unwrap_compiled(child, inner=True)
    return module


def _without_compiled(name: str) -> str:
    """``name`` without torch.compile's "_orig_mod" segments ("_orig_mod.layer4" -> "layer4")."""
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def resolve_layers(model: nn.Module, names: str | Sequence[str]) -> list[str]:
    """Full module names for ``names``, checked against ``model.named_modules()``.

    Inside an :class:`AuditModel` a name may omit the ``net.`` prefix
    ("layer4" and "net.layer4" are the same layer), and torch.compile's
    ``_orig_mod.`` segments may be given or left out ("_orig_mod.layer4",
    "layer4"), whether or not the model is still compiled. Unknown names raise
    ModelError with the closest valid names; a layer given twice raises too
    (TAP would penalise it twice). A single string is one name.
    """
    if isinstance(names, str):
        names = [names]
    modules = dict(model.named_modules())
    has_net = isinstance(modules.get("net"), nn.Module)
    # Names without "_orig_mod" segments -> the module's own name (the first, outermost, wins).
    plain: dict[str, str] = {}
    for full_name in modules:
        plain.setdefault(_without_compiled(full_name), full_name)
    resolved: list[str] = []
    for name in names:
        name = str(name).strip()
        bare = _without_compiled(name)
        if name and name in modules:
            full = name
        elif name and has_net and f"net.{name}" in modules:
            full = f"net.{name}"
        elif bare and bare in plain:
            full = plain[bare]
        elif bare and has_net and f"net.{bare}" in plain:
            full = plain[f"net.{bare}"]
        else:
            raise ModelError(_layer_names_message(name, [n for n in modules if n], model))
        if full in resolved:
            raise ModelError(f"layer '{full}' is listed twice")
        resolved.append(full)
    return resolved


def _per_channel(
    values: float | Sequence[float] | None, default: float, in_channels: int, what: str
) -> tuple[float, ...]:
    """One value per input channel: a scalar is repeated, None gives ``default``."""
    if values is None:
        return (default,) * in_channels
    if isinstance(values, (int, float)):
        return (float(values),) * in_channels
    values = tuple(float(v) for v in values)
    if len(values) != in_channels:
        raise ModelError(f"{what} has {len(values)} value(s) but the model has {in_channels} input channel(s)")
    return values


def _check_positive_int(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ModelError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


# (arch, in_channels, the size the network sees) -> Presets: one probe per architecture and size. The
# presets depend on the architecture (a name's build is the same network every time) and, for a
# network that does not run at the standard probe size, on the size it runs at; nothing invalidates
# an entry within a process. A user's factory is re-imported by name only in a new process.
_FOUND: dict[tuple[str, int, tuple[int, int] | None], object] = {}


def found_presets(arch: str, net: nn.Module, in_channels: int, input_size: tuple[int, int] | None = None):
    """The presets a probe forward pass finds for ``net`` (auditkit/models/presets.py): at the
    standard size when the network runs there, else at the size it runs at for ``input_size`` (the
    data's or the checkpoint's (H, W)), then its minimum and common sizes (presets.probe_sizes).
    ModelError in one line naming the sizes tried when it runs at none."""
    from .presets import discover_presets_at, network_size, probe_sizes

    minimum = get_arch(arch).min_input_size
    running = network_size(input_size, minimum) if input_size is not None else None
    key = (arch, in_channels, running)
    if key not in _FOUND:
        _FOUND[key] = discover_presets_at(net, in_channels, probe_sizes(input_size, minimum), running)[0]
    return _FOUND[key]


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    input_size: tuple[int, int],
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    target_layers: Sequence[str] | None = None,
    gradcam_layer: str | None = None,
    normalization: str | None = None,
    output: str | int | None = None,
) -> AuditModel:
    """A randomly initialised :class:`AuditModel` of architecture ``arch``.

    ``input_size`` is the (height, width) of the data (it may be smaller than
    the architecture's minimum; the model upsamples). ``mean``/``std`` default
    to 0.5 per channel (see :data:`DEFAULT_MEAN`); ``normalization`` records
    their source in ``meta.normalization`` (default: "option" when mean or
    std is given, else "default"). ``class_names`` default to "0",
    "1", ...; ``target_layers`` and ``gradcam_layer`` default to the
    architecture's presets and may be given with or without the "net."
    prefix. ``output``: which part of the network's output is the logits when it
    is not one tensor (a key/field name or an index; default: the rule of
    auditkit/models/outputs.py), stored in ``meta.output``. Bad names or sizes
    raise ModelError.
    """
    spec = get_arch(arch)
    output = check_spec(output)
    num_classes = _check_positive_int(num_classes, "num_classes")
    in_channels = _check_positive_int(in_channels, "in_channels")
    if len(tuple(input_size)) != 2:
        raise ModelError(f"input_size must be (height, width), got {input_size!r}")
    height, width = (_check_positive_int(side, "input_size") for side in input_size)
    if normalization is None:
        normalization = "default" if mean is None and std is None else "option"
    mean = _per_channel(mean, DEFAULT_MEAN, in_channels, "mean")
    std = _per_channel(std, DEFAULT_STD, in_channels, "std")
    if min(std) <= 0:
        raise ModelError(f"std must be positive, got {std}")
    names = tuple(str(n) for n in class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
    if len(names) != num_classes:
        raise ModelError(f"{len(names)} class name(s) given for {num_classes} classes")

    net = unwrap_compiled(spec.build(in_channels, num_classes), inner=True)
    if spec.tap_layers is not None and spec.gradcam_layer is not None:
        tap_layers, gradcam = spec.tap_layers, spec.gradcam_layer
    elif target_layers is not None and gradcam_layer is not None:
        tap_layers, gradcam = (), ""  # both given: no probe needed
    else:
        found = found_presets(spec.name, net, in_channels, (height, width))
        tap_layers, gradcam = found.tap_layers, found.gradcam_layer
    meta = ModelMeta(
        arch=spec.name,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=(height, width),
        mean=mean,
        std=std,
        class_names=names,
        target_layers=tuple(f"net.{layer}" for layer in tap_layers),
        gradcam_layer=f"net.{gradcam}" if gradcam else "",
        normalization=normalization,
        output=output,
    )
    model = AuditModel(net, meta, min_input_size=spec.min_input_size)
    if target_layers is not None:
        if isinstance(target_layers, str):
            target_layers = [target_layers]
        if len(target_layers) == 0:
            raise ModelError("target_layers is empty; give at least one layer or leave it unset for the preset")
        model.meta = replace(model.meta, target_layers=tuple(resolve_layers(model, target_layers)))
    if gradcam_layer is not None:
        model.meta = replace(model.meta, gradcam_layer=resolve_layers(model, [gradcam_layer])[0])
    return model
