"""`auditkit inspect` and `auditkit evaluate`: read a checkpoint safely, describe it, score it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    ClassesOption,
    DeviceOption,
    FindingsOption,
    HeadOption,
    JsonOption,
    NormalizeOption,
    OutputOption,
    PrecisionOption,
    handles_errors,
    write_json,
)

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


def load(path: Path, arch: Optional[str], trust_pickle: bool, input_size: Optional[str] = None,
         normalize: Optional[str] = None, output: Optional[str] = None, head: Optional[str] = None):
    from ..errors import AuditkitError
    from ..models.loading import ReadOptions, load_model

    size = None
    if input_size:
        try:
            height, _, width = input_size.lower().partition("x")
            size = (int(height), int(width or height))
        except ValueError as error:
            raise AuditkitError(f"--input-size expects HxW, e.g. 224x224; got {input_size!r}") from error
    # --output: where the logits are in the network's output
    return load_model(path, ReadOptions(arch, trust_pickle, normalize, output, size, head))


def model_data(data: str, model, *, split: Optional[str] = None, variant=None, classes=None, mask_meaning=None,
               findings=None):
    """``data`` (its ``split`` and ``variant``; None: all) in the model's input format. A model whose
    normalisation was assumed is checked on the data's train split (align_dataset_to_model)."""
    from ..training import model_data as open_for_model

    return open_for_model(data, model, split=split, variant=variant, classes=classes, mask_meaning=mask_meaning,
                          findings=findings)


def head_line(meta, names_from_data: bool = False) -> str:
    """What the model's output is, in words: "softmax over 10 classes" or "binary (one logit, sigmoid;
    class 1 = pneumonia when z > 0)"."""
    if getattr(meta, "head", "softmax") == "multilabel":
        return (f"multilabel ({meta.num_classes} independent sigmoids, one per finding: "
                f"{', '.join(meta.class_names)}; present when z_k > 0)")
    if getattr(meta, "head", "softmax") != "binary":
        return f"softmax over {meta.num_classes} classes"
    positive = "the data's second class" if names_from_data else meta.class_names[1]
    return f"binary (one logit, sigmoid; class 1 = {positive} when z > 0)"


@handles_errors
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors or .pt checkpoint.")],
    arch: ArchOption = None,
    normalize: NormalizeOption = None,
    output: OutputOption = None,
    head: HeadOption = None,
    trust_pickle: TrustPickleOption = False,
    json_path: JsonOption = None,
) -> None:
    """Load a checkpoint safely and show what it is: architecture, classes, input, layers, training.

    Example: auditkit inspect shortcut.safetensors
    """
    from rich.console import Console

    from ..models import read_checkpoint_meta
    from ..models.checkpoint import checkpoint_format
    from ..models.normalization import describe

    model = load(checkpoint, arch, trust_pickle, normalize=normalize, output=output, head=head)
    meta = model.meta
    stored = read_checkpoint_meta(checkpoint) if not trust_pickle else {}
    # Class names the file does not record (bare weights) come from the data when it is scored.
    names_from_data = "class_names" in getattr(model, "adopt_from_data", ())
    report = {
        "checkpoint": str(checkpoint),
        "format": checkpoint_format(checkpoint),  # by content, whatever the suffix
        "class_names_recorded": not names_from_data,
        "parameters": sum(p.numel() for p in model.parameters()),
        **meta.to_dict(),
        "extra": stored.get("extra", {}),
    }
    if json_path is not None and str(json_path) == "-":
        write_json(json_path, report)
        return
    console = Console()
    console.print(f"[bold]{checkpoint}[/bold]: {meta.arch}, {report['parameters']:,} parameters")
    console.print(f"  format: {report['format']}", markup=False)
    if names_from_data:
        console.print(f"  classes ({meta.num_classes}): not recorded in the file; scored against --data, in the "
                      "data's class order (--classes to state it)", markup=False)
    else:
        console.print(f"  classes ({meta.num_classes}, by index): "
                      + ", ".join(f"{k}={name}" for k, name in enumerate(meta.class_names)), markup=False)
    console.print(
        f"  input: {meta.in_channels} channel(s), {meta.input_size[1]}x{meta.input_size[0]} px, "
        f"normalised with {describe(meta)}"
    )
    console.print(f"  TAP targets: {', '.join(meta.target_layers) or 'none'}; "
                  f"Grad-CAM layer: {meta.gradcam_layer or 'none'}")
    if meta.output is not None:
        console.print(f"  logits: the network's output [{meta.output!r}]")
    console.print(f"  head: {head_line(meta, names_from_data)}", markup=False)
    training = report["extra"].get("training")
    if training:
        accuracies = ", ".join(f"{k} {v:.3f}" for k, v in training.get("test_accuracy", {}).items())
        console.print(
            f"  trained on {training.get('data')} ({training.get('split')}/{training.get('variant')}), "
            f"{len(training.get('history', []))} epochs in {training.get('seconds')} s; "
            f"test accuracy: {accuracies or 'n/a'}"
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
    normalize: NormalizeOption = None,
    output: OutputOption = None,
    head: HeadOption = None,
    trust_pickle: TrustPickleOption = False,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 256,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    json_path: JsonOption = None,
    classes: ClassesOption = None,
    findings: FindingsOption = None,
) -> None:
    """Accuracy and confusion matrix of a checkpoint on every variant of a dataset split.

    Example: auditkit evaluate shortcut.safetensors --data builtin:decoy-mnist --split test
    """
    from rich.console import Console
    from rich.table import Table

    from ..device import resolve_device, resolve_precision
    from ..training import evaluate as evaluate_model

    model = load(checkpoint, arch, trust_pickle, input_size, normalize, output, head)
    target = resolve_device(device)
    precision = resolve_precision(precision, target)
    model.to(target)  # before the data: an assumed normalisation is checked on it
    dataset = model_data(data, model, split=None if split == "all" else split, classes=classes, findings=findings)
    results = evaluate_model(model, dataset, batch_size=batch_size, device=target, precision=precision,
                             show_progress=True)
    per_finding = any(result.per_finding for result in results.values())
    table = Table("variant", "samples", "label-wise accuracy" if per_finding else "accuracy")
    for result in results.values():
        table.add_row(result.variant, str(result.samples), f"{result.accuracy:.3f}")
    Console().print(table)
    if per_finding:  # a multilabel model: sensitivity and specificity per finding at z_k > 0
        findings_table = Table("variant", "finding", "sensitivity", "specificity")
        for result in results.values():
            for name, ((tn, fp), (fn, tp)) in result.per_finding.items():
                findings_table.add_row(result.variant, name, f"{tp / max(tp + fn, 1):.3f}",
                                       f"{tn / max(tn + fp, 1):.3f}")
        Console().print(findings_table)
    write_json(
        json_path,
        {"checkpoint": str(checkpoint), "data": data, "split": split, "device": str(target), "precision": precision,
         "results": {k: vars(v) for k, v in results.items()}},
    )


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
    app.command("evaluate")(evaluate)
