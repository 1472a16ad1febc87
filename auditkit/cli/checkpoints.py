"""`auditkit inspect` and `auditkit evaluate`: read a checkpoint safely, describe it, score it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DeviceOption, PrecisionOption, JsonOption, handles_errors, write_json

ArchOption = Annotated[
    Optional[str], typer.Option("--arch", help="Architecture of a bare state_dict (a checkpoint without metadata).")
]
TrustPickleOption = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help="Allow unpickling arbitrary Python objects. Only for files from an author you trust: it can run code.",
    ),
]


def load(path: Path, arch: Optional[str], trust_pickle: bool, input_size: Optional[str] = None):
    from ..errors import AuditkitError
    from ..models import load_checkpoint

    size = None
    if input_size:
        try:
            height, _, width = input_size.lower().partition("x")
            size = (int(height), int(width or height))
        except ValueError as error:
            raise AuditkitError(f"--input-size expects HxW, e.g. 224x224; got {input_size!r}") from error
    model = load_checkpoint(path, arch=arch, trust_pickle=trust_pickle, input_size=size)
    return model.eval()


@handles_errors
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors or .pt checkpoint.")],
    arch: ArchOption = None,
    trust_pickle: TrustPickleOption = False,
    json_path: JsonOption = None,
) -> None:
    """Load a checkpoint safely and show what it is: architecture, classes, input, layers, training.

    Example: auditkit inspect shortcut.safetensors
    """
    from rich.console import Console

    from ..models import read_checkpoint_meta

    model = load(checkpoint, arch, trust_pickle)
    meta = model.meta
    stored = read_checkpoint_meta(checkpoint) if not trust_pickle else {}
    report = {
        "checkpoint": str(checkpoint),
        "parameters": sum(p.numel() for p in model.parameters()),
        **meta.to_dict(),
        "extra": stored.get("extra", {}),
    }
    if json_path is not None and str(json_path) == "-":
        write_json(json_path, report)
        return
    console = Console()
    console.print(f"[bold]{checkpoint}[/bold]: {meta.arch}, {report['parameters']:,} parameters")
    console.print(f"  classes ({meta.num_classes}): {', '.join(meta.class_names)}")
    console.print(
        f"  input: {meta.in_channels} channel(s), {meta.input_size[1]}x{meta.input_size[0]} px, "
        f"normalised with mean {list(meta.mean)} std {list(meta.std)}"
    )
    console.print(f"  TAP targets: {', '.join(meta.target_layers) or 'none'}; Grad-CAM layer: {meta.gradcam_layer or 'none'}")
    training = report["extra"].get("training")
    if training:
        accuracies = ", ".join(f"{k} {v:.3f}" for k, v in training.get("test_accuracy", {}).items())
        console.print(
            f"  trained on {training.get('data')} ({training.get('split')}/{training.get('variant')}), "
            f"{len(training.get('history', []))} epochs in {training.get('seconds')} s; test accuracy: {accuracies or 'n/a'}"
        )
    write_json(json_path, report)


@handles_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors or .pt checkpoint.")],
    data: Annotated[str, typer.Option("--data", help="Dataset: folder, .csv of boxes, .npz or builtin:NAME.")],
    split: Annotated[str, typer.Option(help="Split to evaluate ('all' for every sample).")] = "test",
    arch: ArchOption = None,
    input_size: Annotated[
        Optional[str], typer.Option(help="Input size HxW for a bare state_dict (default 224x224).")
    ] = None,
    trust_pickle: TrustPickleOption = False,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    json_path: JsonOption = None,
) -> None:
    """Accuracy and confusion matrix of a checkpoint on every variant of a dataset split.

    Example: auditkit evaluate shortcut.safetensors --data builtin:decoy-mnist --split test
    """
    from rich.console import Console
    from rich.table import Table

    from ..data import open_dataset
    from ..device import resolve_device, resolve_precision
    from ..training import align_dataset_to_model, evaluate as evaluate_model

    model = load(checkpoint, arch, trust_pickle, input_size)
    target = resolve_device(device)
    precision = resolve_precision(precision, target)
    dataset = open_dataset(data, split=None if split == "all" else split)
    dataset = align_dataset_to_model(dataset, model)
    results = evaluate_model(model.to(target), dataset, batch_size=batch_size, device=target, precision=precision,
                             show_progress=True)
    table = Table("variant", "samples", "accuracy")
    for result in results.values():
        table.add_row(result.variant, str(result.samples), f"{result.accuracy:.3f}")
    Console().print(table)
    write_json(
        json_path,
        {"checkpoint": str(checkpoint), "data": data, "split": split, "device": str(target), "precision": precision,
         "results": {k: vars(v) for k, v in results.items()}},
    )


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.command("evaluate")(evaluate)
