"""Saving and loading models without running code from the file.

Formats, saved by suffix, read by content (the first bytes, whatever the suffix:
a safetensors file named .pth loads; see :func:`_sniff`):

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
when the architecture is named. A folder is refused with the weights files it
holds (model folders are not read yet). Every failure is a CheckpointError with a
one-line message.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_model
from torch import nn

from .._io import atomic_write
from .._version import __version__
from ..errors import CheckpointError, ModelError, ParameterError
from .normalization import (
    Normalization,
    assumed_warning,
    is_assumed,
    parse_normalize,
    preprocessor_normalization,
    recorded_normalization,
    set_normalization,
)
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

FORMAT_VERSION = 1
_META_KEY = "auditkit"
_FORMATS = {".safetensors": "safetensors", ".pt": "torch", ".pth": "torch", ".ckpt": "torch", ".bin": "torch"}
# Where training frameworks keep the weights in a checkpoint dict (Lightning: "state_dict"; many
# training scripts: "model_state_dict", "model", "net"; EMA weights: "ema", "model_ema", ...). The
# first key that holds a state_dict wins; EMA keys come last (the trained weights first).
_WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module", "weights", "params",
                "ema", "model_ema", "state_dict_ema", "ema_state_dict")
# Key prefixes training code adds, in any order: DataParallel/DDP "module.", torch.compile "_orig_mod.",
# Lightning "model."/"net." attributes, auditkit's own "net.".
_KEY_PREFIXES = ("module", "_orig_mod", "model", "net", "network", "backbone", "ema", "model_ema")
_REQUIRED_META = (
    "format_version",
    "arch",
    "num_classes",
    "in_channels",
    "input_size",
    "mean",
    "std",
    "class_names",
    "target_layers",
    "gradcam_layer",
)
# Input size assumed for a bare state_dict when none is given: the torchvision default.
_BARE_STATE_DICT_INPUT_SIZE = (224, 224)
_MAX_REASON_CHARS = 200


# --------------------------------------------------------------------------- messages


def _one_line(text: str, limit: int = _MAX_REASON_CHARS) -> str:
    """First line of ``text`` without terminal colour codes, trimmed to ``limit`` characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text)).strip()
    line = text.splitlines()[0].strip() if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _unreadable(path: Path, reason: str | BaseException) -> CheckpointError:
    if isinstance(reason, BaseException):
        # First sentence only: torch appends paragraphs of advice to its errors.
        fallback = "file ends early" if isinstance(reason, EOFError) else type(reason).__name__
        reason = _one_line(str(reason)).split(". ")[0] or fallback
    return CheckpointError(f"{path} is not a readable checkpoint ({_one_line(reason)})")


class PickleRefused(ParameterError, CheckpointError):
    """A checkpoint that only unpickling could read, with ``trust_pickle`` off."""


def _pickle_refused(path: Path) -> CheckpointError:
    return PickleRefused(
        "trust_pickle",
        f"is off and {path} contains pickled Python objects; auditkit does not unpickle untrusted files. "
        "If you trust its author, turn it on.",
    )


_SAVE_SUFFIXES = (".safetensors", ".pt", ".pth")
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

# What a file is, by its first bytes (the suffix says nothing: a safetensors file named .pth, a torch
# zip named .bin or .ckpt, a legacy pickle named .pt all exist). Formats auditkit reads:
SAFETENSORS, TORCH_ZIP, TORCHSCRIPT, PICKLE = "safetensors", "torch", "torchscript", "pickle"
FORMAT_NAMES = {
    SAFETENSORS: "safetensors",
    TORCH_ZIP: "PyTorch zip archive (torch.save)",
    TORCHSCRIPT: "TorchScript archive (torch.jit.save)",
    PICKLE: "pickle stream (legacy torch.save)",
}
# Files people hand over by mistake, by magic bytes: the line says what they are.
_FOREIGN = (
    (b"version https://git-lfs", "a Git LFS pointer, not the weights: run `git lfs pull` first"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5?); auditkit reads PyTorch weights"),
    (b"\x93NUMPY", "a NumPy .npy array, not a checkpoint"),
    (b"GGUF", "a GGUF file (llama.cpp); auditkit reads PyTorch weights"),
)


