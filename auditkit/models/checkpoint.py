"""Saving and loading models without running code from the file.

Formats, saved by suffix, read by content (the first bytes, whatever the suffix:
a safetensors file named .pth loads; see :func:`auditkit.models.checkpoint_files._sniff`):

* ``.safetensors`` (recommended): the state_dict as safetensors, with the
  model's metadata as JSON under the header key ``"auditkit"``.
* ``.pt`` / ``.pth``: ``torch.save`` of ``{"format": "auditkit", "meta": ...,
  "state_dict": ...}``, built only from tensors, dicts, lists, strings and
  numbers, so ``torch.load(weights_only=True)`` reads it.

Loading never unpickles by default. A ``.pt`` file that holds pickled Python
objects (a whole ``nn.Module``, custom classes) is refused unless the caller
passes ``trust_pickle=True`` (``--trust-pickle``), because unpickling runs
arbitrary code; so is a TorchScript archive (``torch.jit.save``), which runs
its compiled code. Bare state_dicts (e.g. a torchvision resnet18 ``.pth``) load
when the architecture is named. A Hugging Face or timm model folder (a directory with a
config.json) is read by :mod:`auditkit.models.folders`; another folder is refused with the weights
files it holds. Every failure is a CheckpointError with a
one-line message.

Reading a file without building the model (sniffing, metadata, finding the weights in a payload)
lives in :mod:`auditkit.models.checkpoint_files`; its public names are importable from here too.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from .._io import atomic_write
from .._version import __version__
from ..errors import CheckpointError, ModelError, ParameterError
from .checkpoint_files import (  # noqa: F401  (re-exported: the public names of reading files live there)
    _BARE_STATE_DICT_INPUT_SIZE,
    _META_KEY,
    FORMAT_NAMES,
    FORMAT_VERSION,
    PICKLE,
    SAFETENSORS,
    TORCH_ZIP,
    TORCHSCRIPT,
    PickleRefused,
    _check_meta,
    _check_readable_file,
    _format_of,
    _is_auditkit_payload,
    _is_state_dict,
    _no_weights_message,
    _read_safetensors,
    _torch_load,
    _torchscript_refused,
    _unreadable,
    align_keys,
    CONFIG,
    describe_keys,
    find_state_dict,
    file_format,
    read_file_meta,
)
from .normalization import (
    Normalization,
    assumed_warning,
    is_assumed,
    parse_normalize,
    preprocessor_normalization,
    recorded_normalization,
    set_normalization,
)
from .outputs import BINARY, SOFTMAX, output_width
from .zoo import (
    ARCHITECTURES,
    CUSTOM_ARCH,
    AuditModel,
    ModelMeta,
    _is_transformer,
    _refuse_transformer,
    build_model,
    classifier_name,
    first_conv_name,
    get_arch,
    unwrap_compiled,
)

# --------------------------------------------------------------------------- saving


def checkpoint_meta(model: AuditModel, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The metadata dict stored with ``model``: its :class:`ModelMeta`, format and auditkit version, ``extra``.

    ``extra`` (e.g. a training data fingerprint and a training summary) is
    stored under the key "extra" after a JSON round trip, so both formats
    read back exactly the same dict.
    """
    try:
        extra_json = json.loads(json.dumps(dict(extra or {})))
    except (TypeError, ValueError) as err:
        raise TypeError(f"extra checkpoint metadata must be JSON-serialisable: {err}") from None
    return {
        "format_version": FORMAT_VERSION,
        "auditkit_version": __version__,
        **model.meta.to_dict(),
        "extra": extra_json,
    }


