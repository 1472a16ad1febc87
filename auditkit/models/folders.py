"""Model folders as users keep them on disk: Hugging Face ``transformers`` and timm.

    model = load_model("vit-pneumonia/")            # config.json + model.safetensors
    model.folder.kind, model.meta.head              # "hf", "binary"

A **Hugging Face** image-classification folder (``save_pretrained``: ``config.json`` with a
``model_type`` + ``model.safetensors`` or ``pytorch_model.bin``, sharded or not, and usually a
``preprocessor_config.json``) is built with ``AutoModelForImageClassification`` (ViT, DINOv2, Swin,
ConvNeXt, ResNet, SigLIP, ... whatever the installed transformers maps). A **timm** folder
(``timm.models.push_to_hf_hub`` / ``save_for_hf``: ``config.json`` with ``architecture``,
``num_classes``, ``pretrained_cfg`` and optionally ``model_args`` + the weights) is built with
``timm.create_model``. What is read, each overridable by the usual reading options:

* architecture: the transformers class (``hf:ViTForImageClassification``) or ``timm:NAME``;
* class names: ``id2label`` (HF; the default ``LABEL_k`` names count as none: the data's are
  used) or ``label_names`` (timm);
* head: HF ``problem_type`` with ``num_labels`` (see :func:`hf_head`): single-label → softmax, one
  label → binary (sigmoid), multi-label → multilabel, regression → refused; timm: one class →
  binary;
* input size and normalisation: ``preprocessor_config.json`` (``size``/``crop_size``,
  ``image_mean``/``image_std``, ``do_normalize``, ``do_rescale``), else ``config.json``'s
  ``image_size`` (HF); timm's ``pretrained_cfg`` ``input_size``, ``mean``, ``std``.

Safety: nothing is downloaded (``local_files_only`` and ``HF_HUB_OFFLINE`` semantics inside the
call, the environment restored after), weights only through safetensors or
``torch.load(weights_only=True)``, and a folder's own code is never run (``trust_remote_code`` is
never on: a folder whose ``config.json`` has an ``auto_map`` is refused in one line). A folder that
would need a download (no weights, a hub id instead of a path) is refused naming what is missing.
Every refusal is a :class:`~auditkit.errors.CheckpointError` of one line.

A repaired folder model is saved as a folder of the same kind (:func:`save_folder`): HF's
``save_pretrained`` (+ ``preprocessor_config.json``) or timm's ``save_for_hf`` layout, which
``from_pretrained`` / ``timm.create_model("local-dir:PATH", pretrained=True)`` load back.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from .normalization import Normalization, PRESETS, assumed_warning, parse_normalize, set_normalization
from .outputs import BINARY, MULTILABEL, SOFTMAX
from .checkpoint_files import CONFIG, _torch_load, find_state_dict, hub_id_message, is_model_folder  # noqa: F401
from .zoo import AuditModel, ModelMeta

HF, TIMM = "hf", "timm"
EXTRA = "auditkit[hf]"
PREPROCESSOR = "preprocessor_config.json"
# Weights files, preferred first (an index names the shards of a sharded save).
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_DEFAULT_LABEL = re.compile(r"LABEL_\d+")
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _refuse(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: {why}")


# --------------------------------------------------------------------------- what a folder is


@dataclass(frozen=True)
class ModelFolder:
    """What a model folder says about its model, read without building it."""

    kind: str  # HF or TIMM
    path: Path
    config: dict  # config.json as read
    architecture: str  # the transformers class name, or timm's architecture
    weights: tuple[str, ...]  # the weights files used (shards included)
    num_outputs: int  # the classifier's width
    in_channels: int
    head: str  # SOFTMAX, BINARY or MULTILABEL
    head_note: str  # why that head, in words
    class_names: tuple[str, ...] | None  # None: not recorded (the data's are used)
    input_size: tuple[int, int] | None  # None: not recorded (the data's is used)
    input_size_from: str = ""
    normalization: Normalization | None = None  # None: not recorded (assumed, with a warning)
    preprocessor: dict | None = None  # preprocessor_config.json as read

    @property
    def arch(self) -> str:
        return f"hf:{self.architecture}" if self.kind == HF else f"timm:{self.architecture}"

    def describe(self) -> str:
        """The folder in words, for ``auditkit inspect``'s format line."""
        what = "Hugging Face transformers" if self.kind == HF else "timm"
        size = f"; input size from {self.input_size_from}" if self.input_size_from else "; input size not recorded"
        return f"{what} model folder ({self.architecture}; {', '.join(self.weights)}); head: {self.head_note}{size}"

    def facts(self) -> dict[str, Any]:
        """What was read from where (JSON), for ``inspect``'s report."""
        return {"kind": self.kind, "architecture": self.architecture, "weights": list(self.weights),
                "head": self.head, "head_note": self.head_note,
                "class_names": list(self.class_names) if self.class_names else None,
                "input_size": list(self.input_size) if self.input_size else None,
                "input_size_from": self.input_size_from,
                "normalization": self.normalization.label if self.normalization else "not recorded"}


