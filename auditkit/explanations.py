"""Explaining samples of a checkpoint: image files, or samples spread evenly over a dataset split;
one picture per sample (the image beside its heatmap overlay) and a captioned grid.

    done = explain_samples(SampleExplanation(Path("shortcut.safetensors"), Path("heat"),
                                             data="builtin:decoy-mnist", n=16))
    done.grid, done.rows[0]["explained_class"]

It sits above training (the data is put in the model's input format, training.model_data), so
beside demo.py rather than in explain/, which training may use. The device is resolved here, once
per run, and passed down as a ``torch.device``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import collate
from .data.dataset import AuditDataset, DatasetInfo, Record
from .device import autocast, resolve_device, resolve_precision
from .errors import DataError, OutputExistsError, ParameterError, short_list
from .explain import METHODS, attribute
from .explain.defaults import EPSILON_EXPLAIN
from .explain.render import captioned, grid, overlay, to_rgb, upscale, write_png
from .models.loading import ReadOptions, load_model
from .training import model_data

TARGETS = ("pred", "label")


@dataclass(frozen=True)
class SampleExplanation:
    """What to explain (``images`` or ``data``: one of the two), how, and where the pictures go."""

    checkpoint: Path
    out: Path  # a folder: one <name>.png per sample, grid.png, heatmaps.npz with save_maps
    images: tuple[Path, ...] = ()
    data: str | None = None  # a dataset spec (auditkit.data.open_dataset)
    split: str = "test"
    variant: str | None = None  # default: all variants
    n: int = 32  # samples of data, spread evenly over the split
    method: str = "lrp_epsilon"  # an auditkit.explain.METHODS name
    target: str = "pred"  # pred, label (data only), or a class name or index
    epsilon: float | None = None  # LRP-epsilon stabiliser; None: EPSILON_EXPLAIN (explain/defaults.py)
    layer: str | None = None  # Grad-CAM's layer (default: the checkpoint's preset)
    steps: int = 32  # Integrated Gradients
    internal_batch_size: int | None = None  # Integrated Gradients: path images per pass
    batch_size: int = 32
    save_maps: bool = False  # also the raw maps, heatmaps.npz
    overwrite: bool = False
    classes: str | None = None
    reading: ReadOptions = ReadOptions()
    seed: int = 0
    device: str | torch.device = "auto"
    precision: str = "auto"

    def check(self) -> None:
        if self.method not in METHODS:
            raise ParameterError("method", f"must be one of {', '.join(METHODS)}; got {self.method!r}")
        if bool(self.images) == bool(self.data):
            raise ParameterError("data", "or image files must be given (one of the two)")
        if self.out.exists() and any(self.out.iterdir()) and not self.overwrite:
            raise OutputExistsError("overwrite", f"is off and {self.out} exists and is not empty: choose another "
                                    "folder, or allow replacing its files")

    def method_options(self) -> dict:
        """The options ``attribute`` takes for this method."""
        if self.method == "lrp_epsilon":
            return {"epsilon": EPSILON_EXPLAIN if self.epsilon is None else self.epsilon}
        if self.method == "gradcam":
            return {"layer": self.layer}
        if self.method == "integrated_gradients":
            return {"steps": self.steps, "internal_batch_size": self.internal_batch_size}
        return {}


@dataclass
class ExplainedSamples:
    """What ``explain_samples`` wrote: the grid, the maps file (or None) and one row per sample
    (name, file, label, variant, predicted and explained class, map_sum, map_abs_max)."""

    out: Path
    grid: Path
    maps: Path | None
    rows: list[dict]
    device: torch.device
    precision: str


def explain_samples(request: SampleExplanation) -> ExplainedSamples:
    """Explains the samples ``request`` names and writes their pictures (module docstring). Raises
    ParameterError / DataError for bad settings before any picture is written."""
    request.check()
    torch.manual_seed(request.seed)
    model = load_model(request.checkpoint, request.reading)
    device = resolve_device(request.device)  # once per run
    precision = resolve_precision(request.precision, device)
    model.to(device)
    dataset, picks, names = _samples(request, model)
    meta = model.meta  # read after the data: a checkpoint without metadata took its sizes and names from it
    target = _target(request.target, meta.class_names, meta.num_classes)
    options = request.method_options()
    head = getattr(meta, "head", "softmax")
    tiles, rows, maps = [], [], []
    for start in range(0, len(picks), request.batch_size):
        batch = collate([dataset[int(k)] for k in picks[start : start + request.batch_size]]).to(device)
        with autocast(device, precision):
            with torch.no_grad():
                logits = model(batch.images)
            if head == "multilabel":
                # K sigmoids: one finding's logit per image (pred: the finding with the highest logit; label:
                # the labelled finding with the highest logit, the highest logit overall on an image with none).
                explained = _finding_targets(target, logits, batch.labels if request.data else None)
                heatmaps = attribute(model, batch.images, explained, request.method, **options)[:, 0]
                predicted = logits > 0
            else:
                predicted = logits.argmax(1)
                heatmaps = attribute(model, batch.images, target, request.method, labels=batch.labels,
                                     **options)[:, 0]
                explained = (predicted if target == "pred" else batch.labels if target == "label"
                             else torch.full_like(predicted, target))
        for j in range(len(heatmaps)):
            name = names[start + j]
            picture = upscale(overlay(batch.images[j], heatmaps[j]))
            write_png(request.out / f"{name}.png", np.concatenate([upscale(to_rgb(batch.images[j])), picture], axis=1))
            variant = batch.variants[j] if request.data else None
            if head == "multilabel":
                label = _present(meta.class_names, batch.labels[j] > 0.5) if request.data else "?"
                said = _present(meta.class_names, predicted[j])
            else:
                label = meta.class_names[int(batch.labels[j])] if request.data else "?"
                said = meta.class_names[int(predicted[j])]
            tiles.append(captioned(picture, f"{label}->{said} {variant[:4] if variant else ''}"))
            rows.append({"name": name, "file": str(request.out / f"{name}.png"),
                         "label": label if request.data else None, "variant": variant,
                         "predicted": said,
                         "explained_class": meta.class_names[int(explained[j])],
                         "explained_output": explained_output(head, meta.class_names, int(explained[j])),
                         "map_sum": float(heatmaps[j].sum()), "map_abs_max": float(heatmaps[j].abs().max())})
            maps.append(heatmaps[j].detach().cpu().numpy())
    grid_path = write_png(request.out / "grid.png", grid(tiles))
    maps_path = None
    if request.save_maps:
        maps_path = request.out / "heatmaps.npz"
        np.savez_compressed(maps_path, maps=np.stack(maps), names=np.array([r["name"] for r in rows]))
    return ExplainedSamples(request.out, grid_path, maps_path, rows, device, precision)


def _samples(request: SampleExplanation, model) -> tuple[AuditDataset, np.ndarray, list[str]]:
    """The dataset, the indices of the samples explained and their names."""
    if request.data:
        dataset = model_data(request.data, model, split=request.split, variant=request.variant,
                             classes=request.classes)
        if len(dataset) == 0:
            raise DataError(f"{request.data}: no samples in split {request.split!r}")
        picks = np.linspace(0, len(dataset) - 1, num=min(request.n, len(dataset))).round().astype(int)
        return dataset, picks, [f"{request.split}-{k}" for k in picks]
    missing = [str(p) for p in request.images if not Path(p).is_file()]
    if missing:
        raise DataError(f"no such image file: {missing[0]}")
    meta = model.meta
    records = [Record(Path(p), 0) for p in request.images]
    dataset = AuditDataset(records, DatasetInfo("images", "files", meta.class_names), channels=meta.in_channels,
                           image_size=tuple(meta.input_size))
    if request.target == "label":
        raise ParameterError("target", "'label' needs a dataset (image files carry no label)")
    return dataset, np.arange(len(records)), [Path(p).stem for p in request.images]


def explained_output(head: str, class_names, index: int) -> str:
    """Which output a map explains, in words: the class's logit (softmax), ``z`` or ``-z`` (one logit:
    class 1 or class 0), or the finding's logit z_k (multilabel)."""
    if head == "binary":
        return "z" if index == 1 else "-z"
    if head == "multilabel":
        return f"z of finding {class_names[index]!r}"
    return f"logit of class {class_names[index]!r}"


