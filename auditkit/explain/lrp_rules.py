"""LRP-epsilon as a rule table: how relevance crosses each kind of layer.

A rule is a function ``rule(step) -> list`` that receives one layer of the traced network as a
:class:`Step` (what was called, its tensor inputs, its output z, the relevance R arriving at the
output, shaped (K*N, ...) for K explanations per sample) and returns the relevance of each tensor
input (``None`` where an input gets none). Rules are keyed by module type (looked up along the
class's MRO, so a subclass inherits its base's rule), by function, or by method name:

    from auditkit.explain import register_rule, identity_rule
    register_rule(MyNorm, identity_rule)             # a module type
    register_rule(my_function, my_rule)              # a function the forward calls
    register_rule("my_method", my_rule)              # a tensor method, by name

The built-in rules and their sources (Montavon et al. 2019, "Layer-Wise Relevance Propagation: An
Overview", for the epsilon rule; seed 004 Eq. A1-A3):

- ``epsilon_rule`` for layers z = W a + b: R_in = a ⊙ Wᵀ(R / (z + ε·sign z)), sign(0) = +1 — convolutions
  and linear layers on the fused kernels; batch norm (an elementwise affine layer; after a conv it is
  merged into it by the caller); average and adaptive average pooling; means and sums over any
  non-batch dims; interpolation (the bias-free linear maps, Wᵀ by autograd or the pooling's own
  backward);
- ``sum_rule`` for residual additions z = a1 + a2: R_i = a_i ⊙ R / (z + ε·sign z);
- ``winner_takes_all_rule`` for max and adaptive max pooling: R goes to the maximum (Montavon et al.);
- ``identity_rule`` for elementwise activations (ReLU and all other non-linearities: SiLU, GELU,
  Hardswish, sigmoid, tanh, ...), dropout, stochastic depth, identity, dtype and layout casts, and the
  normalisations GroupNorm and LayerNorm on feature maps (AttnLRP, Achtibat et al. 2024: the identity
  rule on normalisation layers);
- ``gate_rule`` for products x · g where g is a gate (a sigmoid, as in squeeze-excitation, or a
  broadcast per-channel factor such as layer scale): g is a constant weight, all relevance goes to x
  (Montavon et al.; Arras et al. 2017 for gated products);
- ``rearrange_rule`` for flatten, reshape, view, squeeze/unsqueeze, permute, transpose and concatenation:
  relevance is rearranged back (conservative exactly).

A layer with no rule is refused with one line naming it and how to register one: never a silent
wrong map.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..ops import lrp_epsilon_conv2d, lrp_epsilon_linear, lrp_epsilon_ratio


def below_autograd(enabled: bool):
    """Without a graph to build, the fused ops skip the autograd layer (for our ops a Python one,
    tens of microseconds a call: a noticeable share of LRP at batch 1)."""
    below = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
    return below() if enabled and below is not None else contextlib.nullcontext()


class UnsupportedLayerError(ModelError):
    """The network contains a layer LRP-epsilon has no rule for."""


@dataclass
class Step:
    """One layer of the traced network, as a rule sees it.

    ``target``: the module instance, the function, or the method's name; ``args``/``kwargs``: the
    call's arguments with tensors in place of graph values; ``inputs``: the tensor inputs (graph
    values, in order of appearance in args then kwargs); ``producers``: what computed each input (a
    module, a function, a method name, or None for the network input and parameters); ``output``:
    z, batch N; ``relevance``: R at the output, (K*N, ...), target-major; ``extra``: what the forward
    kept for the rule (max-pool indices)."""

    kind: str  # "module", "function" or "method"
    target: Any
    args: tuple
    kwargs: dict
    inputs: list[torch.Tensor]
    producers: list[Any]
    output: torch.Tensor
    relevance: torch.Tensor
    k: int
    epsilon: float
    create_graph: bool
    name: str = ""
    extra: dict = field(default_factory=dict)
    constant: list[bool] = field(default_factory=list)  # per input: independent of the network input (weights)

    def ratio(self) -> torch.Tensor:
        """s = R / (z + ε·sign z) (the fused kernel), (K*N, ...)."""
        with below_autograd(not self.create_graph):
            return lrp_epsilon_ratio(self.relevance, self.output, self.epsilon)

    def per_target(self, t: torch.Tensor) -> torch.Tensor:
        """(K*N, ...) -> (K, N, ...)."""
        return t.view(self.k, t.shape[0] // self.k, *t.shape[1:])

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """(K, N, ...) -> (K*N, ...)."""
        return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])

    def call_on(self, t: torch.Tensor) -> torch.Tensor:
        """The same call with its first input replaced by ``t`` (a linear map applied again)."""
        if self.kind == "module":
            return self.target(t, *self.args[1:], **self.kwargs)
        if self.kind == "method":
            return getattr(t, self.target)(*self.args[1:], **self.kwargs)
        return self.target(t, *self.args[1:], **self.kwargs)


Rule = Callable[[Step], list]

_MODULE_RULES: dict[type, Rule] = {}
_FUNCTION_RULES: dict[Any, Rule] = {}
_METHOD_RULES: dict[str, Rule] = {}


_version = [0]  # bumped by every registration: traces made under an older table are traced again


def rules_version() -> int:
    return _version[0]


def register_rule(key: type | Callable | str, rule: Rule) -> None:
    """Registers ``rule`` for a module type (and its subclasses that have no rule of their own), a
    function, or a tensor method name. A later registration replaces an earlier one. A module type
    with a rule is one step of the trace (its forward is not traced into)."""
    _version[0] += 1
    if isinstance(key, type) and issubclass(key, nn.Module):
        _MODULE_RULES[key] = rule
    elif isinstance(key, str):
        _METHOD_RULES[key] = rule
    elif callable(key):
        _FUNCTION_RULES[key] = rule
    else:
        raise TypeError(f"register_rule: key must be an nn.Module subclass, a function or a method name; got {key!r}")


def rule_for(kind: str, target: Any) -> Rule | None:
    if kind == "module":
        for cls in type(target).__mro__:
            if cls in _MODULE_RULES:
                return _MODULE_RULES[cls]
        return None
    if kind == "method":
        return _METHOD_RULES.get(target.rstrip("_") if target.endswith("_") and not target.endswith("__") else target)
    return _FUNCTION_RULES.get(target)


def no_rule_message(step_name: str, kind: str, target: Any) -> str:
    if kind == "module":
        what, key = f"module {step_name!r} ({type(target).__name__})", type(target).__name__
    elif kind == "method":
        what, key = f"method {target!r} (graph node {step_name})", repr(target)
    else:
        what, key = f"function {getattr(target, '__name__', target)!r} (graph node {step_name})", getattr(target, "__name__", "fn")
    return (f"LRP-epsilon has no rule for {what}; register one with auditkit.explain.register_rule({key}, rule) "
            "(docs/explain.md), or use a gradient-based method")


# ---- the rules --------------------------------------------------------------------------------


def _only_first(step: Step, relevance: torch.Tensor) -> list:
    return [relevance] + [None] * (len(step.inputs) - 1)


def identity_rule(step: Step) -> list:
    """R_in = R: relevance passes an elementwise layer unchanged (activations, dropout, identity,
    normalisations on feature maps (AttnLRP), casts). The layer must keep its input's shape."""
    a = step.inputs[0]
    if a.shape[1:] != step.output.shape[1:]:
        raise UnsupportedLayerError(f"the identity rule needs a layer that keeps its input's shape ({step.name}: "
                                    f"{tuple(a.shape)} -> {tuple(step.output.shape)})")
    return _only_first(step, step.relevance)


