"""The architectures auditkit can build and their presets (:class:`ArchSpec`).

auditkit's own small CNNs, every torchvision classification CNN, ``timm:NAME`` and the user's
``package.module:factory``, looked up by name with :func:`get_arch`. Vision transformers by name
(``timm:NAME``: ViT, DeiT, DeiT-3, ViT with registers, EVA-02, Swin, ConViT; torchvision ``vit_*``,
``swin_*``; the zoo's ``vit-digits``) are built at the data's size (:func:`build_network`) and their
layers are read as (N, C, h, w) maps (auditkit/models/tokens.py); one that cannot run at that size
is refused in one line saying what size would. A transformer from a user's factory or a pickle is
still refused (:func:`_refuse_transformer`). Torchvision and timm
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
from .tokens import is_transformer as _is_transformer  # noqa: F401  (checkpoint.py and zoo.py import it from here)

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

def vit_digits(in_channels: int, num_classes: int, input_size: tuple[int, int] | None = None) -> nn.Module:
    """A small ViT for 28x28 digits: timm's ``VisionTransformer`` with 4x4 patches (7x7 tokens at
    28x28), a class token, embed_dim 64, depth 4, 4 heads, MLP ratio 2, built for ``input_size``
    (default 28x28) with ``dynamic_img_size`` (another size whose sides divide by 4 resamples the
    position embeddings, as timm does). About 0.16M parameters: a few seconds an epoch on a CPU.

    Its patch embedding is a per-patch MLP (``patch_embed.proj``: a 4x4 stride-4 convolution to 256
    units, GELU, a 1x1 convolution to 64), not timm's single linear projection. Measured on 3,500
    clean digits (docs/reproductions.md): 0.947 test accuracy against 0.913, and, unlike a
    convolutional stem (0.95, but its 3x3 window lets a corner artefact into the neighbouring tokens,
    where TAP on tokens could not remove it), each token still sees only its own 4x4 pixels."""
    from timm.models.vision_transformer import VisionTransformer

    size = tuple(input_size) if input_size is not None else (28, 28)
    if size[0] % 4 or size[1] % 4:
        raise ModelError(f"'vit-digits' cannot run at {size[0]}x{size[1]}: its 4x4 patches need sides that divide "
                         f"by 4; {-(-size[0] // 4) * 4}x{-(-size[1] // 4) * 4} would work")
    net = VisionTransformer(img_size=size, patch_size=4, in_chans=in_channels, num_classes=num_classes,
                            embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, dynamic_img_size=True)
    net.patch_embed.proj = nn.Sequential(nn.Conv2d(in_channels, 256, 4, stride=4), nn.GELU(), nn.Conv2d(256, 64, 1))
    return net


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
    # The ViT rule of presets.py: the outputs of blocks 2, 3 and 4 of 4 (about 1/2, 3/4, the last);
    # Grad-CAM on the last block's first LayerNorm (the residual stream it reads, as pytorch-grad-cam).
    ArchSpec(
        name="vit-digits",
        build=vit_digits,
        tap_layers=("blocks.1", "blocks.2", "blocks.3"),
        gradcam_layer="blocks.3.norm1",
        min_input_size=28,
        lrp_notes="per-patch MLP embedding; attention (AttnLRP rules), LayerNorm, GELU MLPs, residual additions; "
        "class token pooling",
        description="small ViT for 28x28 digits (timm VisionTransformer, 4x4 patches through a per-patch MLP, "
        "7x7 tokens, dim 64, depth 4, 4 heads); TAP on blocks 2-4",
    ),
]

#: Every architecture auditkit can build, by name.
ARCHITECTURES: dict[str, ArchSpec] = {spec.name: spec for spec in _ARCH_LIST}


# torchvision's vision transformers: built at the data's size by _build_torchvision_transformer.
_TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit")
_MIN_INPUT = {"inception_v3": 75, "alexnet": 64}
# torchvision networks whose auxiliary heads would change what forward returns in train mode.
_TORCHVISION_OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True},
                        "inception_v3": {"aux_logits": False, "init_weights": True}}


def torchvision_classifiers() -> list[str]:
    """Every torchvision classification network auditkit can build (its ViTs and Swins included;
    MaxViT refused, see _refuse_maxvit)."""
    from torchvision import models

    return [n for n in models.list_models(module=models) if not n.startswith("maxvit")]


def _refuse_transformer(name: str) -> None:
    """A transformer from a user's factory or a pickled module: refused in one line (named ones are built)."""
    raise ModelError(f"'{name}' is a vision transformer: one from a user's factory or a pickled module is not "
                     "supported yet; name it instead (timm:NAME, e.g. timm:vit_small_patch16_224, or torchvision's "
                     "vit_b_16, swin_t), and load its weights from a checkpoint file")


