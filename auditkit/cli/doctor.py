"""`auditkit doctor`: versions, devices, which kernels are live and why, and a self-test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer


def doctor(
    json_path: Annotated[
        Optional[Path],
        typer.Option("--json", help="Also write the report as JSON to this path ('-' for stdout)."),
    ] = None,
    self_test: Annotated[
        bool, typer.Option("--self-test/--no-self-test", help="Check the kernels against the reference.")
    ] = True,
) -> None:
    """Show versions, devices and which kernels (compiled CPU/CUDA or reference) are live, and why.

    Exits 1 when the self-test disagrees with the reference.

    Example: auditkit doctor --json doctor.json
    """
    from rich.console import Console
    from rich.table import Table

    from .._io import atomic_write_text
    from ..diagnostics import collect

    report = collect(run_self_test=self_test)
    text = json.dumps(report, indent=2)
    if json_path is not None and str(json_path) == "-":
        typer.echo(text)
    else:
        console = Console()
        console.print(
            f"[bold]auditkit {report['auditkit']}[/bold]  python {report['python']}  torch {report['torch']}"
            f" (CUDA {report['torch_cuda'] or 'none'})  torchvision {report['torchvision']}"
        )
        console.print(f"GPUs: {', '.join(report['gpus']) or 'none visible'}; CPU threads: {report['cpu_threads']}")
        extension = report["extension"]
        console.print(f"extension: {extension['path'] or 'not found'} ({extension['reason']})")
        table = Table("device", "kernels", "why")
        table.add_row("CPU", report["kernels"]["cpu"]["backend"], report["kernels"]["cpu"]["why"])
        cuda = report["kernels"]["cuda"]
        why = cuda["why"] + ("" if cuda["runnable"] else "; no GPU visible, so nothing runs on CUDA here")
        table.add_row("CUDA", cuda["backend"], why)
        console.print(table)
        for result in report.get("self_test", []):
            verdict = "[green]ok[/green]" if result["ok"] else "[red]MISMATCH[/red]"
            console.print(
                f"self-test on {result['device']}: {verdict} (forward rel. error "
                f"{result['forward_rel_error']:.1e}, gradient abs. error {result['backward_abs_error']:.1e})"
            )
        if json_path is not None:
            atomic_write_text(json_path, text + "\n", overwrite=True)
            console.print(f"JSON written to {json_path}")
    if not all(result["ok"] for result in report.get("self_test", [])):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