def _check_batch_kept(step: Step) -> None:
    if step.output.shape[0] != step.inputs[0].shape[0]:
        raise UnsupportedLayerError(f"LRP cannot follow relevance across the batch dimension ({step.name})")


def reshape_rule(step: Step) -> list:
    """Flatten, reshape, view, squeeze, unsqueeze: the relevance takes its input's shape back."""
    _check_batch_kept(step)
    a = step.inputs[0]
    return _only_first(step, step.relevance.reshape(step.relevance.shape[0], *a.shape[1:]))


def _dims(step: Step) -> list[int]:
    """The permutation of a permute call, normalised to non-negative dims."""
    given = step.args[1:] if step.kind == "method" else step.args[1:]
    if "dims" in step.kwargs:
        given = step.kwargs["dims"]
    if len(given) == 1 and isinstance(given[0], (tuple, list)):
        given = given[0]
    rank = step.inputs[0].dim()
    return [d % rank for d in given]


def permute_rule(step: Step) -> list:
    """permute / transpose / swapaxes: the inverse permutation (the batch dimension must stay first)."""
    rank = step.inputs[0].dim()
    if step.kind == "method" and step.target == "permute" or step.kind == "function" and step.target is torch.permute:
        order = _dims(step)
    else:  # transpose(d0, d1)
        d0, d1 = (step.kwargs.get("dim0", step.args[1] if len(step.args) > 1 else None),
                  step.kwargs.get("dim1", step.args[2] if len(step.args) > 2 else None))
        order = list(range(rank))
        order[d0 % rank], order[d1 % rank] = order[d1 % rank], order[d0 % rank]
    if order[0] != 0:
        raise UnsupportedLayerError(f"LRP cannot follow relevance across the batch dimension ({step.name})")
    inverse = [order.index(d) for d in range(rank)]
    return _only_first(step, step.relevance.permute(*inverse))


