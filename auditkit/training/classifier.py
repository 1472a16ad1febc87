"""Plain supervised training and evaluation of a classifier (the "No XS" / "Base" models of the TAP
paper): ``train_model`` builds and trains one on a split of a dataset (what `auditkit train` and
the reproductions call); ``evaluate`` (evaluation.py) gives accuracy and a confusion matrix per
variant.
"""

from __future__ import annotations

import time
from typing import Any
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..data import AuditDataset, stratified_split
from ..distributed import Context
from ..errors import DataError, ParameterError, short_list
from ..models import AuditModel, build_model
from ..models.normalization import check_assumed_normalization, is_assumed, parse_normalize
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


def align_dataset_to_model(dataset: AuditDataset, model, *, check_on: AuditDataset | None = None) -> AuditDataset:
    """The dataset in the model's input format (channels, size), after checking its classes.

    ``model`` is an AuditModel (or its ``meta``). Images are converted by the dataset policy (grey <->
    RGB, resize); class names must match the checkpoint's, or predictions would be compared with the
    wrong labels: the same names in another order, or some of them (classes missing from the data) when
    the data names its classes (declared, or not bare numbers), are re-indexed by name to the
    checkpoint's classes (with a UserWarning); other names, and numbered classes inferred from the
    labels that are fewer than the checkpoint's, raise DataError naming both lists. A model loaded from weights
    without auditkit metadata (a framework's checkpoint, a bare state_dict) takes its input size and,
    when the counts agree, its class names from the data: the file does not know them.

    A model whose input normalisation was assumed (nothing recorded or given) is checked on up to
    256 images (64 on the CPU) of the train split of ``check_on`` (default ``dataset``; all of it when it has no
    train split): a NormalizationWarning names the fix when another common normalisation scores
    much better (auditkit.models.normalization.check_assumed_normalization).
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
    multilabel = check_label_kind(dataset, meta)
    if multilabel:
        # K findings scored by K sigmoids: matched by name (another order is re-ordered), never by position.
        if set(dataset.classes) == set(meta.class_names) and tuple(dataset.classes) != tuple(meta.class_names):
            from ..data.labels import reorder_findings

            dataset = reorder_findings(dataset, meta.class_names, "the checkpoint's findings")
        if tuple(dataset.classes) != tuple(meta.class_names):
            raise DataError(f"the dataset's findings ({short_list(dataset.classes)}) do not match the checkpoint's "
                            f"({short_list(meta.class_names)})")
        return dataset.with_format(channels=meta.in_channels, image_size=tuple(meta.input_size))
    if getattr(meta, "head", "softmax") == "binary" and dataset.num_classes > 2:
        # One output logit scores two classes: data of another kind would be scored against wrong labels.
        raise DataError(f"the model has one output logit (a binary, sigmoid head over two classes) but the dataset has "
                        f"{dataset.num_classes} classes ({short_list(dataset.classes)}); give it data with two classes")
    subset = set(dataset.classes) < set(meta.class_names)
    if subset and not _named_classes(dataset):
        raise DataError(
            f"the dataset's classes ({short_list(dataset.classes)}) are {dataset.num_classes} of the checkpoint's "
            f"{len(meta.class_names)} ({short_list(meta.class_names)}); numbered classes inferred from the labels "
            "cannot tell a split that lacks some classes from data of another task: if the data holds only some of "
            "the model's classes, declare them all (load_dataset's classes, or dataset.json's)"
        )
    if tuple(dataset.classes) != tuple(meta.class_names) and set(dataset.classes) <= set(meta.class_names):
        # The same classes in another order (e.g. folders 0..11: ImageFolder's text order against a
        # checkpoint saved in numeric order), or some of them (a split where classes are missing, an .npz
        # whose integer labels name only the classes present): labels follow the model's indices, by
        # name, never by position.
        import warnings

        from ..data.readers import reindex_classes

        if len(dataset.classes) == len(meta.class_names):
            message = (f"the dataset orders its classes {short_list(dataset.classes)}; re-indexed by name "
                       f"to the checkpoint's order {short_list(meta.class_names)}")
        else:
            absent = [c for c in meta.class_names if c not in dataset.classes]
            message = (f"the dataset has {len(dataset.classes)} of the checkpoint's {len(meta.class_names)} classes "
                       f"(none of {short_list(absent)}); its labels are "
                       "re-indexed by name to the checkpoint's classes")
        warnings.warn(message, UserWarning, stacklevel=2)
        dataset = reindex_classes(dataset, meta.class_names, "the checkpoint's class names")
    if tuple(dataset.classes) != tuple(meta.class_names):
        raise DataError(f"the dataset's classes ({short_list(dataset.classes)}) do not match the "
                        f"checkpoint's ({short_list(meta.class_names)})")
    if isinstance(model, AuditModel) and is_assumed(model):
        reference = dataset if check_on is None else check_on
        if tuple(reference.classes) != tuple(meta.class_names):
            reference = dataset  # check_on in another class order: its labels would not be the model's
        what = "the data"
        if "train" in reference.splits:
            reference, what = reference.select(split="train"), "the train split"
        if len(reference.variants) > 1 and "contaminated" in reference.variants:
            # A shortcut model is near chance on the permuted/clean variants by design: checked on those, it
            # would look mis-normalised. The variant a model is trained on is the one it should score on.
            reference, what = reference.select(variant="contaminated"), f"the contaminated variant of {what}"
        reference = reference.with_format(channels=meta.in_channels, image_size=tuple(meta.input_size))
        check_assumed_normalization(model, reference, what=what)
    return dataset.with_format(channels=meta.in_channels, image_size=tuple(meta.input_size))


def check_label_kind(dataset: AuditDataset, meta) -> bool:
    """Whether the data and the model are both multilabel; DataError in one line naming both when only
    one of them is (K findings per image cannot be scored by exclusive classes, nor the reverse)."""
    head = getattr(meta, "head", "softmax") or "softmax"
    kind = getattr(dataset, "label_kind", "softmax")
    if (head == "multilabel") == (kind == "multilabel"):
        return head == "multilabel"
    model = (f"multilabel ({meta.num_classes} sigmoids: {short_list(meta.class_names)})" if head == "multilabel"
             else f"{head} ({meta.num_classes} classes: {short_list(meta.class_names)})")
    data = (f"multilabel ({dataset.num_classes} findings: {short_list(dataset.classes)})" if kind == "multilabel"
            else f"{kind} ({dataset.num_classes} classes: {short_list(dataset.classes)})")
    fix = ("; train or read the model as multilabel (--head multilabel) for multi-label data" if kind == "multilabel"
           else "; give it multi-label data (a labels column or one 0/1 column per finding)")
    raise DataError(f"the model's head is {model} but the data's labels are {data}{fix}")


def training_head(dataset: AuditDataset, head: str | None) -> str | None:
    """The head a model trained on ``dataset`` gets: ``head`` when given, else the data's label kind
    (None for softmax labels: build_model's default, which reads a one-logit network as binary).
    HeadError/DataError in one line for a head the labels cannot train (multilabel labels need a
    multilabel head and the reverse; binary needs two classes)."""
    from ..models.outputs import BINARY, MULTILABEL, HeadError, check_head

    kind = getattr(dataset, "label_kind", "softmax")
    given = check_head(head)
    head = given or kind
    if (head == MULTILABEL) != (kind == MULTILABEL):
        raise DataError(f"the head {head} cannot be trained on {kind} labels ({short_list(dataset.classes)}): "
                        "multi-label data trains a multilabel head and only it")
    if head == BINARY and dataset.num_classes != 2:
        raise HeadError(f"is binary (one logit) but the data has {dataset.num_classes} classes "
                        f"({short_list(dataset.classes)})")
    return head if given or head != "softmax" else None


def _named_classes(dataset: AuditDataset) -> bool:
    """Whether the dataset's class names mean something by themselves: declared (dataset.json, the
    classes option, a built-in dataset) or not all integers. Numbers inferred from integer labels only
    count the classes present, so they cannot say which of a model's classes they are."""
    from ..data.dataset import ORDER_DECLARED

    declared = dataset.info.class_order.startswith(ORDER_DECLARED.split("{")[0])
    return declared or not all(name.lstrip("-").isdigit() for name in dataset.classes)


