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
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

DISABLE_VARIABLE = "AUDITKIT_DISABLE_EXTENSION"


class ReferenceFallbackWarning(RuntimeWarning):
    """The compiled kernels are not in use; the pure-PyTorch reference runs instead."""


@dataclass(frozen=True)
class CudaArch:
    """One entry of the extension's TORCH_CUDA_ARCH_LIST: machine code for sm_<major><minor>
    (``specific``: the arch-specific 'a'/'f' variant), plus PTX when ``ptx``."""

    major: int
    minor: int
    ptx: bool = False
    specific: bool = False

    def runs_on(self, capability: tuple[int, int]) -> bool:
        """Whether a GPU of this compute capability can run this entry's code: machine code runs
        on its own major version at an equal or higher minor (the arch-specific variant on its
        own capability only); PTX is compiled by the driver for any equal or newer GPU (CUDA C
        Programming Guide, "Binary Compatibility" and "PTX Compatibility")."""
        own = (self.major, self.minor)
        if self.specific:
            return capability == own
        if capability[0] == self.major and capability[1] >= self.minor:
            return True
        return self.ptx and capability >= own


def parse_cuda_archs(token: str) -> list[CudaArch] | None:
    """The build's arch token ("7.5_8.0_9.0ptx", see setup.py) as entries; None when unknown."""
    if not token or token == "unknown":
        return None
    archs = []
    for part in token.split("_"):
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(ptx)?", part)
        if match is None:
            return None
        archs.append(CudaArch(int(match[1]), int(match[2]), bool(match[4]), bool(match[3])))
    return archs


def describe_cuda_archs(archs: list[CudaArch]) -> str:
    """[7.5, 8.0, 9.0+PTX] -> "sm_75, sm_80, sm_90 (+PTX 9.0)"."""
    names = [f"sm_{a.major}{a.minor}{'a' if a.specific else ''}" for a in archs]
    ptx = [f"{a.major}.{a.minor}" for a in archs if a.ptx]
    return ", ".join(names) + (f" (+PTX {', '.join(ptx)})" if ptx else "")


def unsupported_gpus(archs: list[CudaArch] | None, capabilities: dict[str, tuple[int, int]]) -> list[str]:
    """The devices (name -> compute capability) that none of ``archs`` runs on; none when the
    list is unknown (trusted)."""
    if archs is None:
        return []
    return [
        f"{device} (sm_{major}{minor})"
        for device, (major, minor) in capabilities.items()
        if not any(arch.runs_on((major, minor)) for arch in archs)
    ]


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
    reason = f"compiled for CUDA {int(compiled) // 1000}.{int(compiled) % 1000 // 10}"
    archs = parse_cuda_archs(build_info.get("cuda_archs", "unknown"))
    if archs is not None:
        reason += f", {describe_cuda_archs(archs)}"
    return True, reason


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


# Set once CUDA initialises, if a visible GPU has no kernel image in the build (see
# auditkit/ops/_library.py, which then serves CUDA tensors with the reference).
_cuda_device_fallback: str | None = None


def current_status() -> ExtensionStatus:
    """``status()`` as it stands now: after CUDA initialised, it also says whether the compiled
    CUDA kernels run on the visible GPUs (checked then, not at import, which must not touch CUDA)."""
    loaded = status()
    if _cuda_device_fallback is None or not loaded.cuda_kernels:
        return loaded
    return replace(loaded, cuda_kernels=False, cuda_reason=_cuda_device_fallback)


def record_cuda_device_fallback(reason: str) -> None:
    global _cuda_device_fallback
    _cuda_device_fallback = reason


def warn_if_fallback(current: ExtensionStatus) -> None:
    if not current.loaded:
        warnings.warn(
            f"auditkit is using its pure-PyTorch reference kernels: {current.reason}",
            ReferenceFallbackWarning,
            stacklevel=3,
        )
