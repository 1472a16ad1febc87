"""The `auditkit` command line: thin Typer commands over the library.

Heavy imports (torch, the kernels) happen inside command bodies so that
`auditkit --help` answers at once. Each command lives in its own module.
"""

from __future__ import annotations

from typing import Annotated

import typer

from .._version import __version__

app = typer.Typer(
    name="auditkit",
    help=(
        "Audit an image classifier for shortcut learning and repair it with TAP or TEA.\n\n"
        "Example: auditkit audit shortcut.safetensors --data builtin:decoy-mnist --report-dir audit"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        from ..diagnostics import summary_line

        typer.echo(summary_line())
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Print versions and which kernels are live, then exit.",
        ),
    ] = False,
) -> None:
    """auditkit: audit, then repair, fast."""


from . import audit as _audit  # noqa: E402  (each module registers its command)
from . import checkpoints as _checkpoints  # noqa: E402
from . import data as _data  # noqa: E402
from . import demo as _demo  # noqa: E402
from . import discover as _discover  # noqa: E402
from . import doctor as _doctor  # noqa: E402
from . import explain as _explain  # noqa: E402
from . import models as _models  # noqa: E402
from . import repair as _repair  # noqa: E402
from . import report as _report  # noqa: E402
from . import reproduce as _reproduce  # noqa: E402
from . import train as _train  # noqa: E402

for _module in (_demo, _audit, _discover, _repair, _report, _data, _train, _explain, _checkpoints, _models, _doctor,
                _reproduce):
    _module.register(app)


def main() -> None:
    app()


__all__ = ["__version__", "app", "main"]
