"""What every command shares: error handling, JSON output, shared option types."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

EXIT_ERROR = 2

JsonOption = Annotated[
    Optional[Path], typer.Option("--json", help="Also write a machine-readable JSON report here ('-' for stdout).")
]
DeviceOption = Annotated[
    str, typer.Option("--device", help="auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N.")
]
PrecisionOption = Annotated[
    str,
    typer.Option(
        "--precision",
        help="auto (bf16 on GPUs that support it, else fp32), fp32, bf16 or fp16: autocast of the model's passes.",
    ),
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed for every random choice; the same seed repeats a run.")]
ForceOption = Annotated[bool, typer.Option("--force", help="Replace an existing output instead of refusing.")]
QuietOption = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]


def fail(message: str, code: int = EXIT_ERROR) -> None:
    """One clear line on stderr, then exit (no traceback)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# Library parameters whose flag is not simply --name-with-dashes. Library errors name parameters
# (ParameterError); the command line shows the flag the user typed instead.
FLAGS = {
    "lam": "--lambda",
    "explained_class": "--tea-class",
    "classes": "--tea-classes",
    "annotation": "--teacher with --tau",
    "overwrite": "--force",
    "options": "--option",
    "data_order": "the data order",
}


def flag_for(parameter: str) -> str:
    """The command-line flag of a library parameter (`batch_size` -> --batch-size)."""
    return FLAGS.get(parameter, "--" + parameter.replace("_", "-"))


def handles_errors(command):
    """Turns AuditkitError (bad input) into one line + exit 2 and Ctrl-C into exit 130; a
    ParameterError's line names the command's flag, not the library's parameter."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from ..errors import AuditkitError, ParameterError

        try:
            return command(*args, **kwargs)
        except ParameterError as error:
            fail(error.naming(flag_for(error.parameter)))
        except AuditkitError as error:
            fail(str(error))
        except FileExistsError as error:
            fail(str(error))
        except OSError as error:
            if error.errno is None:  # not the operating system's answer: a bug of ours, shown in full
                raise
            # A file the system refused (full disk, no permission, a folder gone): one line, not a traceback.
            where = f"{error.filename}: " if error.filename else ""
            fail(f"{where}{error.strerror or error}")
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None

    return wrapper


def write_json(path: Optional[Path], payload: Any) -> None:
    """Writes ``payload`` as JSON to ``path`` atomically ('-' prints it to stdout)."""
    if path is None:
        return
    text = json.dumps(payload, indent=2, default=str) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        return
    from .._io import atomic_write_text

    atomic_write_text(path, text, overwrite=True)


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """['bias=0.9', 'texture=smooth'] -> {'bias': 0.9, 'texture': 'smooth'}."""
    from ..data.builtin import parse_value
    from ..errors import AuditkitError

    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise AuditkitError(f"--param expects KEY=VALUE; got {pair!r}")
        params[key.strip().replace("-", "_")] = parse_value(value.strip())
    return params
