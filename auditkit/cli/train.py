"""`auditkit train`: plain training into an auditkit checkpoint, then accuracy per test variant."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    ClassesOption,
    DeviceOption,
    FindingsOption,
    ForceOption,
    HeadOption,
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
    val_split: Annotated[
        str, typer.Option(help="Split for the per-epoch validation accuracy ('none' to skip).")
    ] = "val",
    test_split: Annotated[str, typer.Option(help="Split evaluated per variant at the end ('none' to skip).")] = "test",
    variant: Annotated[
        Optional[str], typer.Option(help="Variant to train on (default: contaminated if present, else the only one).")
    ] = None,
    fraction: Annotated[
        float, typer.Option(help="Train on a stratified, seeded fraction of the split (e.g. 0.1 for a teacher's "
                                 "small clean split).")
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
    findings: FindingsOption = None,
    head: HeadOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train a classifier (the paper's "No XS" model on contaminated data) and save a checkpoint.

    Example: auditkit train --data builtin:decoy-mnist --arch tap-cnn --out shortcut.safetensors

    A one-logit (BCE) model: binary data trains one by default, or --head binary on two-class data:
    auditkit train --data builtin:binary-mnist --arch tap-cnn --out one_logit.safetensors

    A TEA teacher from a 10 % clean split (augmentation matters on few images):
    auditkit train --data builtin:colored-mnist --arch shortcut-cnn --normalize none --variant permuted
    --fraction 0.1 --epochs 300 --shift 2 --rotate 15 --scale 0.15 --channel-shuffle --out teacher.safetensors
    """
    from rich.console import Console

    from ..training import TrainConfig
    from ..training.checkpoint import CheckpointTraining, train_checkpoint

    console = Console()
    config = TrainConfig(epochs, batch_size, lr, optimizer, weight_decay, shift=shift, rotate=rotate, scale=scale,
                         channel_shuffle=channel_shuffle, seed=seed, device=device, precision=precision)
    request = CheckpointTraining(data, arch, out, config, split=split,
                                 val_split=None if val_split == "none" else val_split,
                                 test_split=None if test_split == "none" else test_split, variant=variant,
                                 fraction=fraction, layers=tuple(layers.split(",")) if layers else None,
                                 normalize=normalize, output=output, overwrite=force, classes=classes,
                                 findings=findings, head=head)
    done = train_checkpoint(request, show_progress=not quiet, on_start=training_start(console, arch, data, split),
                            on_epoch=training_epoch(console))
    print_trained(console, done, test_split)
    write_json(json_path, {"checkpoint": str(done.path), "arch": arch, "training": done.training,
                           "test": {name: vars(result) for name, result in done.results.items()}})


def training_start(console, arch: str, data: str, split: str):
    """The line that opens a training run (train_checkpoint's on_start)."""
    from ..device import describe

    def start(model, train_set, chosen_variant, config) -> None:
        head = getattr(model.meta, "head", "softmax")
        loss = (f", multilabel head over {train_set.num_classes} findings (BCE-with-logits)" if head == "multilabel"
                else "")
        console.print(
            f"training [bold]{arch}[/bold]{loss} on {len(train_set)} {chosen_variant} images of {data} "
            f"({split} split), {config.epochs} epochs, {config.optimizer} lr={config.lr:g}, "
            f"batch {config.batch_size}, seed {config.seed}, {describe(config.device, config.precision)}"
        )

    return start


def training_epoch(console):
    """One line per epoch of training (train_checkpoint's on_epoch)."""
    def report(record) -> None:
        val = f", val accuracy {record.val_accuracy:.3f}" if record.val_accuracy is not None else ""
        console.print(
            f"  epoch {record.epoch}: loss {record.task_loss:.4f}, train accuracy {record.accuracy:.3f}{val} "
            f"({record.seconds:.1f} s)"
        )

    return report


def print_trained(console, done, test_split: str) -> None:
    """The test split's accuracy per variant, and where the checkpoint went."""
    from rich.table import Table

    if test_split != "none":
        per_finding = any(result.per_finding for result in done.results.values())
        table = Table(f"{test_split} variant", "samples", "label-wise accuracy" if per_finding else "accuracy")
        for result in done.results.values():
            table.add_row(result.variant, str(result.samples), f"{result.accuracy:.3f}")
        console.print(table)
    console.print(f"checkpoint written to [bold]{done.path}[/bold] ({done.training['seconds']:.1f} s of training)")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