def _safetensors_header(head: bytes) -> bool:
    """Whether ``head`` starts like safetensors: an 8-byte little-endian header length, then JSON."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= 100_000_000  # safetensors' own header limit; a truncated file still counts


def _zip_kind(path: Path) -> str:
    """TORCHSCRIPT, TORCH_ZIP, or "" for a zip archive torch did not write (an .npz, ...). A zip whose
    directory cannot be read (truncated) counts as TORCH_ZIP: torch.load then names the damage."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return TORCH_ZIP
    # torch.jit.save writes <archive>/constants.pkl and the compiled code under <archive>/code/.
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return TORCHSCRIPT
    if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        return TORCH_ZIP
    return ""


def _sniff(path: Path) -> str:
    """The file's format by content (SAFETENSORS, TORCH_ZIP, TORCHSCRIPT, PICKLE); CheckpointError
    (one line) for anything else, saying what it is when its first bytes tell."""
    with path.open("rb") as file:
        head = file.read(64)
    if _safetensors_header(head):
        return SAFETENSORS
    if head.startswith(b"PK\x03\x04"):
        kind = _zip_kind(path)
        if not kind:
            raise _unreadable(path, "a zip archive without torch's data.pkl: an .npz or another archive?")
        return kind
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return PICKLE
    for magic, what in _FOREIGN:
        if head.startswith(magic):
            raise _unreadable(path, what)
    raise _unreadable(path, "not safetensors, a PyTorch zip archive or a pickle, whatever its suffix; "
                            "use .safetensors (recommended), .pt or .pth")


def checkpoint_format(path: str | Path) -> str:
    """What the checkpoint file at ``path`` is, read from its content, in words ("safetensors",
    "PyTorch zip archive (torch.save)", "TorchScript archive (torch.jit.save)", "pickle stream (legacy
    torch.save)"); CheckpointError for a missing file, a folder or another format."""
    path = Path(path)
    _check_readable_file(path)
    return FORMAT_NAMES[_sniff(path)]


def _format_of(path: Path, saving: bool = False) -> str:
    """The format to save in, by suffix (``saving``), or to read with, by content (:func:`_sniff`)."""
    if not saving:
        return _sniff(path)
    if path.suffix.lower() not in _SAVE_SUFFIXES:
        raise CheckpointError(f"{path}: unsupported checkpoint suffix '{path.suffix}' for saving; use .safetensors "
                              "(recommended), .pt or .pth")
    return _FORMATS[path.suffix.lower()]


def _weights_files_in(folder: Path, limit: int = 4) -> list[str]:
    """Up to ``limit`` weights files in ``folder`` and two levels of subfolders, as relative paths."""
    found: list[str] = []
    for pattern in ("*", "*/*", "*/*/*"):
        for candidate in sorted(folder.glob(pattern)):
            if candidate.suffix.lower() in _WEIGHT_SUFFIXES and candidate.is_file():
                found.append(str(candidate.relative_to(folder)))
                if len(found) == limit:
                    return found
    return found