def _read_json(path: Path, file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as error:
        raise _refuse(path, f"{file.name} is not readable JSON ({str(error).splitlines()[0][:120]})") from None
    if not isinstance(value, dict):
        raise _refuse(path, f"{file.name} holds a {type(value).__name__}, not a JSON object")
    return value


def _weights(path: Path, names: tuple[str, ...], kind: str) -> tuple[str, ...]:
    """The weights files of the folder (an index's shards, each checked); CheckpointError naming what is missing."""
    for name in names:
        file = path / name
        if not file.is_file():
            continue
        if name.endswith(".index.json"):
            index = _read_json(path, file)
            shards = sorted(set((index.get("weight_map") or {}).values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if not shards or missing:
                raise _refuse(path, f"{name} names {len(shards)} weight shard(s) but {len(missing)} are missing "
                              f"(first: {missing[0] if missing else 'none listed'}); a download that did not finish? "
                              "auditkit never downloads: fetch the whole folder first")
            return (name, *shards)
        if file.stat().st_size < 200 and file.read_bytes().startswith(b"version https://git-lfs"):
            raise _refuse(path, f"{name} is a Git LFS pointer, not the weights: run `git lfs pull` in the folder")
        return (name,)
    stray = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    also = f" (it holds {', '.join(stray[:3])}, not a name {kind} saves)" if stray else ""
    raise _refuse(path, f"the {kind} model folder has {CONFIG} but no weights: none of {', '.join(names)}{also}; "
                  "auditkit never downloads: fetch the weights into the folder first")


def _positive_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _size_of(value: Any) -> tuple[int, int] | None:
    """(H, W) of an image_size / size / crop_size entry: an int, [H, W], or {"height", "width"} /
    {"shortest_edge"}; None for anything else."""
    if _positive_int(value):
        return int(value), int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_positive_int(v) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, dict):
        if _positive_int(value.get("height")) and _positive_int(value.get("width")):
            return int(value["height"]), int(value["width"])
        if _positive_int(value.get("shortest_edge")):
            return int(value["shortest_edge"]), int(value["shortest_edge"])
    return None


def _preprocessor_normalization(settings: dict) -> Normalization | None:
    """image_mean/image_std of a preprocessor_config.json, for images in [0, 1] (``do_rescale`` false:
    the model saw 0-255 pixels, so mean and std are divided by 255); do_normalize false: none."""
    scale = 1.0 if settings.get("do_rescale", True) is not False else 255.0
    if settings.get("do_normalize") is False:
        mean, std = PRESETS["none"]
        return Normalization(tuple(mean), tuple(s / scale for s in std), "checkpoint", f"{PREPROCESSOR} "
                             "(do_normalize false)")
    mean, std = settings.get("image_mean"), settings.get("image_std")
    try:
        mean = (float(mean),) if isinstance(mean, (int, float)) else tuple(float(v) for v in mean)
        std = (float(std),) if isinstance(std, (int, float)) else tuple(float(v) for v in std)
    except (TypeError, ValueError):
        return None
    if not mean or not std or min(std) <= 0:
        return None
    return Normalization(tuple(m / scale for m in mean), tuple(s / scale for s in std), "checkpoint", PREPROCESSOR)


def hf_head(path: Path, problem_type: Any, num_labels: int) -> tuple[str, str]:
    """(head, why) of a Hugging Face config. ``num_labels=1`` means regression to transformers unless
    ``problem_type`` says otherwise: single-label with one label, or no problem_type with one label,
    is read as binary (one sigmoid logit; the note says so), regression is refused."""
    if problem_type == "regression":
        raise _refuse(path, f"config.json says problem_type 'regression' ({num_labels} output(s)): a regression "
                      "model, not a classifier; auditkit audits classifiers (set problem_type to "
                      "'single_label_classification' if its one output is a binary logit)")
    if problem_type == "multi_label_classification":
        return MULTILABEL, f"problem_type multi_label_classification: {num_labels} independent sigmoids"
    if problem_type not in (None, "single_label_classification"):
        raise _refuse(path, f"config.json has an unknown problem_type {problem_type!r}")
    if num_labels == 1:
        if problem_type is None:
            return BINARY, ("num_labels 1 without problem_type (transformers would train it as regression): read "
                            "as binary, one sigmoid logit; set problem_type in config.json to say so")
        return BINARY, "problem_type single_label_classification with num_labels 1: binary, one sigmoid logit"
    return SOFTMAX, f"{problem_type or 'no problem_type'}: softmax over {num_labels} classes"


def _class_names(labels: Any, count: int) -> tuple[str, ...] | None:
    """Class names in index order from id2label ({"0": name}) or a list; None when absent or default."""
    if isinstance(labels, dict):
        try:
            by_index = {int(k): str(v) for k, v in labels.items()}
        except (TypeError, ValueError):
            return None
        names = tuple(by_index.get(k) for k in range(count))
    elif isinstance(labels, (list, tuple)):
        names = tuple(str(v) for v in labels)
    else:
        return None
    if len(names) != count or None in names or all(_DEFAULT_LABEL.fullmatch(n) for n in names):
        return None
    return names


def read_folder(path: str | Path) -> ModelFolder:
    """The :class:`ModelFolder` at ``path`` (no network is built); CheckpointError in one line for
    a folder auditkit cannot read safely (module docstring)."""
    path = Path(path)
    if not is_model_folder(path):
        raise _refuse(path, f"not a model folder (no {CONFIG})")
    config = _read_json(path, path / CONFIG)
    if "auto_map" in config or config.get("trust_remote_code"):
        code = sorted(p.name for p in path.glob("*.py"))
        mapped = ", ".join(sorted(config.get("auto_map") or {})) or "its classes"
        raise _refuse(path, f"config.json maps {mapped} to code shipped with the model"
                      f"{' (' + ', '.join(code[:3]) + ')' if code else ''}, which only trust_remote_code would run; "
                      "auditkit never runs a folder's code: load it in Python yourself and save its state_dict under "
                      "an architecture auditkit knows")
    preprocessor = _read_json(path, path / PREPROCESSOR) if (path / PREPROCESSOR).is_file() else None
    if "architecture" in config and "model_type" not in config:
        return _read_timm(path, config)
    if "model_type" in config:
        return _read_hf(path, config, preprocessor)
    raise _refuse(path, f"{CONFIG} is neither a Hugging Face model's (no model_type) nor a timm model's (no "
                  "architecture)")


def _transformers(path: Path):
    try:
        import transformers
    except ImportError:
        raise _refuse(path, f"a Hugging Face model folder needs transformers: pip install '{EXTRA}'") from None
    return transformers


def _read_hf(path: Path, config: dict, preprocessor: dict | None) -> ModelFolder:
    transformers = _transformers(path)
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES as classes

    model_type = config["model_type"]
    if model_type not in classes:
        raise _refuse(path, f"model_type {model_type!r} has no image-classification model in transformers "
                      f"{transformers.__version__} (AutoModelForImageClassification); auditkit reads image classifiers")
    weights = _weights(path, HF_WEIGHTS, "Hugging Face")
    labels = config.get("id2label")
    num_labels = len(labels) if isinstance(labels, dict) and labels else _positive_int(config.get("num_labels")) or 2
    head, note = hf_head(path, config.get("problem_type"), num_labels)
    vision = config.get("vision_config") if isinstance(config.get("vision_config"), dict) else {}
    in_channels = _positive_int(config.get("num_channels")) or _positive_int(vision.get("num_channels")) or 3
    size, size_from = None, ""
    for where, settings, keys in ((PREPROCESSOR, preprocessor or {}, ("crop_size", "size")),
                                  (CONFIG, config, ("image_size",)), (CONFIG, vision, ("image_size",))):
        for key in keys:
            if settings.get(key) is not None and (size := _size_of(settings[key])) is not None:
                size_from = f"{where} {key}"
                break
        if size is not None:
            break
    names = _class_names(labels, num_labels) if head != BINARY else None
    return ModelFolder(HF, path, config, classes[model_type], weights, num_labels, in_channels, head, note, names,
                       size, size_from, _preprocessor_normalization(preprocessor) if preprocessor else None,
                       preprocessor)


def _read_timm(path: Path, config: dict) -> ModelFolder:
    import timm

    architecture = str(config["architecture"])
    if not timm.is_model(architecture):
        raise _refuse(path, f"timm {timm.__version__} has no architecture {architecture!r}")
    weights = _weights(path, TIMM_WEIGHTS, "timm")
    pretrained = config.get("pretrained_cfg") if isinstance(config.get("pretrained_cfg"), dict) else {}
    num_classes = _positive_int(config.get("num_classes")) or _positive_int(pretrained.get("num_classes"))
    if num_classes is None:
        raise _refuse(path, "config.json states no num_classes: a timm folder without a classifier")
    args = config.get("model_args") if isinstance(config.get("model_args"), dict) else {}
    input_size = pretrained.get("input_size")
    in_channels = _positive_int(args.get("in_chans")) or (
        _positive_int(input_size[0]) if isinstance(input_size, (list, tuple)) and len(input_size) == 3 else None) or 3
    size = _size_of(list(input_size[1:])) if isinstance(input_size, (list, tuple)) and len(input_size) == 3 else None
    head, note = (BINARY, "num_classes 1: binary, one sigmoid logit") if num_classes == 1 else \
        (SOFTMAX, f"softmax over {num_classes} classes")
    mean, std = pretrained.get("mean"), pretrained.get("std")
    normalization = None
    if mean is not None and std is not None:
        try:
            normalization = Normalization(tuple(float(v) for v in mean), tuple(float(v) for v in std), "checkpoint",
                                          "timm pretrained_cfg")
        except (TypeError, ValueError):
            normalization = None
    names = _class_names(config.get("label_names"), num_classes) if head != BINARY else None
    return ModelFolder(TIMM, path, config, architecture, weights, num_classes, in_channels, head, note, names, size,
                       "timm pretrained_cfg input_size" if size else "", normalization, None)


# --------------------------------------------------------------------------- building the network


@contextlib.contextmanager
def offline():
    """HF_HUB_OFFLINE semantics for the duration: the offline environment variables set and the flags
    huggingface_hub and transformers read at import time turned on; everything restored after."""
    saved = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    os.environ.update(_OFFLINE_ENV)
    flags: list[tuple[Any, str, Any]] = []
    for module_name, attribute in (("huggingface_hub.constants", "HF_HUB_OFFLINE"),
                                   ("transformers.utils.hub", "_is_offline_mode")):
        try:
            import importlib

            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, attribute):
            flags.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, True)
    try:
        yield
    finally:
        for module, attribute, value in flags:
            setattr(module, attribute, value)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class HFImageClassifier(nn.Module):
    """A transformers image classifier as auditkit's network: ``forward(pixels)`` returns the model's
    output object (its ``logits`` field is the logits, auditkit/models/outputs.py). Vision
    transformers are asked to interpolate their position embeddings, so they also run at the probe's
    second size (token maps; at their own size the result is unchanged)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model
        import inspect

        self.interpolates = "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        # LRP by the rules of auditkit/explain/lrp/attention.py (epsilon for linear layers and convolutions,
        # gradient form): transformers' forwards branch on their inputs, which torch.fx cannot trace.
        self.lrp_by_rules = True

    def forward(self, pixel_values: torch.Tensor):
        if self.interpolates:
            return self.hf(pixel_values=pixel_values, interpolate_pos_encoding=True)
        return self.hf(pixel_values=pixel_values)


def _hf_network(folder: ModelFolder, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """The transformers model of ``folder``: from its own weights (from_pretrained, local files only,
    safetensors or weights_only), or, given ``state_dict``, from its config and those weights."""
    transformers = _transformers(folder.path)
    from transformers import CONFIG_MAPPING, AutoModelForImageClassification

    with offline(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        try:
            if state_dict is not None:
                config = CONFIG_MAPPING[folder.config["model_type"]].from_dict(folder.config)
                model = AutoModelForImageClassification.from_config(config, trust_remote_code=False)
                wrapped = HFImageClassifier(model)
                wrapped.load_state_dict(state_dict, strict=True)
                return wrapped
            model, info = AutoModelForImageClassification.from_pretrained(
                str(folder.path), local_files_only=True, trust_remote_code=False, weights_only=True,
                use_safetensors=folder.weights[0].startswith("model.safetensors"), output_loading_info=True)
        except CheckpointError:
            raise
        except Exception as error:  # transformers' own refusals: one line
            _refuse_pickled_weights(folder)  # its weights_only refusal, said plainly
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise _refuse(folder.path, f"transformers cannot build it ({type(error).__name__}: {first})") from None
        finally:
            transformers.logging.set_verbosity_warning()
    missing = list(info.get("missing_keys") or []) + [str(m[0]) if isinstance(m, tuple) else str(m)
                                                       for m in info.get("mismatched_keys") or []]
    if missing:
        raise _refuse(folder.path, f"its weights leave {len(missing)} parameter(s) of {folder.architecture} unset or "
                      f"mis-sized (first: {missing[0]}), e.g. a backbone without its trained classification head; "
                      "auditkit will not audit randomly initialised layers")
    return HFImageClassifier(model)


def _refuse_pickled_weights(folder: ModelFolder) -> None:
    """CheckpointError when one of the folder's .bin weights files holds more than tensors (only
    unpickling could read it: auditkit never does for a folder)."""
    import pickle

    for name in folder.weights:
        if not name.endswith(".bin"):
            continue
        try:
            torch.load(folder.path / name, map_location="meta", weights_only=True)
        except pickle.UnpicklingError:
            raise _refuse(folder.path, f"{name} holds pickled Python objects besides tensors; auditkit reads a "
                          "folder's weights only with torch.load(weights_only=True) or safetensors and never unpickles "
                          "them: save them with save_pretrained(safe_serialization=True)") from None
        except Exception:  # noqa: BLE001 - damage of another kind: transformers' own line says it
            continue


def _timm_network(folder: ModelFolder, state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    import timm

    args = dict(folder.config.get("model_args") or {})
    args.update(num_classes=folder.num_outputs, in_chans=folder.in_channels)
    try:
        net = timm.create_model(folder.architecture, pretrained=False, **args)
    except Exception as error:  # noqa: BLE001 - timm's refusal of the folder's arguments: one line
        raise _refuse(folder.path, f"timm cannot build {folder.architecture} with its model_args "
                      f"({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''})") from None
    if state_dict is None:
        state_dict = _read_weights(folder)
    try:
        net.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        detail = str(error).split("\n\t")[1][:200] if "\n\t" in str(error) else str(error)[:200]
        raise _refuse(folder.path, f"its weights do not fit timm's {folder.architecture} ({detail.strip()})") from None
    return net


def _read_weights(folder: ModelFolder) -> dict[str, torch.Tensor]:
    """The state_dict of a timm folder: safetensors, or torch.load(weights_only=True) (never unpickling)."""
    file = folder.path / folder.weights[0]
    if file.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(file), device="cpu")
    _refuse_pickled_weights(folder)
    payload = _torch_load(file, trust_pickle=False)
    state, _ = find_state_dict(payload)
    if state is None:
        raise _refuse(folder.path, f"{file.name} holds no state_dict")
    return state


# --------------------------------------------------------------------------- presets


def _hf_presets(net: nn.Module, in_channels: int, size: tuple[int, int]) -> tuple[tuple[str, ...], str]:
    """(TAP layers, Grad-CAM layer) of a transformers network, names inside ``net``. ViT-like encoders
    (``*.encoder.layer`` or ``*.encoder.layers`` of blocks: ViT, DINOv2, SigLIP): blocks ceil(n/2),
    ceil(3n/4) and n, Grad-CAM the last block's first LayerNorm; Swin-like (``*.encoder.layers`` of
    stages): each stage's patch merging and the final LayerNorm; CNNs with ``*.encoder.stages`` (ResNet,
    ConvNeXt): each stage's output, Grad-CAM the last; anything else: auditkit's probe pass."""
    modules = dict(net.named_modules())
    for name, module in modules.items():
        if not (isinstance(module, nn.ModuleList) and len(module)):
            continue
        staged = all(hasattr(stage, "blocks") for stage in module)  # Swin's stages hold blocks; ViT's layers do not
        if name.endswith(("encoder.layer", "encoder.layers")) and not staged:  # ViT, DINOv2, SigLIP's vision tower
            count = len(module)
            picks = sorted({-(-count // 2) - 1, -(-3 * count // 4) - 1, count - 1})
            last = f"{name}.{count - 1}"
            norm = next((f"{last}.{n}" for n, m in module[count - 1].named_modules() if isinstance(m, nn.LayerNorm)),
                        last)
            return tuple(f"{name}.{i}" for i in picks), norm
        if name.endswith("encoder.layers"):
            base = name[: -len("encoder.layers")]
            merges = [f"{name}.{i}.downsample" for i, stage in enumerate(module)
                      if isinstance(getattr(stage, "downsample", None), nn.Module)]
            final = next((f"{base}{n}" for n in ("layernorm", "post_layernorm") if f"{base}{n}" in modules), None)
            if final is None and not merges:
                break
            found = (*merges, final) if final else tuple(merges)
            return found, found[-1]
        if name.endswith("encoder.stages"):
            # ResNet, ConvNeXt: each stage's output (N, C, h, w); Grad-CAM the last stage's
            stages = tuple(f"{name}.{i}" for i in range(len(module)))
            return stages, stages[-1]
    from .presets import discover_presets_at, probe_sizes

    found = discover_presets_at(net, in_channels, probe_sizes(size))[0]
    return tuple(found.tap_layers), found.gradcam_layer


def _presets(folder: ModelFolder, net: nn.Module, in_channels: int, size: tuple[int, int]):
    from ..errors import ModelError

    try:
        if folder.kind == HF:
            return _hf_presets(net, in_channels, size)
        from .presets import discover_presets_at, probe_sizes

        found = discover_presets_at(net, in_channels, probe_sizes(size))[0]
        return tuple(found.tap_layers), found.gradcam_layer
    except ModelError:
        return (), ""


# --------------------------------------------------------------------------- loading


_DEFAULT_SIZE = (224, 224)


def folder_model(folder: ModelFolder, *, input_size: tuple[int, int] | None = None, normalize: Any = None,
                 state_dict: dict[str, torch.Tensor] | None = None, record: dict | None = None) -> AuditModel:
    """The :class:`AuditModel` of ``folder`` (its own weights, or ``state_dict`` for the network the
    folder's config describes). ``input_size`` and ``normalize`` override the folder's; ``record``: the
    metadata of an auditkit checkpoint of this model (its class names, sizes and normalisation win)."""
    net = (_hf_network if folder.kind == HF else _timm_network)(folder, state_dict)
    net.eval()
    size = tuple(input_size or (record or {}).get("input_size") or folder.input_size or _DEFAULT_SIZE)
    in_channels = folder.in_channels
    tap, gradcam = _presets(folder, net, in_channels, size)
    head = (record or {}).get("head") or folder.head
    classes = 2 if head == BINARY else folder.num_outputs
    names = tuple((record or {}).get("class_names") or ()) or folder.class_names
    meta = ModelMeta(
        arch=folder.arch, num_classes=classes, in_channels=in_channels, input_size=(int(size[0]), int(size[1])),
        mean=(0.5,) * in_channels, std=(0.5,) * in_channels,
        class_names=names if names and len(names) == classes else tuple(str(i) for i in range(classes)),
        target_layers=tuple(f"net.{t}" for t in tap), gradcam_layer=f"net.{gradcam}" if gradcam else "",
        normalization="assumed", head=head)
    model = AuditModel(net, meta, min_input_size=1)
    model.folder = folder
    if folder.kind == HF and folder.head == BINARY and folder.config.get("problem_type") is None and not record:
        warnings.warn(f"{folder.path.name}: {folder.head_note}", UserWarning, stacklevel=3)
    adopt = []
    if not (names and len(names) == classes):
        adopt.append("class_names")
    if input_size is None and not (record or {}).get("input_size") and folder.input_size is None:
        adopt.append("input_size")
    model.adopt_from_data = tuple(adopt)
    chosen = parse_normalize(normalize, in_channels)
    if chosen is None and record and record.get("mean") and record.get("std"):
        chosen = Normalization(tuple(record["mean"]), tuple(record["std"]), "checkpoint",
                               record.get("normalization", "").partition(": ")[2])
    if chosen is None:
        chosen = folder.normalization
    if chosen is not None:
        set_normalization(model, chosen)
    else:
        warnings.warn(assumed_warning(model, folder.path.name, f"the folder has no {PREPROCESSOR} and its "
                                      "config no mean/std"), stacklevel=3)
    return model


def load_folder(path: str | Path, *, input_size: tuple[int, int] | None = None, normalize: Any = None,
                map_location: str | torch.device = "cpu") -> AuditModel:
    """The AuditModel of the model folder at ``path``, in eval mode (module docstring)."""
    return folder_model(read_folder(path), input_size=input_size, normalize=normalize).to(map_location).eval()


def folder_record(model: AuditModel) -> dict | None:
    """What an auditkit checkpoint of a folder model stores to rebuild its network (the folder's kind and
    config), None for other models."""
    folder = getattr(model, "folder", None)
    if folder is None:
        return None
    return {"kind": folder.kind, "architecture": folder.architecture, "config": folder.config,
            "preprocessor": folder.preprocessor, "source": str(folder.path)}


def model_from_record(path: Path, record: dict, meta: dict, state_dict: dict[str, torch.Tensor],
                      overrides: dict[str, Any]) -> AuditModel:
    """An auditkit checkpoint of a folder model back as an AuditModel: the network from the stored
    config, the weights from the file, the metadata from the file (``overrides`` win)."""
    kind = record.get("kind")
    config = record.get("config")
    if kind not in (HF, TIMM) or not isinstance(config, dict):
        raise CheckpointError(f"{path} has a model-folder record auditkit cannot read (kind {kind!r})")
    head = meta.get("head") or SOFTMAX
    num_outputs = 1 if head == BINARY else int(meta["num_classes"])
    folder = ModelFolder(kind, Path(record.get("source") or path), config, str(record.get("architecture")),
                         (path.name,), num_outputs, int(meta["in_channels"]), head, "auditkit checkpoint",
                         tuple(meta["class_names"]), tuple(meta["input_size"]), "auditkit checkpoint", None,
                         record.get("preprocessor"))
    state = {key.removeprefix("net."): tensor for key, tensor in state_dict.items()}
    try:
        model = folder_model(folder, input_size=overrides.get("input_size"), state_dict=state, record=meta)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit its recorded {folder.arch} "
                              f"({str(error).splitlines()[0][:160]})") from None
    model.adopt_from_data = ()
    model.meta = replace(model.meta, normalization=meta.get("normalization") or "checkpoint")
    return model


# --------------------------------------------------------------------------- saving


def _replace_folder(out: Path, write, overwrite: bool) -> Path:
    """Writes a folder with ``write(tmp)`` and moves it to ``out`` in one rename; an existing ``out`` is
    replaced only with ``overwrite`` and only when it is empty or a model folder (never another folder)."""
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists")
        if not out.is_dir() or (any(out.iterdir()) and not is_model_folder(out)):
            raise CheckpointError(f"{out} exists and is not a model folder: auditkit will not replace it; choose a "
                                  "new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _labels(model: AuditModel) -> dict[int, str] | None:
    names = model.meta.class_names
    return None if "class_names" in getattr(model, "adopt_from_data", ()) else dict(enumerate(names))


AUDITKIT_RECORD = "auditkit.json"  # what auditkit adds to a folder it writes (the repair's summary); loaders ignore it


def save_folder(model: AuditModel, out: str | Path, *, overwrite: bool = False, extra: dict | None = None) -> Path:
    """``model`` (loaded from a model folder) as a folder of the same kind at ``out``: HF's
    ``save_pretrained`` with its class names, head and a ``preprocessor_config.json`` of its input size
    and normalisation; timm's ``save_for_hf`` layout (safetensors) with its label names and
    ``pretrained_cfg`` mean, std and input size. ``from_pretrained`` / timm load it back."""
    folder = getattr(model, "folder", None)
    if folder is None:
        raise CheckpointError("only a model loaded from a model folder can be saved as one; save a checkpoint file")
    meta = model.meta
    net = model.net
    labels = _labels(model)

    def write_hf(tmp: Path) -> None:
        hf = net.hf
        config = hf.config
        if labels is not None and meta.head != BINARY:
            config.id2label = {int(k): v for k, v in labels.items()}
            config.label2id = {v: int(k) for k, v in labels.items()}
        if meta.head == MULTILABEL:
            config.problem_type = "multi_label_classification"
        elif meta.head == BINARY:
            config.problem_type = "single_label_classification"
        with offline():
            hf.save_pretrained(str(tmp), safe_serialization=True)
        settings = dict(folder.preprocessor or {})
        settings.update(do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(meta.mean),
                        image_std=list(meta.std))
        settings.setdefault("image_processor_type", "ViTImageProcessor")
        height, width = meta.input_size
        if "crop_size" in settings:
            settings["crop_size"] = {"height": height, "width": width}
        settings["size"] = {"height": height, "width": width} if not isinstance(settings.get("size"), dict) or \
            "shortest_edge" not in settings["size"] else {"shortest_edge": min(height, width)}
        (tmp / PREPROCESSOR).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    def write_timm(tmp: Path) -> None:
        from timm.models import _hub

        model_config = {"label_names": list(labels.values())} if labels is not None and meta.head != BINARY else {}
        data_config = {"mean": tuple(meta.mean), "std": tuple(meta.std),
                       "input_size": (meta.in_channels, *meta.input_size)}
        with offline(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _hub.save_for_hf(net, str(tmp), model_config=model_config, safe_serialization=True,
                             data_config=data_config)

    def write(tmp: Path) -> None:
        (write_hf if folder.kind == HF else write_timm)(tmp)
        if extra:
            from .._json import dumps

            (tmp / AUDITKIT_RECORD).write_text(dumps(dict(extra), indent=2, default=str) + "\n", encoding="utf-8")

    return _replace_folder(Path(out), write, overwrite)


def folder_format(path: str | Path) -> str:
    """What the model folder at ``path`` is, in words (``inspect``'s format line)."""
    return read_folder(path).describe()


__all__ = ["EXTRA", "HF", "TIMM", "HFImageClassifier", "ModelFolder", "folder_format", "folder_model", "folder_record",
           "hf_head", "hub_id_message", "is_model_folder", "load_folder", "model_from_record", "offline", "read_folder",
           "save_folder"]