def cat_rule(step: Step) -> list:
    """Concatenation: each input gets its slice of the relevance."""
    tensors = step.args[0]
    dim = step.kwargs.get("dim", step.args[1] if len(step.args) > 1 else 0)
    if dim % step.output.dim() == 0:
        raise UnsupportedLayerError(f"LRP cannot split relevance of a concatenation along the batch ({step.name})")
    sizes = [t.shape[dim] for t in tensors]
    return list(torch.split(step.relevance, sizes, dim=dim))


def split_rule(step: Step) -> list:
    """chunk / split / unbind: the parts' relevances (``step.relevance`` is a list, one per part)
    joined back along the dim they were cut along."""
    position = 1 if step.target in ("unbind", torch.unbind) else 2
    dim = step.kwargs.get("dim", step.args[position] if len(step.args) > position else 0)
    if dim % step.inputs[0].dim() == 0:
        raise UnsupportedLayerError(f"LRP cannot follow relevance across the batch dimension ({step.name})")
    parts = list(step.relevance)
    if step.target in ("unbind", torch.unbind):
        parts = [p.unsqueeze(dim) for p in parts]
    return _only_first(step, torch.cat(parts, dim=dim))


def index_rule(step: Step) -> list:
    """Indexing and slicing a tensor (x[:, :8]): relevance goes back to the positions read (Jᵀ R of
    the selection, by autograd); the batch dimension must be kept whole."""
    _check_batch_kept(step)
    a = step.inputs[0]
    with torch.enable_grad():
        probe = torch.zeros((step.relevance.shape[0], *a.shape[1:]), dtype=a.dtype, device=a.device, requires_grad=True)
        (back,) = torch.autograd.grad(probe[step.args[1]], probe, step.relevance, create_graph=step.create_graph)
    return _only_first(step, back)


def linear_map_rule(step: Step) -> list:
    """The epsilon rule for a bias-free linear map z = f(a) (means and sums over non-batch dims,
    interpolation, average pooling): R_in = a ⊙ Jᵀ (R / (z + ε·sign z)), Jᵀ by autograd (f is linear,
    so the point it is evaluated at does not matter)."""
    _check_batch_kept(step)
    a = step.inputs[0]
    s = step.ratio()
    with torch.enable_grad():
        probe = torch.zeros((s.shape[0], *a.shape[1:]), dtype=a.dtype, device=a.device, requires_grad=True)
        (contribution,) = torch.autograd.grad(step.call_on(probe), probe, s, create_graph=step.create_graph)
    return _only_first(step, step.flat(step.per_target(contribution) * a))


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def conv2d_rule(step: Step, weight: torch.Tensor | None = None) -> list:
    """The epsilon rule for a 2-D convolution (fused kernels), module or F.conv2d."""
    if step.kind == "module":
        conv = step.target
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise UnsupportedLayerError(f"LRP supports zero-padded convolutions with numeric padding; got {conv}")
        weight = conv.weight if weight is None else weight
        stride, padding, dilation, groups = conv.stride, conv.padding, conv.dilation, conv.groups
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        given = {**dict(zip(names, step.args)), **step.kwargs}
        weight = given["weight"]
        padding = given.get("padding", 0)
        if isinstance(padding, str):
            raise UnsupportedLayerError(f"LRP supports numeric convolution padding; {step.name} has {padding!r}")
        stride, dilation, groups = given.get("stride", 1), given.get("dilation", 1), given.get("groups", 1)
    with below_autograd(not step.create_graph):
        out = lrp_epsilon_conv2d(step.inputs[0], step.output, step.relevance, weight, list(_pair(stride)),
                                 list(_pair(padding)), list(_pair(dilation)), groups, step.epsilon)
    return _only_first(step, out)