def _check_readable_file(path: Path) -> None:
    """CheckpointError (one line) unless ``path`` is a non-empty regular file; a folder is told what
    to bring instead, naming the weights files inside it."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        found = _weights_files_in(path)
        if found:
            bring = f"give one of its weights files (with --arch NAME for bare weights): it holds {', '.join(found)}"
        else:
            bring = (f"give a weights file (.safetensors, .pt or .pth) with --arch NAME; it holds none "
                     f"({', '.join(_WEIGHT_SUFFIXES)})")
        raise CheckpointError(f"{path} is a folder, not a regular file: model folders (Hugging Face, timm) are not "
                              f"supported yet; {bring}")
    if not path.is_file():
        raise _unreadable(path, "not a regular file")
    if path.stat().st_size == 0:
        raise _unreadable(path, "empty file")


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
    if model.meta.arch == CUSTOM_ARCH:
        raise CheckpointError(
            "cannot save a 'custom' model: a checkpoint is weights plus the recipe to rebuild the network, and a "
            "wrapped module has none; build it under an architecture auditkit knows (a zoo name, any torchvision "
            "CNN, timm:NAME or package.module:factory)"
        )
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


# --------------------------------------------------------------------------- reading files


def _check_meta(path: Path, meta: Any) -> dict[str, Any]:
    """``meta`` if it is auditkit metadata this version understands; CheckpointError otherwise."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has auditkit metadata of the wrong type ({type(meta).__name__})")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format_version {version!r}; auditkit {__version__} reads version {FORMAT_VERSION}"
        )
    missing = [key for key in _REQUIRED_META if key not in meta]
    if missing:
        raise CheckpointError(f"{path} has incomplete auditkit metadata (no '{missing[0]}')")
    return meta


def _read_safetensors(path: Path, with_tensors: bool) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(auditkit metadata or None, tensors) of a safetensors file; tensors only when asked for."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            header = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()} if with_tensors else {}
    except (SafetensorError, OSError, ValueError) as err:
        raise _unreadable(path, err) from None
    if _META_KEY not in header:
        return None, tensors
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} has unreadable auditkit metadata ({_one_line(str(err))})") from None
    return _check_meta(path, meta), tensors


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """The object in a torch.save file (``_sniff`` found a torch zip or a pickle: garbage never reaches
    the unpickler), read with ``weights_only=True`` unless the caller trusts pickles."""
    try:
        with warnings.catch_warnings():
            # torch's notice about a plain pickle's protocol: noise beside the one line auditkit gives
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's safe unpickler refuses classes, functions and opcodes it does not implement.
        if not str(err).startswith("Weights only load failed"):
            raise _unreadable(path, err) from None
        if not trust_pickle:
            raise _pickle_refused(path) from None
    except Exception as err:  # the file's bytes decide what breaks: zip, EOF, decode errors alike
        raise _unreadable(path, err) from None

    warnings.warn(
        f"unpickling {path} because trust_pickle is on: this can run arbitrary code stored in the file",
        UserWarning,
        stacklevel=3,
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # e.g. a class the pickle names that cannot be imported here
        raise _unreadable(path, err) from None


def _torchscript_refused(path: Path) -> CheckpointError:
    return PickleRefused(
        "trust_pickle",
        f"is off and {path} is a TorchScript archive (torch.jit.save): loading it runs the code compiled into it. "
        "If you trust its author, turn it on (with --arch NAME its weights go into auditkit's NAME network, for "
        "every method); or bring the weights: torch.save(model.state_dict(), 'weights.pt').",
    )


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
    )
    return AuditModel(script, meta, min_input_size=1)


def _is_state_dict(obj: Any) -> bool:
    """A mapping of names to tensors, harmless non-tensor values beside them allowed (an EMA's step
    count, a version number), at least one tensor."""
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(k, str) for k in obj):
        return False
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    return tensors > 0 and all(isinstance(v, (torch.Tensor, int, float, str, bool, type(None))) for v in obj.values())


