"""Argument checks for the auditkit ops.

Shape, dtype and device checks run on every call (they read no tensor data,
so they cost no device sync and also run on fake tensors under
torch.compile). Value checks (mask range, NaN) read data: they run where data
enters auditkit (readers, CLI), inside the CPU kernels, where they ride along
for free, and on GPU tensors only when debug checks are on
(``AUDITKIT_DEBUG=1`` or ``set_debug_checks(True)``). The messages match the
C++ checks in csrc/ops/tap_penalty.cpp.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_debug_checks = os.environ.get("AUDITKIT_DEBUG", "") == "1"


def set_debug_checks(enabled: bool) -> None:
    """Turns value checks on tensors (mask range, NaN) on or off for every device."""
    global _debug_checks
    _debug_checks = bool(enabled)


def debug_checks_enabled() -> bool:
    return _debug_checks


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def _check_is_tensor(value, name: str, op: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor; got {type(value).__name__}")


def check_mask_tensor(mask: torch.Tensor) -> None:
    _check_is_tensor(mask, "mask", "tap_penalty")
    if not (mask.dim() == 3 or (mask.dim() == 4 and mask.shape[1] == 1)):
        raise ValueError(f"tap_penalty: `mask` must have shape (N, 1, H, W) or (N, H, W); got {_shape(mask)}")
    if mask.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            "tap_penalty: `mask` must be a floating tensor with values in [0, 1] "
            f"(float16, bfloat16, float32 or float64); got {mask.dtype}. Convert it with mask.float()."
        )


def check_kernel_size(kernel_size: int) -> None:
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1:
        raise ValueError(f"tap_penalty: `kernel_size` must be an integer >= 1; got {kernel_size!r}")


def check_mask_covers(mask: torch.Tensor, height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"tap_penalty: the activation's spatial size must be at least 1x1; got {height}x{width}")
    mask_h, mask_w = mask.shape[-2], mask.shape[-1]
    if mask_h < height or mask_w < width:
        raise ValueError(
            f"tap_penalty: `mask` ({mask_h}x{mask_w}) is smaller than the activation map ({height}x{width}); "
            "masks are given at input resolution and must be at least as large as every targeted activation"
        )


def check_downscale_mask_args(
    mask: torch.Tensor, kernel_sizes: Sequence[int], sizes: Sequence[tuple[int, int]], dtype: torch.dtype | None
) -> None:
    check_mask_tensor(mask)
    if len(sizes) == 0:
        raise ValueError("downscale_mask: `sizes` must list (height, width) pairs; got none")
    if len(kernel_sizes) not in (1, len(sizes)):
        raise ValueError(
            f"downscale_mask: `kernel_sizes` must hold one kernel size for all layers or one per layer "
            f"({len(sizes)}); got {list(kernel_sizes)}"
        )
    for kernel_size in kernel_sizes:
        check_kernel_size(kernel_size)
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise TypeError(f"downscale_mask: `dtype` must be float32 or float64; got {dtype}")
    for height, width in sizes:
        check_mask_covers(mask, height, width)


def check_activation(activation: torch.Tensor) -> None:
    _check_is_tensor(activation, "activation", "tap_penalty")
    if activation.dim() != 4:
        raise ValueError(f"tap_penalty: `activation` must have shape (N, C, h, w); got {_shape(activation)}")
    if activation.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"tap_penalty: `activation` must be float16, bfloat16, float32 or float64; got {activation.dtype}"
        )


def check_weighted_relu_sum_args(activation: torch.Tensor, weights: torch.Tensor) -> None:
    check_activation(activation)
    _check_is_tensor(weights, "weights", "weighted_relu_sum")
    n, _, h, w = activation.shape
    if weights.dim() != 3 or tuple(weights.shape) != (n, h, w):
        raise ValueError(
            f"weighted_relu_sum: `weights` must have shape (N, h, w) = ({n}, {h}, {w}) to match "
            f"`activation`; got {_shape(weights)}"
        )
    if weights.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"weighted_relu_sum: `weights` must be floating; got {weights.dtype}")
    if weights.device != activation.device:
        raise ValueError(
            f"weighted_relu_sum: `weights` is on {weights.device} but `activation` is on {activation.device}"
        )


def check_weighted_relu_sum_backward_grad(grad: torch.Tensor, activation: torch.Tensor, weights: torch.Tensor) -> None:
    """Same rules as csrc's check_weighted_relu_sum_backward_args for `weights` and `grad`."""
    check_weighted_relu_sum_args(activation, weights)
    if grad.dim() != 1 or grad.shape[0] != activation.shape[0]:
        raise ValueError(
            f"weighted_relu_sum_backward: `grad` must have shape ({activation.shape[0]},); got {_shape(grad)}"
        )
    if grad.dtype not in _FLOAT_DTYPES:
        raise TypeError("weighted_relu_sum_backward: `grad` must be floating")
    if grad.device != activation.device:
        raise ValueError("weighted_relu_sum_backward: all tensors must be on one device")


