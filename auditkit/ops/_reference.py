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
    grad: torch.Tensor, activation: torch.Tensor, weights: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """dP/dA = g[n] * weights[n,i,j] * 1[A > 0] (plus ``base`` when given), in the activation's dtype."""
    acc = accumulate_dtype(activation.dtype)
    scaled = grad.to(acc)[:, None, None, None] * weights.to(acc)[:, None]
    zero = torch.zeros((), dtype=acc, device=activation.device)
    out = torch.where(activation > 0, scaled, zero)
    if base is not None:
        out = out + base.to(acc)
    return out.to(activation.dtype)


def tap_penalty_reference(activation: torch.Tensor, mask: torch.Tensor, kernel_size: int = 3) -> torch.Tensor:
    """P[n] = sum_ij D(M)[n,i,j] * sum_c relu(A[n,c,i,j])  (TAP Eq. 8, per sample)."""
    weights = downscale_mask_reference(
        mask.detach(), activation.shape[-2:], kernel_size, accumulate_dtype(activation.dtype)
    )
    return weighted_relu_sum_reference(activation, weights)


# ---- LRP-epsilon (Bassi et al. 2024, arXiv:2407.09788, App. A Eq. A1-A3) ------------------------
# Relevance may hold K explanations per sample: shape (K*N, ...) target-major, while the
# forward's tensors keep batch N and are broadcast over K.


def lrp_targets(relevance: torch.Tensor, output: torch.Tensor) -> int:
    """K, the number of explanations per sample carried by ``relevance``."""
    n = output.shape[0]
    return 1 if n == 0 else relevance.shape[0] // n


def lrp_stabilise(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z + eps * sign(z) with sign(0) = +1: never smaller than eps in magnitude."""
    # The sign is built as exact +-1 in z's dtype and then scaled: torch.where with Python
    # scalars would make a float32 epsilon and lose precision for float64 inputs.
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


def lrp_epsilon_ratio_reference(relevance: torch.Tensor, output: torch.Tensor, epsilon: float) -> torch.Tensor:
    """s = R / (z + eps * sign z), z broadcast over the K explanations per sample."""
    k = lrp_targets(relevance, output)
    return (relevance.view(k, *output.shape) / lrp_stabilise(output, epsilon)).reshape(relevance.shape)


def lrp_epsilon_ratio_backward_reference(
    grad: torch.Tensor, relevance: torch.Tensor, output: torch.Tensor, epsilon: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of s = R / stab(z): (grad / stab(z), -sum_K grad * R / stab(z)^2)."""
    k = lrp_targets(relevance, output)
    stab = lrp_stabilise(output, epsilon)
    per_target = grad.reshape(k, *output.shape) / stab
    grad_output = -(per_target * relevance.reshape(k, *output.shape) / stab).sum(0)
    return per_target.reshape(relevance.shape).contiguous(), grad_output


def _times_activation(contribution: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    k = contribution.shape[0] // max(activation.shape[0], 1)
    return (contribution.view(k, *activation.shape) * activation).reshape(contribution.shape)


def lrp_epsilon_conv2d_reference(input, output, relevance, weight, stride, padding, dilation, groups, epsilon):
    """R_in = a * W^T (R / (z + eps sign z)) for z = conv2d(a, W) + b."""
    s = lrp_epsilon_ratio_reference(relevance, output, epsilon)
    shape = (relevance.shape[0], *input.shape[1:])
    contribution = torch.nn.grad.conv2d_input(shape, weight, s, stride, padding, dilation, groups)
    return _times_activation(contribution, input)


def lrp_epsilon_linear_reference(input, output, relevance, weight, epsilon):
    """R_in = a * W^T (R / (z + eps sign z)) for z = a W^T + b."""
    s = lrp_epsilon_ratio_reference(relevance, output, epsilon)
    return _times_activation(s @ weight, input)
