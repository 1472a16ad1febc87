"""The Targeted Activation Penalty (TAP paper, Eq. 7-8) on fused kernels.

    D(M)  = AdaptiveAvgPool_(h,w)( MaxPool_{k, stride 1, pad k//2}(M) )        (Eq. 7)
    P[n]  = sum_{i,j} D(M)[n,i,j] * sum_c relu(A[n,c,i,j])
    L_TAP = (1/L) sum_l mean_n P_l[n]                                            (Eq. 8)

The max pool widens each annotated region by k//2 pixels to cover the
receptive field around it; the adaptive average brings it to the layer's
resolution with exactly torch.nn.functional.adaptive_avg_pool2d's windows.

Two ops do the work (a file each, with their fake and autograd registrations):
``downscale_mask`` computes D(M) for every targeted layer in one pass over the
mask (tiny outputs), and ``weighted_relu_sum`` streams each activation once.
``tap_loss`` calls the first once per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._checks import check_tap_penalty_args
from ._reference import accumulate_dtype
from .downscale_mask import downscale_mask, downscale_masks, kernel_size_list
from .weighted_relu_sum import weighted_relu_sum, weighted_relu_sum_backward


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
    weights = downscale_mask(mask, activation.shape[-2:], kernel_size, accumulate_dtype(activation.dtype))
    return torch.ops.auditkit.weighted_relu_sum(activation, weights)


class _DeferredPenaltyGradient(torch.autograd.Function):
    """P = weighted_relu_sum(A, D) whose backward does not return dP/dA: it hands (g, A, D) to the
    gradient hook on A (see tap_loss), which adds g·D·1[A > 0] to A's incoming gradient in one pass."""

    @staticmethod
    def forward(ctx, activation, weights, pending):
        ctx.save_for_backward(activation, weights)  # also checks A was not modified in place since
        ctx.pending = pending
        return torch.ops.auditkit.weighted_relu_sum(activation, weights)

    @staticmethod
    def backward(ctx, grad_penalty):
        activation, weights = ctx.saved_tensors
        ctx.pending.append((grad_penalty, activation, weights))
        return None, None, None


# A transformer's token map (N, C, gh, gw) is a view of its layer's token sequence (N, T, C);
# models/tokens.py marks it with (sequence, number of prefix tokens) when the network goes on from the
# sequence itself (capture_activations(rebuild=False)). The penalty's gradient is then added to the
# sequence's own gradient, channels innermost, without a copy of either.
_TOKENS = "_auditkit_tokens"


def mark_token_map(feature_map: torch.Tensor, tokens: torch.Tensor, prefix: int) -> torch.Tensor:
    """Marks ``feature_map`` (N, C, gh, gw), the view of ``tokens`` (N, T, C) without its first
    ``prefix`` tokens (token ``prefix + i*gw + j`` at [:, :, i, j]), for :func:`tap_loss`."""
    setattr(feature_map, _TOKENS, (tokens, int(prefix)))
    return feature_map