def linear_rule(step: Step) -> list:
    """The epsilon rule for a linear layer (fused kernels), module or F.linear, on (N, ..., features):
    extra dims (channels-last feature maps, as in ConvNeXt) are positions, each its own sample."""
    a, z, relevance = step.inputs[0], step.output, step.relevance
    weight = step.target.weight if step.kind == "module" else {**dict(zip(("input", "weight"), step.args)), **step.kwargs}["weight"]
    if a.dim() < 2:
        raise UnsupportedLayerError(f"LRP supports linear layers on (N, ..., features) inputs ({step.name})")
    with below_autograd(not step.create_graph):
        if a.dim() == 2:
            return _only_first(step, lrp_epsilon_linear(a, z, relevance, weight, step.epsilon))
        # (K*N, ..., out) target-major flattens to (K * N*positions, out) in the same target-major order.
        out = lrp_epsilon_linear(a.reshape(-1, a.shape[-1]), z.reshape(-1, z.shape[-1]),
                                 relevance.reshape(-1, relevance.shape[-1]), weight, step.epsilon)
    return _only_first(step, out.view(relevance.shape[0], *a.shape[1:]))


def batch_norm_scale(bn: nn.BatchNorm2d, bn_input: torch.Tensor) -> torch.Tensor:
    """gamma / sigma with the statistics the module used in this forward pass."""
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
    return _only_first(step, step.flat(step.per_target(step.ratio()) * (a * scale)))


def average_pool_rule(step: Step) -> list:
    """Average and adaptive average pooling (linear maps) under the epsilon rule; Wᵀ is the pooling's
    own backward kernel; an adaptive pool to the input's size is the identity."""
    a, z = step.inputs[0], step.output
    s = step.ratio()
    adaptive = (step.kind == "module" and isinstance(step.target, nn.AdaptiveAvgPool2d)) or step.target is F.adaptive_avg_pool2d
    if adaptive and z.shape[-2:] == a.shape[-2:]:
        contribution = s
    else:
        placeholder = s.new_empty(1).expand(s.shape[0], *a.shape[1:])  # only its shape matters
        if adaptive:
            contribution = torch.ops.aten._adaptive_avg_pool2d_backward(s, placeholder)
        else:
            if step.kind == "module":
                m = step.target
                params = (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
            else:
                names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
                given = {**dict(zip(names, step.args)), **step.kwargs}
                kernel = given["kernel_size"]
                params = (kernel, given.get("stride") or kernel, given.get("padding", 0), given.get("ceil_mode", False),
                          given.get("count_include_pad", True), given.get("divisor_override"))
            kernel, stride, padding, ceil_mode, count_include_pad, divisor = params
            contribution = torch.ops.aten.avg_pool2d_backward(
                s, placeholder, list(_pair(kernel)), list(_pair(stride or kernel)), list(_pair(padding)), ceil_mode,
                count_include_pad, divisor,
            )
    return _only_first(step, step.flat(step.per_target(contribution) * a))


def winner_takes_all_rule(step: Step) -> list:
    """Max and adaptive max pooling: each output's relevance goes to the input position of its
    maximum (overlapping windows add up, exactly as the pool's gradient). Needs the forward's indices."""
    a, relevance = step.inputs[0], step.relevance
    indices = step.extra.get("indices")
    if indices is None:  # pragma: no cover - run_forward keeps them for every max pool it knows
        raise UnsupportedLayerError(f"LRP needs the max positions of {step.name}")
    flat_indices = indices.flatten(2)
    if step.k > 1:
        flat_indices = flat_indices.repeat(step.k, 1, 1)
    out = torch.zeros((relevance.shape[0], a.shape[1], a.shape[2] * a.shape[3]), dtype=relevance.dtype, device=relevance.device)
    return _only_first(step, out.scatter_add_(2, flat_indices, relevance.flatten(2)).view(relevance.shape[0], *a.shape[1:]))


def sum_rule(step: Step) -> list:
    """z = a1 + a2 (a residual addition): R_i = a_i ⊙ R / (z + ε·sign z); adding a constant leaves
    the relevance with the tensor."""
    z = step.output
    tensors = [i for i, t in enumerate(step.inputs)]
    if len(tensors) == 1:
        return [step.relevance]
    if any(t.shape != z.shape for t in step.inputs):
        raise UnsupportedLayerError(f"LRP supports additions of same-shape tensors only ({step.name})")
    s = step.per_target(step.ratio())
    return [step.flat(s * t) for t in step.inputs]


_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}