def check_weighted_relu_sum_backward_base(activation: torch.Tensor, base: torch.Tensor | None) -> None:
    """Same rules as csrc's check_weighted_relu_sum_backward_args for the optional `base`."""
    if base is None:
        return
    if tuple(base.shape) != tuple(activation.shape):
        raise ValueError(
            f"weighted_relu_sum_backward: `base` must have the activation's shape {_shape(activation)}; "
            f"got {_shape(base)}"
        )
    if base.dtype != activation.dtype:
        raise TypeError(
            f"weighted_relu_sum_backward: `base` must have the activation's dtype {activation.dtype}; got {base.dtype}"
        )
    if base.device != activation.device:
        raise ValueError("weighted_relu_sum_backward: all tensors must be on one device")


def check_tap_penalty_args(activation: torch.Tensor, mask: torch.Tensor, kernel_size: int) -> None:
    check_activation(activation)
    check_mask_tensor(mask)
    if mask.shape[0] != activation.shape[0]:
        raise ValueError(
            f"tap_penalty: `mask` has batch size {mask.shape[0]} but `activation` has {activation.shape[0]}"
        )
    if mask.device != activation.device:
        raise ValueError(f"tap_penalty: `mask` is on {mask.device} but `activation` is on {activation.device}")
    check_kernel_size(kernel_size)
    check_mask_covers(mask, activation.shape[2], activation.shape[3])


def check_mask_values(mask: torch.Tensor, name: str = "mask") -> None:
    """Raises ValueError unless every value lies in [0, 1] (NaN fails). Reads the data."""
    if mask.numel() == 0:
        return
    inside = (mask >= 0) & (mask <= 1)
    if not bool(inside.all()):
        bad = mask[~inside]
        raise ValueError(
            f"tap_penalty: `{name}` values must lie in [0, 1] (1 = spurious pixel); "
            f"found {bad.numel()} outside that range or NaN (e.g. {bad.flatten()[0].item():g})"
        )


def check_ratio_backward_inplace_args(grad: torch.Tensor) -> None:
    """lrp_epsilon_ratio_backward_ overwrites ``grad`` position by position: it must be contiguous."""
    if not grad.is_contiguous():
        raise ValueError("lrp_epsilon_ratio_backward_: `grad` must be contiguous (it is overwritten)")


def check_lrp_broadcast(relevance: torch.Tensor, output: torch.Tensor, op: str) -> int:
    """Same rules and messages as csrc's check_lrp_broadcast; returns K (explanations per sample)."""
    if relevance.dtype not in _FLOAT_DTYPES or relevance.dtype != output.dtype:
        raise TypeError(
            f"{op}: `relevance` and `output` must share one floating dtype; got {relevance.dtype} and {output.dtype}"
        )
    if relevance.device != output.device:
        raise ValueError(f"{op}: `relevance` is on {relevance.device} but `output` is on {output.device}")
    if output.dim() < 1 or relevance.dim() != output.dim() or relevance.shape[1:] != output.shape[1:]:
        raise ValueError(f"{op}: `relevance` must have the shape of `output` except for its batch; got "
                         f"{_shape(relevance)} and {_shape(output)}")
    n = output.shape[0]
    if not ((n == 0 and relevance.shape[0] == 0) or (n > 0 and relevance.shape[0] % n == 0)):
        raise ValueError(f"{op}: the batch of `relevance` ({relevance.shape[0]}) must be a multiple of the batch of "
                         f"`output` ({n}): K explanations per sample")
    return 1 if n == 0 else relevance.shape[0] // n


def check_epsilon(epsilon: float, op: str) -> None:
    if not epsilon >= 0:
        raise ValueError(f"{op}: `epsilon` must be >= 0; got {epsilon}")


def check_lrp_linear_shapes(input: torch.Tensor, output: torch.Tensor, weight: torch.Tensor) -> None:
    """Same rule and message as csrc's lrp_epsilon_linear."""
    if not (input.dim() == 2 and output.dim() == 2 and weight.dim() == 2 and weight.shape[0] == output.shape[1]
            and weight.shape[1] == input.shape[1]):
        raise ValueError(f"lrp_epsilon_linear: expected input (N, in), output (N, out), weight (out, in); got "
                         f"{_shape(input)}, {_shape(output)}, {_shape(weight)}")
