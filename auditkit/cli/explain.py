"""`auditkit explain`: heatmap overlays and a grid for images or a dataset split."""

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
    SeedOption,
    handles_errors,
    write_json,
)
from .checkpoints import ArchOption, TrustPickleOption, load, model_data


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
    epsilon: Annotated[float, typer.Option(help="LRP-epsilon stabiliser.")] = 1e-6,
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
    import numpy as np
    import torch
    from rich.console import Console

    from ..data import collate
    from ..data.dataset import AuditDataset, DatasetInfo, Record
    from ..errors import AuditkitError
    from ..explain import METHODS, attribute
    from ..explain.render import captioned, grid, overlay, to_rgb, upscale, write_png
    from ..device import autocast, resolve_device, resolve_precision

    if method not in METHODS:
        raise AuditkitError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if bool(images) == bool(data):
        raise AuditkitError("give image files or --data DATASET (one of the two)")
    if out.exists() and any(out.iterdir()) and not force:
        raise AuditkitError(f"{out} exists and is not empty; choose another --out or pass --force")
    torch.manual_seed(seed)
    model = load(checkpoint, arch, trust_pickle, normalize=normalize, output=output)
    meta = model.meta
    target_device = resolve_device(device)
    precision = resolve_precision(precision, target_device)
    model.to(target_device)

    if data:
        dataset = model_data(data, model, split=split, variant=variant, classes=classes)
        meta = model.meta  # a checkpoint without metadata took its input size and class names from the data
        if len(dataset) == 0:
            raise AuditkitError(f"{data}: no samples in split {split!r}")
        picks = np.linspace(0, len(dataset) - 1, num=min(n, len(dataset))).round().astype(int)
        names = [f"{split}-{k}" for k in picks]
    else:
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise AuditkitError(f"no such image file: {missing[0]}")
        records = [Record(p, 0) for p in images]
        dataset = AuditDataset(records, DatasetInfo("images", "files", meta.class_names), channels=meta.in_channels, image_size=tuple(meta.input_size))
        picks = np.arange(len(records))
        names = [p.stem for p in images]
        if target == "label":
            raise AuditkitError("--target label needs --data (image files carry no label)")

    def target_for(batch):
        if target in ("pred", "label"):
            return target
        if target in meta.class_names:
            return meta.class_names.index(target)
        if target.isdigit() and int(target) < meta.num_classes:
            return int(target)
        raise AuditkitError(f"--target {target!r} is neither pred, label nor one of the classes ({', '.join(meta.class_names[:10])})")

    options = {"epsilon": epsilon} if method == "lrp_epsilon" else {"layer": layer} if method == "gradcam" else {}
    if method == "integrated_gradients":
        options = {"steps": steps, "internal_batch_size": internal_batch_size}
    tiles, rows, maps = [], [], []
    for start in range(0, len(picks), batch_size):
        batch = collate([dataset[int(k)] for k in picks[start : start + batch_size]]).to(target_device)
        with autocast(target_device, precision):
            with torch.no_grad():
                predicted = model(batch.images).argmax(1)
            heatmaps = attribute(model, batch.images, target_for(batch), method, labels=batch.labels, **options)[:, 0]
        explained = predicted if target == "pred" else batch.labels if target == "label" else torch.full_like(predicted, target_for(batch))
        for j in range(len(heatmaps)):
            name = names[start + j]
            picture = upscale(overlay(batch.images[j], heatmaps[j]))
            side_by_side = np.concatenate([upscale(to_rgb(batch.images[j])), picture], axis=1)
            write_png(out / f"{name}.png", side_by_side)
            label = meta.class_names[int(batch.labels[j])] if data else "?"
            caption = f"{label}->{meta.class_names[int(predicted[j])]} {batch.variants[j][:4] if data else ''}"
            tiles.append(captioned(picture, caption))
            rows.append(
                {
                    "name": name,
                    "file": str(out / f"{name}.png"),
                    "label": label if data else None,
                    "variant": batch.variants[j] if data else None,
                    "predicted": meta.class_names[int(predicted[j])],
                    "explained_class": meta.class_names[int(explained[j])],
                    "map_sum": float(heatmaps[j].sum()),
                    "map_abs_max": float(heatmaps[j].abs().max()),
                }
            )
            maps.append(heatmaps[j].detach().cpu().numpy())
    grid_path = write_png(out / "grid.png", grid(tiles))
    if save_maps:
        np.savez_compressed(out / "heatmaps.npz", maps=np.stack(maps), names=np.array([r["name"] for r in rows]))
    Console().print(
        f"{method} for {len(rows)} image(s) of {checkpoint.name} -> [bold]{out}[/bold] "
        f"(overlays, grid.png{', heatmaps.npz' if save_maps else ''}); red = evidence for the explained class"
    )
    write_json(json_path, {"checkpoint": str(checkpoint), "method": method, "grid": str(grid_path), "images": rows})


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)
