"""Training a checkpoint file: open the data, train a classifier on one split, score it per variant
of the test split, save it with its training record.

    done = train_checkpoint(CheckpointTraining("builtin:decoy-mnist", "tap-cnn", Path("shortcut.safetensors")))
    done.path, done.results["contaminated"].accuracy

The device is resolved here, once per run, and passed down as a ``torch.device``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..data import open_dataset
from ..device import resolve_device, resolve_precision
from ..errors import OutputExistsError
from ..models import save_checkpoint
from ..models.outputs import parse_spec
from .classifier import train_model
from .engine import TrainConfig
from .evaluation import VariantResult, evaluate


@dataclass(frozen=True)
class CheckpointTraining:
    """What to train, on what, and where it goes."""

    data: str  # a dataset spec (auditkit.data.open_dataset)
    arch: str  # an architecture name (auditkit.models)
    out: Path  # the checkpoint to write (.safetensors or .pt)
    # Its device and precision may be "auto": resolved once, here.
    config: TrainConfig = field(default_factory=TrainConfig)
    split: str = "train"
    val_split: str | None = "val"  # per-epoch validation accuracy (None: none)
    test_split: str | None = "test"  # scored per variant at the end (None: none)
    variant: str | None = None  # default: contaminated if present, else the only one
    fraction: float = 1.0  # a stratified, seeded fraction of the split
    layers: tuple[str, ...] | None = None  # TAP's target layers (default: the arch's preset)
    normalize: str | None = "dataset"
    output: str | None = None  # where the logits are in the network's output (models.outputs)
    overwrite: bool = False
    classes: str | None = None
    findings: str | None = None  # multi-label data: the findings, in order (auditkit.data.open_dataset)
    head: str | None = None  # softmax | binary | multilabel; None: the data's label kind (training_head)


@dataclass
class TrainedCheckpoint:
    path: Path
    model: torch.nn.Module  # on the CPU, as saved
    training: dict  # the record saved in the checkpoint (data, config, history, test_accuracy, ...)
    results: dict[str, VariantResult]  # per variant of the test split (empty without one)
    config: TrainConfig  # as run: device and precision resolved


def train_checkpoint(
    request: CheckpointTraining,
    *,
    show_progress: bool = True,
    on_start: Callable[[object, object, str, TrainConfig], None] | None = None,
    on_epoch: Callable | None = None,
) -> TrainedCheckpoint:
    """Trains and saves the checkpoint ``request`` describes. ``on_start(model, train_set, variant,
    config)`` runs before the first epoch, ``on_epoch(record)`` after each. Raises ParameterError for
    bad settings and OutputExistsError for an existing ``out`` without ``overwrite``, before training."""
    device = resolve_device(request.config.device)  # once per run
    config = replace(request.config, device=device, precision=resolve_precision(request.config.precision, device))
    config.validate()
    if request.out.exists() and not request.overwrite:
        raise OutputExistsError("overwrite", f"is off and {request.out} already exists: choose another path, "
                                "or allow replacing it")
    dataset = open_dataset(request.data, classes=request.classes, findings=request.findings)

    def start(model, train_set, variant) -> None:
        if on_start is not None:
            on_start(model, train_set, variant, config)

    trained = train_model(dataset, request.arch, config, split=request.split, variant=request.variant,
                          fraction=request.fraction, normalize=request.normalize,
                          layers=list(request.layers) if request.layers else None, val_split=request.val_split,
                          show_progress=show_progress, on_start=start, on_epoch=on_epoch, data_name=request.data,
                          output=parse_spec(request.output), head=request.head)
    training = trained.training
    results = {}
    if request.test_split is not None:
        results = evaluate(trained.model, dataset.select(split=request.test_split), precision=config.precision)
    training["test_accuracy"] = {name: result.accuracy for name, result in results.items()}
    path = save_checkpoint(trained.model.cpu(), request.out, extra={"training": training}, overwrite=request.overwrite)
    return TrainedCheckpoint(path, trained.model, training, results, config)


__all__ = ["CheckpointTraining", "TrainedCheckpoint", "train_checkpoint"]
