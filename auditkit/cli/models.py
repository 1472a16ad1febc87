"""`auditkit models`: the architectures auditkit can build, with their TAP and Grad-CAM layers."""

from __future__ import annotations

import typer


def models() -> None:
    """List the architectures with the layers TAP targets and the Grad-CAM layer.

    Example: auditkit models
    """
    from rich.console import Console
    from rich.table import Table

    from ..models import ARCHITECTURES

    table = Table("architecture", "TAP targets (TAP paper §5.3)", "Grad-CAM layer", "notes")
    for name, spec in ARCHITECTURES.items():
        table.add_row(name, ", ".join(spec.tap_layers), spec.gradcam_layer, spec.description)
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
