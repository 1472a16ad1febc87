"""The input gradient that RRR and Energy differentiate again (double backward)."""

from __future__ import annotations

import torch
from torch import nn


def forward_with_input_gradient(model: nn.Module, images: torch.Tensor,
                                scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(leaf images, logits, d scores(logits).sum() / d images), the graph kept for a second backward.
    One forward serves both the task loss (logits) and the input-gradient loss."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    images = images.detach().requires_grad_(True)
    # Fused attention kernels have no second derivative; PyTorch's math path (the same values) has.
    with sdpa_kernel(SDPBackend.MATH):
        logits = model(images)
    (grad,) = torch.autograd.grad(scores(logits).sum(), images, create_graph=True)
    return images, logits, grad
