"""A model's input normalisation: where its mean and std come from, and a check that they fit the data.

An :class:`~auditkit.models.AuditModel` takes images in [0, 1] and normalises them with
``meta.mean``/``meta.std`` before the network sees them. Weights trained on inputs normalised one
way and fed inputs normalised another way still run, and answer wrongly: the torchvision recipe's
ImageNet statistics read as 0.5/0.5 turn a perfect model into a coin toss. So the normalisation is
never guessed silently. Its source, in order of precedence:

1. ``"option"``: the caller's choice (``normalize=`` of :func:`~auditkit.models.load_checkpoint`,
   ``mean``/``std`` of :func:`~auditkit.models.build_model`).
2. ``"checkpoint"``: what the file records: auditkit metadata, a timm ``pretrained_cfg``/``default_cfg``
   (in the payload or on a pickled timm module), timm training arguments (``args.mean``/``args.std``,
   else the defaults timm's ``train.py`` used for ``args.model``), ``mean``/``std`` saved beside the weights
   or in Lightning's ``hyper_parameters``, or a Hugging Face ``preprocessor_config.json`` in the
   checkpoint's folder.
3. ``"training data"``: the training images' statistics (what `auditkit train` stores by default);
   ``"default"``: a new model built without mean/std (0.5/0.5): it will be trained with them.
4. ``"assumed"``: nothing recorded and nothing given: 0.5/0.5 for weights
   (:data:`~auditkit.models.zoo.DEFAULT_MEAN`), 0/1 for a pickled module. Loading warns
   (:class:`NormalizationWarning`), and :func:`check_assumed_normalization` compares the assumption
   with the common alternatives on a sample of the data.

``ModelMeta.normalization`` holds the source word, followed by ``": detail"`` where the record was
found (``"checkpoint: timm pretrained_cfg"``).
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ParameterError

#: Named normalisations, (mean, std) for RGB. ``inception`` is 0.5/0.5 (timm's name for it, and
#: auditkit's assumption for bare weights); ``none`` passes [0, 1] pixels unchanged.
PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
#: What ``check_assumed_normalization`` tries besides the assumption: the recipes people use most.
CANDIDATES = ("imagenet", "none", "inception")
SOURCES = ("option", "checkpoint", "training data", "default", "assumed")
SYNTAX = ("imagenet, inception (0.5/0.5), clip, none (0/1) or MEAN/STD, e.g. 0.485,0.456,0.406/0.229,0.224,0.225 "
          "or 0.5/0.25")


class NormalizationWarning(UserWarning):
    """A normalisation auditkit had to assume, or one that looks wrong for the data.

    ``text`` holds ``{advice}`` where the fix goes: in Python ``give normalize='imagenet'``;
    :meth:`naming` words it with a command-line flag instead (the CLI prints ``pass --normalize imagenet``).
    """

    def __init__(self, text: str, value: str, parameter: str = "normalize") -> None:
        self.text, self.value, self.parameter = text, value, parameter
        super().__init__(text.replace("{advice}", f"give {parameter}={value!r}"))

    def naming(self, flag: str) -> str:
        """The message with the advice as a command-line flag."""
        return self.text.replace("{advice}", f"pass {flag} {self.value}")


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` and ``std`` (one value each per input channel) and where they come from.

    ``source`` is one of :data:`SOURCES`; ``detail`` says where exactly (e.g. "timm pretrained_cfg").
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    detail: str = ""

    @property
    def label(self) -> str:
        """``source`` or ``"source: detail"``: the value of ``ModelMeta.normalization``."""
        return f"{self.source}: {self.detail}" if self.detail else self.source

    def for_channels(self, in_channels: int, what: str = "normalize") -> Normalization:
        """The same normalisation with one value per channel of an ``in_channels`` model.

        A single value is repeated; three (RGB) values for another channel count become their
        average (a greyscale model trained on ImageNet's statistics uses the mean over channels).
        Other counts that do not fit raise ParameterError(``what``).
        """
        mean, std = _fit(self.mean, in_channels, what, "mean"), _fit(self.std, in_channels, what, "std")
        return replace(self, mean=mean, std=std)


def _fit(values: tuple[float, ...], in_channels: int, what: str, name: str) -> tuple[float, ...]:
    if len(values) == in_channels:
        return values
    if len(values) == 1:
        return values * in_channels
    if len(values) == 3:
        average = sum(values) / len(values)
        return (round(average, 6),) * in_channels
    raise ParameterError(what, f"has {len(values)} {name} value(s) but the model has {in_channels} input channel(s)")


def _numbers(values: Any, what: str, name: str) -> tuple[float, ...]:
    """A scalar or a sequence of finite numbers as a tuple of floats; ParameterError(``what``) otherwise."""
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        values = (values,)
    elif isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise ParameterError(what, f"needs {name} as a number or a list of numbers; got {values!r}")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ParameterError(what, f"needs {name} as numbers; got {values!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ParameterError(what, f"has a {name} that is not finite: {out}")
    if name == "std" and min(out) <= 0:
        raise ParameterError(what, f"needs a positive std; got {out}")
    return out


def parse_normalize(spec: Any, in_channels: int, *, what: str = "normalize") -> Normalization | None:
    """The normalisation ``spec`` names, one value per channel of an ``in_channels`` model, source "option".

    ``spec``: None (not given: returns None); a preset name (:data:`PRESETS`, any case); the text
    ``"MEAN/STD"`` with comma-separated numbers on each side, one per channel or one for all
    (``"0.485,0.456,0.406/0.229,0.224,0.225"``, ``"0.5/0.25"``); a ``(mean, std)`` pair or a mapping
    with keys ``mean`` and ``std``; a :class:`Normalization`. Anything else, a std <= 0 or a count
    that fits no channel count raise ParameterError(``what``).
    """
    if spec is None:
        return None
    if isinstance(spec, Normalization):
        return spec.for_channels(in_channels, what)
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in PRESETS:
            mean, std = PRESETS[text]
            return Normalization(mean, std, "option", text).for_channels(in_channels, what)
        left, slash, right = text.partition("/")
        if not slash or not left or not right or "/" in right:
            raise ParameterError(what, f"must be {SYNTAX}; got {spec!r}")
        try:
            mean = tuple(float(v) for v in left.split(","))
            std = tuple(float(v) for v in right.split(","))
        except ValueError:
            raise ParameterError(what, f"must be {SYNTAX}; got {spec!r}") from None
    elif isinstance(spec, Mapping):
        if "mean" not in spec or "std" not in spec:
            raise ParameterError(what, f"as a mapping needs keys 'mean' and 'std'; got {', '.join(map(str, spec))}")
        mean, std = spec["mean"], spec["std"]
    elif isinstance(spec, Sequence) and len(spec) == 2:
        mean, std = spec
    else:
        raise ParameterError(what, f"must be {SYNTAX}, a (mean, std) pair or a Normalization; got {spec!r}")
    mean, std = _numbers(mean, what, "mean"), _numbers(std, what, "std")
    return Normalization(mean, std, "option").for_channels(in_channels, what)


def _short(values: Sequence[float]) -> str:
    values = [round(float(v), 4) for v in values]
    if len(set(values)) == 1:
        return f"{values[0]:g}"
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _describe(mean: Sequence[float], std: Sequence[float]) -> str:
    """``mean 0.5 std 0.5`` (one value when every channel has the same)."""
    return f"mean {_short(mean)} std {_short(std)}"


def describe(model_or_meta: Any) -> str:
    """One phrase for people: ``mean (0.485, 0.456, 0.406) std (…) (from the checkpoint: timm pretrained_cfg)``."""
    meta = getattr(model_or_meta, "meta", model_or_meta)
    source = getattr(meta, "normalization", "") or "not recorded"
    word, _, detail = source.partition(": ")
    origin = {"option": "chosen", "checkpoint": "from the checkpoint", "training data": "the training images'",
              "default": "auditkit's default", "assumed": "ASSUMED"}.get(word, word)
    return f"{_describe(meta.mean, meta.std)} ({origin}{': ' + detail if detail else ''})"


# --------------------------------------------------------------------------- records in files


def _mean_std_of(holder: Any) -> tuple[Any, Any]:
    """(mean, std) of a dict or an object with those keys/attributes, (None, None) if absent."""
    if isinstance(holder, Mapping):
        return holder.get("mean"), holder.get("std")
    return getattr(holder, "mean", None), getattr(holder, "std", None)


def _record(mean: Any, std: Any, detail: str) -> Normalization | None:
    """A "checkpoint" Normalization of numbers found in a file; None when they are absent or not numbers
    (a record auditkit cannot read is no record: loading then warns that it assumed one)."""
    if mean is None or std is None:
        return None
    try:
        return Normalization(_numbers(mean, "record", "mean"), _numbers(std, "record", "std"), "checkpoint", detail)
    except ParameterError:
        return None


def _timm_default(model_name: Any) -> Normalization | None:
    """What timm's train.py normalised with when no --mean/--std was given: the model's pretrained_cfg,
    else ImageNet's (timm.data.resolve_data_config's default). None if ``model_name`` is no timm model."""
    if not isinstance(model_name, str) or not model_name:
        return None
    try:
        import timm

        if not timm.is_model(model_name):
            return None
        cfg = timm.models.get_pretrained_cfg(model_name)
    except Exception:  # noqa: BLE001 - any timm version quirk: no record rather than a crash
        return None
    found = _record(*_mean_std_of(cfg), f"timm's default for {model_name}") if cfg is not None else None
    return found or Normalization(*PRESETS["imagenet"], "checkpoint", f"timm's default for {model_name}")


# Keys under which training code keeps its settings (timm: args; Lightning: hyper_parameters).
_SETTINGS_KEYS = ("hyper_parameters", "hparams", "config", "cfg", "args", "normalization", "normalize")


def recorded_normalization(payload: Any) -> Normalization | None:
    """The normalisation a checkpoint payload records, source "checkpoint"; None when it records none.

    Looks at (first found wins): a module's ``pretrained_cfg``/``default_cfg`` attribute (timm models);
    the keys ``pretrained_cfg``/``default_cfg``; ``mean`` and ``std`` at the top level; the settings
    under ``hyper_parameters``, ``hparams``, ``config``, ``cfg``, ``args`` (a dict or an argparse
    Namespace) or ``normalization``; and for a timm training checkpoint (``args`` with ``model``) whose
    args give no mean, timm's defaults for that model. Auditkit's own metadata is read elsewhere.
    """
    if isinstance(payload, torch.nn.Module):
        for attribute in ("pretrained_cfg", "default_cfg"):
            cfg = getattr(payload, attribute, None)
            if cfg is not None:
                found = _record(*_mean_std_of(cfg), f"the module's {attribute}")
                if found is not None:
                    return found
        return None
    if not isinstance(payload, Mapping):
        return None
    for key in ("pretrained_cfg", "default_cfg"):
        if payload.get(key) is not None:
            found = _record(*_mean_std_of(payload[key]), f"'{key}'")
            if found is not None:
                return found
    mean, std = payload.get("mean"), payload.get("std")
    if not isinstance(mean, torch.Tensor) and not isinstance(std, torch.Tensor):
        # (tensors named mean/std beside the weights are the network's own buffers, not a record)
        found = _record(mean, std, "'mean' and 'std'")
        if found is not None:
            return found
    for key in _SETTINGS_KEYS:
        settings = payload.get(key)
        if settings is None or isinstance(settings, (str, numbers.Number, torch.Tensor)):
            continue
        found = _record(*_mean_std_of(settings), f"'{key}'")
        if found is not None:
            return found
    args = payload.get("args")
    model_name = getattr(args, "model", None) if not isinstance(args, Mapping) else args.get("model")
    if args is not None and model_name is not None:  # a timm training checkpoint with the default statistics
        found = _timm_default(model_name)
        if found is not None:
            return replace(found, detail=f"timm training args (no mean given: {found.detail})")
    return None


def preprocessor_normalization(checkpoint: str | Path) -> Normalization | None:
    """The normalisation in a Hugging Face ``preprocessor_config.json`` beside ``checkpoint``, None if
    there is none (or it cannot be read). ``do_normalize: false`` means no normalisation (0/1)."""
    config = Path(checkpoint).parent / "preprocessor_config.json"
    if not config.is_file():
        return None
    try:
        settings = json.loads(config.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None
    if not isinstance(settings, Mapping):
        return None
    if settings.get("do_normalize") is False:
        return Normalization(*PRESETS["none"], "checkpoint", f"{config.name} (do_normalize false)")
    return _record(settings.get("image_mean"), settings.get("image_std"), config.name)


def assumed_warning(model: Any, where: str, reason: str = "the file records none") -> NormalizationWarning:
    """The warning that ``model``'s normalisation was assumed for the file ``where`` (``reason``: why)."""
    meta = model.meta
    return NormalizationWarning(
        f"assumed input normalisation {_describe(meta.mean, meta.std)} for {where} ({reason}); "
        "for a model trained with ImageNet statistics (the torchvision recipe) {advice}", "imagenet")


