"""`auditkit demo`: the main job end to end on real digits — train a shortcut model, audit it, repair it
with TAP, audit again — by running the same commands a user runs (`train`, then `repair`, whose proof
holds both audits)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ._common import DeviceOption, PrecisionOption, ForceOption, JsonOption, QuietOption, SeedOption, handles_errors, write_json

DEMO_DATA = "builtin:decoy-mnist"


@handles_errors
def demo(
    out: Annotated[Path, typer.Option("--out", help="Folder for the demo's checkpoints and report.")] = Path("auditkit-demo"),
    epochs: Annotated[int, typer.Option(help="Epochs of the shortcut model's training.")] = 6,
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

    Example: auditkit demo --out demo
    """
    from rich.console import Console
    from rich.table import Table

    from ..errors import AuditkitError
    from .repair import repair
    from .train import train

    console = Console()
    if out.exists() and any(out.iterdir()) and not force:
        raise AuditkitError(f"{out} exists and is not empty; choose another --out or pass --force to replace the demo's files")
    out.mkdir(parents=True, exist_ok=True)
    shortcut, repaired = out / "shortcut.safetensors", out / "repaired.safetensors"

    console.rule("[bold]1/2[/bold] train a classifier on decoy MNIST: the corner patch's shade gives the class away")
    train(data=DEMO_DATA, arch="tap-cnn", out=shortcut, epochs=epochs, seed=seed, device=device, precision=precision,
          force=force, quiet=quiet)
    console.rule("[bold]2/2[/bold] audit it, repair it with TAP (ground-truth patch masks), audit again")
    repair(checkpoint=shortcut, data=DEMO_DATA, out=repaired, method="tap", seed=seed, device=device,
           precision=precision, force=force, quiet=quiet)

    proof = json.loads(repaired.with_name(repaired.name + ".audit.json").read_text())
    before, after = proof["before_audit"], proof["after_audit"]
    table = Table("model", "verdict", "contaminated", "permuted", "clean", title="decoy MNIST, test split (accuracy)")
    for name, audit in (("shortcut", before), ("repaired with TAP", after)):
        accuracy = {k: v["value"] for k, v in audit["task"]["per_variant"].items()}
        table.add_row(name, audit["verdict"]["label"],
                      *(f"{accuracy[v]:.3f}" if v in accuracy else "-" for v in ("contaminated", "permuted", "clean")))
    console.print(table)
    report = repaired.with_name(repaired.name + ".audit.html")
    console.print(f"before/after report: [bold]{report}[/bold]")
    write_json(json_path, {"shortcut": str(shortcut), "repaired": str(repaired), "report": str(report),
                           "before": before["verdict"], "after": after["verdict"],
                           "accuracy": {"before": {k: v["value"] for k, v in before["task"]["per_variant"].items()},
                                        "after": {k: v["value"] for k, v in after["task"]["per_variant"].items()}}})


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