def _is_gate(producer) -> bool:
    return isinstance(producer, _GATE_MODULES) or producer in _GATE_FUNCTIONS or producer in ("sigmoid", "sigmoid_")


def gate_rule(step: Step) -> list:
    """x · g with g a gate (a sigmoid's output, as in squeeze-excitation) or a broadcast factor
    (layer scale, per-channel weights): g is a constant weight, x gets all the relevance."""
    z = step.output
    if len(step.inputs) == 1:  # a constant factor
        return [step.relevance]
    gates = [i for i, constant in enumerate(step.constant) if constant]  # a weight (layer scale)
    if len(gates) != 1:
        gates = [i for i, p in enumerate(step.producers) if _is_gate(p)]
    if len(gates) != 1:
        gates = [i for i, t in enumerate(step.inputs) if t.shape != z.shape]
    if len(gates) != 1 or len(step.inputs) != 2:
        raise UnsupportedLayerError(
            f"LRP supports products where one factor is a gate (a sigmoid, as in squeeze-excitation, "
            f"or a broadcast factor such as layer scale); {step.name} is neither"
        )
    out = [None, None]
    out[1 - gates[0]] = step.relevance
    return out


# ---- the table ------------------------------------------------------------------------------------


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


def _register_builtins() -> None:
    for module in ELEMENTWISE_MODULES:
        register_rule(module, identity_rule)
    for function in ELEMENTWISE_FUNCTIONS:
        register_rule(function, identity_rule)
    for method in ELEMENTWISE_METHODS:
        register_rule(method, identity_rule)
    register_rule(nn.Conv2d, conv2d_rule)
    register_rule(F.conv2d, conv2d_rule)
    register_rule(nn.Linear, linear_rule)
    register_rule(F.linear, linear_rule)
    register_rule(nn.BatchNorm2d, batch_norm_rule)
    for key in (nn.AdaptiveAvgPool2d, nn.AvgPool2d, F.adaptive_avg_pool2d, F.avg_pool2d):
        register_rule(key, average_pool_rule)
    for key in (nn.MaxPool2d, nn.AdaptiveMaxPool2d, F.max_pool2d, F.adaptive_max_pool2d):
        register_rule(key, winner_takes_all_rule)
    for key in (nn.Flatten, nn.Unflatten, torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                "view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze"):
        register_rule(key, reshape_rule)
    for key in (torch.permute, torch.transpose, torch.swapaxes, "permute", "transpose", "swapaxes"):
        register_rule(key, permute_rule)
    register_rule(torch.cat, cat_rule)
    for key in (torch.chunk, torch.split, torch.unbind, "chunk", "split", "unbind"):
        register_rule(key, split_rule)
    register_rule(operator.getitem, index_rule)
    register_rule(torch.concat, cat_rule)
    for key in (operator.add, operator.iadd, torch.add, "add"):
        register_rule(key, sum_rule)
    for key in (operator.mul, operator.imul, torch.mul, "mul"):
        register_rule(key, gate_rule)
    for key in (torch.mean, torch.sum, "mean", "sum", F.interpolate, F.upsample):
        register_rule(key, linear_map_rule)
    for module in (nn.Upsample, nn.UpsamplingBilinear2d, nn.UpsamplingNearest2d):
        register_rule(module, linear_map_rule)


_register_builtins()
