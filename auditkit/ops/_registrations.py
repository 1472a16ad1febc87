"""Registers the auditkit ops with PyTorch: kernels, fake kernels, autograd.

The schemas and the CPU/CUDA kernels come from the compiled extension
(csrc/). When it is missing, the same schemas are defined here and served by
the pure-PyTorch reference on every device; when it lacks CUDA kernels, the
reference serves CUDA tensors. Fake kernels (for torch.compile and meta
tensors) and autograd formulas are registered here in all cases, so every
path behaves the same way.
"""

from __future__ import annotations

import torch

from . import _extension
from ._checks import check_downscale_mask_args, check_mask_values, check_weighted_relu_sum_args
from ._reference import (
    accumulate_dtype,
    downscale_mask_reference,
    weighted_relu_sum_backward_reference,
    weighted_relu_sum_reference,
)

# Must equal the TORCH_LIBRARY definitions in csrc/ (a test compares them).
SCHEMAS = {
    "downscale_mask": (
        "downscale_mask(Tensor mask, int kernel_size, int[] sizes, ScalarType? dtype=None) -> Tensor[]"
    ),
    "weighted_relu_sum": "weighted_relu_sum(Tensor activation, Tensor weights) -> Tensor",
    "weighted_relu_sum_backward": (
        "weighted_relu_sum_backward(Tensor grad, Tensor activation, Tensor weights) -> Tensor"
    ),
}


def size_pairs(sizes) -> list[tuple[int, int]]:
    """[h0, w0, h1, w1, ...] -> [(h0, w0), (h1, w1), ...]"""
    if len(sizes) % 2:
        raise ValueError(f"downscale_mask: `sizes` must list (height, width) pairs; got {list(sizes)}")
    return [(sizes[k], sizes[k + 1]) for k in range(0, len(sizes), 2)]


def downscaled_dtype(mask: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if mask.dtype == torch.float64 else torch.float32


def empty_activation_grad(activation: torch.Tensor) -> torch.Tensor:
    """Same layout rule as empty_activation_grad in csrc/ops/tap_penalty.cpp."""
    channels_last = not activation.is_contiguous() and activation.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(
        activation, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


# ---- reference kernels (fallback) -------------------------------------------


def _downscale_mask_reference_kernel(mask, kernel_size, sizes, dtype=None):
    pairs = size_pairs(sizes)
    check_downscale_mask_args(mask, kernel_size, pairs, dtype)
    if mask.device.type == "cpu":
        check_mask_values(mask)  # the compiled CPU kernel checks this too, for free
    out_dtype = downscaled_dtype(mask, dtype)
    return [downscale_mask_reference(mask, size, kernel_size, out_dtype) for size in pairs]


def _weighted_relu_sum_reference_kernel(activation, weights):
    check_weighted_relu_sum_args(activation, weights)
    return weighted_relu_sum_reference(activation, weights)


def _weighted_relu_sum_backward_reference_kernel(grad, activation, weights):
    out = empty_activation_grad(activation)
    out.copy_(weighted_relu_sum_backward_reference(grad, activation, weights))
    return out


_REFERENCE_KERNELS = {
    "downscale_mask": _downscale_mask_reference_kernel,
    "weighted_relu_sum": _weighted_relu_sum_reference_kernel,
    "weighted_relu_sum_backward": _weighted_relu_sum_backward_reference_kernel,
}

STATUS = _extension.status()
_libraries: list[torch.library.Library] = []  # kept alive: dropping one unregisters it

if not STATUS.loaded:
    _extension.warn_if_fallback(STATUS)
    _lib = torch.library.Library("auditkit", "DEF")
    for _name, _schema in SCHEMAS.items():
        _lib.define(_schema)
        _lib.impl(_name, _REFERENCE_KERNELS[_name], "CompositeExplicitAutograd")
    _libraries.append(_lib)
elif not STATUS.cuda_kernels:
    _lib = torch.library.Library("auditkit", "IMPL")
    for _name, _kernel in _REFERENCE_KERNELS.items():
        _lib.impl(_name, _kernel, "CUDA")
    _libraries.append(_lib)


# ---- fake kernels -------------------------------------------------------------


@torch.library.register_fake("auditkit::downscale_mask")
def _downscale_mask_fake(mask, kernel_size, sizes, dtype=None):
    pairs = size_pairs(sizes)
    check_downscale_mask_args(mask, kernel_size, pairs, dtype)
    out_dtype = downscaled_dtype(mask, dtype)
    return [mask.new_empty((mask.shape[0], h, w), dtype=out_dtype) for h, w in pairs]


@torch.library.register_fake("auditkit::weighted_relu_sum")
def _weighted_relu_sum_fake(activation, weights):
    check_weighted_relu_sum_args(activation, weights)
    return activation.new_empty((activation.shape[0],), dtype=accumulate_dtype(activation.dtype))


@torch.library.register_fake("auditkit::weighted_relu_sum_backward")
def _weighted_relu_sum_backward_fake(grad, activation, weights):
    return empty_activation_grad(activation)


# ---- autograd -------------------------------------------------------------------


def _weighted_relu_sum_setup_context(ctx, inputs, output):
    activation, weights = inputs
    if weights.requires_grad:
        raise ValueError(
            "weighted_relu_sum: `weights` (the downscaled mask) are constants of the penalty; "
            "detach them (TAP Eq. 8 differentiates the activations only)"
        )
    ctx.save_for_backward(activation, weights)


def _weighted_relu_sum_backward(ctx, grad_penalty):
    activation, weights = ctx.saved_tensors
    grad_activation = None
    if ctx.needs_input_grad[0]:
        grad_activation = torch.ops.auditkit.weighted_relu_sum_backward(grad_penalty, activation, weights)
    return grad_activation, None


torch.library.register_autograd(
    "auditkit::weighted_relu_sum", _weighted_relu_sum_backward, setup_context=_weighted_relu_sum_setup_context
)


def _refuse(message: str):
    def backward(ctx, *grads):
        raise RuntimeError(message)

    return backward


def _no_context(ctx, inputs, output):
    return None


torch.library.register_autograd(
    "auditkit::weighted_relu_sum_backward",
    _refuse("auditkit: double backward through tap_penalty is not supported (TAP needs first-order gradients only)"),
    setup_context=_no_context,
)
torch.library.register_autograd(
    "auditkit::downscale_mask",
    _refuse("auditkit: downscale_mask is not differentiable; masks are constant annotations"),
    setup_context=_no_context,
)
