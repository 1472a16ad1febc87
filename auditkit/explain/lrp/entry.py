"""The entry points: LRP-epsilon heatmaps of a model for given targets.

Bassi et al. 2024, "Improving deep neural network generalization and robustness to background bias
via layer-wise relevance propagation optimization" (Nat. Commun. 15, 291), Eq. A1-A3: relevance
starts at the target logit and is propagated to the input by the epsilon rules (rules.py). With
``create_graph=True`` every step is differentiable, so a loss on the heatmap trains the model (TEA).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..defaults import EPSILON_EXPLAIN
from ..validate import check_logits, check_targets, explanation_method, logits_from
from .attention import attention_maps, uses_attention
from .forward import in_float32, run_forward
from .plan import propagate
from .registry import Step, UnsupportedLayerError
from .rules import linear_map_rule
from .switch import general_forced
from .trace import TracedNetwork, trace


def logits_node(traced: TracedNetwork, env: dict, logits: torch.Tensor) -> fx.Node:
    """The node whose value is ``logits``: the graph's output, or the part of a dict or tuple output
    that the model's output adapter picked (auditkit/models/outputs.py), found by identity."""
    output = traced.output.args[0]
    if isinstance(output, fx.Node) and env.get(output) is logits:
        return output
    # A container: its parts, and the arguments of nodes that built one (a namedtuple's constructor).
    found, pending, seen = None, [output], set()
    while pending and found is None:
        leaves: list[fx.Node] = []
        fx.node.map_arg(pending.pop(), leaves.append)
        for leaf in leaves:
            if env.get(leaf) is logits:
                found = leaf
                break
            if leaf not in seen and not isinstance(env.get(leaf), torch.Tensor):
                seen.add(leaf)
                pending.append((leaf.args, leaf.kwargs))
    if found is None:
        raise UnsupportedLayerError("LRP could not find the logits among the network's outputs (they are not one "
                                    "of its returned values); use gradient-based methods")
    return found


@explanation_method
def lrp_epsilon(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    epsilon: float = EPSILON_EXPLAIN,
    create_graph: bool = False,
) -> torch.Tensor:
    """LRP-epsilon heatmaps (N, K, H, W) for ``targets`` (N, K) class indices (see lrp_epsilon_and_logits)."""
    return lrp_epsilon_and_logits(model, x, targets, epsilon=epsilon, create_graph=create_graph)[0]


def lrp_epsilon_and_logits(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    epsilon: float = EPSILON_EXPLAIN,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(LRP-epsilon heatmaps (N, K, H, W) for ``targets`` (N, K) class indices, logits (N, classes)).
    The logits come from the same forward pass (TEA uses them instead of running the model twice).

    Relevance starts at the target logit (Eq. A3: R = z_c for the explained class, 0 elsewhere)
    and is propagated to the input (Eq. A1); the heatmap sums it over channels. For an
    auditkit model it is the relevance of the normalised input pixels, mapped back through the
    model's resizing, so it lines up with the image and its mask.
    """
    from ...models import AuditModel

    if uses_attention(model.net if isinstance(model, AuditModel) else model):  # transformers: AttnLRP
        return attention_maps(model, x, targets, epsilon=epsilon, create_graph=create_graph)
    n, k = targets.shape
    with torch.set_grad_enabled(create_graph):
        if isinstance(model, AuditModel):
            normalised = (x - model.mean) / model.std
            network_input = model._upsample_to_min_size(normalised)
            traced = trace(model.net)
        else:
            normalised = network_input = x
            traced = trace(model)
        # The network's output as the model's forward reads it (meta.output for an auditkit model).
        select = model.network_logits if isinstance(model, AuditModel) else logits_from
        general = general_forced()  # read once for both passes
        logits, env = run_forward(traced, network_input, select, general=general)
        logits_at = logits_node(traced, env, logits)  # before autocast's float copies: found by identity
        # A binary (one-logit) model: relevance starts at its z, as its two-class view's logit ±z/2
        # (auditkit/models/outputs.py binary_view): a start in the view's two columns is summed onto z.
        binary = isinstance(model, AuditModel) and model.meta.head == "binary"
        z_dims = logits.dim()  # a binary network's z: (N, 1), or (N,) when it squeezes its output
        if binary:
            from ...models.outputs import binary_view

            logits = binary_view(logits)
        check_targets(targets, n, check_logits(logits, n))
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if autocast:
            # Mixed precision: the forward ran in the low dtype; relevance flows in float32 (the
            # ratio R / (z + eps sign z) divides by activations, which bfloat16's 8-bit mantissa
            # would blur near 0), so the low dtype reaches the map only through the activations.
            env = in_float32(env)
            logits = logits.float()
    autocast_off = torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext()
    with torch.set_grad_enabled(create_graph), autocast_off:
        # One forward pass serves every target. On CUDA the K relevance passes run as one batch
        # of K*N (bigger GEMMs, fewer launches); on CPU as K passes of N, which measured faster
        # (oneDNN at batch K*N loses cache locality: ResNet-18, K = 3, 16 images: 1.48x -> ~1.0x
        # the cost of K input-gradient backwards).
        # Start relevance (Eq. A3): the target logit z_c in its class's column, 0 elsewhere, built
        # with one gather and one scatter (an index_put over aranges cost ~0.1 ms per call at 1x28^2).
        picked = logits.gather(1, targets)  # (N, K)
        if k == 1:
            groups = [(targets, picked)]
        elif x.device.type == "cuda" or x[0].numel() * n * k <= 16384:
            # CPU too for tiny batches, where per-pass Python costs more than cache locality saves
            # (two-layer CNN, 1x28^2, K = 3: 1.08x -> 0.99x the cost of K input-gradient backwards).
            groups = [(targets.t().reshape(-1, 1), picked.t().reshape(-1, 1))]  # (K*N, 1), target-major
        else:
            groups = [(targets[:, j:j + 1], picked[:, j:j + 1]) for j in range(k)]
        maps = []
        for group, values in groups:  # class indices (rows, 1) and their logits (rows, 1)
            per_group = group.shape[0] // n
            start = logits.new_zeros((group.shape[0], logits.shape[1])).scatter_(1, group, values)
            if binary:  # [-z/2, 0] or [0, z/2] -> relevance ±z/2 at z (the view is linear in z)
                start = start.sum(dim=1, keepdim=z_dims == 2)
            last = group is groups[-1][0]
            relevance = propagate(traced, env, start, k=per_group, epsilon=epsilon, create_graph=create_graph,
                                  release=last, start=logits_at, general=general)
            if network_input is not normalised:  # undo the model's resize with the same rule
                size = tuple(network_input.shape[-2:])
                resize = Step("function", F.interpolate, (normalised,),
                              {"size": size, "mode": "bilinear", "align_corners": False}, [normalised], [None],
                              network_input, relevance, per_group, epsilon, create_graph, "resize")
                relevance = linear_map_rule(resize)[0]
            maps.append(relevance.sum(dim=1).view(per_group, n, *relevance.shape[2:]))  # (k, N, H, W)
        return (maps[0] if len(maps) == 1 else torch.cat(maps)).transpose(0, 1), logits

