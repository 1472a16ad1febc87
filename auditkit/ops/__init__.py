"""Public ops: the fused TAP penalty (TAP Eq. 7-8), the LRP-epsilon steps (Bassi et al. 2024,
arXiv:2407.09788, Eq. A1), and
their building blocks.

Importing this module loads the compiled kernels, or registers the pure-PyTorch reference in their
place and warns once (``ReferenceFallbackWarning``). ``extension_status()`` says which kernels
serve CPU and CUDA tensors. One file per op: its schema, reference fallback, fake kernel, autograd
formula and Python wrapper (downscale_mask.py, weighted_relu_sum.py, lrp_epsilon_ratio.py,
lrp_epsilon_step.py); tap.py composes the TAP penalty from the first two.
"""

from __future__ import annotations

from ._checks import check_mask_values, debug_checks_enabled, set_debug_checks
from ._extension import ExtensionStatus, ReferenceFallbackWarning
from ._extension import current_status as extension_status
from .downscale_mask import downscale_mask, downscale_masks
from .lrp_epsilon_ratio import lrp_epsilon_ratio, lrp_epsilon_ratio_backward
from .lrp_epsilon_step import lrp_epsilon_conv2d, lrp_epsilon_linear
from .tap import tap_loss, tap_penalty
from .weighted_relu_sum import weighted_relu_sum, weighted_relu_sum_backward

__all__ = [
    "ExtensionStatus",
    "ReferenceFallbackWarning",
    "check_mask_values",
    "debug_checks_enabled",
    "downscale_mask",
    "downscale_masks",
    "extension_status",
    "lrp_epsilon_conv2d",
    "lrp_epsilon_linear",
    "lrp_epsilon_ratio",
    "lrp_epsilon_ratio_backward",
    "set_debug_checks",
    "tap_loss",
    "tap_penalty",
    "weighted_relu_sum",
    "weighted_relu_sum_backward",
]
