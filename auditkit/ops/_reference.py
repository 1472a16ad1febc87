"""Pure-PyTorch reference implementations of the auditkit ops.

They are the test oracle (composed from stock torch ops, so autograd supplies
their gradients independently of our backward formulas) and the fallback
kernels when the compiled extension is missing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/float16/bfloat16 activations, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def downscale_mask_reference(
    mask: torch.Tensor,
    size: tuple[int, int],
    kernel_size: int = 3,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """D(M) of TAP Eq. 7: AdaptiveAvgPool_size(MaxPool_{k, stride 1, pad k//2}(M)).

    mask: (N, 1, H, W) or (N, H, W); returns (N, h, w) in ``dtype`` (default:
    float64 for a float64 mask, else float32). The max is exact in the mask's
    dtype; the window means are taken in float64 and rounded once.
    """
    m = mask if mask.dim() == 4 else mask.unsqueeze(1)
    dilated = F.max_pool2d(m, kernel_size, stride=1, padding=kernel_size // 2)
    out = F.adaptive_avg_pool2d(dilated.double(), tuple(int(s) for s in size))[:, 0]
    if dtype is None:
        dtype = torch.float64 if mask.dtype == torch.float64 else torch.float32
    return out.to(dtype)


def weighted_relu_sum_reference(activation: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """P[n] = sum_{c,i,j} weights[n,i,j] * relu(A[n,c,i,j]), in the accumulate dtype."""
    acc = accumulate_dtype(activation.dtype)
    return (activation.to(acc).relu() * weights.to(acc).unsqueeze(1)).sum(dim=(1, 2, 3))


def weighted_relu_sum_backward_reference(
    grad: torch.Tensor, activation: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """dP/dA = g[n] * weights[n,i,j] * 1[A > 0], in the activation's dtype."""
    acc = accumulate_dtype(activation.dtype)
    scaled = grad.to(acc)[:, None, None, None] * weights.to(acc)[:, None]
    zero = torch.zeros((), dtype=acc, device=activation.device)
    return torch.where(activation > 0, scaled, zero).to(activation.dtype)


def tap_penalty_reference(activation: torch.Tensor, mask: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """P[n] = sum_ij D(M)[n,i,j] * sum_c relu(A[n,c,i,j])  (TAP Eq. 8, per sample)."""
    weights = downscale_mask_reference(
        mask.detach(), activation.shape[-2:], kernel_size, accumulate_dtype(activation.dtype)
    )
    return weighted_relu_sum_reference(activation, weights)
