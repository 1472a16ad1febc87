"""One LRP-epsilon step through a convolution or a linear layer z = W a + b (Bassi et al. 2024, "Training with
Explanations Alone", arXiv:2407.09788, App. A Eq. A1-A3):

    s    = R / (z + eps * sign(z))      lrp_epsilon_ratio (fused kernel)
    c    = W^T s                        the layer's input gradient for output gradient s (cuDNN/oneDNN, GEMM)
    R_in = a * c

``auditkit::lrp_epsilon_conv2d`` and ``auditkit::lrp_epsilon_linear`` are device-generic
compositions in csrc (one C++ implementation for every device), batched over K explanations per
sample: R is (K*N, ...) target-major while a and z keep batch N. They are differentiable in a, z,
R and W (TEA trains on heatmaps), with the gradients

    d/dR = T^T(g a) / stab(z)
    d/dz = -sum_K T^T(g a) * s / stab(z)      (z is shared by the K targets)
    d/da = sum_K g * T(s)
    d/dW from <g a, W^T s> = <W (g a), s>: the weight gradient of a layer whose input is g*a and
         whose output gradient is s.
"""

from __future__ import annotations

import torch

from . import _library
from ._checks import check_lrp_broadcast, check_lrp_linear_shapes
from ._reference import lrp_epsilon_conv2d_reference, lrp_epsilon_linear_reference, lrp_targets
from .lrp_epsilon_ratio import lrp_epsilon_ratio, lrp_epsilon_ratio_backward

CONV2D_SCHEMA = (
    "lrp_epsilon_conv2d(Tensor input, Tensor output, Tensor relevance, Tensor weight, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups, float epsilon) -> Tensor"
)
LINEAR_SCHEMA = (
    "lrp_epsilon_linear(Tensor input, Tensor output, Tensor relevance, Tensor weight, float epsilon) -> Tensor"
)


def _conv2d_reference_kernel(input, output, relevance, weight, stride, padding, dilation, groups, epsilon):
    check_lrp_broadcast(relevance, output, "lrp_epsilon_conv2d")
    return lrp_epsilon_conv2d_reference(input, output, relevance, weight, stride, padding, dilation, groups, epsilon)


def _linear_reference_kernel(input, output, relevance, weight, epsilon):
    check_lrp_broadcast(relevance, output, "lrp_epsilon_linear")
    check_lrp_linear_shapes(input, output, weight)
    return lrp_epsilon_linear_reference(input, output, relevance, weight, epsilon)


_library.define("lrp_epsilon_conv2d", CONV2D_SCHEMA, _conv2d_reference_kernel, device_generic=True)
_library.define("lrp_epsilon_linear", LINEAR_SCHEMA, _linear_reference_kernel, device_generic=True)


@torch.library.register_fake("auditkit::lrp_epsilon_conv2d")
def _conv2d_fake(input, output, relevance, weight, stride, padding, dilation, groups, epsilon):
    return input.new_empty((relevance.shape[0], *input.shape[1:]))


@torch.library.register_fake("auditkit::lrp_epsilon_linear")
def _linear_fake(input, output, relevance, weight, epsilon):
    return input.new_empty((relevance.shape[0], input.shape[1]))


