"""Public ops: the fused TAP penalty (TAP Eq. 7-8) and its building blocks.

Importing this module loads the compiled kernels, or registers the
pure-PyTorch reference in their place and warns once (``ReferenceFallbackWarning``).
``extension_status()`` says which kernels serve CPU and CUDA tensors.
"""

from __future__ import annotations

from . import _registrations  # noqa: F401  (registers the ops)
from ._checks import check_mask_values, debug_checks_enabled, set_debug_checks
from ._extension import ExtensionStatus, ReferenceFallbackWarning
from ._extension import current_status as extension_status
from .tap import downscale_mask, downscale_masks, tap_loss, tap_penalty, weighted_relu_sum

__all__ = [
    "ExtensionStatus",
    "ReferenceFallbackWarning",
    "check_mask_values",
    "debug_checks_enabled",
    "downscale_mask",
    "downscale_masks",
    "extension_status",
    "set_debug_checks",
    "tap_loss",
    "tap_penalty",
    "weighted_relu_sum",
]
