"""The streaming half of the TAP penalty (TAP Eq. 8): P[n] = sum_{c,i,j} W[n,i,j] * relu(A[n,c,i,j]).

``auditkit::weighted_relu_sum(A, W)`` reads each activation once and never materialises the
(N, h, w) channel sum; its result and accumulation are float32 (float64 for float64 activations).
Its gradient, ``auditkit::weighted_relu_sum_backward(g, A, W, base)`` = base + g[n] * W[n,i,j] *
1[A > 0], is one elementwise pass that can add itself to an incoming gradient (``base``), which is
how ``tap_loss(defer_gradient=True)`` keeps a plain step's peak memory.
"""

from __future__ import annotations

import torch

from . import _library
from ._checks import (
    check_weighted_relu_sum_args,
    check_weighted_relu_sum_backward_base,
    check_weighted_relu_sum_backward_grad,
)
from ._reference import accumulate_dtype, weighted_relu_sum_backward_reference, weighted_relu_sum_reference

SCHEMA = "weighted_relu_sum(Tensor activation, Tensor weights) -> Tensor"
BACKWARD_SCHEMA = (
    "weighted_relu_sum_backward(Tensor grad, Tensor activation, Tensor weights, Tensor? base=None) -> Tensor"
)


def empty_activation_grad(activation: torch.Tensor) -> torch.Tensor:
    """Same layout rule as empty_activation_grad in csrc/ops/tap_penalty.cpp."""
    channels_last = not activation.is_contiguous() and activation.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(
        activation, memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )


def _reference_kernel(activation, weights):
    check_weighted_relu_sum_args(activation, weights)
    return weighted_relu_sum_reference(activation, weights)


def _backward_reference_kernel(grad, activation, weights, base=None):
    check_weighted_relu_sum_backward_grad(grad, activation, weights)
    check_weighted_relu_sum_backward_base(activation, base)
    out = empty_activation_grad(activation)
    out.copy_(weighted_relu_sum_backward_reference(grad, activation, weights, base))
    return out


_library.define("weighted_relu_sum", SCHEMA, _reference_kernel)
_library.define("weighted_relu_sum_backward", BACKWARD_SCHEMA, _backward_reference_kernel)


@torch.library.register_fake("auditkit::weighted_relu_sum")
def _fake(activation, weights):
    check_weighted_relu_sum_args(activation, weights)
    return activation.new_empty((activation.shape[0],), dtype=accumulate_dtype(activation.dtype))


@torch.library.register_fake("auditkit::weighted_relu_sum_backward")
def _backward_fake(grad, activation, weights, base=None):
    check_weighted_relu_sum_backward_base(activation, base)
    return empty_activation_grad(activation)


def _setup_context(ctx, inputs, output):
    activation, weights = inputs
    if weights.requires_grad:
        raise ValueError(
            "weighted_relu_sum: `weights` (the downscaled mask) are constants of the penalty; "
            "detach them (TAP Eq. 8 differentiates the activations only)"
        )
    ctx.save_for_backward(activation, weights)


def _backward(ctx, grad_penalty):
    activation, weights = ctx.saved_tensors
    grad_activation = None
    if ctx.needs_input_grad[0]:
        grad_activation = torch.ops.auditkit.weighted_relu_sum_backward(grad_penalty, activation, weights)
    return grad_activation, None


torch.library.register_autograd("auditkit::weighted_relu_sum", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "auditkit::weighted_relu_sum_backward",
    _library.refuse(
        "auditkit: double backward through tap_penalty is not supported (TAP needs first-order gradients only)"
    ),
    setup_context=_library.no_context,
)


def weighted_relu_sum(activation: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """P[n] = sum_{c,i,j} weights[n,i,j] * relu(activation[n,c,i,j]), one pass over the activation.

    ``activation`` (N, C, h, w) float16/bfloat16/float32/float64, any strides; ``weights`` (N, h, w).
    Differentiable in ``activation`` (weights are constants). The result (N,) is float32 (float64
    for float64 activations) and so is the accumulation. Bad shapes or dtypes: ValueError/TypeError.
    """
    check_weighted_relu_sum_args(activation, weights)
    return torch.ops.auditkit.weighted_relu_sum(activation, weights)


def weighted_relu_sum_backward(
    grad: torch.Tensor, activation: torch.Tensor, weights: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """dP/dA = grad[n] * weights[n,i,j] * 1[activation > 0], plus ``base`` when given, in one pass:
    (N, C, h, w) in the activation's dtype, channels_last when the activation is."""
    return torch.ops.auditkit.weighted_relu_sum_backward(grad, activation, weights, base)
