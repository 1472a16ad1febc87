"""Reading checkpoint files without building a model: what a file is and what it holds.

A file is recognised by content, never by suffix (:func:`_sniff`: safetensors, a torch zip archive,
TorchScript, a legacy pickle; Git LFS pointers, HDF5, NumPy and GGUF files are named in one line).
Its auditkit metadata is checked (:func:`_check_meta`), its weights are found wherever training
frameworks keep them (:func:`find_state_dict`) and their keys aligned to a network's
(:func:`align_keys`). Unpickling only with ``trust_pickle`` (:func:`_torch_load`). Building the model
from what is read: :mod:`auditkit.models.checkpoint`.
"""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .._version import __version__
from ..errors import CheckpointError, ParameterError

# A model folder (Hugging Face or timm; auditkit/models/folders.py reads it) is a folder with this file.
CONFIG = "config.json"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder with a ``config.json`` (a Hugging Face or timm model folder)."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG).is_file()


def hub_id_message(path: str | Path) -> str | None:
    """The one line for a path that does not exist but reads like a hub id (``org/name``), else None."""
    text = str(path)
    if Path(text).exists() or text.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(text):
        return None
    return (f"{text} does not exist here; it reads like a Hugging Face hub id, and auditkit never downloads: "
            f"fetch it first (huggingface-cli download {text} --local-dir DIR) and give the folder DIR")

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


def file_format(path: str | Path) -> str:
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
        raise CheckpointError(hub_id_message(path) or f"{path}: no such file")
    if path.is_dir():
        found = _weights_files_in(path)
        if found:
            bring = f"give one of its weights files (with arch=NAME for bare weights): it holds {', '.join(found)}"
        else:
            bring = (f"give a weights file (.safetensors, .pt or .pth) with arch=NAME; it holds none "
                     f"({', '.join(_WEIGHT_SUFFIXES)})")
        raise CheckpointError(f"{path} is a folder, not a regular file, and no Hugging Face or timm model folder "
                              f"(it has no config.json); {bring}")
    if not path.is_file():
        raise _unreadable(path, "not a regular file")
    if path.stat().st_size == 0:
        raise _unreadable(path, "empty file")


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
        "If you trust its author, turn it on (with arch=NAME its weights go into auditkit's NAME network, for "
        "every method); or bring the weights: torch.save(model.state_dict(), 'weights.pt').",
    )


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


def read_file_meta(path: str | Path) -> dict[str, Any]:
    """The auditkit metadata of a checkpoint file without building the model; {} for a bare state_dict.

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
