"""`auditkit reproduce NAME`: one command per table of the source papers (see auditkit.reproduce)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import DeviceOption, JsonOption, PrecisionOption, QuietOption, handles_errors, write_json


@handles_errors
def reproduce(
    name: Annotated[str, typer.Argument(help="table9, table12, colored, kinds or multilabel.")],
    seeds: Annotated[int, typer.Option(help="Number of seeds (0, 1, ...); the tables use 5 (kinds: 3).")] = 5,
    first_seed: Annotated[int, typer.Option(help="The first seed: runs seeds FIRST ... FIRST+SEEDS-1 (to spread "
                                                 "seeds over processes or machines).")] = 0,
    arch: Annotated[str, typer.Option(
        help="kinds: tap-cnn (every kind, 28x28), resnet18 (marker and stripe, 64x64) or vit-digits (decoy patch, "
             "28x28, TAP on its attention inputs).")] = "tap-cnn",
    only: Annotated[Optional[str], typer.Option(
        help="kinds: comma-separated kinds to run (default: all of the arch's).")] = None,
    cases: Annotated[Optional[str], typer.Option(
        help="kinds: comma-separated methods to run, as the table names them (default: all; vit-digits: "
             "tap-fixed).")] = None,
    out: Annotated[Path, typer.Option(
        "--out", help="Folder for NAME.md (the table) and NAME.json (per-seed numbers).")] = Path("reproductions"),
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    json_path: JsonOption = None,
    quiet: QuietOption = False,
) -> None:
    """Re-run a published experiment on the built-in data over several seeds and write its table beside the paper's.

    table9: TAP Table 9 (decoy MNIST, ground-truth masks: Base, No XS, RRR, TAP, TEA; ~3 min per seed on 2 cores).
    table12: TAP Table 12 / Fig. 8 (TAP with teacher masks, 10 % / 1 % / untrained teachers, three τ; ~3 min per seed).
    colored: the coloured MNIST of Bharadwaj 2026, "The Lazy Artist" (shortcut CNN, then TEA and TAP; ~2.5 min
    per seed).
    kinds: which method fixes which shortcut: 5 kinds x 8 methods on the two-layer CNN
    (--arch resnet18: 2 kinds at 64x64; --arch vit-digits: decoy MNIST on the built-in ViT, TAP on its tokens,
    ~10 min per seed on 2 cores).
    TAP Table 1 (speed and memory) is `make bench` (benchmarks/test_repair_bench.py).

    Example: auditkit reproduce table9 --seeds 5 --out reproductions
    """
    from rich.console import Console

    from .._io import atomic_write_text
    from ..errors import AuditkitError
    from ..device import resolve_device, resolve_precision
    from ..reproduce import KIND_ARCHS, KIND_CASES, KINDS, REPRODUCTIONS, Compute, kinds_markdown, markdown
    from ..reproduce import reproduce as run

    if name not in REPRODUCTIONS:
        raise AuditkitError(f"unknown reproduction {name!r}; choose one of {', '.join(REPRODUCTIONS)}")
    if seeds < 1:
        raise AuditkitError(f"--seeds must be at least 1; got {seeds}")
    if first_seed < 0:
        raise AuditkitError(f"--first-seed must be at least 0; got {first_seed}")
    options, stem = {}, name
    if name == "kinds":
        if arch not in KIND_ARCHS:
            raise AuditkitError(f"--arch must be one of {', '.join(KIND_ARCHS)} for kinds; got {arch!r}")
        for flag, given, known in (("--only", only, KINDS), ("--cases", cases, KIND_CASES)):
            unknown = [x for x in (given or "").split(",") if x and x not in known]
            if unknown:
                raise AuditkitError(f"{flag}: unknown {unknown[0]!r}; choose from {', '.join(known)}")
        options = {"arch": arch, "only": tuple(only.split(",")) if only else None,
                   "cases": tuple(cases.split(",")) if cases else None}
        stem = f"kinds-{arch}"
    target = resolve_device(device)
    compute = Compute(target, resolve_precision(precision, target))
    result = run(name, list(range(first_seed, first_seed + seeds)), show_progress=not quiet, compute=compute, **options)
    table = kinds_markdown(result, arch) if name == "kinds" else markdown(result)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{stem}.md", table, overwrite=True)
    write_json(out / f"{stem}.json", result.as_dict())
    Console().print(table)
    Console().print(f"written: [bold]{out / (stem + '.md')}[/bold] and {stem}.json")
    write_json(json_path, result.as_dict())


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)
