"""auditkit: audit image classifiers for shortcut learning, repair them with TAP or TEA.

Submodules are imported lazily so that ``import auditkit`` and the CLI's
``--help`` stay fast; ``auditkit.ops`` loads the compiled kernels (or the
pure-PyTorch reference when they are missing) on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

__all__ = ["__version__", "ops"]

_SUBMODULES = {"ops"}


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'auditkit' has no attribute {name!r}")
