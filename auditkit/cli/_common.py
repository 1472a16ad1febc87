"""What every command shares: error handling, JSON output, shared option types."""

from __future__ import annotations

import contextlib
import functools
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
OutputOption = Annotated[
    Optional[str],
    typer.Option(
        "--output",
        metavar="NAME|INDEX",
        help="Which part of the model's output is the logits when its forward returns a dict, tuple, namedtuple or "
        "dataclass: a key or field name (logits) or an index (0). Default: what the checkpoint records, else a "
        "container's only tensor, its field named logits, or a tuple's first (N, classes) tensor.",
    ),
]
HeadOption = Annotated[
    Optional[str],
    typer.Option(
        "--head",
        metavar="softmax|binary|multilabel",
        help="What the model's output is: softmax (one logit per class), binary (one logit z, sigmoid; class 1, "
        "the second class, when z > 0) or multilabel (K sigmoids, one per finding; present when z_k > 0). Default: "
        "what the checkpoint records, else binary for a network with one output.",
    ),
]
FindingsOption = Annotated[
    Optional[str],
    typer.Option(
        "--findings",
        help="Multi-label data: the findings in order, comma-separated (e.g. effusion,pneumothorax): the 0/1 "
        "columns to read, or the names a labels column may use. Overrides dataset.json's.",
    ),
]
NormalizeOption = Annotated[
    Optional[str],
    typer.Option(
        "--normalize",
        metavar="NAME|MEAN/STD",
        help="Input normalisation the model was trained with: imagenet, inception (0.5/0.5), clip, none (pixels "
        "in [0, 1] unchanged) or MEAN/STD, comma-separated per channel or one number for all "
        "(0.485,0.456,0.406/0.229,0.224,0.225 or 0.5/0.25). Default: what the checkpoint records, else 0.5/0.5 "
        "with a warning. train also takes dataset (its default: the training images' statistics).",
    ),
]
ClassesOption = Annotated[
    Optional[str],
    typer.Option(
        "--classes",
        help="Class names in index order, comma-separated (e.g. cat,dog): overrides dataset.json and the default "
        "order (folder trees: names sorted as text, like torchvision's ImageFolder).",
    ),
]
# What the data's masks mark (auditkit/data/meaning.py); the library's parameter is mask_meaning.
MasksMarkOption = Annotated[
    Optional[str],
    typer.Option(
        "--masks-mark",
        metavar="artefact|object",
        help="What the data's masks (and boxes) mark: artefact (the shortcut; TAP, RRR, the audit's swap and "
        "removal) or object (the evidence; Energy). Overrides dataset.json's mask_meaning; default: artefact.",
    ),
]

# The LRP-epsilon defaults live in auditkit/explain/defaults.py (one per use); an option left unset
# passes None and the library applies its own default, so the value is written once and --help
# needs no torch import.
EPSILON_HELP_EXPLAIN = "LRP-epsilon stabiliser (default: auditkit.explain.defaults.EPSILON_EXPLAIN, near LRP-0)."
EPSILON_HELP_AUDIT = "LRP-epsilon stabiliser (default: auditkit.explain.defaults.EPSILON_AUDIT, for scored maps)."


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
    "mask_meaning": "--masks-mark",
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
            with _warnings_as_lines():
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


@contextlib.contextmanager
def _warnings_as_lines():
    """While a command runs, each warning shown is one line on stderr ("warning: ..."), its advice
    worded with the command's flags (a warning with ``parameter`` and ``naming``, e.g.
    auditkit.models.NormalizationWarning, says --normalize where the library says normalize=)."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        parameter, naming = getattr(message, "parameter", None), getattr(message, "naming", None)
        text = naming(flag_for(parameter)) if parameter and callable(naming) else str(message)
        typer.secho(f"warning: {' '.join(text.split())}", fg=typer.colors.YELLOW, err=True)

    with warnings.catch_warnings():  # (also resets which warnings were shown: each command shows its own)
        warnings.showwarning = show
        yield


def write_json(path: Optional[Path], payload: Any) -> None:
    """Writes ``payload`` as JSON to ``path`` atomically ('-' prints it to stdout)."""
    if path is None:
        return
    from .._json import dumps

    text = dumps(payload, indent=2, default=str) + "\n"  # never NaN/Infinity: JSON.parse rejects them
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
