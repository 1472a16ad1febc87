"""The LRP-epsilon ratio s = R / (z + eps * sign(z)), sign(0) = +1, and its backward (Bassi
et al. 2024, "Training with Explanations Alone", arXiv:2407.09788, App. A Eq. A1).

Every LRP-epsilon step divides the relevance R arriving at a layer by the layer's stabilised
output z; ``auditkit::lrp_epsilon_ratio`` does it in one fused pass, with R holding K explanations
per sample laid out target-major as (K*N, ...) while z keeps the forward's batch N (broadcast, never
copied). Its gradient (TEA differentiates heatmaps) is one fused pass too:

    d/dR = g / stab(z)                              (K*N, ...)
    d/dz = -sum_K g * R / stab(z)^2                 (N, ...)

``lrp_epsilon_ratio_backward_`` writes d/dR over ``g`` (contiguous) and returns d/dz, so TEA's
double backward never holds both output-sized tensors at once. The backward is not differentiable
again (TEA needs first-order gradients of the heatmap).
"""

from __future__ import annotations

import torch

from . import _library
from ._checks import check_epsilon, check_lrp_broadcast, check_ratio_backward_inplace_args
from ._reference import lrp_epsilon_ratio_backward_reference, lrp_epsilon_ratio_reference

SCHEMA = "lrp_epsilon_ratio(Tensor relevance, Tensor output, float epsilon) -> Tensor"
BACKWARD_SCHEMA = (
    "lrp_epsilon_ratio_backward(Tensor grad, Tensor relevance, Tensor output, float epsilon) -> (Tensor, Tensor)"
)
INPLACE_BACKWARD_SCHEMA = (
    "lrp_epsilon_ratio_backward_(Tensor(a!) grad, Tensor relevance, Tensor output, float epsilon) -> Tensor"
)


# The fallback kernels check their arguments as csrc does (same exceptions and messages).
def _reference_kernel(relevance, output, epsilon):
    check_lrp_broadcast(relevance, output, "lrp_epsilon_ratio")
    check_epsilon(epsilon, "lrp_epsilon_ratio")
    return lrp_epsilon_ratio_reference(relevance, output, epsilon)


def _backward_reference_kernel(grad, relevance, output, epsilon):
    check_lrp_broadcast(relevance, output, "lrp_epsilon_ratio_backward")
    check_epsilon(epsilon, "lrp_epsilon_ratio_backward")
    return lrp_epsilon_ratio_backward_reference(grad, relevance, output, epsilon)


def _inplace_backward_reference_kernel(grad, relevance, output, epsilon):
    check_ratio_backward_inplace_args(grad)
    grad_relevance, grad_output = _backward_reference_kernel(grad, relevance, output, epsilon)
    grad.copy_(grad_relevance)
    return grad_output


_library.define("lrp_epsilon_ratio", SCHEMA, _reference_kernel)
_library.define("lrp_epsilon_ratio_backward", BACKWARD_SCHEMA, _backward_reference_kernel)
_library.define("lrp_epsilon_ratio_backward_", INPLACE_BACKWARD_SCHEMA, _inplace_backward_reference_kernel)


@torch.library.register_fake("auditkit::lrp_epsilon_ratio")
def _fake(relevance, output, epsilon):
    return torch.empty_like(relevance, memory_format=torch.contiguous_format)


@torch.library.register_fake("auditkit::lrp_epsilon_ratio_backward")
def _backward_fake(grad, relevance, output, epsilon):
    return (torch.empty_like(relevance, memory_format=torch.contiguous_format),
            torch.empty_like(output, memory_format=torch.contiguous_format))


@torch.library.register_fake("auditkit::lrp_epsilon_ratio_backward_")
def _inplace_backward_fake(grad, relevance, output, epsilon):
    check_ratio_backward_inplace_args(grad)
    return torch.empty_like(output, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    relevance, z, epsilon = inputs
    ctx.epsilon = epsilon
    ctx.save_for_backward(relevance, z)


def _backward(ctx, grad):
    relevance, z = ctx.saved_tensors
    grad_relevance, grad_output = torch.ops.auditkit.lrp_epsilon_ratio_backward(grad, relevance, z, ctx.epsilon)
    return (
        grad_relevance if ctx.needs_input_grad[0] else None,
        grad_output if ctx.needs_input_grad[1] else None,
        None,
    )


torch.library.register_autograd("auditkit::lrp_epsilon_ratio", _backward, setup_context=_setup_context)
torch.library.register_autograd(
    "auditkit::lrp_epsilon_ratio_backward",
    _library.refuse(
        "auditkit: LRP-epsilon is differentiable once (what TEA needs); its backward is not differentiable"
    ),
    setup_context=_library.no_context,
)


def lrp_epsilon_ratio(relevance: torch.Tensor, output: torch.Tensor, epsilon: float) -> torch.Tensor:
    """s = R / (z + epsilon * sign(z)) with sign(0) = +1 (Bassi et al. 2024, arXiv:2407.09788, App. A Eq. A1),
    differentiable in R and z.

    ``relevance`` R: (K*N, ...) for K explanations per sample, target-major; ``output`` z: (N, ...),
    the layer's output, broadcast over the K; both one floating dtype and device; ``epsilon`` >= 0
    (a float). Returns s, contiguous, R's shape and dtype (computed in float32 for half inputs).
    Raises ValueError/TypeError naming the argument for bad shapes, dtypes or devices."""
    return torch.ops.auditkit.lrp_epsilon_ratio(relevance, output, epsilon)


def lrp_epsilon_ratio_backward(
    grad: torch.Tensor, relevance: torch.Tensor, output: torch.Tensor, epsilon: float, *, overwrite_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dR, d/dz) of ``lrp_epsilon_ratio`` for the incoming gradient ``grad`` (R's shape), in one
    pass. ``overwrite_grad=True`` writes d/dR into ``grad`` (which must be contiguous) and returns it:
    no second output-sized tensor is allocated."""
    if overwrite_grad:
        grad_output = torch.ops.auditkit.lrp_epsilon_ratio_backward_(grad, relevance, output, epsilon)
        return grad, grad_output
    return torch.ops.auditkit.lrp_epsilon_ratio_backward(grad, relevance, output, epsilon)
