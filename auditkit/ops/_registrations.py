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
    check_epsilon,
    check_lrp_broadcast,
    check_lrp_linear_shapes,
    check_mask_values,
    check_ratio_backward_inplace_args,
    check_weighted_relu_sum_args,
    check_weighted_relu_sum_backward_base,
    check_weighted_relu_sum_backward_grad,
)
from ._reference import (
    accumulate_dtype,
    downscale_mask_reference,
    lrp_epsilon_conv2d_reference,
    lrp_epsilon_linear_reference,
    lrp_epsilon_ratio_backward_reference,
    lrp_epsilon_ratio_reference,
    lrp_targets,
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
        "weighted_relu_sum_backward(Tensor grad, Tensor activation, Tensor weights, Tensor? base=None) -> Tensor"
    ),
    "lrp_epsilon_ratio": "lrp_epsilon_ratio(Tensor relevance, Tensor output, float epsilon) -> Tensor",
    "lrp_epsilon_ratio_backward": (
        "lrp_epsilon_ratio_backward(Tensor grad, Tensor relevance, Tensor output, float epsilon) -> (Tensor, Tensor)"
    ),
    "lrp_epsilon_ratio_backward_": (
        "lrp_epsilon_ratio_backward_(Tensor(a!) grad, Tensor relevance, Tensor output, float epsilon) -> Tensor"
    ),
    "lrp_epsilon_conv2d": (
        "lrp_epsilon_conv2d(Tensor input, Tensor output, Tensor relevance, Tensor weight, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups, float epsilon) -> Tensor"
    ),
    "lrp_epsilon_linear": (
        "lrp_epsilon_linear(Tensor input, Tensor output, Tensor relevance, Tensor weight, float epsilon) -> Tensor"
    ),
}
# Device-generic compositions in csrc (CompositeExplicitAutograd): only the ratio has
# per-device kernels, so only it needs a CUDA fallback when CUDA kernels are missing.
_COMPOSITE_OPS = {"lrp_epsilon_conv2d", "lrp_epsilon_linear"}


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


def _weighted_relu_sum_backward_reference_kernel(grad, activation, weights, base=None):
    check_weighted_relu_sum_backward_grad(grad, activation, weights)
    check_weighted_relu_sum_backward_base(activation, base)
    out = empty_activation_grad(activation)
    out.copy_(weighted_relu_sum_backward_reference(grad, activation, weights, base))
    return out


# The fallback kernels check their arguments as csrc does (same exceptions and messages).
def _lrp_epsilon_ratio_reference_kernel(relevance, output, epsilon):
    check_lrp_broadcast(relevance, output, "lrp_epsilon_ratio")
    check_epsilon(epsilon, "lrp_epsilon_ratio")
    return lrp_epsilon_ratio_reference(relevance, output, epsilon)


def _lrp_epsilon_ratio_backward_reference_kernel(grad, relevance, output, epsilon):
    check_lrp_broadcast(relevance, output, "lrp_epsilon_ratio_backward")
    check_epsilon(epsilon, "lrp_epsilon_ratio_backward")
    return lrp_epsilon_ratio_backward_reference(grad, relevance, output, epsilon)


def _lrp_epsilon_conv2d_reference_kernel(input, output, relevance, weight, stride, padding, dilation, groups, epsilon):
    check_lrp_broadcast(relevance, output, "lrp_epsilon_conv2d")
    return lrp_epsilon_conv2d_reference(input, output, relevance, weight, stride, padding, dilation, groups, epsilon)


def _lrp_epsilon_linear_reference_kernel(input, output, relevance, weight, epsilon):
    check_lrp_broadcast(relevance, output, "lrp_epsilon_linear")
    check_lrp_linear_shapes(input, output, weight)
    return lrp_epsilon_linear_reference(input, output, relevance, weight, epsilon)


def _lrp_epsilon_ratio_backward_inplace_reference_kernel(grad, relevance, output, epsilon):
    check_ratio_backward_inplace_args(grad)
    grad_relevance, grad_output = _lrp_epsilon_ratio_backward_reference_kernel(grad, relevance, output, epsilon)
    grad.copy_(grad_relevance)
    return grad_output


