"""`auditkit train`: plain training into an auditkit checkpoint, then accuracy per test variant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DeviceOption, PrecisionOption, ForceOption, JsonOption, QuietOption, SeedOption, handles_errors, write_json


@handles_errors
def train(
    data: Annotated[str, typer.Option("--data", help="Dataset: folder, .csv of boxes, .npz or builtin:NAME.")],
    arch: Annotated[str, typer.Option("--arch", help="Architecture (see `auditkit models`), e.g. tap-cnn, resnet18.")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint to write (.safetensors, or .pt).")],
    epochs: Annotated[int, typer.Option(help="Passes over the training split.")] = 6,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 64,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd (momentum 0.9).")] = "adam",
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 0.0,
    shift: Annotated[
        int, typer.Option(help="Augment: translate each image by up to this many pixels (helps small clean splits).")
    ] = 0,
    rotate: Annotated[float, typer.Option(help="Augment: rotate each image by up to this many degrees.")] = 0.0,
    scale: Annotated[float, typer.Option(help="Augment: zoom each image by a factor in [1 - scale, 1 + scale].")] = 0.0,
    channel_shuffle: Annotated[
        bool, typer.Option("--channel-shuffle", help="Augment: put each image's colour channels in a random order.")
    ] = False,
    split: Annotated[str, typer.Option(help="Split to train on.")] = "train",
    val_split: Annotated[str, typer.Option(help="Split for the per-epoch validation accuracy ('none' to skip).")] = "val",
    test_split: Annotated[str, typer.Option(help="Split evaluated per variant at the end ('none' to skip).")] = "test",
    variant: Annotated[
        Optional[str], typer.Option(help="Variant to train on (default: contaminated if present, else the only one).")
    ] = None,
    fraction: Annotated[
        float, typer.Option(help="Train on a stratified, seeded fraction of the split (e.g. 0.1 for a teacher's small clean split).")
    ] = 1.0,
    layers: Annotated[
        Optional[str], typer.Option(help="Comma-separated module names TAP should target (default: the arch's preset).")
    ] = None,
    normalize: Annotated[
        str, typer.Option(help="Input normalisation stored in the checkpoint: dataset (per-channel mean/std of the training images) or none.")
    ] = "dataset",
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    force: ForceOption = False,
    json_path: JsonOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train a classifier (the paper's "No XS" model on contaminated data) and save a checkpoint.

    Example: auditkit train --data builtin:decoy-mnist --arch tap-cnn --out shortcut.safetensors

    A TEA teacher from a 10 % clean split (augmentation matters on few images):
    auditkit train --data builtin:colored-mnist --arch shortcut-cnn --normalize none --variant permuted
    --fraction 0.1 --epochs 300 --shift 2 --rotate 15 --scale 0.15 --channel-shuffle --out teacher.safetensors
    """
    import time

    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from ..data import open_dataset
    from ..device import describe, resolve_device, resolve_precision
    from ..errors import AuditkitError
    from ..models import build_model, save_checkpoint
    from ..train import TrainConfig, choose_training_variant, evaluate, history_as_dicts, train_classifier

    console = Console()
    target = resolve_device(device)
    config = TrainConfig(epochs, batch_size, lr, optimizer, weight_decay, shift=shift, rotate=rotate, scale=scale,
                         channel_shuffle=channel_shuffle, seed=seed, device=str(target),
                         precision=resolve_precision(precision, target))
    config.validate()
    if out.exists() and not force:
        raise AuditkitError(f"{out} already exists; choose another --out or pass --force to replace it")
    dataset = open_dataset(data)
    train_all = dataset.select(split=split)
    chosen_variant = choose_training_variant(train_all, variant)
    train_set = train_all.select(variant=chosen_variant)
    if not 0 < fraction <= 1:
        raise AuditkitError(f"--fraction must lie in (0, 1]; got {fraction}")
    if fraction < 1:
        from ..data import stratified_split

        labels = np.array([r.label for r in train_set.records])
        keep = stratified_split(labels, seed, {"kept": fraction, "rest": 1 - fraction})["kept"]
        train_set = train_set.select(indices=keep.tolist())
    val_set = None if val_split == "none" else dataset.select(split=val_split, variant=chosen_variant)

    if normalize not in ("dataset", "none"):
        raise AuditkitError(f"--normalize must be dataset or none; got {normalize!r}")
    mean, std = train_set.channel_stats() if normalize == "dataset" else ((0.0,) * dataset.channels, (1.0,) * dataset.channels)
    torch.manual_seed(seed)  # the same seed gives the same initial weights
    model = build_model(
        arch,
        num_classes=dataset.num_classes,
        in_channels=dataset.channels,
        input_size=dataset.image_size,
        class_names=dataset.classes,
        target_layers=layers.split(",") if layers else None,
        mean=mean,
        std=std,
    )
    console.print(
        f"training [bold]{arch}[/bold] on {len(train_set)} {chosen_variant} images of {data} ({split} split), "
        f"{epochs} epochs, {config.optimizer} lr={lr:g}, batch {batch_size}, seed {seed}, {describe(target, config.precision)}"
    )

    def report(stats) -> None:
        val = f", val accuracy {stats.val_accuracy:.3f}" if stats.val_accuracy is not None else ""
        console.print(
            f"  epoch {stats.epoch}: loss {stats.train_loss:.4f}, train accuracy {stats.train_accuracy:.3f}{val} "
            f"({stats.seconds:.1f} s)"
        )

    start = time.perf_counter()
    history = train_classifier(model, train_set, val_set, config, show_progress=not quiet, on_epoch=report)
    seconds = time.perf_counter() - start
    training = {
        "data": data,
        "data_fingerprint": train_set.fingerprint(),
        "split": split,
        "variant": chosen_variant,
        "fraction": fraction,
        "samples": len(train_set),
        "config": vars(config),
        "history": history_as_dicts(history),
        "seconds": round(seconds, 2),
    }
    results = {}
    if test_split != "none":
        results = evaluate(model, dataset.select(split=test_split), precision=config.precision)
        table = Table(f"{test_split} variant", "samples", "accuracy")
        for result in results.values():
            table.add_row(result.variant, str(result.samples), f"{result.accuracy:.3f}")
        console.print(table)
    training["test_accuracy"] = {name: result.accuracy for name, result in results.items()}
    path = save_checkpoint(model.cpu(), out, extra={"training": training}, overwrite=force)
    console.print(f"checkpoint written to [bold]{path}[/bold] ({seconds:.1f} s of training)")
    write_json(
        json_path,
        {
            "checkpoint": str(path),
            "arch": arch,
            "training": training,
            "test": {name: vars(result) for name, result in results.items()},
        },
    )


def register(app: typer.Typer) -> None:
    app.command("train")(train)
