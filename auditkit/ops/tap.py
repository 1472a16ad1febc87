"""The Targeted Activation Penalty (TAP paper, Eq. 7-8) as fused ops.

    D(M)  = AdaptiveAvgPool_(h,w)( MaxPool_{k, stride 1, pad k//2}(M) )        (Eq. 7)
    P[n]  = sum_{i,j} D(M)[n,i,j] * sum_c relu(A[n,c,i,j])
    L_TAP = (1/L) sum_l mean_n P_l[n]                                            (Eq. 8)

The max pool widens each annotated region by k//2 pixels to cover the
receptive field around it; the adaptive average brings it to the layer's
resolution with exactly torch.nn.functional.adaptive_avg_pool2d's windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import (
    check_downscale_mask_args,
    check_mask_values,
    check_tap_penalty_args,
    debug_checks_enabled,
)


def _maybe_check_values(mask: torch.Tensor) -> None:
    # CPU kernels check the mask range for free; elsewhere it costs a device
    # sync, so only in debug mode (and never while torch.compile traces).
    if debug_checks_enabled() and not torch.compiler.is_compiling():
        check_mask_values(mask)


def tap_penalty(activation: torch.Tensor, mask: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """Per-sample TAP penalty P[n] of one targeted layer.

    Args:
        activation: (N, C, h, w) float16/bfloat16/float32/float64, any strides.
        mask: (N, 1, H, W) or (N, H, W) at input resolution, values in [0, 1]
            (1 = spurious pixel), H >= h and W >= w. Treated as a constant.
        kernel_size: max-pool size k of Eq. 7 (the region grows by k//2 pixels).

    Returns:
        (N,) penalties, float32 (float64 for float64 activations); accumulation
        is in that dtype, so float16 activations cannot overflow it.
    """
    check_tap_penalty_args(activation, mask, kernel_size)
    _maybe_check_values(mask)
    penalty, _ = torch.ops.auditkit.tap_penalty(activation, mask.detach(), kernel_size)
    return penalty


def tap_loss(activations: Sequence[torch.Tensor], mask: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """L_TAP of Eq. 8: the mean over layers of the batch-mean penalty.

    This is what training adds to the task loss (times lambda). An empty batch
    gives 0.
    """
    if len(activations) == 0:
        raise ValueError("tap_loss: `activations` is empty; pass the outputs of the targeted layers")
    total = sum(tap_penalty(activation, mask, kernel_size).sum() for activation in activations)
    batch = max(int(activations[0].shape[0]), 1)
    return total / (len(activations) * batch)


def downscale_mask(mask: torch.Tensor, size: tuple[int, int], kernel_size: int = 3) -> torch.Tensor:
    """D(M) of Eq. 7 as an (N, h, w) tensor (float32, float64 for a float64 mask)."""
    height, width = (int(s) for s in size)
    check_downscale_mask_args(mask, height, width, kernel_size)
    _maybe_check_values(mask)
    return torch.ops.auditkit.downscale_mask(mask.detach(), height, width, kernel_size)
