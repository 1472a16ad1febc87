"""Public ops: the fused TAP penalty and its helpers.

Importing this module loads the compiled kernels, or registers the
pure-PyTorch reference in their place and warns once (``ReferenceFallbackWarning``).
``extension_status()`` says which kernels serve CPU and CUDA tensors.
"""

from __future__ import annotations

from . import _registrations  # noqa: F401  (registers the ops)
from ._checks import check_mask_values, debug_checks_enabled, set_debug_checks
from ._extension import ExtensionStatus, ReferenceFallbackWarning
from ._extension import status as extension_status
from .tap import downscale_mask, tap_loss, tap_penalty

__all__ = [
    "ExtensionStatus",
    "ReferenceFallbackWarning",
    "check_mask_values",
    "debug_checks_enabled",
    "downscale_mask",
    "extension_status",
    "set_debug_checks",
    "tap_loss",
    "tap_penalty",
]