@dataclass
class TrainedModel:
    """What ``train_model`` returns: the trained model, its per-epoch history and the description of
    its training that `auditkit train` stores in the checkpoint."""

    model: AuditModel
    history: list[dict]
    training: dict


def train_model(
    dataset: AuditDataset,
    arch: str,
    config: TrainConfig | None = None,
    *,
    split: str = "train",
    variant: str | None = None,
    fraction: float = 1.0,
    normalize: Any = "dataset",
    layers: list[str] | None = None,
    val_split: str | None = "val",
    context: Context | None = None,
    show_progress: bool = False,
    on_start=None,
    on_epoch=None,
    data_name: str | None = None,
    output: str | int | None = None,
    head: str | None = None,
) -> TrainedModel:
    """A randomly initialised ``arch`` trained with cross-entropy on ``variant`` of ``split`` of ``dataset``
    (multi-label data: a multilabel head, K sigmoids, trained with BCE-with-logits, ``pos_weight`` per
    skewed finding; training/losses.py).

    ``variant``: default contaminated, else the only one. ``fraction``: a stratified, seeded
    fraction of the split (small clean splits for teachers). ``normalize``: "dataset" stores the
    training images' per-channel mean and std in the model, "none" stores 0 and 1, or any choice
    auditkit.models.normalization.parse_normalize reads ("imagenet", "MEAN/STD", a (mean, std)
    pair); the checkpoint records it. ``layers``: TAP
    target layers (default: the architecture's preset). ``val_split``: accuracy on it after every
    epoch (None to skip). The seed (``config.seed``) fixes the initial weights, the fraction and
    the data order. ``on_start(model, train_set, variant)`` is called once everything is checked,
    before the first step. ``output``: which part of the network's output is the logits (a key or
    index; auditkit/models/outputs.py), stored in the model. ``head``: softmax, binary (one logit,
    BCE-with-logits as the two-class view's cross-entropy) or multilabel; default: the data's label
    kind (binary data, e.g. builtin:binary-mnist, trains a one-logit model). Raises ParameterError/DataError/ModelError
    for bad values."""
    config = config or TrainConfig()
    config.validate()
    if not 0 < fraction <= 1:
        raise ParameterError("fraction", f"must lie in (0, 1]; got {fraction}")
    is_dataset = isinstance(normalize, str) and normalize.strip().lower() == "dataset"
    given = None if is_dataset else parse_normalize(normalize, dataset.channels)  # ParameterError if unreadable
    train_all = dataset.select(split=split)
    chosen_variant = choose_training_variant(train_all, variant)
    train_set = train_all.select(variant=chosen_variant)
    if fraction < 1:
        labels = np.array([r.label for r in train_set.records])
        if labels.ndim == 2:  # multilabel: stratified by the combination of findings
            labels = np.unique(labels, axis=0, return_inverse=True)[1].ravel()
        keep = stratified_split(labels, config.seed, {"kept": fraction, "rest": 1 - fraction})["kept"]
        train_set = train_set.select(indices=keep.tolist())
    val_set = None
    if val_split is not None and val_split in dataset.splits:
        val_set = dataset.select(split=val_split, variant=chosen_variant)
    if given is None:
        (mean, std), source = train_set.channel_stats(), "training data"
    else:
        mean, std, source = given.mean, given.std, given.label
    torch.manual_seed(config.seed)  # the same seed gives the same initial weights
    model = build_model(arch, num_classes=dataset.num_classes, in_channels=dataset.channels,
                        input_size=dataset.image_size, class_names=dataset.classes, target_layers=layers,
                        mean=mean, std=std, normalization=source, output=output,
                        head=training_head(dataset, head))
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
        "config": config.as_dict(),
        "history": history,
        "seconds": round(time.perf_counter() - start, 2),
    }
    return TrainedModel(model, history, training)


def model_data(data: str, model, *, split: str | None = None, variant: str | None = None,
               classes: str | None = None, mask_meaning: str | None = None,
               findings: str | None = None) -> AuditDataset:
    """The dataset ``data`` (its ``split`` and ``variant``; None: all) in the model's input format.
    A model whose normalisation was assumed is checked on the data's train split
    (:func:`align_dataset_to_model`)."""
    import warnings

    from ..data import open_dataset

    full = open_dataset(data, classes=classes, mask_meaning=mask_meaning, findings=findings)
    if split is not None and full.splits == [""]:
        # The user's own data often has no split column: use all of it (and say so) rather than refuse
        # the default split, which the user never chose.
        warnings.warn(f"{data} has no splits (no split column or folders): using all {len(full)} images", stacklevel=2)
        split = None
    chosen = full.select(split=split, variant=variant) if split is not None or variant is not None else full
    return align_dataset_to_model(chosen, model, check_on=full)
