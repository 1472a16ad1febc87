"""D(M) of TAP Eq. 7: the mask dilated by a k x k max pool, then averaged to each layer's size.

    D_l(M) = AdaptiveAvgPool_(h_l,w_l)( MaxPool_{k_l, stride 1, pad k_l//2}(M) )

One op, ``auditkit::downscale_mask(mask, kernel_sizes, sizes, dtype)``, computes it for every
targeted layer's size, one pass over the mask per distinct kernel size (a training step calls it
once per batch); its windows are exactly those of ``torch.nn.functional.adaptive_avg_pool2d``.
Eq. 7 uses one k for every layer; ``kernel_sizes`` may also give one per layer, a dilation that
grows with depth (auditkit/ops/dilation.py). Not differentiable: masks are constant annotations.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _library
from ._checks import check_downscale_mask_args, check_mask_values, debug_checks_enabled
from ._reference import downscale_mask_reference

SCHEMA = "downscale_mask(Tensor mask, int[] kernel_sizes, int[] sizes, ScalarType? dtype=None) -> Tensor[]"


def size_pairs(sizes) -> list[tuple[int, int]]:
    """[h0, w0, h1, w1, ...] -> [(h0, w0), (h1, w1), ...]"""
    if len(sizes) % 2:
        raise ValueError(f"downscale_mask: `sizes` must list (height, width) pairs; got {list(sizes)}")
    return [(sizes[k], sizes[k + 1]) for k in range(0, len(sizes), 2)]


def downscaled_dtype(mask: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    return torch.float64 if mask.dtype == torch.float64 else torch.float32


def per_layer(kernel_sizes, count: int) -> list[int]:
    """One kernel size per layer from ``kernel_sizes`` (one for all, or one per layer)."""
    return [int(k) for k in kernel_sizes] if len(kernel_sizes) == count else [int(kernel_sizes[0])] * count


def _reference_kernel(mask, kernel_sizes, sizes, dtype=None):
    pairs = size_pairs(sizes)
    check_downscale_mask_args(mask, kernel_sizes, pairs, dtype)
    if mask.device.type == "cpu":
        check_mask_values(mask)  # the compiled CPU kernel checks this too, for free
    out_dtype = downscaled_dtype(mask, dtype)
    kernels = per_layer(kernel_sizes, len(pairs))
    return [downscale_mask_reference(mask, size, k, out_dtype) for size, k in zip(pairs, kernels)]


_library.define("downscale_mask", SCHEMA, _reference_kernel)


@torch.library.register_fake("auditkit::downscale_mask")
def _fake(mask, kernel_sizes, sizes, dtype=None):
    pairs = size_pairs(sizes)
    check_downscale_mask_args(mask, kernel_sizes, pairs, dtype)
    out_dtype = downscaled_dtype(mask, dtype)
    return [mask.new_empty((mask.shape[0], h, w), dtype=out_dtype) for h, w in pairs]


torch.library.register_autograd(
    "auditkit::downscale_mask",
    _library.refuse("auditkit: downscale_mask is not differentiable; masks are constant annotations"),
    setup_context=_library.no_context,
)


def _maybe_check_values(mask: torch.Tensor) -> None:
    # CPU kernels check the mask range for free; elsewhere it costs a device
    # sync, so only in debug mode (and never while torch.compile traces).
    if debug_checks_enabled() and mask.device.type != "cpu" and not torch.compiler.is_compiling():
        check_mask_values(mask)


def kernel_size_list(kernel_size: int | Sequence[int]) -> list[int]:
    """``kernel_size`` as the op's ``kernel_sizes`` argument: [k] for one int, else the list."""
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        return [kernel_size]
    if isinstance(kernel_size, Sequence) and not isinstance(kernel_size, str):
        return list(kernel_size)
    raise TypeError(f"tap_penalty: `kernel_size` must be an integer >= 1 or one per layer; got {kernel_size!r}")


def downscale_masks(
    mask: torch.Tensor,
    sizes: Sequence[tuple[int, int]],
    kernel_size: int | Sequence[int] = 3,
    dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """D(M) of Eq. 7 for several layer sizes at once: a list of (N, h, w) tensors.

    ``mask`` is (N, 1, H, W) or (N, H, W) with values in [0, 1], H >= h, W >= w.
    ``kernel_size``: the max pool's size k, one for every size (Eq. 7) or one per size.
    ``dtype`` defaults to float64 for a float64 mask, else float32.
    """
    pairs = [(int(h), int(w)) for h, w in sizes]
    kernel_sizes = kernel_size_list(kernel_size)
    check_downscale_mask_args(mask, kernel_sizes, pairs, dtype)
    _maybe_check_values(mask)
    flat = [s for pair in pairs for s in pair]
    return list(torch.ops.auditkit.downscale_mask(mask.detach(), kernel_sizes, flat, dtype))


def downscale_mask(
    mask: torch.Tensor, size: tuple[int, int], kernel_size: int = 3, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """D(M) of Eq. 7 at one size, as an (N, h, w) tensor."""
    return downscale_masks(mask, [size], [kernel_size], dtype)[0]
