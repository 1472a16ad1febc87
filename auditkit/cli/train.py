"""`auditkit train`: plain training into an auditkit checkpoint, then accuracy per test variant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    ClassesOption,
    DeviceOption,
    ForceOption,
    JsonOption,
    NormalizeOption,
    OutputOption,
    PrecisionOption,
    QuietOption,
    SeedOption,
    handles_errors,
    write_json,
)


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
    normalize: NormalizeOption = "dataset",
    output: OutputOption = None,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    force: ForceOption = False,
    json_path: JsonOption = None,
    classes: ClassesOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train a classifier (the paper's "No XS" model on contaminated data) and save a checkpoint.

    Example: auditkit train --data builtin:decoy-mnist --arch tap-cnn --out shortcut.safetensors

    A TEA teacher from a 10 % clean split (augmentation matters on few images):
    auditkit train --data builtin:colored-mnist --arch shortcut-cnn --normalize none --variant permuted
    --fraction 0.1 --epochs 300 --shift 2 --rotate 15 --scale 0.15 --channel-shuffle --out teacher.safetensors
    """
    from rich.console import Console
    from rich.table import Table

    from ..data import open_dataset
    from ..device import describe, resolve_device, resolve_precision
    from ..errors import AuditkitError
    from ..models import save_checkpoint
    from ..models.outputs import parse_spec
    from ..training import TrainConfig, evaluate, train_model

    console = Console()
    target = resolve_device(device)
    config = TrainConfig(epochs, batch_size, lr, optimizer, weight_decay, shift=shift, rotate=rotate, scale=scale,
                         channel_shuffle=channel_shuffle, seed=seed, device=str(target),
                         precision=resolve_precision(precision, target))
    config.validate()
    if out.exists() and not force:
        raise AuditkitError(f"{out} already exists; choose another --out or pass --force to replace it")
    dataset = open_dataset(data, classes=classes)

    def start(model, train_set, chosen_variant) -> None:
        console.print(
            f"training [bold]{arch}[/bold] on {len(train_set)} {chosen_variant} images of {data} ({split} split), "
            f"{epochs} epochs, {config.optimizer} lr={lr:g}, batch {batch_size}, seed {seed}, "
            f"{describe(target, config.precision)}"
        )

    def report(record) -> None:
        val = f", val accuracy {record.val_accuracy:.3f}" if record.val_accuracy is not None else ""
        console.print(
            f"  epoch {record.epoch}: loss {record.task_loss:.4f}, train accuracy {record.accuracy:.3f}{val} "
            f"({record.seconds:.1f} s)"
        )

    trained = train_model(dataset, arch, config, split=split, variant=variant, fraction=fraction, normalize=normalize,
                          layers=layers.split(",") if layers else None, val_split=None if val_split == "none" else val_split,
                          show_progress=not quiet, on_start=start, on_epoch=report, data_name=data,
                          output=parse_spec(output))
    training = trained.training
    results = {}
    if test_split != "none":
        results = evaluate(trained.model, dataset.select(split=test_split), precision=config.precision)
        table = Table(f"{test_split} variant", "samples", "accuracy")
        for result in results.values():
            table.add_row(result.variant, str(result.samples), f"{result.accuracy:.3f}")
        console.print(table)
    training["test_accuracy"] = {name: result.accuracy for name, result in results.items()}
    path = save_checkpoint(trained.model.cpu(), out, extra={"training": training}, overwrite=force)
    console.print(f"checkpoint written to [bold]{path}[/bold] ({training['seconds']:.1f} s of training)")
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
