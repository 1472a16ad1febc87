"""`auditkit reproduce NAME`: one command per table of the source papers (see auditkit.reproduce)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import DeviceOption, JsonOption, PrecisionOption, QuietOption, handles_errors, write_json


@handles_errors
def reproduce(
    name: Annotated[str, typer.Argument(help="table9, table12 or colored.")],
    seeds: Annotated[int, typer.Option(help="Number of seeds (0, 1, ...); the tables use 5.")] = 5,
    out: Annotated[Path, typer.Option("--out", help="Folder for NAME.md (the table) and NAME.json (per-seed numbers).")] = Path("reproductions"),
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    json_path: JsonOption = None,
    quiet: QuietOption = False,
) -> None:
    """Re-run a published experiment on the built-in data over several seeds and write its table beside the paper's.

    table9: TAP Table 9 (decoy MNIST, ground-truth masks: Base, No XS, RRR, TAP, TEA; ~3 min per seed on 2 cores).
    table12: TAP Table 12 / Fig. 8 (TAP with teacher masks, 10 % / 1 % / untrained teachers, three τ; ~3 min per seed).
    colored: seed 004's coloured MNIST (shortcut CNN, then TEA and TAP; ~2.5 min per seed).
    TAP Table 1 (speed and memory) is `make bench` (benchmarks/test_repair_bench.py).

    Example: auditkit reproduce table9 --seeds 5 --out reproductions
    """
    from rich.console import Console

    from .._io import atomic_write_text
    from ..errors import AuditkitError
    from ..device import resolve_device, resolve_precision
    from ..reproduce import REPRODUCTIONS, Compute, markdown
    from ..reproduce import reproduce as run

    if name not in REPRODUCTIONS:
        raise AuditkitError(f"unknown reproduction {name!r}; choose one of {', '.join(REPRODUCTIONS)}")
    if seeds < 1:
        raise AuditkitError(f"--seeds must be at least 1; got {seeds}")
    target = resolve_device(device)
    compute = Compute(str(target), resolve_precision(precision, target))
    result = run(name, list(range(seeds)), show_progress=not quiet, compute=compute)
    table = markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{name}.md", table, overwrite=True)
    write_json(out / f"{name}.json", result.as_dict())
    Console().print(table)
    Console().print(f"written: [bold]{out / (name + '.md')}[/bold] and {name}.json")
    write_json(json_path, result.as_dict())


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)