def _refuse_maxvit(name: str) -> None:
    raise ModelError(f"'{name}' is not supported: MaxViT builds its attention for one fixed input size (a multiple of "
                     "224), so the probe cannot tell its maps' channel dims from their spatial dims (that needs two "
                     "sizes); use swin_t, vit_b_16 or timm:NAME")


# What a transformer is: auditkit/models/tokens.py (is_transformer, imported here as _is_transformer):
# a class name with "Transformer" or "Attention" in it (CNN attention blocks excepted), an
# nn.MultiheadAttention, or a module that states its token grid. timm's CNN attention layers are named
# "...Attn" and are not matched; transformers named only "...Attn" (CaiT, Twins) are refused by preset
# discovery, which takes token layers only of recognised ViTs and Swins (presets.py).


def build_network(spec: ArchSpec, in_channels: int, num_classes: int, input_size=None) -> nn.Module:
    """``spec.build(in_channels, num_classes)``, with ``input_size`` (the (H, W) the network sees)
    for the builders that take it (vision transformers are built at the data's size)."""
    import inspect

    try:
        takes_size = "input_size" in inspect.signature(spec.build).parameters
    except (TypeError, ValueError):
        takes_size = False
    if takes_size and input_size is not None:
        return spec.build(in_channels, num_classes, input_size=(int(input_size[0]), int(input_size[1])))
    return spec.build(in_channels, num_classes)


def _refuse_size(label: str, size: tuple[int, int], why: str, works: tuple[int, int] | None) -> None:
    hint = f"; {works[0]}x{works[1]} would work" if works else ""
    raise ModelError(f"'{label}' cannot run at {size[0]}x{size[1]}: {why}{hint}")


