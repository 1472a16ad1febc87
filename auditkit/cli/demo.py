"""`auditkit demo`: the main job end to end on real digits — train a shortcut model, audit it, repair it
with TAP, audit again — through the library calls `train` and `repair` make (auditkit.demo.run_demo),
printed as those commands print them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    DeviceOption,
    ForceOption,
    JsonOption,
    PrecisionOption,
    QuietOption,
    SeedOption,
    handles_errors,
    write_json,
)


@handles_errors
def demo(
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the demo's checkpoints and report.")
    ] = Path("auditkit-demo"),
    arch: Annotated[str, typer.Option(
        help="tap-cnn (the two-layer CNN, under a minute) or vit-digits (the built-in ViT, TAP on its tokens; "
             "about 10 minutes on 2 cores).")] = "tap-cnn",
    epochs: Annotated[Optional[int], typer.Option(
        help="Epochs of the shortcut model's training (default: 6 for tap-cnn, 20 for vit-digits).")] = None,
    seed: SeedOption = 0,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    force: ForceOption = False,
    json_path: JsonOption = None,
    quiet: QuietOption = False,
) -> None:
    """Train a shortcut model on decoy MNIST, audit it, repair it with TAP, audit again (under a minute on 2 cores).

    Decoy MNIST (TAP §5): real digits with a grey patch in a random corner whose shade tells the class.
    Writes OUT/shortcut.safetensors, OUT/repaired.safetensors and the before/after proof
    OUT/repaired.safetensors.audit.html (.json), then prints the path.

    Example: auditkit demo --out demo   (the ViT: auditkit demo --arch vit-digits --out demo-vit)
    """
    from rich.console import Console
    from rich.table import Table

    from ..demo import DEMO_DATA, DEMO_METHOD, Demo, run_demo
    from .repair import print_repair, repair_epoch, repair_start
    from .train import print_trained, training_epoch, training_start

    console = Console()
    stages = {1: "[bold]1/2[/bold] train a classifier on decoy MNIST: the corner patch's shade gives the class away",
              2: "[bold]2/2[/bold] audit it, repair it with TAP (ground-truth patch masks), audit again"}
    done = run_demo(Demo(out, epochs, seed, device, precision, overwrite=force, arch=arch), show_progress=not quiet,
                    on_stage=lambda k: console.rule(stages[k]),
                    on_train_start=training_start(console, arch, DEMO_DATA, "train"),
                    on_train_epoch=training_epoch(console),
                    on_trained=lambda trained: print_trained(console, trained, "test"),
                    on_repair_start=repair_start(console, out / "shortcut.safetensors", DEMO_METHOD, DEMO_DATA, seed),
                    on_repair_epoch=repair_epoch(console, DEMO_METHOD))
    print_repair(console, done.repaired, done.repaired.path, None)
    summary = done.summary()
    table = Table("model", "verdict", "contaminated", "permuted", "clean",
                  title=f"decoy MNIST, {arch}, test split (accuracy)")
    for name, key in (("shortcut", "before"), ("repaired with TAP", "after")):
        accuracy = summary["accuracy"][key]
        table.add_row(name, summary[key]["label"],
                      *(f"{accuracy[v]:.3f}" if v in accuracy else "-" for v in ("contaminated", "permuted", "clean")))
    console.print(table)
    console.print(f"before/after report: [bold]{done.report}[/bold]")
    write_json(json_path, summary)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
