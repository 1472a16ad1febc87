"""Gradient-based attributions: input gradient, input x gradient, Integrated Gradients, Grad-CAM.

All return (N, K, H, W) maps at input resolution for targets (N, K), summing over channels, and
use ``torch.autograd.grad`` (never ``.backward()``), so the model's ``.grad`` fields are not
touched. With ``create_graph=True`` the maps are differentiable w.r.t. the model's parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError, ParameterError
from .validate import check_logits, check_targets, explanation_method, logits_from


IG_PIXEL_BUDGET = 4 * 224 * 224  # path images per pass of integrated_gradients: this many pixels in all


def _target_scores(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over samples of the k-th target's logit (one scalar per backward pass)."""
    return logits.gather(1, targets[:, k : k + 1]).sum()


def _input_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """d logit_target / d x for each of the K targets: (N, K, C, H, W)."""
    with torch.enable_grad():
        # Keep x's own graph when training through the map; otherwise a fresh leaf.
        inputs = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        logits = logits_from(model(inputs))
        check_targets(targets, x.shape[0], check_logits(logits, x.shape[0]))
        grads = []
        for k in range(targets.shape[1]):
            (grad,) = torch.autograd.grad(
                _target_scores(logits, targets, k),
                inputs,
                retain_graph=create_graph or k + 1 < targets.shape[1],
                create_graph=create_graph,
            )
            grads.append(grad)
    return torch.stack(grads, dim=1)


@explanation_method
def gradient(model, x, targets, *, create_graph: bool = False) -> torch.Tensor:
    """The input gradient (Simonyan et al. 2014), summed over channels (signed)."""
    return _input_gradients(model, x, targets, create_graph).sum(dim=2)


@explanation_method
def input_x_gradient(model, x, targets, *, create_graph: bool = False) -> torch.Tensor:
    """x * d logit / d x, summed over channels (Shrikumar et al. 2016)."""
    return (_input_gradients(model, x, targets, create_graph) * x.unsqueeze(1)).sum(dim=2)


@explanation_method
def integrated_gradients(
    model,
    x,
    targets,
    *,
    steps: int = 32,
    baseline: torch.Tensor | float = 0.0,
    internal_batch_size: int | None = None,
    create_graph: bool = False,
) -> torch.Tensor:
    """Integrated Gradients (Sundararajan et al. 2017) with the midpoint rule:
    (x - b) * mean_i grad(b + (i + 1/2)/steps * (x - b)), summed over channels.
    Completeness: the map sums to about logit(x) - logit(b). ``baseline`` defaults to black.

    The N * steps path images go through the network ``internal_batch_size`` at a time (rounded
    to whole steps of the batch); by default as many as fit a budget of IG_PIXEL_BUDGET pixels (four
    224x224 images), so peak memory stays within a few input gradients of the same batch whatever
    the steps and image size."""
    if not isinstance(steps, int) or steps < 1:
        raise ParameterError("steps", f"must be an integer >= 1; got {steps!r}")
    if internal_batch_size is not None and (not isinstance(internal_batch_size, int) or internal_batch_size < 1):
        raise ParameterError("internal_batch_size", f"must be an integer >= 1; got {internal_batch_size!r}")
    baseline = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    n = x.shape[0]
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    if internal_batch_size is None:
        internal_batch_size = max(1, IG_PIXEL_BUDGET // max(1, x.shape[-2] * x.shape[-1]))
    chunk = max(1, internal_batch_size // max(n, 1))  # whole steps of the batch per pass
    total = torch.zeros((n, targets.shape[1], *x.shape[1:]), dtype=x.dtype, device=x.device)
    for start in range(0, steps, chunk):
        a = alphas[start : start + chunk]
        path = (baseline.unsqueeze(0) + a.view(-1, 1, 1, 1, 1) * (x - baseline).unsqueeze(0)).reshape(-1, *x.shape[1:])
        grads = _input_gradients(model, path, targets.repeat(len(a), 1), create_graph)
        total = total + grads.view(len(a), n, *grads.shape[1:]).sum(dim=0)
    return ((x - baseline).unsqueeze(1) * total / steps).sum(dim=2)


def _resolve_layer(model: nn.Module, layer: str | None) -> str:
    from ..models import AuditModel
    from ..models.hooks import resolve_layer_calls
    from .validate import SelectLogits

    if isinstance(model, SelectLogits):  # names are the user's model's
        return "model." + _resolve_layer(model.model, layer)

    if layer is None:
        if isinstance(model, AuditModel) and model.meta.gradcam_layer:
            return model.meta.gradcam_layer
        raise ModelError("Grad-CAM needs a layer: pass layer='module.name' (an auditkit model carries a preset)")
    return resolve_layer_calls(model, [layer])[0]  # "block#2": one call of a module run several times


@explanation_method
def gradcam(model, x, targets, *, layer: str | None = None, create_graph: bool = False) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): relu(sum_c alpha_c A_c) with alpha_c the spatial mean of
    d logit / d A_c at ``layer`` (default: the model's preset), bilinearly upsampled to the input."""
    name = _resolve_layer(model, layer)
    from ..models import run_capturing

    with torch.set_grad_enabled(True):
        # The layer's own output, even when a later op overwrites it in place (then from a copy).
        logits, (activation,), _ = run_capturing(model, [name], lambda: model(x if create_graph else x.detach()))
        logits = logits_from(logits)
        check_targets(targets, x.shape[0], check_logits(logits, x.shape[0]))
        if activation.dim() != 4:
            raise ModelError(f"Grad-CAM needs a 4-D feature map at {name!r}; it gives shape {tuple(activation.shape)}")
        maps = []
        for k in range(targets.shape[1]):
            (grad,) = torch.autograd.grad(
                _target_scores(logits, targets, k),
                activation,
                retain_graph=create_graph or k + 1 < targets.shape[1],
                create_graph=create_graph,
            )
            weights = grad.mean(dim=(2, 3))
            # sum_c alpha_c A_c as a batched product: no (N, C, h, w) temporary.
            maps.append(F.relu(torch.einsum("nc,nchw->nhw", weights, activation)))
    cams = torch.stack(maps, dim=1)
    cams = F.interpolate(cams, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return cams if create_graph else cams.detach()
