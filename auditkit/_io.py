"""Safe file writes: a temp file in the target folder, then an atomic rename."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import AuditkitError, OutputExistsError

# Below this much free space a failed write is put down to a full disk: torch.save reports ENOSPC
# as a RuntimeError from its zip writer ("unexpected pos ..."), not as an OSError.
_NEARLY_FULL = 16 * 2**20


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
        raise OutputExistsError(
            "overwrite", f"is off and {target} already exists: choose another path, or allow replacing it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600 files
        os.replace(tmp, target)
    except (OSError, RuntimeError) as error:
        failure = _write_failure(target, error)
        if failure is error:
            raise
        raise failure from error
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _write_failure(target: Path, error: Exception) -> Exception:
    """The one line a failed write becomes, or ``error`` itself when its cause is not the disk's."""
    if isinstance(error, AuditkitError):
        return error
    free = shutil.disk_usage(target.parent).free  # measured while the partial temp file still exists
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < _NEARLY_FULL:
        return AuditkitError(f"could not write {target}: no space left on its disk ({free / 2**20:.0f} MiB free); "
                             "free some space or write elsewhere")
    if isinstance(error, OSError):
        return AuditkitError(f"could not write {target}: {error.strerror or error}")
    return error


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=overwrite)
