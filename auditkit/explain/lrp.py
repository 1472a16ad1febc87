"""LRP-epsilon (seed 004 Eq. A1-A3; Bassi et al., TEA) for any network torch.fx can trace.

The network is traced once into a graph of its modules and functions. An explanation runs the
forward pass through that graph (the model's own modules and parameters — nothing is copied,
replaced or hooked, so the model, its optimizer and its gradients are untouched), keeps every
node's input and output, and then propagates relevance from the target logit back to the input
node by node:

- conv2d / linear, z = W a + b:  R_in = a * W^T (R / (z + eps sign z))   (the fused ops)
- batch norm after a conv: merged into it on the fly, W' = W gamma / sigma (the module is not
  changed); any other batch norm is an elementwise affine layer under the same rule;
- average / adaptive average pooling, bilinear resizing: linear maps under the same rule;
- residual additions z = a1 + a2: R_i = a_i R / (z + eps sign z) (split by contribution);
- max pooling: relevance goes to the maximum (winner takes all);
- activations, dropout, stochastic depth: relevance passes through unchanged;
- flatten / reshape / concatenation: relevance is rearranged back;
- gating products such as squeeze-excitation (x * g(x), g broadcast): all relevance goes to x.

Anything else is refused with an error naming the module or function, never a silent wrong map.
With ``create_graph=True`` every step is differentiable (the ops have autograd formulas), so a
loss on the heatmap trains the model (TEA).
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops import lrp_epsilon_conv2d, lrp_epsilon_linear, lrp_epsilon_ratio
from ..errors import AuditkitError, ModelError
from .validate import check_logits, check_targets, explanation_method, logits_from

DEFAULT_EPSILON = 1e-6


class UnsupportedLayerError(ModelError):
    """The network contains a layer LRP-epsilon has no rule for."""


# ---- tracing -----------------------------------------------------------------------------------

_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout2d, nn.Identity,
)
_PASS_FUNCTIONS = {F.relu, F.relu6, F.silu, F.gelu, F.leaky_relu, F.elu, F.dropout, torch.relu, torch.sigmoid,
                   torch.tanh, F.hardswish, torch.nn.functional.sigmoid}
_PASS_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "contiguous", "clone", "float", "to", "type_as", "detach"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "view_as", "reshape_as"}


def _stochastic_depth():
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return (), set()
    return (StochasticDepth,), {stochastic_depth}


_SD_MODULES, _SD_FUNCTIONS = _stochastic_depth()


class _Tracer(fx.Tracer):
    # Keep torchvision's stochastic depth as one call instead of tracing into it.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _SD_MODULES) or super().is_leaf_module(m, qualname)


@dataclass
class TracedNetwork:
    """A traced network: its graph, and the network itself held weakly, so that the trace cache
    (keyed weakly by the network) never keeps a deleted network alive."""

    _root: "weakref.ReferenceType[nn.Module]"
    graph: fx.Graph
    # Conv nodes whose output feeds only one batch norm: merged into it.
    merged: dict[fx.Node, fx.Node] = field(default_factory=dict)  # bn node -> conv node

    @property
    def root(self) -> nn.Module:
        root = self._root()
        if root is None:  # pragma: no cover - a trace is only used while its network is in use
            raise ModelError("the traced network no longer exists")
        return root

    def module(self, node: fx.Node) -> nn.Module:
        return self.root.get_submodule(node.target)


_TRACES: "weakref.WeakKeyDictionary[nn.Module, TracedNetwork]" = weakref.WeakKeyDictionary()


def trace(net: nn.Module) -> TracedNetwork:
    """The network's graph (cached per module object)."""
    cached = _TRACES.get(net)
    if cached is not None:
        return cached
    try:
        graph = _Tracer().trace(net)
    except AuditkitError:  # a bad setting found while tracing (e.g. `output` picks nothing): as it is
        raise
    except Exception as error:  # tracing failures come in many types
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsupportedLayerError(
            f"LRP could not trace {type(net).__name__} with torch.fx ({first[:160]}); "
            "use gradient-based methods or make its forward traceable"
        ) from error
    traced = TracedNetwork(weakref.ref(net), graph)
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(traced.module(node), nn.BatchNorm2d):
            source = node.args[0]
            if (
                isinstance(source, fx.Node)
                and source.op == "call_module"
                and isinstance(traced.module(source), nn.Conv2d)
                and len(source.users) == 1
            ):
                traced.merged[node] = source
    _TRACES[net] = traced
    return traced