# --------------------------------------------------------------------------- applying


def set_normalization(model: Any, normalization: Normalization) -> None:
    """Makes ``model`` (an AuditModel) normalise with ``normalization``: its meta (mean, std, source)
    and its mean/std buffers, on the buffers' device, fitted to ``model.meta.in_channels`` (see
    :meth:`Normalization.for_channels`)."""
    normalization = normalization.for_channels(model.meta.in_channels)
    model.meta = replace(model.meta, mean=normalization.mean, std=normalization.std, normalization=normalization.label)
    for name, values in (("mean", normalization.mean), ("std", normalization.std)):
        buffer = getattr(model, name)
        setattr(model, name, torch.tensor(values, dtype=buffer.dtype, device=buffer.device).view(1, -1, 1, 1))


def is_assumed(model: Any) -> bool:
    """Whether ``model``'s normalisation was assumed (nothing recorded or given)."""
    meta = getattr(model, "meta", model)
    return getattr(meta, "normalization", "").partition(":")[0] == "assumed"


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True)
class NormalizationCheck:
    """What :func:`check_normalization` measured on a sample of ``samples`` images.

    ``accuracy`` maps "current" (the model's own normalisation) and each candidate tried (a
    :data:`PRESETS` name) to the accuracy in [0, 1]; ``chance`` is the share of the most frequent
    class in the sample; ``suggestion`` is the candidate that fits much better, None when the
    current normalisation looks right (or nothing beats it clearly).
    """

    samples: int
    chance: float
    accuracy: dict[str, float]
    suggestion: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "chance": self.chance, "accuracy": dict(self.accuracy),
                "suggestion": self.suggestion}


