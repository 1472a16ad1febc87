"""Errors a user can fix. The CLI prints their message as one line and exits 2.

Raise these (not ValueError) where user input enters auditkit: files,
datasets, checkpoints, architecture and layer names, command options.
Library misuse inside Python (wrong tensor shapes passed to an op) keeps
raising ValueError/TypeError.
"""

from __future__ import annotations


def short_list(names, limit: int = 6) -> str:
    """The first ``limit`` names, comma-separated, with ", ..." when there are more: how a message
    shows a list of classes or keys in one line."""
    names = [str(n) for n in names]
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


class AuditkitError(Exception):
    """Bad input: a missing or corrupt file, an unknown name, inconsistent data."""


class DataError(AuditkitError):
    """A dataset, image or mask that cannot be read or does not fit."""


class CheckpointError(AuditkitError):
    """A checkpoint that cannot be read safely, or does not match its model."""


class ModelError(AuditkitError):
    """An unknown architecture or layer name, or a model that cannot be built."""


class ParameterError(AuditkitError):
    """A bad value for a named parameter of a library call. The message names the parameter as
    Python spells it (`lam`, `batch_size`); the command line names its own flag instead (--lambda,
    --batch-size: auditkit/cli/_common.py maps them)."""

    def __init__(self, parameter: str, problem: str) -> None:
        self.parameter = parameter
        self.problem = problem
        super().__init__(f"`{parameter}` {problem}")

    def naming(self, name: str) -> str:
        """The message with the parameter called ``name`` (a CLI flag)."""
        return f"{name} {self.problem}"


class OutputExistsError(ParameterError, FileExistsError):
    """An output that would replace an existing file or folder without ``overwrite``
    (the command line's --force)."""
