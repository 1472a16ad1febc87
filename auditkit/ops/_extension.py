"""Finds and loads the compiled kernels (``auditkit._C``) without ever raising.

The library is a plain shared object that registers its ops with the PyTorch
dispatcher when loaded (``torch.ops.load_library``); it has no Python module
init, so a missing or broken build can only make loading fail, which we catch
and report. ``status()`` says what is live and why.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

DISABLE_VARIABLE = "AUDITKIT_DISABLE_EXTENSION"


class ReferenceFallbackWarning(RuntimeWarning):
    """The compiled kernels are not in use; the pure-PyTorch reference runs instead."""


@dataclass(frozen=True)
class ExtensionStatus:
    """Which kernels serve the auditkit ops in this process, and why."""

    loaded: bool
    path: str | None
    reason: str
    build_info: dict[str, str] = field(default_factory=dict)
    cuda_kernels: bool = False
    cuda_reason: str = ""

    @property
    def cpu_backend(self) -> str:
        return "compiled" if self.loaded else "reference"

    @property
    def cuda_backend(self) -> str:
        return "compiled" if self.cuda_kernels else "reference"


def _library_path() -> str | None:
    """auditkit/_C<suffix> next to this package's files, or None.

    Looked up in the package folder itself (not through the import system, whose
    editable-install finders could point at another checkout's build).
    """
    package_dir = Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package_dir / f"_C{suffix}"
        if candidate.is_file():
            return str(candidate)
    return None


def _parse_build_info(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(";") if "=" in part)


def _cuda_status(build_info: dict[str, str]) -> tuple[bool, str]:
    compiled = build_info.get("cuda", "none")
    if compiled == "none":
        return False, "the extension was built without CUDA kernels (no CUDA toolkit at build time)"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    compiled_major = int(compiled) // 1000
    torch_major = int(torch.version.cuda.split(".")[0])
    if compiled_major != torch_major:
        return False, (
            f"the extension was compiled for CUDA {compiled_major}.x but torch uses CUDA "
            f"{torch.version.cuda}; rebuild with `make build`"
        )
    return True, f"compiled for CUDA {int(compiled) // 1000}.{int(compiled) % 1000 // 10}"


@functools.cache
def status() -> ExtensionStatus:
    """Loads the extension once; never raises."""
    if os.environ.get(DISABLE_VARIABLE) == "1":
        return ExtensionStatus(False, None, f"disabled by {DISABLE_VARIABLE}=1", cuda_reason="extension disabled")
    path = _library_path()
    if path is None:
        return ExtensionStatus(
            False,
            None,
            "auditkit._C is not built (run `make build`, or pip install --no-build-isolation -e .)",
            cuda_reason="extension not built",
        )
    try:
        torch.ops.load_library(path)
        info = _parse_build_info(torch.ops.auditkit._build_info())
    except (OSError, RuntimeError, AttributeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return ExtensionStatus(
            False,
            path,
            f"auditkit._C failed to load ({first_line}); rebuild with `make build`",
            cuda_reason="extension failed to load",
        )
    cuda_ok, cuda_reason = _cuda_status(info)
    return ExtensionStatus(True, path, "loaded", info, cuda_ok, cuda_reason)


def warn_if_fallback(current: ExtensionStatus) -> None:
    if not current.loaded:
        warnings.warn(
            f"auditkit is using its pure-PyTorch reference kernels: {current.reason}",
            ReferenceFallbackWarning,
            stacklevel=3,
        )