#: Fewer images than this say too little about accuracy: no check.
MIN_CHECK_SAMPLES = 16


def _sample(dataset: Any, samples: int) -> list[int]:
    """Up to ``samples`` indices spread evenly over the dataset (deterministic)."""
    n = len(dataset)
    if n <= samples:
        return list(range(n))
    return sorted({int(round(k * (n - 1) / (samples - 1))) for k in range(samples)})


#: Images the check looks at, at most: on an accelerator, and on the CPU (where a large network's
#: forward passes cost seconds per hundred images; 64 still tell 0.5 from 1.0 by eight standard errors).
CHECK_SAMPLES = {"accelerator": 256, "cpu": 64}


def _device_of(model: Any) -> torch.device:
    tensor = next(iter(model.buffers()), None)
    if tensor is None:
        tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


@torch.no_grad()
def check_normalization(model: Any, dataset: Any, *, samples: int | None = None, batch_size: int = 64,
                        candidates: Sequence[str] = CANDIDATES) -> NormalizationCheck | None:
    """Accuracy of ``model`` on up to ``samples`` images of ``dataset`` (default :data:`CHECK_SAMPLES`
    for the model's device) with its own normalisation and, when that is near chance, with each of
    ``candidates``. None when the data has fewer than :data:`MIN_CHECK_SAMPLES` images.

    ``dataset`` yields images in [0, 1] in the model's format (channels, size: see
    ``auditkit.training.align_dataset_to_model``). Near chance: accuracy at most chance + (1 - chance)/3,
    where chance is the share of the most frequent class. A candidate is suggested when it beats that
    by at least (1 - chance)/3 (for two balanced classes: 0.67 or less now, 0.17 better with the
    candidate). The model is left as it was (the candidates are applied to the inputs, not to the
    model); cost: one forward pass over the sample, one more per candidate when near chance.
    """
    device = _device_of(model)
    if samples is None:
        samples = CHECK_SAMPLES["cpu" if device.type == "cpu" else "accelerator"]
    indices = _sample(dataset, samples)
    if len(indices) < MIN_CHECK_SAMPLES:
        return None
    was_training = model.training
    model.eval()
    try:
        # Read once, kept on the CPU (a few hundred images), moved per batch for each pass.
        batches = []
        for start in range(0, len(indices), batch_size):
            # (samples with .image (C, H, W) and .label, stacked here: models/ does not import data/)
            samples_ = [dataset[k] for k in indices[start:start + batch_size]]
            batches.append((torch.stack([s.image for s in samples_]),
                            torch.tensor([s.label for s in samples_], dtype=torch.long)))
        labels = torch.cat([labels for _, labels in batches])
        chance = float(torch.bincount(labels).max()) / len(labels)
        margin = (1 - chance) / 3

        def accuracy(transform) -> float:
            correct = 0
            for images, batch_labels in batches:
                logits = model(transform(images.to(device)))
                correct += int((logits.argmax(dim=1).cpu() == batch_labels).sum())
            return correct / len(labels)

        results = {"current": accuracy(lambda images: images)}
        if results["current"] > chance + margin:
            return NormalizationCheck(len(labels), chance, results, None)
        own_mean, own_std = model.mean, model.std
        for name in candidates:
            candidate = parse_normalize(name, model.meta.in_channels)
            if candidate.mean == tuple(model.meta.mean) and candidate.std == tuple(model.meta.std):
                continue  # the model's own: measured already
            mean = torch.tensor(candidate.mean, device=device).view(1, -1, 1, 1)
            std = torch.tensor(candidate.std, device=device).view(1, -1, 1, 1)
            # Inputs that the model's own normalisation maps to what ``candidate`` would have made of them.
            results[name] = accuracy(lambda images, m=mean, s=std: (images - m) / s * own_std + own_mean)
        best = max((name for name in results if name != "current"), key=lambda name: results[name], default=None)
        suggestion = best if best is not None and results[best] >= results["current"] + margin else None
        return NormalizationCheck(len(labels), chance, results, suggestion)
    finally:
        model.train(was_training)


def check_assumed_normalization(model: Any, dataset: Any, *, what: str = "the data",
                                samples: int | None = None) -> NormalizationCheck | None:
    """:func:`check_normalization` for a model whose normalisation was assumed (None for any other);
    a :class:`NormalizationWarning` with the fix when another normalisation fits much better.
    ``what`` names the images in the warning (e.g. "the train split")."""
    if not is_assumed(model):
        return None
    result = check_normalization(model, dataset, samples=samples)
    if result is not None and result.suggestion is not None:
        name = result.suggestion
        warnings.warn(NormalizationWarning(
            f"accuracy {result.accuracy['current']:.2f} with the assumed normalisation "
            f"({_describe(model.meta.mean, model.meta.std)}), {result.accuracy[name]:.2f} with {name} on "
            f"{result.samples} images of {what} (chance {result.chance:.2f}): the model was likely trained with "
            f"{name} statistics; {{advice}}", name), stacklevel=2)
    return result
