"""The model wrapper (:class:`AuditModel`, :class:`ModelMeta`) and :func:`build_model`.

Every model auditkit trains, audits or repairs is an :class:`AuditModel`: an
architecture (``.net``) plus the facts later stages need (``.meta``): the
input format, the normalisation, the class names and which layers TAP
penalises and Grad-CAM explains. The wrapper takes images in [0, 1] at the
data's own resolution, so annotation masks and explanations always live in
the data's pixel space; normalisation and any upsampling happen inside.

The architectures and their presets live in :mod:`auditkit.models.architectures`, layer names
in :mod:`auditkit.models.layer_names`; their public names are importable from here too. Torchvision
networks are always built with ``weights=None``: auditkit never downloads anything.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ModelError
from .architectures import (  # noqa: F401  (re-exported: importable from auditkit.models.zoo as before)
    _MIN_INPUT,
    _TORCHVISION_OPTIONS,
    _TRANSFORMER_PREFIXES,
    ARCHITECTURES,
    ArchSpec,
    ShortcutCNN,
    TapCNN,
    _is_transformer,
    _refuse_transformer,
    build_network,
    classifier_name,
    first_conv_name,
    get_arch,
    torchvision_classifiers,
)
from .layer_names import (  # noqa: F401  (re-exported, as above)
    _COMPILED,
    _is_compiled,
    _layer_names_message,
    _without_compiled,
    resolve_layers,
    unwrap_compiled,
)
from .hooks import resolve_layer_calls  # layer names with a call ('block#2'), as capture reads them
from .outputs import BINARY, SOFTMAX, HeadError, binary_view, check_head, check_spec, one_logit_network, select_logits

#: The arch name of a wrapped module auditkit cannot rebuild (a trusted pickle).
CUSTOM_ARCH = "custom"

#: Per-channel mean and std used when the caller gives none and the file records none. Models
#: built here start from random weights and `auditkit train` stores the training images' own
#: statistics, so ImageNet's have no special claim; 0.5/0.5 maps [0, 1] pixels to [-1, 1]. For
#: weights trained elsewhere it is an assumption: loading says so (auditkit/models/normalization.py).
DEFAULT_MEAN = 0.5
DEFAULT_STD = 0.5


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
    # What the output means (auditkit/models/outputs.py): "softmax" (one logit per class) or "binary" (one
    # logit z, class 1 when z > 0; num_classes is 2 and the model's logits are the two-class view of z).
    head: str = "softmax"

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
        logits = self.network_logits(output)
        # A one-logit (sigmoid) model is seen through its exact two-class view: every consumer of
        # (N, classes) logits works unchanged and the network keeps its one output.
        return binary_view(logits) if self.meta.head == BINARY else logits

    def network_logits(self, output: Any) -> torch.Tensor:
        """The network's own logits in ``output``: (N, classes), or (N, 1) for a binary head (its z)."""
        if type(output) is torch.Tensor and self.meta.output is None:  # the common case: no adapter call
            return output
        width = 1 if self.meta.head == BINARY else self.meta.num_classes
        return select_logits(output, self.meta.output, num_classes=width)

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
        sizes = probe_sizes(input_size, minimum)
        if running is not None and _is_transformer(net):  # no resolutions to keep apart: its own size, cheaper
            sizes = list(dict.fromkeys([running, *sizes]))
        _FOUND[key] = discover_presets_at(net, in_channels, sizes, running)[0]
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
    head: str | None = None,
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
    auditkit/models/outputs.py), stored in ``meta.output``. ``head``: "softmax" or
    "binary" (one logit, two classes); None reads it off the network: one class asked for, or a
    network whose last Linear has one output when two are asked for, is binary (``meta.head``,
    ``meta.num_classes`` 2). Bad names or sizes raise ModelError.
    """
    spec = get_arch(arch)
    output = check_spec(output)
    head = check_head(head)
    num_classes = _check_positive_int(num_classes, "num_classes")
    if num_classes == 1:  # one output: a sigmoid head over two classes, never a one-class softmax
        if head == SOFTMAX:
            raise HeadError("is softmax but the network has one output logit: a one-logit model is binary (sigmoid)")
        head, num_classes = BINARY, 2
        if class_names is not None and len(class_names) == 1:
            class_names = None  # "0" of a one-output file: the two classes are the data's
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

    if head == BINARY and num_classes != 2:
        raise HeadError(f"is binary (one logit, two classes) but {num_classes} classes were asked for")
    from .presets import network_size

    # A vision transformer is built at the size it sees (auditkit/models/architectures.py build_network).
    seen = network_size((height, width), spec.min_input_size)
    net = unwrap_compiled(build_network(spec, in_channels, 1 if head == BINARY else num_classes, seen), inner=True)
    # A factory that ignores num_classes and builds one logit (its forward returns one per image).
    if head != BINARY and one_logit_network(net, in_channels, (height, width)):
        if head == SOFTMAX:
            raise HeadError("is softmax but the network's last layer has one output logit (a binary, sigmoid head); "
                            "leave it unset")
        if num_classes != 2:
            raise ModelError(f"{spec.name} builds a network with one output logit (a binary, sigmoid head over two "
                             f"classes) but {num_classes} classes were asked for; give it data with two classes")
        head = BINARY
    head = head or SOFTMAX
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
        head=head,
    )
    model = AuditModel(net, meta, min_input_size=spec.min_input_size)
    if target_layers is not None:
        if isinstance(target_layers, str):
            target_layers = [target_layers]
        if len(target_layers) == 0:
            raise ModelError("target_layers is empty; give at least one layer or leave it unset for the preset")
        model.meta = replace(model.meta, target_layers=tuple(resolve_layer_calls(model, target_layers)))
    if gradcam_layer is not None:
        model.meta = replace(model.meta, gradcam_layer=resolve_layer_calls(model, [gradcam_layer])[0])
    return model