def _check_runs(net: nn.Module, in_channels: int, size: tuple[int, int], label: str, patch: int) -> None:
    """One zero image through ``net`` at ``size``; ModelError in one line saying why it fails and
    the size (sides rounded up to the patch) that would work."""
    import torch

    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, in_channels, *size))
    except Exception as error:  # noqa: BLE001 - any failure of the network at that size: one line
        works = (-(-size[0] // patch) * patch, -(-size[1] // patch) * patch)
        first = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
        _refuse_size(label, size, first[:160], works if works != size else None)
    finally:
        net.train(was_training)


def _build_torchvision_transformer(factory: str, in_channels: int, num_classes: int,
                                   input_size: tuple[int, int] | None = None) -> nn.Module:
    """torchvision ``vit_*`` with ``image_size`` = the data's (square, divisible by its patch) or
    ``swin_*`` (any size: it pads its windows); random init, ``in_channels`` inputs."""
    from torchvision import models

    options: dict[str, Any] = {}
    if factory.startswith("vit_") and input_size is not None:
        patch = int(re.search(r"_(\d+)$", factory).group(1))
        height, width = input_size
        if height != width or height % patch:
            side = -(-max(height, width) // patch) * patch
            _refuse_size(factory, input_size, f"torchvision's ViT needs square images whose side divides by its patch "
                         f"size {patch}", (side, side))
        options["image_size"] = height
    net = models.get_model(factory, weights=None, num_classes=num_classes, **options)
    if in_channels != 3:
        _replace_input_conv(net, in_channels, "fan_in")
    if factory.startswith("swin_") and input_size is not None:
        _check_runs(net, in_channels, input_size, factory, 32)
    return net


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

    patch = _timm_transformer_patch(model_name)
    if patch is not None:
        return ArchSpec(name=f"timm:{model_name}", build=functools.partial(_build_timm_transformer, model_name),
                        tap_layers=None, gradcam_layer=None, min_input_size=max(patch, 32 // patch * patch),
                        lrp_notes="attention (AttnLRP rules), LayerNorm, residual additions",
                        description=f"timm {model_name} (vision transformer at the data's size, random init; "
                        "presets found)", source="timm")

    def build(in_channels: int, num_classes: int) -> nn.Module:
        # pretrained=False always: auditkit never downloads weights (bring them in a checkpoint file).
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=in_channels)

    return ArchSpec(name=f"timm:{model_name}", build=build, tap_layers=None, gradcam_layer=None, min_input_size=32,
                    lrp_notes="found by tracing", description=f"timm {model_name} (random init; presets found)",
                    source="timm")


@functools.lru_cache(maxsize=64)
def _timm_transformer_patch(model_name: str) -> int | None:
    """The patch size of timm's ``model_name`` when it is a vision transformer (tokens.is_transformer),
    else None; from a shape-only build on the meta device (no memory, no initialisation cost)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            net = timm.create_model(model_name, pretrained=False)
    except (NotImplementedError, RuntimeError):  # a builder that reads tensor values while initialising
        net = timm.create_model(model_name, pretrained=False)
    if not _is_transformer(net):
        return None
    size = getattr(getattr(net, "patch_embed", None), "patch_size", None)
    return int(size[0] if isinstance(size, (tuple, list)) else size) if size else 1


def _build_timm_transformer(model_name: str, in_channels: int, num_classes: int,
                            input_size: tuple[int, int] | None = None) -> nn.Module:
    """timm's vision transformer ``model_name`` (random init) with ``dynamic_img_size=True`` and
    ``img_size`` = the data's (H, W) where the model takes them (ConViT takes no dynamic size; Swin
    builds its windows for the size), so its position embeddings are made for that size (timm
    resamples them for another); refused in one line when it cannot run at ``input_size``."""
    import timm

    base = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    sized = {"img_size": tuple(input_size)} if input_size is not None else {}
    for extra in ({"dynamic_img_size": True, **sized}, sized, {"dynamic_img_size": True}, {}):
        try:
            net = timm.create_model(model_name, **base, **extra)
            break
        except TypeError as error:  # a model that takes no dynamic_img_size / img_size: the next try
            if "unexpected keyword" not in str(error):
                raise
    if input_size is not None:
        _check_runs(net, in_channels, tuple(input_size), f"timm:{model_name}", _timm_transformer_patch(model_name))
    return net


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
    if name.startswith("maxvit"):
        _refuse_maxvit(name)
    if name.startswith(_TRANSFORMER_PREFIXES) and name in torchvision_classifiers():
        return ArchSpec(name=name, build=functools.partial(_build_torchvision_transformer, name), tap_layers=None,
                        gradcam_layer=None, min_input_size=32, lrp_notes="attention (AttnLRP rules), LayerNorm",
                        description=f"{name} (torchvision vision transformer at the data's size, random init; "
                        "presets found)", source="torchvision")
    if name in torchvision_classifiers():
        return ArchSpec(name=name, build=functools.partial(_build_torchvision_any, name), tap_layers=None,
                        gradcam_layer=None, min_input_size=_MIN_INPUT.get(name, 32), lrp_notes="found by tracing",
                        description=f"{name} (torchvision, random init; presets found)", source="torchvision")
    close = difflib.get_close_matches(name, [*ARCHITECTURES, *torchvision_classifiers()], n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ModelError(f"unknown architecture '{name}'; {hint}known: {', '.join(ARCHITECTURES)}, any torchvision "
                     "classifier (torchvision_classifiers() lists them), timm:NAME or package.module:factory")
