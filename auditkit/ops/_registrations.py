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
from ._checks import (
    check_downscale_mask_args,
    check_mask_values,
    check_tap_penalty_args,
)
from ._reference import (
    accumulate_dtype,
    downscale_mask_reference,
    tap_penalty_backward_reference,
)

# Must equal the TORCH_LIBRARY definitions in csrc/ (a test compares them).
SCHEMAS = {
    "tap_penalty": "tap_penalty(Tensor activation, Tensor mask, int kernel_size=3) -> (Tensor, Tensor)",
    "tap_penalty_backward": "tap_penalty_backward(Tensor grad, Tensor activation, Tensor downscaled_mask) -> Tensor",
    "downscale_mask": "downscale_mask(Tensor mask, int height, int width, int kernel_size=3) -> Tensor",
}


def empty_activation_grad(activation: torch.Tensor) -> torch.Tensor:
    """Same layout rule as empty_activation_grad in csrc/ops/tap_penalty.cpp."""
    channels_last = not activation.is_contiguous() and activation.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(
        activation, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


# ---- reference kernels (fallback) -------------------------------------------


def _tap_penalty_reference_kernel(activation, mask, kernel_size=3):
    check_tap_penalty_args(activation, mask, kernel_size)
    if mask.device.type == "cpu":
        check_mask_values(mask)  # the compiled CPU kernel checks this too, for free
    acc = accumulate_dtype(activation.dtype)
    weights = downscale_mask_reference(mask, activation.shape[-2:], kernel_size, acc)
    penalty = (activation.to(acc).relu() * weights.unsqueeze(1)).sum(dim=(1, 2, 3))
    return penalty, weights


def _tap_penalty_backward_reference_kernel(grad, activation, downscaled_mask):
    out = empty_activation_grad(activation)
    out.copy_(tap_penalty_backward_reference(grad, activation, downscaled_mask))
    return out


def _downscale_mask_reference_kernel(mask, height, width, kernel_size=3):
    check_downscale_mask_args(mask, height, width, kernel_size)
    if mask.device.type == "cpu":
        check_mask_values(mask)
    return downscale_mask_reference(mask, (height, width), kernel_size)


_REFERENCE_KERNELS = {
    "tap_penalty": _tap_penalty_reference_kernel,
    "tap_penalty_backward": _tap_penalty_backward_reference_kernel,
    "downscale_mask": _downscale_mask_reference_kernel,
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


@torch.library.register_fake("auditkit::tap_penalty")
def _tap_penalty_fake(activation, mask, kernel_size=3):
    check_tap_penalty_args(activation, mask, kernel_size)
    acc = accumulate_dtype(activation.dtype)
    n, _, h, w = activation.shape
    return activation.new_empty((n,), dtype=acc), activation.new_empty((n, h, w), dtype=acc)


@torch.library.register_fake("auditkit::tap_penalty_backward")
def _tap_penalty_backward_fake(grad, activation, downscaled_mask):
    return empty_activation_grad(activation)


@torch.library.register_fake("auditkit::downscale_mask")
def _downscale_mask_fake(mask, height, width, kernel_size=3):
    check_downscale_mask_args(mask, height, width, kernel_size)
    dtype = torch.float64 if mask.dtype == torch.float64 else torch.float32
    return mask.new_empty((mask.shape[0], height, width), dtype=dtype)


# ---- autograd -------------------------------------------------------------------


def _tap_penalty_setup_context(ctx, inputs, output):
    activation, _mask, _kernel_size = inputs
    _penalty, downscaled_mask = output
    ctx.save_for_backward(activation, downscaled_mask)
    ctx.mark_non_differentiable(downscaled_mask)


def _tap_penalty_backward(ctx, grad_penalty, _grad_downscaled_mask):
    activation, downscaled_mask = ctx.saved_tensors
    grad_activation = None
    if ctx.needs_input_grad[0]:
        grad_activation = torch.ops.auditkit.tap_penalty_backward(grad_penalty, activation, downscaled_mask)
    # The mask is a constant annotation (TAP Eq. 8): no gradient flows to it.
    return grad_activation, None, None


torch.library.register_autograd(
    "auditkit::tap_penalty", _tap_penalty_backward, setup_context=_tap_penalty_setup_context
)


def _refuse(message: str):
    def backward(ctx, *grads):
        raise RuntimeError(message)

    return backward


def _no_context(ctx, inputs, output):
    return None


torch.library.register_autograd(
    "auditkit::tap_penalty_backward",
    _refuse(
        "auditkit: double backward through tap_penalty is not supported "
        "(TAP needs first-order gradients only)"
    ),
    setup_context=_no_context,
)
torch.library.register_autograd(
    "auditkit::downscale_mask",
    _refuse("auditkit: downscale_mask is not differentiable; masks are constant annotations"),
    setup_context=_no_context,
)
