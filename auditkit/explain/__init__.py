"""Attributions: where a model looks, one call for every method.

    heatmaps = attribute(model, images, target="pred", method="lrp_epsilon")   # (N, 1, H, W)

Methods: ``lrp_epsilon`` (the fused LRP-epsilon kernels, differentiable for TEA), ``gradcam``,
``gradient``, ``input_x_gradient``, ``integrated_gradients``. ``target`` is a class index, a
tensor of N indices, an (N, K) tensor for K explanations per sample (one forward pass serves all
of them for LRP), ``"pred"`` or ``"label"`` (with ``labels=``). Maps are (N, K, H, W) at input
resolution, summed over channels and signed (Grad-CAM is non-negative). ``create_graph=True``
makes them differentiable w.r.t. the model's parameters. The model is never changed: it is
explained in eval mode (batch norm and dropout as at test time) and its modes restored; no
parameters replaced, no hooks left behind, no ``.grad`` written.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ParameterError
from .gradients import gradcam, gradient, input_x_gradient, integrated_gradients
from .lrp import (
    DEFAULT_EPSILON,
    Step,
    UnsupportedLayerError,
    gate_rule,
    identity_rule,
    linear_map_rule,
    lrp_epsilon,
    permute_rule,
    register_rule,
    reshape_rule,
    sum_rule,
    winner_takes_all_rule,
)
from .validate import SelectLogits, as_targets, check_logits, explained, logits_from

METHODS: dict[str, Callable] = {
    "lrp_epsilon": lrp_epsilon,
    "gradcam": gradcam,
    "gradient": gradient,
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": integrated_gradients,
}


def resolve_targets(
    model: nn.Module, x: torch.Tensor, target, labels: torch.Tensor | None = None, output=None
) -> torch.Tensor:
    """Targets as an (N, K) long tensor on x's device: ``"pred"`` (the model's prediction),
    ``"label"`` (``labels``), a class index, N indices or (N, K) indices."""
    if isinstance(target, str):
        if target == "pred":
            with torch.no_grad():
                logits = logits_from(model(x), output)
            check_logits(logits, x.shape[0])
            return logits.argmax(dim=1, keepdim=True)
        if target == "label":
            if labels is None:
                raise ParameterError("labels", "must be given with target='label'")
            target = labels
        else:
            raise ParameterError("target", f"must be a class index, a tensor, 'pred' or 'label'; got {target!r}")
    return as_targets(target, x)


def attribute(
    model: nn.Module,
    x: torch.Tensor,
    target="pred",
    method: str = "lrp_epsilon",
    *,
    labels: torch.Tensor | None = None,
    output: str | int | Callable | None = None,
    create_graph: bool = False,
    **options,
) -> torch.Tensor:
    """(N, K, H, W) attribution maps of ``model`` on images ``x`` (N, C, H, W) for ``target``.

    Options: ``epsilon`` (lrp_epsilon, default 1e-6), ``layer`` (gradcam, default the model's
    preset), ``steps``/``baseline``/``internal_batch_size`` (integrated_gradients). ``output``:
    which part of the model's output holds the (N, classes) logits when it is not one tensor (a
    dict key, a tuple index or a function).

    Every method checks its inputs alike (auditkit/explain/validate.py): images (N, C, H, W) with the
    model's channels, device and dtype; one (N, classes) logits tensor; targets in [0, classes).
    Bad input raises ParameterError naming the argument. The model is explained in eval mode and
    left exactly as it was (modes, parameters, buffers, hooks, ``requires_grad``, ``.grad``).

    Under ``torch.autocast`` (auditkit.device.autocast) the model's passes run in the low dtype
    and maps come back in float32 (LRP's relevance pass runs in float32 throughout); measured
    against float32 maps, bfloat16 keeps a per-map cosine similarity of at least 0.95, 0.98 on average
    (docs/explain.md).
    """
    if method not in METHODS:
        raise ParameterError("method", f"must be one of {', '.join(METHODS)}; got {method!r}")
    from ..models.zoo import unwrap_compiled

    model = unwrap_compiled(model)  # the eager module: hooks added after torch.compile never run in its code
    with explained(model, x):
        targets = resolve_targets(model, x, target, labels, output)
        # The method's own body: the checks and the eval mode above are the wrapper's already.
        run = METHODS[method].__wrapped__
        net = model if output is None else SelectLogits(model, output)
        maps = run(net, x, targets, create_graph=create_graph, **options)
    return maps.float() if maps.dtype in (torch.float16, torch.bfloat16) else maps


__all__ = [
    "DEFAULT_EPSILON",
    "METHODS",
    "Step",
    "UnsupportedLayerError",
    "attribute",
    "gate_rule",
    "identity_rule",
    "linear_map_rule",
    "permute_rule",
    "register_rule",
    "reshape_rule",
    "sum_rule",
    "winner_takes_all_rule",
    "gradcam",
    "gradient",
    "input_x_gradient",
    "integrated_gradients",
    "lrp_epsilon",
    "resolve_targets",
]