_REFERENCE_KERNELS = {
    "downscale_mask": _downscale_mask_reference_kernel,
    "weighted_relu_sum": _weighted_relu_sum_reference_kernel,
    "weighted_relu_sum_backward": _weighted_relu_sum_backward_reference_kernel,
    "lrp_epsilon_ratio": _lrp_epsilon_ratio_reference_kernel,
    "lrp_epsilon_ratio_backward": _lrp_epsilon_ratio_backward_reference_kernel,
    "lrp_epsilon_ratio_backward_": _lrp_epsilon_ratio_backward_inplace_reference_kernel,
    "lrp_epsilon_conv2d": _lrp_epsilon_conv2d_reference_kernel,
    "lrp_epsilon_linear": _lrp_epsilon_linear_reference_kernel,
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


def _serve_cuda_with_reference() -> None:
    lib = torch.library.Library("auditkit", "IMPL")
    for name, kernel in _REFERENCE_KERNELS.items():
        if name not in _COMPOSITE_OPS:
            lib.impl(name, kernel, "CUDA")
    _libraries.append(lib)


def check_cuda_devices(capabilities: dict[str, tuple[int, int]] | None = None) -> str | None:
    """Runs when CUDA initialises (``torch.cuda._lazy_call``; import must not touch CUDA):
    when a visible GPU has no kernel image in the build (e.g. a T4, sm_75, against a build for
    sm_80/sm_90 only), the reference serves CUDA tensors instead of every op failing with "no
    kernel image", and ``extension_status()`` and a ReferenceFallbackWarning say so. Returns
    that reason, or None when the kernels run on every visible GPU. ``capabilities`` (device
    name -> compute capability) replaces the real devices in tests."""
    if capabilities is None:
        capabilities = {f"cuda:{i}": torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    archs = _extension.parse_cuda_archs(STATUS.build_info.get("cuda_archs", "unknown"))
    missing = _extension.unsupported_gpus(archs, capabilities)
    if not missing:
        return None
    reason = (
        f"the CUDA kernels were compiled for {_extension.describe_cuda_archs(archs)}, which do not run on "
        f"{', '.join(missing)}; the reference serves CUDA tensors (rebuild with TORCH_CUDA_ARCH_LIST naming "
        "this GPU's compute capability, e.g. `TORCH_CUDA_ARCH_LIST=7.5 make build`)"
    )
    _extension.record_cuda_device_fallback(reason)
    import warnings

    with warnings.catch_warnings():  # torch warns that the compiled CUDA kernels are overridden: intended
        warnings.simplefilter("ignore", UserWarning)
        _serve_cuda_with_reference()
    warnings.warn(f"auditkit: {reason}", _extension.ReferenceFallbackWarning, stacklevel=2)
    return reason


def _check_cuda_devices_safely() -> None:
    try:
        check_cuda_devices()
    except Exception as error:  # noqa: BLE001 - must never break CUDA's initialisation
        import warnings

        warnings.warn(f"auditkit could not check its CUDA kernels against this GPU: {error}", RuntimeWarning)


if STATUS.loaded and not STATUS.cuda_kernels:
    _serve_cuda_with_reference()
elif STATUS.cuda_kernels:
    torch.cuda._lazy_call(_check_cuda_devices_safely)  # now if CUDA is initialised, else at its initialisation


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
def _weighted_relu_sum_backward_fake(grad, activation, weights, base=None):
    check_weighted_relu_sum_backward_base(activation, base)
    return empty_activation_grad(activation)


@torch.library.register_fake("auditkit::lrp_epsilon_ratio")
def _lrp_epsilon_ratio_fake(relevance, output, epsilon):
    return torch.empty_like(relevance, memory_format=torch.contiguous_format)


@torch.library.register_fake("auditkit::lrp_epsilon_ratio_backward")
def _lrp_epsilon_ratio_backward_fake(grad, relevance, output, epsilon):
    return (torch.empty_like(relevance, memory_format=torch.contiguous_format),
            torch.empty_like(output, memory_format=torch.contiguous_format))


@torch.library.register_fake("auditkit::lrp_epsilon_ratio_backward_")
def _lrp_epsilon_ratio_backward_inplace_fake(grad, relevance, output, epsilon):
    check_ratio_backward_inplace_args(grad)
    return torch.empty_like(output, memory_format=torch.contiguous_format)


@torch.library.register_fake("auditkit::lrp_epsilon_conv2d")
def _lrp_epsilon_conv2d_fake(input, output, relevance, weight, stride, padding, dilation, groups, epsilon):
    return input.new_empty((relevance.shape[0], *input.shape[1:]))


@torch.library.register_fake("auditkit::lrp_epsilon_linear")
def _lrp_epsilon_linear_fake(input, output, relevance, weight, epsilon):
    return input.new_empty((relevance.shape[0], input.shape[1]))


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
    "auditkit::lrp_epsilon_ratio_backward",
    _refuse("auditkit: LRP-epsilon is differentiable once (what TEA needs); its backward is not differentiable"),
    setup_context=_no_context,
)
torch.library.register_autograd(
    "auditkit::downscale_mask",
    _refuse("auditkit: downscale_mask is not differentiable; masks are constant annotations"),
    setup_context=_no_context,
)


# ---- LRP-epsilon: differentiable so that TEA can train on heatmaps --------------------
# With s = R / stab(z), stab(z) = z + eps sign z, and a step R_in = a * T(s) (T = W^T):
#   d/dR    = T^T(g a) / stab(z)
#   d/dz    = -sum_K T^T(g a) * s / stab(z)            (z is shared by the K targets)
#   d/da    = sum_K g * T(s)
#   d/dW    from <g a, W^T s> = <W (g a), s>: the weight gradient of a layer whose
#           input is g*a and whose output gradient is s.


def _per_target(t, k):
    return t.view(k, t.shape[0] // k, *t.shape[1:])


def _ratio_backward_parts(grad_s, relevance, output, epsilon, needs_relevance, needs_output):
    grad_relevance, grad_output = torch.ops.auditkit.lrp_epsilon_ratio_backward(grad_s, relevance, output, epsilon)
    return (grad_relevance if needs_relevance else None), (grad_output if needs_output else None)


def _lrp_ratio_setup(ctx, inputs, output):
    relevance, z, epsilon = inputs
    ctx.epsilon = epsilon
    ctx.save_for_backward(relevance, z)


def _lrp_ratio_backward(ctx, grad):
    relevance, z = ctx.saved_tensors
    grad_relevance, grad_output = _ratio_backward_parts(
        grad, relevance, z, ctx.epsilon, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    )
    return grad_relevance, grad_output, None


torch.library.register_autograd("auditkit::lrp_epsilon_ratio", _lrp_ratio_backward, setup_context=_lrp_ratio_setup)


def _lrp_step_setup(ctx, inputs, output):
    input, z, relevance, weight, *config = inputs
    ctx.config = config
    ctx.save_for_backward(input, z, relevance, weight)


def _lrp_step_backward(ctx, grad, transposed, forward, weight_grad):
    """Shared backward of the conv2d and linear steps; the three callables are the layer's
    W^T (transposed), W (forward) and weight gradient. Runs in the saved tensors' dtype whatever
    autocast says: a backward called inside ``torch.autocast`` would otherwise compute T^T(g a) in
    the low dtype and hand the ratio's backward mismatched dtypes."""
    with torch.autocast(ctx.saved_tensors[0].device.type, enabled=False):
        return _lrp_step_backward_exact(ctx, grad.to(ctx.saved_tensors[2].dtype), transposed, forward, weight_grad)


def _lrp_step_backward_exact(ctx, grad, transposed, forward, weight_grad):
    input, z, relevance, weight = ctx.saved_tensors
    epsilon = ctx.config[-1]
    k = lrp_targets(relevance, z)
    s = torch.ops.auditkit.lrp_epsilon_ratio(relevance, z, epsilon)
    weighted = (_per_target(grad, k) * input).reshape(grad.shape)  # g * a
    needs_input, needs_z, needs_relevance, needs_weight = ctx.needs_input_grad[:4]
    grad_input = (_per_target(grad, k) * _per_target(transposed(s), k)).sum(0) if needs_input else None
    grad_weight = weight_grad(weighted, s) if needs_weight else None
    del s  # an output-sized tensor: freed before the two output-sized gradients below exist (peak memory)
    grad_relevance = grad_output = None
    if needs_z or needs_relevance:
        grad_s = forward(weighted)  # T^T(g a), output-sized
        if grad_s.is_contiguous() and grad_s.shape == relevance.shape and grad_s.dtype == relevance.dtype:
            # Overwritten by d/dR: the two output-sized tensors are never alive at once (peak memory).
            grad_output = torch.ops.auditkit.lrp_epsilon_ratio_backward_(grad_s, relevance, z, epsilon)
            grad_relevance = grad_s
        else:
            grad_relevance, grad_output = torch.ops.auditkit.lrp_epsilon_ratio_backward(grad_s, relevance, z, epsilon)
        del grad_s
    return grad_input, (grad_output if needs_z else None), (grad_relevance if needs_relevance else None), \
        grad_weight, *([None] * len(ctx.config))


def _lrp_conv2d_backward(ctx, grad):
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

    return _lrp_step_backward(ctx, grad, transposed, forward, weight_grad)


def _lrp_linear_backward(ctx, grad):
    weight = ctx.saved_tensors[3]
    return _lrp_step_backward(ctx, grad, lambda s: s @ weight, lambda x: x @ weight.t(), lambda x, s: s.t() @ x)


torch.library.register_autograd("auditkit::lrp_epsilon_conv2d", _lrp_conv2d_backward, setup_context=_lrp_step_setup)
torch.library.register_autograd("auditkit::lrp_epsilon_linear", _lrp_linear_backward, setup_context=_lrp_step_setup)