def _present(names, flags) -> str:
    """The findings ``flags`` (K bools) marks present, joined by '|'; "none" without any."""
    chosen = [name for name, flag in zip(names, flags.tolist()) if flag]
    return "|".join(chosen) or "none"


def _finding_targets(target, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """One finding per image for a multilabel model: the one asked for (an index), the one with the
    highest logit (pred), or the labelled finding with the highest logit (label; the highest logit
    overall where an image has no finding)."""
    if isinstance(target, int):
        return torch.full((len(logits),), target, dtype=torch.long, device=logits.device)
    scores = logits.detach().float()
    if target == "label" and labels is not None:
        positive = labels > 0.5
        masked = scores.masked_fill(~positive, float("-inf"))
        return torch.where(positive.any(1), masked.argmax(1), scores.argmax(1))
    return scores.argmax(1)


def _target(target: str, class_names, num_classes: int) -> str | int:
    """pred, label or a class index, from a class name or index."""
    if target in TARGETS:
        return target
    if target in class_names:
        return list(class_names).index(target)
    if target.isdigit() and int(target) < num_classes:
        return int(target)
    raise ParameterError("target", f"{target!r} is neither pred, label nor one of the classes "
                         f"({short_list(class_names, 10)})")


__all__ = ["ExplainedSamples", "SampleExplanation", "explain_samples"]
