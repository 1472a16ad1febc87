"""The architectures auditkit can build and their presets (:class:`ArchSpec`).

auditkit's own small CNNs, every torchvision classification CNN, ``timm:NAME`` and the user's
``package.module:factory``, looked up by name with :func:`get_arch`. Vision transformers are refused
in one line (:func:`_refuse_transformer`), whatever route they come by. Torchvision and timm
networks are always built without pretrained weights: auditkit never downloads anything. The
wrapper every stage uses, and :func:`build_model`: :mod:`auditkit.models.zoo`.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ModelError
from .layer_names import unwrap_compiled

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
    """The Colored-MNIST CNN of Bharadwaj 2026, "The Lazy Artist": two conv+ReLU layers, three linear layers.

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
                     "classifier (torchvision_classifiers() lists them), timm:NAME or package.module:factory")
