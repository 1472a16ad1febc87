"""Safe file writes: a temp file in the target folder, then an atomic rename."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import OutputExistsError


def _default_file_mode() -> int:
    """0o666 minus the process umask: what open() would have given the file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Calls ``write(tmp_path)`` and renames the result to ``path``.

    The target is never left half-written: a crash or Ctrl-C leaves either the
    old file or the new one. Refuses to replace an existing file unless
    ``overwrite`` is set.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise OutputExistsError("overwrite", f"is off and {target} already exists: choose another path, or allow replacing it")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600 files
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)