def _describe(traced: TracedNetwork, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(traced.module(node)).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{'method' if node.op == 'call_method' else 'function'} {name!r} (graph node {node.name})"


# ---- forward -------------------------------------------------------------------------------------

# In-place activations would overwrite the values the rules need (torchvision's ResNet applies
# ReLU(inplace=True) to batch-norm outputs), so the forward uses out-of-place equivalents.
_OUT_OF_PLACE = {
    nn.ReLU: lambda m, x: F.relu(x),
    nn.ReLU6: lambda m, x: F.relu6(x),
    nn.SiLU: lambda m, x: F.silu(x),
    nn.Hardswish: lambda m, x: F.hardswish(x),
    nn.Hardsigmoid: lambda m, x: F.hardsigmoid(x),
    nn.LeakyReLU: lambda m, x: F.leaky_relu(x, m.negative_slope),
    nn.ELU: lambda m, x: F.elu(x, m.alpha),
    nn.Dropout: lambda m, x: F.dropout(x, m.p, m.training),
}


_OUT_OF_PLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def _is_relu(traced: TracedNetwork, node: fx.Node) -> bool:
    """max(x, 0) exactly: not ReLU6, leaky or other variants, whose outputs differ from x where x > 0
    or are non-zero where x < 0."""
    if node.op == "call_module":
        return type(traced.module(node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _feeds_only(source, node: fx.Node) -> bool:
    """``source`` is a layer's output used by ``node`` alone (so no other rule reads its value)."""
    return isinstance(source, fx.Node) and source.op in ("call_module", "call_function", "call_method") \
        and list(source.users) == [node] and len(node.args) >= 1


def _call_module(module: nn.Module, args, kwargs):
    if getattr(module, "inplace", False):
        out_of_place = _OUT_OF_PLACE.get(type(module))
        if out_of_place is not None and len(args) == 1 and not kwargs:
            return out_of_place(module, args[0])
        args = (args[0].clone(), *args[1:])
    return module(*args, **kwargs)


def _max_pool_params(node: fx.Node, traced: TracedNetwork, value) -> tuple | None:
    """(kernel, stride, padding, dilation, ceil_mode) of a max-pool node, or None."""
    if node.op == "call_module":
        module = traced.module(node)
        if isinstance(module, nn.MaxPool2d) and not module.return_indices:
            return (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
        return None
    if node.op == "call_function" and node.target is F.max_pool2d:
        names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
        given = {key: value(v) for key, v in {**dict(zip(names, node.args)), **node.kwargs}.items()}
        if given.get("return_indices"):
            return None
        kernel = given["kernel_size"]
        return (kernel, given.get("stride") or kernel, given.get("padding", 0), given.get("dilation", 1),
                given.get("ceil_mode", False))
    return None


def _in_float32(env: dict) -> dict:
    """The forward's values with float16/bfloat16 tensors in float32 (differentiably: TEA)."""
    low = (torch.float16, torch.bfloat16)
    return {key: value.float() if isinstance(value, torch.Tensor) and value.dtype in low else value
            for key, value in env.items()}


def run_forward(traced: TracedNetwork, x: torch.Tensor) -> tuple[torch.Tensor, dict[fx.Node, object]]:
    """Runs the graph with the network's own modules; returns (output, every node's value).

    Max pools also keep the positions of their maxima (under ``(node, "indices")``), which the
    winner-takes-all rule needs; computing them now saves a second pooling pass.
    """
    env: dict[fx.Node, object] = {}

    def value(arg):
        return fx.node.map_arg(arg, lambda n: env[n])

    output = None
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            env[node] = x
        elif node.op == "get_attr":
            target = traced.root
            for part in node.target.split("."):
                target = getattr(target, part)
            env[node] = target
        elif (pool := _max_pool_params(node, traced, value)) is not None:
            env[node], env[(node, "indices")] = F.max_pool2d(value(node.args[0]), *pool, return_indices=True)
        elif node.op == "call_module":
            env[node] = _call_module(traced.module(node), value(node.args), value(node.kwargs))
        elif node.op == "call_function":
            kwargs = value(node.kwargs)
            if kwargs.get("inplace"):
                kwargs = {**kwargs, "inplace": False}
            function = _OUT_OF_PLACE_OPERATORS.get(node.target, node.target)
            env[node] = function(*value(node.args), **kwargs)
        elif node.op == "call_method":
            receiver, *rest = value(node.args)
            method = node.target[:-1] if node.target.endswith("_") and not node.target.endswith("__") else node.target
            env[node] = getattr(receiver, method)(*rest, **value(node.kwargs))
        elif node.op == "output":
            output = value(node.args[0])
        if _is_relu(traced, node) and _feeds_only(node.args[0], node):
            # The layer before a ReLU needs its output z only in s = R / (z + eps sign z), and there
            # R = 0 wherever relu(z) = 0 (relevance at a tensor is that tensor times something, Eq. A1),
            # so relu(z) gives the same s and, through the ReLU's backward, the same gradients.
            # Keeping relu(z), which autograd holds anyway, instead of z saves one activation-sized
            # tensor per layer (TEA's double backward: benchmarks/RESULTS.md).
            env[node.args[0]] = env[node]
    return logits_from(output), env


# ---- rules -----------------------------------------------------------------------------------


def _per_target(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.view(k, t.shape[0] // k, *t.shape[1:])


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _batch_norm_scale(bn: nn.BatchNorm2d, bn_input: torch.Tensor) -> torch.Tensor:
    """gamma / sigma with the statistics the module used in this forward pass."""
    if bn.training or bn.running_var is None:
        variance = bn_input.detach().var(dim=(0, 2, 3), unbiased=False)
    else:
        variance = bn.running_var
    scale = torch.rsqrt(variance + bn.eps)
    return scale * bn.weight if bn.weight is not None else scale


def _linear_map_rule(fn, a: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor, k: int, epsilon: float, create_graph: bool):
    """The epsilon rule for a bias-free linear map z = fn(a) (pooling, resizing):
    R_in = a * J^T (R / (z + eps sign z)), with J^T from autograd (fn is linear, so any point works)."""
    s = lrp_epsilon_ratio(relevance, z, epsilon)
    with torch.enable_grad():
        probe = torch.zeros((relevance.shape[0], *a.shape[1:]), dtype=a.dtype, device=a.device, requires_grad=True)
        (contribution,) = torch.autograd.grad(fn(probe), probe, s, create_graph=create_graph)
    return _flat(_per_target(contribution, k) * a)


def _average_pool_rule(params, a: torch.Tensor, z: torch.Tensor, relevance: torch.Tensor, ctx: "_Context"):
    """The epsilon rule for average pooling (``params`` None: adaptive), a linear map: the
    transpose is the pooling's own backward kernel; an adaptive pool to the same size is the
    identity."""
    s = lrp_epsilon_ratio(relevance, z, ctx.epsilon)
    if params is None and z.shape[-2:] == a.shape[-2:]:
        contribution = s
    else:
        # Only the shape of `self` matters to these kernels: a broadcast placeholder.
        placeholder = s.new_empty(1).expand(relevance.shape[0], *a.shape[1:])
        if params is None:
            contribution = torch.ops.aten._adaptive_avg_pool2d_backward(s, placeholder)
        else:
            kernel, stride, padding, ceil_mode, count_include_pad, divisor = params
            contribution = torch.ops.aten.avg_pool2d_backward(
                s, placeholder, list(_pair(kernel)), list(_pair(stride)), list(_pair(padding)), ceil_mode,
                count_include_pad, divisor,
            )
    return _flat(_per_target(contribution, ctx.k) * a)


def _max_pool_rule(indices: torch.Tensor, a: torch.Tensor, relevance: torch.Tensor, k: int):
    """Winner takes all: each output's relevance goes to the input position of its maximum
    (overlapping windows add up, exactly as the max pool's gradient)."""
    flat_indices = indices.flatten(2)
    if k > 1:
        flat_indices = flat_indices.repeat(k, 1, 1)
    out = torch.zeros((relevance.shape[0], a.shape[1], a.shape[2] * a.shape[3]), dtype=relevance.dtype, device=relevance.device)
    return out.scatter_add_(2, flat_indices, relevance.flatten(2)).view(relevance.shape[0], *a.shape[1:])


_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid}


def _is_gate(traced: TracedNetwork, node: fx.Node) -> bool:
    """A factor produced by a sigmoid: a gate in [0, 1] (squeeze-excitation, attention)."""
    if node.op == "call_module":
        return isinstance(traced.module(node), _GATE_MODULES)
    if node.op == "call_function":
        return node.target in _GATE_FUNCTIONS
    return node.op == "call_method" and node.target in ("sigmoid", "sigmoid_")


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


@dataclass
class _Context:
    traced: TracedNetwork
    env: dict
    k: int
    epsilon: float
    create_graph: bool

    def value(self, arg):
        return self.env[arg] if isinstance(arg, fx.Node) else arg


def _conv_rule(ctx: _Context, conv: nn.Conv2d, a, z, relevance, weight=None):
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise UnsupportedLayerError(f"LRP supports zero-padded convolutions with numeric padding; got {conv}")
    return lrp_epsilon_conv2d(
        a, z, relevance, conv.weight if weight is None else weight, list(_pair(conv.stride)),
        list(_pair(conv.padding)), list(_pair(conv.dilation)), conv.groups, ctx.epsilon,
    )


def _module_rule(ctx: _Context, node: fx.Node, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    module = ctx.traced.module(node)
    source = node.args[0]
    a, z = ctx.value(source), ctx.env[node]
    if node in ctx.traced.merged:  # conv followed by this batch norm: one linear layer
        conv_node = ctx.traced.merged[node]
        conv = ctx.traced.module(conv_node)
        scale = _batch_norm_scale(module, a)
        merged_weight = conv.weight * scale.view(-1, 1, 1, 1)
        return [(conv_node.args[0], _conv_rule(ctx, conv, ctx.value(conv_node.args[0]), z, relevance, merged_weight))]
    if isinstance(module, nn.Conv2d):
        return [(source, _conv_rule(ctx, module, a, z, relevance))]
    if isinstance(module, nn.Linear):
        return [(source, lrp_epsilon_linear(a, z, relevance, module.weight, ctx.epsilon))]
    if isinstance(module, nn.BatchNorm2d):  # not after a conv: an elementwise affine layer
        s = lrp_epsilon_ratio(relevance, z, ctx.epsilon)
        scale = _batch_norm_scale(module, a).view(1, -1, 1, 1)
        return [(source, _flat(_per_target(s, ctx.k) * (a * scale)))]
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return [(source, _average_pool_rule(None, a, z, relevance, ctx))]
    if isinstance(module, nn.AvgPool2d):
        params = (module.kernel_size, module.stride, module.padding, module.ceil_mode, module.count_include_pad,
                  module.divisor_override)
        return [(source, _average_pool_rule(params, a, z, relevance, ctx))]
    if isinstance(module, nn.MaxPool2d):
        return [(source, _max_pool_rule(ctx.env[(node, "indices")], a, relevance, ctx.k))]
    if isinstance(module, nn.Flatten):
        return [(source, relevance.reshape(relevance.shape[0], *a.shape[1:]))]
    if isinstance(module, _PASS_MODULES + _SD_MODULES):
        return [(source, relevance)]
    raise UnsupportedLayerError(f"LRP-epsilon has no rule for {_describe(ctx.traced, node)}")


def _function_rule(ctx: _Context, node: fx.Node, relevance: torch.Tensor) -> list[tuple[fx.Node, torch.Tensor]]:
    target, args = node.target, node.args
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if target in _PASS_FUNCTIONS or target in _SD_FUNCTIONS or (node.op == "call_method" and name in _PASS_METHODS):
        return [(args[0], relevance)]
    if target in _RESHAPE_FUNCTIONS or (node.op == "call_method" and name in _RESHAPE_METHODS):
        a = ctx.value(args[0])
        return [(args[0], relevance.reshape(relevance.shape[0], *a.shape[1:]))]
    if target is torch.cat:
        tensors = args[0]
        dim = node.kwargs.get("dim", args[1] if len(args) > 1 else 0)
        if dim in (0, -ctx.value(tensors[0]).dim()):
            raise UnsupportedLayerError(f"LRP cannot split relevance of a concatenation along the batch ({node.name})")
        sizes = [ctx.value(t).shape[dim] for t in tensors]
        return list(zip(tensors, torch.split(relevance, sizes, dim=dim)))
    if target in (operator.add, torch.add, operator.iadd):
        left, right = args[0], args[1]
        tensors = [arg for arg in (left, right) if isinstance(arg, fx.Node) and isinstance(ctx.value(arg), torch.Tensor)]
        z = ctx.env[node]
        if len(tensors) == 1:  # adding a constant: relevance stays with the tensor
            return [(tensors[0], relevance)]
        if any(ctx.value(t).shape != z.shape for t in tensors):
            raise UnsupportedLayerError(f"LRP supports additions of same-shape tensors only ({node.name})")
        s = _per_target(lrp_epsilon_ratio(relevance, z, ctx.epsilon), ctx.k)
        return [(t, _flat(s * ctx.value(t))) for t in tensors]
    if target in (operator.mul, torch.mul, operator.imul):
        tensors = [arg for arg in args[:2] if isinstance(arg, fx.Node) and isinstance(ctx.value(arg), torch.Tensor)]
        z = ctx.env[node]
        if len(tensors) == 1:
            return [(tensors[0], relevance)]
        gates = [t for t in tensors if _is_gate(ctx.traced, t)]
        if len(gates) != 1:  # no sigmoid: the broadcast factor is the gate
            gates = [t for t in tensors if ctx.value(t).shape != z.shape]
        if len(gates) != 1:
            raise UnsupportedLayerError(
                f"LRP supports products where one factor is a gate (a sigmoid, as in squeeze-excitation, "
                f"or a broadcast factor); {node.name} is neither"
            )
        signal = next(t for t in tensors if t is not gates[0])
        return [(signal, relevance)]  # the gate g(x) only modulates x
    if target in (F.conv2d, F.linear):
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        given = {**dict(zip(names, args)), **node.kwargs}
        a, weight, z = ctx.value(given["input"]), ctx.value(given["weight"]), ctx.env[node]
        if target is F.linear:
            if a.dim() != 2:
                raise UnsupportedLayerError(f"LRP supports linear layers on (N, features) inputs ({node.name})")
            return [(given["input"], lrp_epsilon_linear(a, z, relevance, weight, ctx.epsilon))]
        padding = ctx.value(given.get("padding", 0))
        if isinstance(padding, str):
            raise UnsupportedLayerError(f"LRP supports numeric convolution padding; {node.name} has {padding!r}")
        step = lrp_epsilon_conv2d(
            a, z, relevance, weight, list(_pair(ctx.value(given.get("stride", 1)))), list(_pair(padding)),
            list(_pair(ctx.value(given.get("dilation", 1)))), ctx.value(given.get("groups", 1)), ctx.epsilon,
        )
        return [(given["input"], step)]
    if target is F.adaptive_avg_pool2d:
        return [(args[0], _average_pool_rule(None, ctx.value(args[0]), ctx.env[node], relevance, ctx))]
    if target is F.avg_pool2d:
        names = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        given = {key: ctx.value(v) for key, v in {**dict(zip(names, args)), **node.kwargs}.items()}
        kernel = given["kernel_size"]
        params = (kernel, given.get("stride") or kernel, given.get("padding", 0), given.get("ceil_mode", False),
                  given.get("count_include_pad", True), given.get("divisor_override"))
        return [(args[0], _average_pool_rule(params, given["input"], ctx.env[node], relevance, ctx))]
    if target is F.max_pool2d:
        return [(args[0], _max_pool_rule(ctx.env[(node, "indices")], ctx.value(args[0]), relevance, ctx.k))]
    raise UnsupportedLayerError(f"LRP-epsilon has no rule for {_describe(ctx.traced, node)}")


def propagate(
    traced: TracedNetwork,
    env: dict,
    output_relevance: torch.Tensor,
    *,
    k: int,
    epsilon: float,
    create_graph: bool,
) -> torch.Tensor:
    """Relevance at the network input, (K*N, ...) target-major, from relevance at its output."""
    nodes = list(traced.graph.nodes)
    output_node = next(n for n in reversed(nodes) if n.op == "output")
    relevance: dict[fx.Node, torch.Tensor] = {output_node.args[0]: output_relevance}
    ctx = _Context(traced, env, k, epsilon, create_graph)
    input_relevance = None
    for node in reversed(nodes):
        if node not in relevance:
            continue
        r = relevance.pop(node)
        if node.op == "placeholder":
            input_relevance = r
            continue
        if node.op == "call_module":
            contributions = _module_rule(ctx, node, r)
        elif node.op in ("call_function", "call_method"):
            contributions = _function_rule(ctx, node, r)
        else:
            raise UnsupportedLayerError(f"LRP-epsilon has no rule for graph node {node.name} ({node.op})")
        for source, value in contributions:
            if not isinstance(source, fx.Node):
                continue
            relevance[source] = relevance[source] + value if source in relevance else value
    if input_relevance is None:
        raise UnsupportedLayerError("no relevance reached the network input (is the output independent of it?)")
    return input_relevance


@explanation_method
def lrp_epsilon(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    epsilon: float = DEFAULT_EPSILON,
    create_graph: bool = False,
) -> torch.Tensor:
    """LRP-epsilon heatmaps (N, K, H, W) for ``targets`` (N, K) class indices (see lrp_epsilon_and_logits)."""
    return lrp_epsilon_and_logits(model, x, targets, epsilon=epsilon, create_graph=create_graph)[0]


def lrp_epsilon_and_logits(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    epsilon: float = DEFAULT_EPSILON,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(LRP-epsilon heatmaps (N, K, H, W) for ``targets`` (N, K) class indices, logits (N, classes)).
    The logits come from the same forward pass (TEA uses them instead of running the model twice).

    Relevance starts at the target logit (Eq. A3: R = z_c for the explained class, 0 elsewhere)
    and is propagated to the input (Eq. A1); the heatmap sums it over channels. For an
    auditkit model it is the relevance of the normalised input pixels, mapped back through the
    model's resizing, so it lines up with the image and its mask.
    """
    from ..models import AuditModel

    n, k = targets.shape
    with torch.set_grad_enabled(create_graph):
        if isinstance(model, AuditModel):
            normalised = (x - model.mean) / model.std
            network_input = model._upsample_to_min_size(normalised)
            traced = trace(model.net)
        else:
            normalised = network_input = x
            traced = trace(model)
        logits, env = run_forward(traced, network_input)
        check_targets(targets, n, check_logits(logits, n))
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Mixed precision: the forward ran in the low dtype; relevance flows in float32 (the
            # ratio R / (z + eps sign z) divides by activations, which bfloat16's 8-bit mantissa
            # would blur near 0), so the low dtype reaches the map only through the activations.
            env = _in_float32(env)
            logits = logits.float()
    autocast_off = torch.autocast(device_type, enabled=False)
    with torch.set_grad_enabled(create_graph), autocast_off:
        # One forward pass serves every target. On CUDA the K relevance passes run as one batch
        # of K*N (bigger GEMMs, fewer launches); on CPU as K passes of N, which measured faster
        # (oneDNN at batch K*N loses cache locality: ResNet-18, K = 3, 16 images: 1.48x -> ~1.0x
        # the cost of K input-gradient backwards).
        groups = [targets.t().reshape(-1)] if x.device.type == "cuda" else list(targets.t())
        maps = []
        for columns in groups:
            per_group = columns.shape[0] // n
            rows = torch.arange(n, device=x.device).repeat(per_group)
            start = torch.zeros((columns.shape[0], logits.shape[1]), dtype=logits.dtype, device=logits.device)
            start = start.index_put((torch.arange(columns.shape[0], device=x.device), columns), logits[rows, columns])
            relevance = propagate(traced, env, start, k=per_group, epsilon=epsilon, create_graph=create_graph)
            if network_input is not normalised:  # undo the model's resize with the same rule
                size = network_input.shape[-2:]

                def resize(t):
                    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

                relevance = _linear_map_rule(resize, normalised, network_input, relevance, per_group, epsilon, create_graph)
            maps.append(relevance.sum(dim=1).view(per_group, n, *relevance.shape[2:]))  # (k, N, H, W)
        return torch.cat(maps).transpose(0, 1), logits