def save_checkpoint(
    model: AuditModel,
    path: str | Path,
    *,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes ``model`` to ``path`` (format by suffix, see the module docstring) and returns the path.

    The file appears atomically (never half-written). An existing file is
    only replaced with ``overwrite=True``. Only built-in architectures can be
    saved: a checkpoint is a state_dict plus the recipe to rebuild the
    network, and a wrapped custom module has no recipe.
    """
    if not isinstance(model, AuditModel):
        raise TypeError(f"save_checkpoint needs an AuditModel, got {type(model).__name__}")
    path = Path(path)
    fmt = _format_of(path, saving=True)
    from .folders import folder_record

    record = folder_record(model)
    if record is not None:  # a model folder's network: rebuilt from its stored config, not from a zoo name
        extra = {**dict(extra or {}), "model_folder": record}
    elif model.meta.arch == CUSTOM_ARCH:
        raise CheckpointError(
            "cannot save a 'custom' model: a checkpoint is weights plus the recipe to rebuild the network, and a "
            "wrapped module has none; build it under an architecture auditkit knows (a zoo name, any torchvision "
            "CNN, timm:NAME or package.module:factory)"
        )
    if record is None:
        get_arch(model.meta.arch)  # the recipe must resolve (ModelError otherwise)
    meta = checkpoint_meta(model, extra)

    def write_safetensors(tmp: Path) -> None:
        # save_model drops duplicate names of shared tensors and makes every tensor contiguous.
        save_model(model, str(tmp), metadata={_META_KEY: json.dumps(meta)}, force_contiguous=True)

    def write_torch(tmp: Path) -> None:
        state_dict = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
        torch.save({"format": "auditkit", "meta": meta, "state_dict": state_dict}, tmp)

    try:
        return atomic_write(path, write_safetensors if fmt == "safetensors" else write_torch, overwrite=overwrite)
    except FileExistsError:
        raise


def _torchscript_sizes(path: Path, script: nn.Module, overrides: dict[str, Any]) -> tuple[int, int]:
    """(in_channels, num_classes) of a TorchScript module: the given ones, else its first Conv2d's and
    last Linear's (scripted submodules keep their ``original_name`` and size attributes), else the
    first 4-D and the last 2-D weight's shapes."""
    convs = [m for _, m in script.named_modules() if getattr(m, "original_name", "") == "Conv2d"]
    linears = [m for _, m in script.named_modules() if getattr(m, "original_name", "") == "Linear"]
    weights = [t for k, t in script.state_dict().items() if k.endswith("weight")]
    in_channels = _first_given(
        overrides["in_channels"],
        getattr(convs[0], "in_channels", None) if convs else None,
        next((int(t.shape[1]) for t in weights if t.dim() == 4), None),
    )
    num_classes = _first_given(
        overrides["num_classes"],
        getattr(linears[-1], "out_features", None) if linears else None,
        next((int(t.shape[0]) for t in reversed(weights) if t.dim() == 2), None),
    )
    if in_channels is None or num_classes is None:
        raise ParameterError(
            "in_channels", f"and num_classes must be given: they cannot be read off the layers of {path}"
        )
    return int(in_channels), int(num_classes)


def _returned_width(net, in_channels: int, num_classes: int, overrides: dict[str, Any]) -> int:
    """The class count: the one given, else the width the forward returns (one pass on zeros), else
    ``num_classes`` as read off the last Linear layer. The last registered Linear may be a side head
    (a quality score after a two-class classifier): what the forward returns decides."""
    if overrides["num_classes"] is not None:
        return int(num_classes)
    size = tuple(_first_given(overrides["input_size"], _BARE_STATE_DICT_INPUT_SIZE))
    width = output_width(net, in_channels, size)
    return int(num_classes) if width is None else width


def _load_torchscript(path: Path, trust_pickle: bool, overrides: dict[str, Any]) -> AuditModel:
    """A TorchScript archive as an AuditModel, only with ``trust_pickle`` (torch.jit.load runs its code).

    With ``arch`` its weights go into a fresh network of that architecture (presets, hooks: every
    method works). Without, the scripted module itself runs as arch "custom" with no TAP or Grad-CAM
    layers (a ScriptModule refuses forward hooks), enough to evaluate it.
    """
    if not trust_pickle:
        raise _torchscript_refused(path)
    warnings.warn(
        f"loading TorchScript archive {path} because trust_pickle is on: this runs the code compiled into it",
        UserWarning,
        stacklevel=3,
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's deprecation notice: not the user's concern
            script = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # the archive's bytes or code decide what breaks
        raise _unreadable(path, err) from None
    if overrides["arch"] is not None:
        return _model_from_state_dict(path, None, dict(script.state_dict()), overrides)
    in_channels, num_classes = _torchscript_sizes(path, script, overrides)
    num_classes = _returned_width(script, in_channels, num_classes, overrides)
    head = BINARY if num_classes == 1 else SOFTMAX  # one output logit: a binary (sigmoid) head
    num_classes = 2 if head == BINARY else num_classes
    meta = ModelMeta(
        arch=CUSTOM_ARCH,
        num_classes=num_classes,
        in_channels=in_channels,
        input_size=tuple(_first_given(overrides["input_size"], _BARE_STATE_DICT_INPUT_SIZE)),
        mean=(0.0,) * in_channels,
        std=(1.0,) * in_channels,
        class_names=tuple(str(i) for i in range(num_classes)),
        target_layers=(),
        gradcam_layer="",
        normalization="assumed",  # as for a pickled module: load_checkpoint settles it
        head=head,
    )
    return AuditModel(script, meta, min_input_size=1)


# --------------------------------------------------------------------------- building models


def _first_given(*values: Any) -> Any:
    """The first value that is not None (None if all are)."""
    return next((value for value in values if value is not None), None)


_SENTINEL_CLASSES = 7919  # a class count no other layer has: marks the classifier in a shape probe


def _expected(arch: str) -> tuple[set[str], str | None, str | None]:
    """(the network's state_dict keys, its input conv's weight key, its classifier's weight key), from
    a shape-only build (meta device: no memory, no initialisation cost)."""
    try:
        with torch.device("meta"):
            probe = get_arch(arch).build(3, _SENTINEL_CLASSES)
    except (NotImplementedError, RuntimeError):  # a builder that reads tensor values while initialising
        probe = get_arch(arch).build(3, _SENTINEL_CLASSES)
    keys = set(probe.state_dict())
    try:
        conv = f"{first_conv_name(probe)}.weight"
    except ModelError:
        conv = None
    classifier = next((name for name, tensor in probe.state_dict().items()
                       if name.endswith("weight") and tensor.dim() >= 2 and tensor.shape[0] == _SENTINEL_CLASSES), None)
    return keys, conv, classifier


def _infer_sizes(
    state: Mapping[str, torch.Tensor], conv: str | None, classifier: str | None
) -> tuple[int | None, int | None]:
    """(in_channels, num_classes) read off the input conv's and the classifier's weights, None if absent."""
    weight = state.get(conv) if conv else None
    head = state.get(classifier) if classifier else None
    in_channels = int(weight.shape[1]) if weight is not None and weight.dim() == 4 else None
    num_classes = int(head.shape[0]) if head is not None and head.dim() >= 2 else None
    return in_channels, num_classes


def _with_metadata(state_dict: Mapping[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    from collections import OrderedDict

    out = OrderedDict(state_dict)
    metadata = getattr(state_dict, "_metadata", None) or getattr(expected, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out


def _load_weights(path: Path, model: AuditModel, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads ``state_dict`` into ``model.net``; CheckpointError naming the first key that does not fit."""
    meta = model.meta
    what = f"{path} does not match {meta.arch} (in_channels={meta.in_channels}, num_classes={meta.num_classes})"
    expected = model.net.state_dict()
    state_dict = align_keys(state_dict, set(expected))
    aligned_keys = set(state_dict)
    # Modules that read versioned metadata while loading (torchvision's MNASNet) find the network's own.
    state_dict = _with_metadata(state_dict, expected)
    # BatchNorm's step counter is bookkeeping, absent from some older state_dicts.
    for key in expected:
        if key not in state_dict and key.endswith("num_batches_tracked"):
            state_dict[key] = expected[key]
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    if missing and unexpected and not aligned_keys & set(expected):
        # Nothing matched: say what the file holds.
        import difflib

        file_keys = [k for k in state_dict if k in aligned_keys]
        close = difflib.get_close_matches(file_keys[0], list(expected), n=2)
        # No size is quoted: none could be read from weights whose names match nothing.
        raise CheckpointError(
            f"{path} does not match {meta.arch}: none of the file's {len(file_keys)} weights has a name the network "
            f"expects; the file's names start with {describe_keys(file_keys)} (first: '{file_keys[0]}'); expected "
            f"names like {', '.join(repr(c) for c in close) or repr(next(iter(expected)))}"
        )
    if missing or unexpected:
        counts = f"{len(missing)} missing, {len(unexpected)} unexpected"
        if missing:
            raise CheckpointError(f"{what}: missing key 'net.{missing[0]}' ({counts})")
        raise CheckpointError(f"{what}: unexpected key 'net.{unexpected[0]}' ({counts})")
    for key, tensor in expected.items():
        if state_dict[key].shape != tensor.shape:
            raise CheckpointError(
                f"{what}: key 'net.{key}' has shape {tuple(state_dict[key].shape)} in the file, "
                f"{tuple(tensor.shape)} in the model"
            )
    model.net.load_state_dict(state_dict, strict=True)


def _model_from_state_dict(
    path: Path,
    meta: dict[str, Any] | None,
    state_dict: Mapping[str, torch.Tensor],
    overrides: dict[str, Any],
) -> AuditModel:
    """Builds the model that ``meta`` (or, for a bare state_dict, ``overrides``) describes and loads the weights.

    Arguments in ``overrides`` win over the file's metadata. Presets tied to
    the stored architecture (layers, class names, normalisation) are kept
    only while they still fit. Bare weights get the assumed normalisation
    (``meta.normalization`` "assumed"); :func:`load_checkpoint` settles it.
    """
    if meta is None:
        arch = overrides["arch"]
        if arch is None:
            raise ParameterError("arch", f"must be given: {path} holds weights without auditkit metadata; name its "
                                         f"architecture ({', '.join(ARCHITECTURES)}, any torchvision or timm:NAME)")
        keys, conv, classifier = _expected(arch)
        state = align_keys(state_dict, keys)
        inferred_channels, inferred_classes = _infer_sizes(state, conv, classifier)
        # Sizes that cannot be inferred only matter if the keys are missing, which _load_weights reports.
        in_channels = _first_given(overrides["in_channels"], inferred_channels, 3)
        num_classes = _first_given(overrides["num_classes"], inferred_classes, 2)
        input_size = _first_given(overrides["input_size"], _BARE_STATE_DICT_INPUT_SIZE)
        model = build_model(arch, num_classes, in_channels, tuple(input_size), normalization="assumed")
    elif isinstance((meta.get("extra") or {}).get("model_folder"), dict) and overrides["arch"] is None:
        from .folders import model_from_record  # a model folder's network, from the config the file stores

        return model_from_record(path, meta["extra"]["model_folder"], meta, state_dict, overrides)
    else:
        state = dict(state_dict)
        arch = _first_given(overrides["arch"], meta["arch"])
        in_channels = _first_given(overrides["in_channels"], meta["in_channels"])
        num_classes = _first_given(overrides["num_classes"], meta["num_classes"])
        same_arch = arch == meta["arch"]
        try:  # the record, fitted to an overridden channel count (RGB statistics averaged for grey)
            recorded = Normalization(tuple(meta["mean"]), tuple(meta["std"]), "checkpoint").for_channels(in_channels)
        except ParameterError:
            recorded = None
        model = build_model(
            arch,
            num_classes,
            in_channels,
            tuple(_first_given(overrides["input_size"], meta["input_size"])),
            mean=recorded.mean if recorded else None,
            std=recorded.std if recorded else None,
            class_names=meta["class_names"] if len(meta["class_names"]) == num_classes else None,
            target_layers=meta["target_layers"] if same_arch else None,
            gradcam_layer=meta["gradcam_layer"] if same_arch else None,
            # The recorded source survives a round trip ("training data", "option: imagenet", ...).
            normalization=(meta.get("normalization") or "checkpoint") if recorded else "assumed",
            output=meta.get("output"),
            head=meta.get("head"),  # absent before the field: read off the network (one output: binary)
        )
    _load_weights(path, model, state)
    return model


def _wrap_module(path: Path, net: nn.Module, overrides: dict[str, Any]) -> AuditModel:
    """Wraps a trusted pickled ``nn.Module``.

    With ``arch`` given, its weights go into a freshly built network of that
    architecture (so the presets apply). Otherwise it becomes arch "custom":
    presets found by a probe pass (or none), the assumed normalisation mean 0,
    std 1 (the [0, 1] images unchanged; :func:`load_checkpoint` replaces it
    with the module's own record, e.g. a timm ``pretrained_cfg``, or the
    caller's ``normalize``) and no upsampling.
    """
    if overrides["arch"] is not None:
        return _model_from_state_dict(path, None, net.state_dict(), overrides)
    if _is_transformer(unwrap_compiled(net)):  # the same one line as a named transformer or a factory's
        _refuse_transformer(f"{path} ({type(net).__name__})")
    in_channels, num_classes = overrides["in_channels"], overrides["num_classes"]
    try:
        if in_channels is None:
            in_channels = net.get_submodule(first_conv_name(net)).in_channels
        if num_classes is None:
            num_classes = net.get_submodule(classifier_name(net)).out_features
    except ModelError:  # no Conv2d or no Linear to read sizes from
        raise ParameterError(
            "in_channels",
            f"and num_classes must be given: {path} holds a {type(net).__name__} whose sizes cannot be inferred",
        ) from None
    try:  # the presets a probe pass finds (none for a network without convolutional stages)
        from .presets import discover_presets_at, probe_sizes

        found = discover_presets_at(unwrap_compiled(net, inner=True), int(in_channels),
                                    probe_sizes(overrides["input_size"]))[0]
        tap_layers, gradcam = tuple(f"net.{n}" for n in found.tap_layers), f"net.{found.gradcam_layer}"
    except ModelError:
        tap_layers, gradcam = (), ""
    # One output logit: a binary (sigmoid) head, seen as two classes (auditkit/models/outputs.py).
    num_classes = _returned_width(net, int(in_channels), int(num_classes), overrides)
    head = BINARY if num_classes == 1 else SOFTMAX
    num_classes = 2 if head == BINARY else int(num_classes)
    meta = ModelMeta(
        arch=CUSTOM_ARCH,
        num_classes=num_classes,
        in_channels=int(in_channels),
        input_size=tuple(_first_given(overrides["input_size"], _BARE_STATE_DICT_INPUT_SIZE)),
        mean=(0.0,) * int(in_channels),
        std=(1.0,) * int(in_channels),
        class_names=tuple(str(i) for i in range(num_classes)),
        target_layers=tap_layers,
        gradcam_layer=gradcam,
        normalization="assumed",
        head=head,
    )
    return AuditModel(net, meta, min_input_size=1)


def load_checkpoint(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_size: tuple[int, int] | None = None,
    trust_pickle: bool = False,
    map_location: str | torch.device = "cpu",
    normalize: Any = None,
) -> AuditModel:
    """The :class:`AuditModel` stored at ``path``, on ``map_location``.

    Reads auditkit checkpoints of both formats and bare state_dicts (with or
    without a "net." prefix; ``arch`` required, ``in_channels`` and
    ``num_classes`` inferred from the weights, ``input_size`` default
    224x224). Arguments given override the file's metadata. Pickled objects
    load only with ``trust_pickle=True`` (with a warning): an auditkit dict, a
    state_dict, an AuditModel (returned as is) or a plain ``nn.Module``
    (see :func:`_wrap_module`).

    Input normalisation (auditkit/models/normalization.py): ``normalize`` (a
    preset name such as "imagenet" or "none", "MEAN/STD", a ``(mean, std)``
    pair) wins; else the file's record (auditkit metadata, a timm
    ``pretrained_cfg`` or training args, a ``preprocessor_config.json``
    beside the file); else 0.5/0.5 (0/1 for a pickled module) is assumed,
    with a :class:`~auditkit.models.normalization.NormalizationWarning`.
    ``meta.normalization`` says which. Weights are read on the CPU and the finished
    model is moved once. It comes back in eval mode (batch norm and dropout as
    at test time), the mode audits and explanations need.
    """
    path = Path(path)
    from .folders import is_model_folder, load_folder

    if is_model_folder(path):  # a Hugging Face or timm model folder (auditkit/models/folders.py)
        return load_folder(path, input_size=input_size, normalize=normalize, map_location=map_location)
    _check_readable_file(path)
    fmt = _format_of(path)  # by content, not suffix
    overrides = {"arch": arch, "num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    has_meta = True  # whether the file says what the model expects (auditkit metadata, a pickled AuditModel)
    record = None  # the normalisation a file without auditkit metadata records (timm pretrained_cfg, ...)
    if fmt == SAFETENSORS:
        meta, tensors = _read_safetensors(path, with_tensors=True)
        has_meta = meta is not None
        model = _model_from_state_dict(path, meta, tensors, overrides)
    elif fmt == TORCHSCRIPT:
        has_meta = False
        model = _load_torchscript(path, trust_pickle, overrides)
    else:
        payload = _torch_load(path, trust_pickle)
        record = recorded_normalization(payload)
        if isinstance(payload, AuditModel):
            model = payload
        elif isinstance(payload, nn.Module):
            has_meta = False
            model = _wrap_module(path, payload, overrides)
        elif _is_auditkit_payload(payload):
            state_dict = payload.get("state_dict")
            if not _is_state_dict(state_dict):
                raise CheckpointError(f"{path} is an auditkit checkpoint without a valid state_dict")
            model = _model_from_state_dict(path, _check_meta(path, payload.get("meta")), state_dict, overrides)
        else:
            has_meta = False
            state_dict, _where = find_state_dict(payload)
            if state_dict is None:
                raise CheckpointError(_no_weights_message(path, payload))
            model = _model_from_state_dict(path, None, state_dict, overrides)
    if not has_meta:
        # No auditkit metadata in the file: the data will say the input size and the class names.
        model.adopt_from_data = ("class_names",) if input_size is not None else ("input_size", "class_names")
    _settle_normalization(path, model, normalize, record if not has_meta else None, has_meta)
    return model.to(map_location).eval()


def _settle_normalization(path: Path, model: AuditModel, normalize: Any, record, has_meta: bool) -> None:
    """The model's final normalisation: ``normalize`` > the file's record > the assumption (warned)."""
    chosen = parse_normalize(normalize, model.meta.in_channels)
    if chosen is None and not has_meta:
        chosen = record or preprocessor_normalization(path)
    if chosen is not None:
        set_normalization(model, chosen)
    elif not model.meta.normalization:  # a pickled AuditModel from before the field: its meta is the record
        model.meta = replace(model.meta, normalization="checkpoint")
    if is_assumed(model):
        reason = "saved by auditkit with an assumed normalisation" if has_meta else "the file records none"
        warnings.warn(assumed_warning(model, path.name, reason), stacklevel=3)


def checkpoint_format(path: str | Path) -> str:
    """What the checkpoint at ``path`` is, in words: a model folder's kind, class and weights files
    (auditkit/models/folders.py), else the file's format read from its content ("safetensors",
    "PyTorch zip archive (torch.save)", "TorchScript archive (torch.jit.save)", "pickle stream (legacy
    torch.save)"); CheckpointError for a missing file, another folder or another format."""
    from .folders import folder_format, is_model_folder

    return folder_format(path) if is_model_folder(path) else file_format(path)


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The auditkit metadata of a checkpoint without building the model; {} for a bare state_dict; for a
    model folder, what it records under ``extra["model_folder"]`` (auditkit/models/folders.py), with
    what auditkit wrote there (a repair's summary, AUDITKIT_RECORD). For safetensors only the header is
    read; pickled files are refused as in :func:`load_checkpoint` without ``trust_pickle``."""
    from .folders import AUDITKIT_RECORD, is_model_folder, read_folder

    path = Path(path)
    if not is_model_folder(path):
        return read_file_meta(path)
    extra: dict[str, Any] = {}
    if (path / AUDITKIT_RECORD).is_file():
        try:
            extra = dict(json.loads((path / AUDITKIT_RECORD).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            extra = {}
    return {"extra": {**extra, "model_folder": read_folder(path).facts()}}
