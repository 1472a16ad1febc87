"""`auditkit data`: make contaminated datasets, describe datasets, list what is built in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import (
    ClassesOption,
    FindingsOption,
    ForceOption,
    JsonOption,
    MasksMarkOption,
    SeedOption,
    handles_errors,
    parse_params,
    write_json,
)

app = typer.Typer(
    help="Make contaminated datasets and inspect datasets.\n\nExample: auditkit data make decoy-patch out/decoy-mnist",
    no_args_is_help=True,
)


@app.command("make")
@handles_errors
def make(
    kind: Annotated[str, typer.Argument(help="Contamination: decoy-patch, coloured-background, text-tag or stripe.")],
    out_dir: Annotated[Path, typer.Argument(help="Folder to create (refused if it exists, unless --force).")],
    source: Annotated[
        str,
        typer.Option("--source",
                     help="Images to contaminate: mnist (5,000 real digits), sklearn-digits, or a dataset."),
    ] = "mnist",
    param: Annotated[
        list[str], typer.Option("--param", "-p", help="Generator parameter KEY=VALUE (see `auditkit data list`).")
    ] = [],  # noqa: B006 (typer needs a literal default)
    seed: SeedOption = 0,
    fmt: Annotated[str, typer.Option("--format", help="png (manifest.csv + PNG files) or npz.")] = "png",
    force: ForceOption = False,
    json_path: JsonOption = None,
    classes: ClassesOption = None,
) -> None:
    """Write the contaminated, permuted and clean variants of every split, with a mask per image.

    Example: auditkit data make coloured-background out/colored -p bias=0.95 -p texture=smooth
    """
    from rich.console import Console

    from .._progress import progress_bar
    from ..data import SOURCES, make_dataset, open_dataset, write_dataset

    # a built-in source, or the user's data
    images = source if source in SOURCES else open_dataset(source, classes=classes)
    dataset = make_dataset(kind, source=images, params=parse_params(param), seed=seed)
    with progress_bar(f"writing {len(dataset)} images", total=len(dataset)) as bar:
        folder = write_dataset(dataset, out_dir, fmt=fmt, overwrite=force, progress=bar.advance)
    summary = dataset.summary()
    _print_summary(Console(), summary)
    Console().print(f"written to [bold]{folder}[/bold] (open it with --data {folder})")
    write_json(json_path, {"path": str(folder), **summary})


@app.command("show")
@handles_errors
def show(
    spec: Annotated[str, typer.Argument(help="A dataset: folder, .csv of boxes, .npz or builtin:NAME.")],
    json_path: JsonOption = None,
    classes: ClassesOption = None,
    masks_mark: MasksMarkOption = None,
    findings: FindingsOption = None,
) -> None:
    """Describe a dataset: splits, variants, classes, masks and what they mark.

    Example: auditkit data show builtin:decoy-mnist
    """
    from rich.console import Console

    from ..data import open_dataset

    summary = open_dataset(spec, classes=classes, mask_meaning=masks_mark, findings=findings).summary()
    if json_path is not None and str(json_path) == "-":
        write_json(json_path, summary)
        return
    _print_summary(Console(), summary)
    write_json(json_path, summary)


@app.command("list")
def list_builtins() -> None:
    """List the built-in datasets and the contamination generators with their parameters.

    Example: auditkit data list
    """
    from rich.console import Console
    from rich.table import Table

    from ..data import BUILTINS, CONTAMINATIONS, make_contamination

    console = Console()
    table = Table("built-in dataset", "images", "contamination")
    for name, (source, kind) in BUILTINS.items():
        table.add_row(f"builtin:{name}", source, kind or "none (clean)")
    console.print(table)
    table = Table("generator", "variants", "parameters (defaults)")
    for kind in CONTAMINATIONS:
        generator = make_contamination(kind)
        params = {k: v for k, v in generator.params().items() if k != "kind"}
        table.add_row(kind, ", ".join(generator.variants), ", ".join(f"{k}={v}" for k, v in params.items()))
    console.print(table)


def _print_summary(console, summary: dict) -> None:
    from rich.table import Table

    from ..data.meaning import describe

    console.print(
        f"[bold]{summary['name']}[/bold]: {summary['samples']} samples, {_labels_line(summary)}, "
        f"{summary['channels']} channel(s), {summary['image_size'][1]}x{summary['image_size'][0]} px, "
        f"{summary['with_masks']} with masks of {describe(summary['mask_meaning'])}"
    )
    order = f"; {summary['class_order']}" if summary.get("class_order") else ""
    if summary.get("label_kind") == "multilabel":
        per = summary.get("per_class", {})
        console.print(f"findings by index{order}: " + ", ".join(f"{k}={n} ({per.get(n, 0)} images)"
                                                                for k, n in enumerate(summary["classes"]))
                      + f"; {summary.get('without_findings', 0)} images with none", markup=False, highlight=False)
    else:
        console.print(f"classes by index{order}: " + ", ".join(f"{k}={n}" for k, n in enumerate(summary["classes"])),
                      markup=False, highlight=False)
    variants = sorted({v for counts in summary["splits"].values() for v in counts})
    table = Table("split", *variants)
    for split, counts in summary["splits"].items():
        table.add_row(split, *(str(counts.get(v, 0)) for v in variants))
    console.print(table)


def _labels_line(summary: dict) -> str:
    """The label kind in words: "4 classes", "binary (other / seven: one logit)", "multilabel, 4 findings"."""
    kind, classes = summary.get("label_kind", "softmax"), summary["classes"]
    if kind == "multilabel":
        return f"multilabel, {len(classes)} findings ({', '.join(classes)})"
    if kind == "binary":
        return f"binary ({classes[0]} / {classes[1]}; positive: {classes[1]})"
    return f"{len(classes)} classes"


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="data")