def _as_token_row(tokens: torch.Tensor, prefix: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sequence as a one-row map (N, C, 1, T) (a view, channels innermost: the kernels' channels-last
    path) and its weights (N, 1, T): D(M) on the grid tokens, 0 on the prefix tokens."""
    n, count, _ = tokens.shape
    row = weights.new_zeros(n, 1, count)
    row[:, 0, prefix:] = weights.reshape(n, -1)
    return _token_row(tokens), row


def _token_row(sequence: torch.Tensor) -> torch.Tensor:
    return sequence.transpose(1, 2).unsqueeze(2)  # (N, T, C) -> (N, C, 1, T), a view


def _penalty_with_deferred_gradient(activation: torch.Tensor, weights: torch.Tensor,
                                    tokens: torch.Tensor | None = None) -> torch.Tensor:
    """The penalty on ``activation``, its gradient added by a hook on ``activation`` itself, or on
    ``tokens`` when ``activation`` is their one-row view (``_as_token_row``)."""
    pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    # The hook must not hold the tensor it is registered on: that cycle (tensor -> hook -> tensor) keeps
    # every step's graph alive until Python's cyclic collector runs (measured: +570 MB per epoch).
    sequence = tokens is not None

    def add_penalty_gradient(grad: torch.Tensor | None) -> torch.Tensor | None:
        # Runs when backward reaches A: A's grad_fn depends on the penalty's node, so `pending`
        # is filled by then (empty only if the penalty was not differentiated in this pass).
        if not pending:
            return None
        if grad is None:  # autograd will not let a hook turn "no gradient" into one
            raise RuntimeError(
                "tap_loss(defer_gradient=True): a targeted layer's output reaches the loss only through "
                "the penalty; target layers the network uses, or pass defer_gradient=False"
            )
        grad_penalty, saved, w = pending.pop()
        if sequence:  # (N, T, C) in and out, contiguous when `grad` was
            return weighted_relu_sum_backward(grad_penalty, saved, w, _token_row(grad)).squeeze(2).transpose(1, 2)
        if not (saved.is_contiguous() or saved.is_contiguous(memory_format=torch.channels_last)):
            # A view with other strides (a token map not marked with its sequence): the kernel's
            # strided path is ~50x slower than two copies and its dense path.
            saved, grad = saved.contiguous(), grad.contiguous()
        return weighted_relu_sum_backward(grad_penalty, saved, w, grad)

    (activation if tokens is None else tokens).register_hook(add_penalty_gradient)
    return _DeferredPenaltyGradient.apply(activation, weights, pending)


def tap_loss(
    activations: Sequence[torch.Tensor],
    mask: torch.Tensor,
    kernel_size: int | Sequence[int] = 3,
    *,
    defer_gradient: bool = False,
    absolute: bool = False,
) -> torch.Tensor:
    """L_TAP of Eq. 8: the mean over layers of the batch-mean penalty.

    This is what training adds to the task loss (times lambda). D(M) is
    computed once for all layers. An empty batch gives 0. ``kernel_size`` is
    Eq. 7's k for every layer, or one per activation (a dilation that grows
    with depth: auditkit.ops.dilation).

    ``defer_gradient=True`` (what ``auditkit repair`` uses) gives the same
    gradients at a plain step's peak memory: backward reaches the penalties
    first and would otherwise materialise every layer's dP/dA at once, held
    until backward reaches that layer; deferred, each dP/dA is added to the
    layer's incoming gradient by one fused pass when backward gets there.
    It needs activations that require grad and a ``backward()`` (or
    ``autograd.grad``) that runs through the layers, as a training step does.

    ``absolute=True`` penalises |A| instead of relu(A) (signed token features of a transformer,
    docs/repair.md "TAP on vision transformers"): |A| = 2 relu(A) - A, the fused kernel once and one
    weighted channel sum, instead of the kernel on a negated copy of every map.
    """
    if len(activations) == 0:
        raise ValueError("tap_loss: `activations` is empty; pass the outputs of the targeted layers")
    kernel_sizes = kernel_size_list(kernel_size)
    if len(kernel_sizes) not in (1, len(activations)):
        raise ValueError(f"tap_loss: `kernel_size` must be one integer or one per activation ({len(activations)}); "
                         f"got {kernel_sizes}")
    kernel_sizes = kernel_sizes * len(activations) if len(kernel_sizes) == 1 else kernel_sizes
    for activation, k in zip(activations, kernel_sizes):
        check_tap_penalty_args(activation, mask, k)
    # One D(M) per distinct (size, k); all of them from one op call.
    keys = [(int(a.shape[2]), int(a.shape[3]), k) for a, k in zip(activations, kernel_sizes)]
    unique = list(dict.fromkeys(keys))
    precise = any(accumulate_dtype(a.dtype) == torch.float64 for a in activations)
    downscaled = downscale_masks(mask, [(h, w) for h, w, _ in unique], [k for _, _, k in unique],
                                 torch.float64 if precise else torch.float32)
    weights = dict(zip(unique, downscaled))
    total = 0
    for a, key in zip(activations, keys):
        w = weights[key]
        marked = getattr(a, _TOKENS, None)
        deferred = defer_gradient and a.requires_grad and torch.is_grad_enabled()
        if deferred and marked is not None and marked[0].requires_grad:
            a, w = _as_token_row(*marked, w)  # the sequence itself: no slice, no permuted copy
            penalty = _penalty_with_deferred_gradient(a, w, tokens=marked[0])
        elif deferred:
            penalty = _penalty_with_deferred_gradient(a, w)
        else:
            penalty = torch.ops.auditkit.weighted_relu_sum(a, w)
        total = total + penalty.sum()
        if absolute:  # |A| = 2 relu(A) - A: minus sum W * (the channel sum of A)
            total = total + penalty.sum() - (w * a.sum(1, dtype=w.dtype)).sum()
    return total / (len(activations) * max(int(activations[0].shape[0]), 1))


__all__ = [
    "downscale_mask",
    "mark_token_map",
    "downscale_masks",
    "tap_loss",
    "tap_penalty",
    "weighted_relu_sum",
]