def _tensors_of(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def find_state_dict(payload: Any) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(the weights in a checkpoint payload, where they were) or (None, ""): the payload itself, or a
    state_dict under one of the keys training frameworks use, searched one level down too."""
    if _is_state_dict(payload):
        return _tensors_of(payload), "the file"
    if not isinstance(payload, Mapping):
        return None, ""
    for key in _WEIGHT_KEYS:
        value = payload.get(key)
        if _is_state_dict(value):
            return _tensors_of(value), f"'{key}'"
        if isinstance(value, nn.Module):
            return _tensors_of(value.state_dict()), f"'{key}' (a module)"
    for key, value in payload.items():  # e.g. {"checkpoint": {"state_dict": ...}}
        if isinstance(value, Mapping):
            inner, where = find_state_dict(value)
            if inner is not None:
                return inner, f"'{key}' → {where}"
    return None, ""


def align_keys(state: Mapping[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """The state_dict with training code's key prefixes removed (module., _orig_mod., model., net., …,
    nested in any order) wherever that makes a key one the network expects."""
    aligned: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = key
        while name not in expected:
            head, dot, rest = name.partition(".")
            if not dot or head not in _KEY_PREFIXES:
                break
            name = rest
        if name not in expected and "_orig_mod." in name:  # a torch.compile'd submodule's keys, inside
            name = ".".join(part for part in name.split(".") if part != "_orig_mod")
        aligned[name] = tensor
    return aligned


def describe_keys(state, limit: int = 6) -> str:
    """The file's top-level key names, for messages."""
    heads = list(dict.fromkeys(k.split(".")[0] for k in state))
    return ", ".join(heads[:limit]) + (", ..." if len(heads) > limit else "")


def _is_auditkit_payload(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == "auditkit"


def _no_weights_message(path: Path, payload: Any) -> str:
    if isinstance(payload, Mapping):
        keys = ", ".join(map(str, list(payload)[:10])) + (", ..." if len(payload) > 10 else "")
        return (f"{path} holds a dict with keys {keys}; none of them holds a state_dict (looked for "
                f"{', '.join(_WEIGHT_KEYS[:4])}, ... and one level down)")
    return f"{path} holds a {type(payload).__name__}, neither an auditkit checkpoint nor weights"


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The auditkit metadata of a checkpoint without building the model; {} for a bare state_dict.

    For safetensors only the header is read. Pickled files are refused as in
    :func:`load_checkpoint` without ``trust_pickle``.
    """
    path = Path(path)
    _check_readable_file(path)
    fmt = _format_of(path)
    if fmt == SAFETENSORS:
        meta, _ = _read_safetensors(path, with_tensors=False)
        return dict(meta or {})
    if fmt == TORCHSCRIPT:
        raise _torchscript_refused(path)
    payload = _torch_load(path, trust_pickle=False)
    if _is_auditkit_payload(payload):
        return dict(_check_meta(path, payload.get("meta")))
    if find_state_dict(payload)[0] is not None:
        return {}
    raise CheckpointError(_no_weights_message(path, payload))


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


def _infer_sizes(state: Mapping[str, torch.Tensor], conv: str | None, classifier: str | None) -> tuple[int | None, int | None]:
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
            "in_channels", f"and num_classes must be given: {path} holds a {type(net).__name__} whose sizes cannot be inferred"
        ) from None
    try:  # the presets a probe pass finds (none for a network without convolutional stages)
        from .presets import discover_presets_at, probe_sizes

        found = discover_presets_at(unwrap_compiled(net, inner=True), int(in_channels),
                                    probe_sizes(overrides["input_size"]))[0]
        tap_layers, gradcam = tuple(f"net.{n}" for n in found.tap_layers), f"net.{found.gradcam_layer}"
    except ModelError:
        tap_layers, gradcam = (), ""
    meta = ModelMeta(
        arch=CUSTOM_ARCH,
        num_classes=int(num_classes),
        in_channels=int(in_channels),
        input_size=tuple(_first_given(overrides["input_size"], _BARE_STATE_DICT_INPUT_SIZE)),
        mean=(0.0,) * int(in_channels),
        std=(1.0,) * int(in_channels),
        class_names=tuple(str(i) for i in range(int(num_classes))),
        target_layers=tap_layers,
        gradcam_layer=gradcam,
        normalization="assumed",
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
