"""Plain supervised training and evaluation of a classifier (the "No XS" / "Base" models of the TAP
paper): ``train_model`` builds and trains one on a split of a dataset (what `auditkit train` and
the reproductions call); ``evaluate`` (evaluation.py) gives accuracy and a confusion matrix per
variant.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ..data import AuditDataset, stratified_split
from ..distributed import Context
from ..errors import DataError, ParameterError
from ..models import AuditModel, build_model
from .engine import TrainConfig, fit

from .objective import Objective


def choose_training_variant(dataset: AuditDataset, requested: str | None) -> str:
    """The variant to train on: the one asked for, else 'contaminated', else the only one."""
    variants = dataset.variants
    if requested is not None:
        if requested not in variants:
            raise DataError(f"no variant {requested!r} in the training data; it has {', '.join(variants)}")
        return requested
    if "contaminated" in variants:
        return "contaminated"
    if len(variants) == 1:
        return variants[0]
    raise ParameterError("variant", f"must name the variant to train on: the training data has {', '.join(variants)}")


def align_dataset_to_model(dataset: AuditDataset, model) -> AuditDataset:
    """The dataset in the model's input format (channels, size), after checking its classes.

    ``model`` is an AuditModel (or its ``meta``). Images are converted by the dataset policy (grey <->
    RGB, resize); class names must match the checkpoint's, in order, or predictions would be compared
    with the wrong labels. A model loaded from weights without auditkit metadata (a framework's
    checkpoint, a bare state_dict) takes its input size and, when the counts agree, its class names
    from the data: the file does not know them.
    """
    meta = getattr(model, "meta", model)
    adopt = getattr(model, "adopt_from_data", ())
    if adopt:
        changes = {}
        if "input_size" in adopt:
            changes["input_size"] = tuple(dataset.image_size)
        if "class_names" in adopt and len(dataset.classes) == meta.num_classes:
            changes["class_names"] = tuple(dataset.classes)
        meta = model.meta = replace(meta, **changes)
        model.adopt_from_data = ()
    if tuple(dataset.classes) != tuple(meta.class_names):
        ours, theirs = ", ".join(dataset.classes[:6]), ", ".join(meta.class_names[:6])
        raise DataError(
            f"the dataset's classes ({ours}{', ...' if dataset.num_classes > 6 else ''}) do not match the "
            f"checkpoint's ({theirs}{', ...' if len(meta.class_names) > 6 else ''})"
        )
    return dataset.with_format(channels=meta.in_channels, image_size=tuple(meta.input_size))


@dataclass
class TrainedModel:
    """What ``train_model`` returns: the trained model, its per-epoch history and the description of
    its training that `auditkit train` stores in the checkpoint."""

    model: AuditModel
    history: list[dict]
    training: dict


NORMALIZATIONS = ("dataset", "none")


def train_model(
    dataset: AuditDataset,
    arch: str,
    config: TrainConfig | None = None,
    *,
    split: str = "train",
    variant: str | None = None,
    fraction: float = 1.0,
    normalize: str = "dataset",
    layers: list[str] | None = None,
    val_split: str | None = "val",
    context: Context | None = None,
    show_progress: bool = False,
    on_start=None,
    on_epoch=None,
    data_name: str | None = None,
) -> TrainedModel:
    """A randomly initialised ``arch`` trained with cross-entropy on ``variant`` of ``split`` of ``dataset``.

    ``variant``: default contaminated, else the only one. ``fraction``: a stratified, seeded
    fraction of the split (small clean splits for teachers). ``normalize``: "dataset" stores the
    training images' per-channel mean and std in the model, "none" stores 0 and 1. ``layers``: TAP
    target layers (default: the architecture's preset). ``val_split``: accuracy on it after every
    epoch (None to skip). The seed (``config.seed``) fixes the initial weights, the fraction and
    the data order. ``on_start(model, train_set, variant)`` is called once everything is checked,
    before the first step. Raises ParameterError/DataError/ModelError for bad values."""
    config = config or TrainConfig()
    config.validate()
    if not 0 < fraction <= 1:
        raise ParameterError("fraction", f"must lie in (0, 1]; got {fraction}")
    if normalize not in NORMALIZATIONS:
        raise ParameterError("normalize", f"must be one of {', '.join(NORMALIZATIONS)}; got {normalize!r}")
    train_all = dataset.select(split=split)
    chosen_variant = choose_training_variant(train_all, variant)
    train_set = train_all.select(variant=chosen_variant)
    if fraction < 1:
        labels = np.array([r.label for r in train_set.records])
        keep = stratified_split(labels, config.seed, {"kept": fraction, "rest": 1 - fraction})["kept"]
        train_set = train_set.select(indices=keep.tolist())
    val_set = None
    if val_split is not None and val_split in dataset.splits:
        val_set = dataset.select(split=val_split, variant=chosen_variant)
    if normalize == "dataset":
        mean, std = train_set.channel_stats()
    else:
        mean, std = (0.0,) * dataset.channels, (1.0,) * dataset.channels
    torch.manual_seed(config.seed)  # the same seed gives the same initial weights
    model = build_model(arch, num_classes=dataset.num_classes, in_channels=dataset.channels,
                        input_size=dataset.image_size, class_names=dataset.classes, target_layers=layers,
                        mean=mean, std=std)
    if on_start is not None:
        on_start(model, train_set, chosen_variant)
    start = time.perf_counter()
    history = fit(model, train_set, Objective(), config, val_set=val_set, context=context,
                  show_progress=show_progress, on_epoch=on_epoch)
    training = {
        "data": data_name or dataset.info.name,
        "data_fingerprint": train_set.fingerprint(),
        "split": split,
        "variant": chosen_variant,
        "fraction": fraction,
        "samples": len(train_set),
        "config": asdict(config),
        "history": history,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return TrainedModel(model, history, training)
