"""LRP-epsilon's rules, each written once, and the table that says which layer gets which.

Every rule is two plain functions: its maths on tensors (``*_relevance``, what the fast plan steps
call directly, plan.py) and ``*_rule(step)``, which reads the tensors and parameters off a
:class:`~.registry.Step` and calls the maths (what the general path and user networks call). Sources:
Bach et al. 2015, "On pixel-wise explanations for non-linear classifier decisions by layer-wise
relevance propagation" (PLoS ONE); Montavon et al. 2019, "Layer-Wise Relevance Propagation: An
Overview" (LNCS 11700); Bassi et al. 2024, "Improving deep neural network generalization and
robustness to background bias via layer-wise relevance propagation optimization" (Nat. Commun. 15,
291), Eq. A1-A3.

- epsilon rule for z = W a + b: R_in = a ⊙ Wᵀ(R / (z + ε·sign z)), sign(0) = +1 — convolutions and
  linear layers on the fused kernels; batch norm (elementwise affine; after a conv it is merged into
  it, plan.py); average pooling, means, sums, interpolation (bias-free linear maps, Wᵀ by autograd or
  the pooling's own backward kernel);
- ``sum_rule`` for residual additions z = a1 + a2: R_i = a_i ⊙ R / (z + ε·sign z);
- ``winner_takes_all_rule`` for max pooling: R goes to the maximum (Montavon et al. 2019);
- ``identity_rule`` for elementwise activations, dropout, stochastic depth, casts and GroupNorm /
  LayerNorm on feature maps (Achtibat et al. 2024, "AttnLRP", arXiv:2402.05602: identity on norms);
- ``gate_rule`` for products x · g with g a gate (sigmoid, as in squeeze-excitation) or a broadcast
  factor (layer scale): g is a constant weight, x gets all relevance (Arras et al. 2017,
  "Explaining recurrent neural network predictions in sentiment analysis", arXiv:1706.07206);
- ``reshape_rule``, ``permute_rule``, ``cat_rule``, ``split_rule``, ``index_rule``: relevance is
  rearranged back (conservative exactly).

A new rule: its function here (or in a module beside this one) and a row in ``BUILTIN_RULES``.

Private torch internals used, and why: ``torch.ops.aten._adaptive_avg_pool2d_backward`` (Wᵀ of
adaptive average pooling as one kernel, not an autograd round trip) and, through registry.py,
``torch._C._AutoDispatchBelowAutograd``.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops  # noqa: F401  (registers the fused ops)
from .registry import Step, UnsupportedLayerError, below_autograd, register_rule

# The fused ops' overloads, called directly: resolving the overload packet on every call (what the
# wrappers in auditkit/ops do) cost more than the small layers' kernels (docs: benchmarks/RESULTS.md).
_RATIO = torch.ops.auditkit.lrp_epsilon_ratio.default
_CONV2D = torch.ops.auditkit.lrp_epsilon_conv2d.default
_LINEAR = torch.ops.auditkit.lrp_epsilon_linear.default

# ---- the maths, on tensors: (K*N, ...) relevance, target-major; a, z of batch N ----------------


def epsilon_ratio(relevance: torch.Tensor, z: torch.Tensor, epsilon: float, create_graph: bool) -> torch.Tensor:
    """s = R / (z + ε·sign z), sign(0) = +1 (the fused kernel), shaped like R (K*N, ...)."""
    with below_autograd(not create_graph):
        return _RATIO(relevance, z, epsilon)


def step_ratio(step: Step) -> torch.Tensor:
    """The step's s = R / (z + ε·sign z), (K*N, ...): ``epsilon_ratio`` of its relevance and output."""
    return epsilon_ratio(step.relevance, step.output, step.epsilon, step.create_graph)


