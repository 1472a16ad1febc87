"""`auditkit explain`: heatmap overlays and a grid for images or a dataset split."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    EPSILON_HELP_EXPLAIN,
    ClassesOption,
    DeviceOption,
    ForceOption,
    JsonOption,
    NormalizeOption,
    HeadOption,
    OutputOption,
    PrecisionOption,
    SeedOption,
    handles_errors,
    write_json,
)
from .checkpoints import ArchOption, TrustPickleOption


@handles_errors
def explain(
    checkpoint: Annotated[Path, typer.Argument(help="A .safetensors or .pt checkpoint.")],
    images: Annotated[Optional[list[Path]], typer.Argument(help="Image files to explain (or use --data).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the overlays and grid.png.")] = Path("explanations"),
    method: Annotated[
        str, typer.Option(help="lrp_epsilon, gradcam, gradient, input_x_gradient or integrated_gradients.")
    ] = "lrp_epsilon",
    target: Annotated[str, typer.Option(help="pred, label (with --data) or a class name/index.")] = "pred",
    data: Annotated[Optional[str], typer.Option(help="Explain samples of this dataset instead of files.")] = None,
    split: Annotated[str, typer.Option(help="Split of --data.")] = "test",
    variant: Annotated[Optional[str], typer.Option(help="Variant of --data (default: all).")] = None,
    n: Annotated[int, typer.Option("--n", help="How many samples of --data (spread evenly over the split).")] = 32,
    epsilon: Annotated[Optional[float], typer.Option(help=EPSILON_HELP_EXPLAIN)] = None,
    layer: Annotated[Optional[str], typer.Option(help="Grad-CAM layer (default: the checkpoint's preset).")] = None,
    steps: Annotated[int, typer.Option(help="Integrated Gradients steps.")] = 32,
    internal_batch_size: Annotated[
        Optional[int], typer.Option(help="Integrated Gradients: path images per pass (default: a memory budget).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 32,
    save_maps: Annotated[bool, typer.Option("--save-maps", help="Also write the raw maps to heatmaps.npz.")] = False,
    arch: ArchOption = None,
    normalize: NormalizeOption = None,
    output: OutputOption = None,
    head: HeadOption = None,
    trust_pickle: TrustPickleOption = False,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    seed: SeedOption = 0,
    force: ForceOption = False,
    json_path: JsonOption = None,
    classes: ClassesOption = None,
) -> None:
    """Show where a model looks: one overlay per image and a captioned grid.

    Example: auditkit explain shortcut.safetensors --data builtin:decoy-mnist --variant contaminated --n 16 --out heat
    """
    from rich.console import Console

    from ..explanations import SampleExplanation, explain_samples
    from ..models.loading import ReadOptions

    done = explain_samples(SampleExplanation(
        checkpoint, out, images=tuple(images or ()), data=data, split=split, variant=variant, n=n, method=method,
        target=target, epsilon=epsilon, layer=layer, steps=steps, internal_batch_size=internal_batch_size,
        batch_size=batch_size, save_maps=save_maps, overwrite=force, classes=classes,
        reading=ReadOptions(arch, trust_pickle, normalize, output, head=head), seed=seed, device=device,
        precision=precision))
    Console().print(
        f"{method} for {len(done.rows)} image(s) of {checkpoint.name} -> [bold]{out}[/bold] "
        f"(overlays, grid.png{', heatmaps.npz' if save_maps else ''}); red = evidence for the explained class"
    )
    write_json(json_path, {"checkpoint": str(checkpoint), "method": method, "grid": str(done.grid),
                           "images": done.rows})


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)