def _per_target(t, k):
    return t.view(k, t.shape[0] // k, *t.shape[1:])


def _setup_context(ctx, inputs, output):
    input, z, relevance, weight, *config = inputs
    ctx.config = config
    ctx.save_for_backward(input, z, relevance, weight)


def _step_backward(ctx, grad, transposed, forward, weight_grad):
    """Shared backward of the conv2d and linear steps; the three callables are the layer's
    W^T (transposed), W (forward) and weight gradient. Runs in the saved tensors' dtype whatever
    autocast says: a backward called inside ``torch.autocast`` would otherwise compute T^T(g a) in
    the low dtype and hand the ratio's backward mismatched dtypes."""
    with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
        return _step_backward_exact(ctx, grad.to(ctx.saved_tensors[2].dtype), transposed, forward, weight_grad)


def _step_backward_exact(ctx, grad, transposed, forward, weight_grad):
    input, z, relevance, weight = ctx.saved_tensors
    epsilon = ctx.config[-1]
    k = lrp_targets(relevance, z)
    s = lrp_epsilon_ratio(relevance, z, epsilon)
    weighted = (_per_target(grad, k) * input).reshape(grad.shape)  # g * a
    needs_input, needs_z, needs_relevance, needs_weight = ctx.needs_input_grad[:4]
    grad_input = (_per_target(grad, k) * _per_target(transposed(s), k)).sum(0) if needs_input else None
    grad_weight = weight_grad(weighted, s) if needs_weight else None
    del s  # an output-sized tensor: freed before the two output-sized gradients below exist (peak memory)
    grad_relevance = grad_output = None
    if needs_z or needs_relevance:
        grad_s = forward(weighted)  # T^T(g a), output-sized
        # Overwritten by d/dR where it can be: the two output-sized tensors are never alive at once.
        inplace = grad_s.is_contiguous() and grad_s.shape == relevance.shape and grad_s.dtype == relevance.dtype
        grad_relevance, grad_output = lrp_epsilon_ratio_backward(grad_s, relevance, z, epsilon, overwrite_grad=inplace)
        del grad_s
    return grad_input, (grad_output if needs_z else None), (grad_relevance if needs_relevance else None), \
        grad_weight, *([None] * len(ctx.config))


def _conv2d_backward(ctx, grad):
    input, _z, relevance, weight = ctx.saved_tensors
    stride, padding, dilation, groups, _epsilon = ctx.config
    shape = (relevance.shape[0], *input.shape[1:])

    def transposed(s):
        return torch.nn.grad.conv2d_input(shape, weight, s, stride, padding, dilation, groups)

    def forward(x):
        return torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)

    def weight_grad(x, s):
        return torch.ops.aten.convolution_backward(
            s, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [False, True, False]
        )[1]

    return _step_backward(ctx, grad, transposed, forward, weight_grad)


def _linear_backward(ctx, grad):
    weight = ctx.saved_tensors[3]
    return _step_backward(ctx, grad, lambda s: s @ weight, lambda x: x @ weight.t(), lambda x, s: s.t() @ x)


torch.library.register_autograd("auditkit::lrp_epsilon_conv2d", _conv2d_backward, setup_context=_setup_context)
torch.library.register_autograd("auditkit::lrp_epsilon_linear", _linear_backward, setup_context=_setup_context)


def lrp_epsilon_conv2d(
    input: torch.Tensor,
    output: torch.Tensor,
    relevance: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    epsilon: float,
) -> torch.Tensor:
    """R_in = a * W^T (R / (z + eps sign z)) through a 2-D convolution (Bassi et al. 2024, arXiv:2407.09788,
    App. A Eq. A1).

    ``input`` a: (N, C_in, H, W), the layer's input; ``output`` z: (N, C_out, h, w), its output
    (bias included); ``relevance`` R: (K*N, C_out, h, w), target-major; ``weight``: (C_out, C_in /
    groups, kh, kw); ``stride``, ``padding``, ``dilation``: two ints each, as the convolution's.
    Returns R_in (K*N, C_in, H, W). Differentiable in a, z, R and W. ValueError/TypeError for
    inconsistent shapes, dtypes or devices."""
    return torch.ops.auditkit.lrp_epsilon_conv2d(input, output, relevance, weight, list(stride), list(padding),
                                                 list(dilation), groups, epsilon)


def lrp_epsilon_linear(
    input: torch.Tensor, output: torch.Tensor, relevance: torch.Tensor, weight: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """R_in = a * W^T (R / (z + eps sign z)) through a linear layer (Bassi et al. 2024, arXiv:2407.09788,
    App. A Eq. A1).

    ``input`` a: (N, in); ``output`` z: (N, out); ``relevance`` R: (K*N, out), target-major;
    ``weight``: (out, in). Returns R_in (K*N, in). Differentiable in a, z, R and W."""
    return torch.ops.auditkit.lrp_epsilon_linear(input, output, relevance, weight, epsilon)