def times_input(contribution: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """a ⊙ c for c (K*N, ...) and a (N, ...): each target's contribution times the same input."""
    if k == 1:  # the same shapes: no views (two op calls less, a noticeable share of a small layer)
        return contribution * a
    return (contribution.view(k, *a.shape) * a).view(contribution.shape)


def identity_relevance(a: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor, name: str) -> torch.Tensor:
    """R_in = R for a layer that keeps its input's shape; UnsupportedLayerError otherwise."""
    if a.shape[1:] != z.shape[1:]:
        raise UnsupportedLayerError(f"the identity rule needs a layer that keeps its input's shape ({name}: "
                                    f"{tuple(a.shape)} -> {tuple(z.shape)})")
    return relevance


def rearranged_back(a: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """A reshape's relevance in its input's shape (the batch dimension kept first)."""
    return relevance.reshape(relevance.shape[0], *a.shape[1:])


def conv2d_relevance(a, z, relevance, weight, stride, padding, dilation, groups: int, epsilon: float,
                     create_graph: bool) -> torch.Tensor:
    """Epsilon rule of a 2-D convolution (fused kernel): a (N, C, H, W), z (N, O, h, w), R (K*N, O, h, w)."""
    with below_autograd(not create_graph):
        return _CONV2D(a, z, relevance, weight, _pair_list(stride), _pair_list(padding), _pair_list(dilation), groups,
                       epsilon)


def conv2d_module_relevance(conv: nn.Conv2d, a, z, relevance, epsilon: float, create_graph: bool,
                            weight: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d_relevance with a Conv2d module's geometry (``weight``: a merged W γ/σ instead of its own)."""
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedLayerError(f"LRP supports zero-padded convolutions with numeric padding; got {conv}")
    return conv2d_relevance(a, z, relevance, conv.weight if weight is None else weight, conv.stride, conv.padding,
                            conv.dilation, conv.groups, epsilon, create_graph)


def linear_relevance(a, z, relevance, weight, epsilon: float, create_graph: bool, name: str = "") -> torch.Tensor:
    """Epsilon rule of a linear layer (fused kernel) on (N, ..., features): extra dims (channels-last
    feature maps, as in ConvNeXt) are positions, each its own sample."""
    if a.dim() < 2:
        raise UnsupportedLayerError(f"LRP supports linear layers on (N, ..., features) inputs ({name})")
    with below_autograd(not create_graph):
        if a.dim() == 2:
            return _LINEAR(a, z, relevance, weight, epsilon)
        # (K*N, ..., out) target-major flattens to (K * N*positions, out) in the same target-major order.
        out = _LINEAR(a.reshape(-1, a.shape[-1]), z.reshape(-1, z.shape[-1]),
                      relevance.reshape(-1, relevance.shape[-1]), weight, epsilon)
    return out.view(relevance.shape[0], *a.shape[1:])


def winner_takes_all(a: torch.Tensor, indices: torch.Tensor, relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Max pooling: each output's R goes to its maximum's input position (the forward's ``indices``,
    (N, C, h, w) into H·W); overlapping windows add up, as the pool's gradient."""
    flat_indices = indices.flatten(2)
    if k > 1:
        flat_indices = flat_indices.repeat(k, 1, 1)
    out = torch.zeros((relevance.shape[0], a.shape[1], a.shape[2] * a.shape[3]), dtype=relevance.dtype,
                      device=relevance.device)
    return out.scatter_add_(2, flat_indices, relevance.flatten(2)).view(relevance.shape[0], *a.shape[1:])


def adaptive_avg_pool_relevance(a, z, relevance, k: int, epsilon: float, create_graph: bool) -> torch.Tensor:
    """Epsilon rule of adaptive average pooling; Wᵀ is ATen's backward kernel, and a pool to the
    input's own size is the identity map (Wᵀ s = s)."""
    s = epsilon_ratio(relevance, z, epsilon, create_graph)
    if z.shape[-2:] != a.shape[-2:]:
        placeholder = s.new_empty(1).expand(s.shape[0], *a.shape[1:])  # only its shape matters
        s = torch.ops.aten._adaptive_avg_pool2d_backward(s, placeholder)
    return times_input(s, a, k)


# ---- the rules: a Step's tensors and parameters, then the maths --------------------------------


def _only_first(step: Step, relevance: torch.Tensor) -> list:
    return [relevance] + [None] * (len(step.inputs) - 1)


def _check_batch_kept(step: Step) -> None:
    if step.output.shape[0] != step.inputs[0].shape[0]:
        raise UnsupportedLayerError(f"LRP cannot follow relevance across the batch dimension ({step.name})")


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pair_list(v) -> list:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _given(step: Step, names: tuple) -> dict:
    """A function call's arguments by name (positional ones named by ``names``)."""
    return {**dict(zip(names, step.args)), **step.kwargs}


def identity_rule(step: Step) -> list:
    """R_in = R: relevance passes an elementwise layer unchanged (activations, dropout, identity,
    normalisations on feature maps (AttnLRP), casts). The layer must keep its input's shape."""
    return _only_first(step, identity_relevance(step.inputs[0], step.output, step.relevance, step.name))


def reshape_rule(step: Step) -> list:
    """Flatten, reshape, view, squeeze, unsqueeze: the relevance takes its input's shape back."""
    _check_batch_kept(step)
    return _only_first(step, rearranged_back(step.inputs[0], step.relevance))


def permute_rule(step: Step) -> list:
    """permute / transpose / swapaxes: the inverse permutation (the batch dimension must stay first)."""
    rank = step.inputs[0].dim()
    if step.target in ("permute", torch.permute):
        given = step.kwargs["dims"] if "dims" in step.kwargs else step.args[1:]
        if len(given) == 1 and isinstance(given[0], (tuple, list)):
            given = given[0]
        order = [d % rank for d in given]
    else:  # transpose(d0, d1)
        d0 = step.kwargs.get("dim0", step.args[1] if len(step.args) > 1 else None)
        d1 = step.kwargs.get("dim1", step.args[2] if len(step.args) > 2 else None)
        order = list(range(rank))
        order[d0 % rank], order[d1 % rank] = order[d1 % rank], order[d0 % rank]
    if order[0] != 0:
        raise UnsupportedLayerError(f"LRP cannot follow relevance across the batch dimension ({step.name})")
    return _only_first(step, step.relevance.permute(*[order.index(d) for d in range(rank)]))


def cat_rule(step: Step) -> list:
    """Concatenation: each input gets its slice of the relevance."""
    dim = step.kwargs.get("dim", step.args[1] if len(step.args) > 1 else 0)
    if dim % step.output.dim() == 0:
        raise UnsupportedLayerError(f"LRP cannot split relevance of a concatenation along the batch ({step.name})")
    return list(torch.split(step.relevance, [t.shape[dim] for t in step.args[0]], dim=dim))


def split_rule(step: Step) -> list:
    """chunk / split / unbind: the parts' relevances (``step.relevance`` is a list, one per part)
    joined back along the dim they were cut along."""
    unbind = step.target in ("unbind", torch.unbind)
    position = 1 if unbind else 2
    dim = step.kwargs.get("dim", step.args[position] if len(step.args) > position else 0)
    if dim % step.inputs[0].dim() == 0:
        raise UnsupportedLayerError(f"LRP cannot follow relevance across the batch dimension ({step.name})")
    parts = [p.unsqueeze(dim) for p in step.relevance] if unbind else list(step.relevance)
    return _only_first(step, torch.cat(parts, dim=dim))


def index_rule(step: Step) -> list:
    """Indexing and slicing a tensor (x[:, :8]): relevance goes back to the positions read (Jᵀ R of
    the selection, by autograd); the batch dimension must be kept whole."""
    _check_batch_kept(step)
    a = step.inputs[0]
    with torch.enable_grad():
        probe = torch.zeros((step.relevance.shape[0], *a.shape[1:]), dtype=a.dtype, device=a.device,
                            requires_grad=True)
        (back,) = torch.autograd.grad(probe[step.args[1]], probe, step.relevance, create_graph=step.create_graph)
    return _only_first(step, back)


def linear_map_rule(step: Step) -> list:
    """The epsilon rule for a bias-free linear map z = f(a) (means and sums over non-batch dims,
    interpolation, average pooling): R_in = a ⊙ Jᵀ (R / (z + ε·sign z)), Jᵀ by autograd (f is linear,
    so the point it is evaluated at does not matter)."""
    _check_batch_kept(step)
    a = step.inputs[0]
    s = step_ratio(step)
    with torch.enable_grad():
        probe = torch.zeros((s.shape[0], *a.shape[1:]), dtype=a.dtype, device=a.device, requires_grad=True)
        (contribution,) = torch.autograd.grad(step.call_on(probe), probe, s, create_graph=step.create_graph)
    return _only_first(step, times_input(contribution, a, step.k))


def conv2d_rule(step: Step) -> list:
    """The epsilon rule for a 2-D convolution (fused kernels), module or F.conv2d."""
    a, z, r, eps, graph = step.inputs[0], step.output, step.relevance, step.epsilon, step.create_graph
    if step.kind == "module":
        return _only_first(step, conv2d_module_relevance(step.target, a, z, r, eps, graph))
    given = _given(step, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
    padding = given.get("padding", 0)
    if isinstance(padding, str):
        raise UnsupportedLayerError(f"LRP supports numeric convolution padding; {step.name} has {padding!r}")
    return _only_first(step, conv2d_relevance(a, z, r, given["weight"], given.get("stride", 1), padding,
                                              given.get("dilation", 1), given.get("groups", 1), eps, graph))


def linear_rule(step: Step) -> list:
    """The epsilon rule for a linear layer (fused kernels), module or F.linear (see linear_relevance)."""
    weight = step.target.weight if step.kind == "module" else _given(step, ("input", "weight"))["weight"]
    return _only_first(step, linear_relevance(step.inputs[0], step.output, step.relevance, weight, step.epsilon,
                                              step.create_graph, step.name))


def batch_norm_scale(bn: nn.BatchNorm2d, bn_input: torch.Tensor) -> torch.Tensor:
    """γ / σ with the statistics the module used in this forward pass, (C,)."""
    if bn.training or bn.running_var is None:
        variance = bn_input.detach().var(dim=(0, 2, 3), unbiased=False)
    else:
        variance = bn.running_var
    scale = torch.rsqrt(variance + bn.eps)
    return scale * bn.weight if bn.weight is not None else scale


def batch_norm_rule(step: Step) -> list:
    """A batch norm not after a convolution: an elementwise affine layer under the epsilon rule,
    R_in = a ⊙ (γ/σ) ⊙ R / (z + ε·sign z)."""
    a = step.inputs[0]
    scale = batch_norm_scale(step.target, a).view(1, -1, *([1] * (a.dim() - 2)))
    return _only_first(step, times_input(step_ratio(step), a * scale, step.k))


def average_pool_rule(step: Step) -> list:
    """Average and adaptive average pooling (linear maps) under the epsilon rule; Wᵀ is the pooling's
    own backward kernel."""
    a, z, module = step.inputs[0], step.output, step.target if step.kind == "module" else None
    if isinstance(module, nn.AdaptiveAvgPool2d) or step.target is F.adaptive_avg_pool2d:
        return _only_first(step, adaptive_avg_pool_relevance(a, z, step.relevance, step.k, step.epsilon,
                                                             step.create_graph))
    if module is not None:
        params = (module.kernel_size, module.stride, module.padding, module.ceil_mode, module.count_include_pad,
                  module.divisor_override)
    else:
        given = _given(step, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                              "divisor_override"))
        kernel = given["kernel_size"]
        params = (kernel, given.get("stride") or kernel, given.get("padding", 0), given.get("ceil_mode", False),
                  given.get("count_include_pad", True), given.get("divisor_override"))
    kernel, stride, padding, ceil_mode, count_include_pad, divisor = params
    s = step_ratio(step)
    placeholder = s.new_empty(1).expand(s.shape[0], *a.shape[1:])  # only its shape matters
    contribution = torch.ops.aten.avg_pool2d_backward(
        s, placeholder, list(_pair(kernel)), list(_pair(stride or kernel)), list(_pair(padding)), ceil_mode,
        count_include_pad, divisor,
    )
    return _only_first(step, times_input(contribution, a, step.k))


def winner_takes_all_rule(step: Step) -> list:
    """Max and adaptive max pooling (see winner_takes_all); needs the forward's indices."""
    indices = step.extra.get("indices")
    if indices is None:  # pragma: no cover - the forward keeps them for every max pool it knows
        raise UnsupportedLayerError(f"LRP needs the max positions of {step.name}")
    return _only_first(step, winner_takes_all(step.inputs[0], indices, step.relevance, step.k))


def sum_rule(step: Step) -> list:
    """z = a1 + a2 (a residual addition): R_i = a_i ⊙ R / (z + ε·sign z); adding a constant leaves
    the relevance with the tensor."""
    if len(step.inputs) == 1:
        return [step.relevance]
    if any(t.shape != step.output.shape for t in step.inputs):
        raise UnsupportedLayerError(f"LRP supports additions of same-shape tensors only ({step.name})")
    s = step_ratio(step)
    return [times_input(s, t, step.k) for t in step.inputs]


_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}


def _is_gate(producer) -> bool:
    return isinstance(producer, _GATE_MODULES) or producer in _GATE_FUNCTIONS or producer in ("sigmoid", "sigmoid_")


def gate_rule(step: Step) -> list:
    """x · g with g a gate (a sigmoid's output, as in squeeze-excitation) or a broadcast factor
    (layer scale, per-channel weights): g is a constant weight, x gets all the relevance."""
    if len(step.inputs) == 1:  # a constant factor
        return [step.relevance]
    gates = [i for i, constant in enumerate(step.constant) if constant]  # a weight (layer scale)
    if len(gates) != 1:
        gates = [i for i, p in enumerate(step.producers) if _is_gate(p)]
    if len(gates) != 1:
        gates = [i for i, t in enumerate(step.inputs) if t.shape != step.output.shape]
    if len(gates) != 1 or len(step.inputs) != 2:
        raise UnsupportedLayerError(
            f"LRP supports products where one factor is a gate (a sigmoid, as in squeeze-excitation, "
            f"or a broadcast factor such as layer scale); {step.name} is neither"
        )
    out = [None, None]
    out[1 - gates[0]] = step.relevance
    return out


# ---- the table: which layer gets which rule --------------------------------------------------------


def _stochastic_depth():
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return (), ()
    return (StochasticDepth,), (stochastic_depth,)


STOCHASTIC_DEPTH_MODULES, STOCHASTIC_DEPTH_FUNCTIONS = _stochastic_depth()

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Softsign, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    *STOCHASTIC_DEPTH_MODULES,
)
ELEMENTWISE_FUNCTIONS = (
    F.relu, F.relu6, F.leaky_relu, F.prelu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.mish, F.softplus, F.softsign, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.alpha_dropout, F.layer_norm, F.group_norm, torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.sigmoid,
    *STOCHASTIC_DEPTH_FUNCTIONS,
)
ELEMENTWISE_METHODS = ("relu", "sigmoid", "tanh", "contiguous", "clone", "float", "double", "half", "bfloat16", "to",
                       "type_as", "detach")

# (keys, rule): module types, functions and tensor method names. A new rule adds a row here.
BUILTIN_RULES = (
    ((*ELEMENTWISE_MODULES, *ELEMENTWISE_FUNCTIONS, *ELEMENTWISE_METHODS), identity_rule),
    ((nn.Conv2d, F.conv2d), conv2d_rule),
    ((nn.Linear, F.linear), linear_rule),
    ((nn.BatchNorm2d,), batch_norm_rule),
    ((nn.AdaptiveAvgPool2d, nn.AvgPool2d, F.adaptive_avg_pool2d, F.avg_pool2d), average_pool_rule),
    ((nn.MaxPool2d, nn.AdaptiveMaxPool2d, F.max_pool2d, F.adaptive_max_pool2d), winner_takes_all_rule),
    ((nn.Flatten, nn.Unflatten, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, "view", "reshape",
      "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze"), reshape_rule),
    ((torch.permute, torch.transpose, torch.swapaxes, "permute", "transpose", "swapaxes"), permute_rule),
    ((torch.cat, torch.concat), cat_rule),
    ((torch.chunk, torch.split, torch.unbind, "chunk", "split", "unbind"), split_rule),
    ((operator.getitem,), index_rule),
    ((operator.add, operator.iadd, torch.add, "add"), sum_rule),
    ((operator.mul, operator.imul, torch.mul, "mul"), gate_rule),
    ((torch.mean, torch.sum, "mean", "sum", F.interpolate, F.upsample, nn.Upsample, nn.UpsamplingBilinear2d,
      nn.UpsamplingNearest2d), linear_map_rule),
)

for _keys, _rule in BUILTIN_RULES:
    for _key in _keys:
        register_rule(_key, _rule)
