"""LRP-epsilon (seed 004 Eq. A1-A3; Bassi et al., TEA) for any network torch.fx can trace.

The network is traced once into a graph of its modules and functions (the trace is cached, held
weakly). An explanation runs the forward pass through that graph (the model's own modules and
parameters — nothing is copied, replaced or hooked, so the model, its optimizer and its gradients
are untouched), keeps every node's input and output, and then propagates relevance from the target
logit back to the input node by node, each node by the rule the table in lrp_rules.py gives for
its module type, function or method (``register_rule`` adds one). A batch norm that follows a
convolution is merged into it on the fly (W' = W γ/σ; the module is not changed).

Anything without a rule is refused with an error naming the module or function and how to register
a rule, never a silent wrong map. With ``create_graph=True`` every step is differentiable (the ops
have autograd formulas), so a loss on the heatmap trains the model (TEA).
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from .lrp_rules import (
    STOCHASTIC_DEPTH_MODULES,
    Step,
    UnsupportedLayerError,
    batch_norm_scale,
    conv2d_rule,
    identity_rule,
    linear_map_rule,
    no_rule_message,
    rule_for,
    rules_version,
)
from ..errors import AuditkitError, ModelError
from .validate import check_logits, check_targets, explanation_method, logits_from

DEFAULT_EPSILON = 1e-6


# ---- tracing -----------------------------------------------------------------------------------

class _Tracer(fx.Tracer):
    # Keep torchvision's stochastic depth, and any module type a rule is registered for, as one call
    # instead of tracing into it.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, STOCHASTIC_DEPTH_MODULES) or rule_for("module", m) is not None
                or super().is_leaf_module(m, qualname))


@dataclass
class TracedNetwork:
    """A traced network: its graph, and the network itself held weakly, so that the trace cache
    (keyed weakly by the network) never keeps a deleted network alive."""

    _root: "weakref.ReferenceType[nn.Module]"
    graph: fx.Graph
    rules_version: int
    # Conv nodes whose output feeds only one batch norm: merged into it.
    merged: dict[fx.Node, fx.Node] = field(default_factory=dict)  # bn node -> conv node
    # The modules by name, looked up once per explanation (refresh): the user may replace one.
    _modules: dict[str, nn.Module] = field(default_factory=dict)
    # bn node -> (the tensors' identities and versions, W γ/σ): merged weights of eval-mode
    # explanations, reused while the convolution and batch norm are unchanged.
    merged_weights: dict = field(default_factory=dict)
    dynamic: set = field(default_factory=set)  # nodes whose value depends on the network input
    compiled: object = None  # _CompiledForward, made at the first forward
    _identity: dict = field(default_factory=dict)  # node -> its input under the identity rule, or None
    # node -> (kind, target, rule, producers, constant): what a rule needs of the node that does not
    # change between calls (valid, like _identity, while the module objects stay the same).
    _steps: dict = field(default_factory=dict)
    _plan: list | None = None  # the relevance pass, node by node (see _plan_for); valid like _steps
    _releases: list | None = None  # per plan step, the forward values read for the last time there
    _pass: tuple | None = None  # (plan, the relevance pass generated for it: _generate_pass)
    _same: tuple | None = None  # (number of paths, generated check that each path holds its module)
    _paths: dict = field(default_factory=dict)  # module target -> its attribute path, split once
    interpret: bool = False  # the code generator refused this graph: interpret it node by node

    def refresh(self) -> None:
        """Looks the modules up again (the user may have replaced one since the last explanation);
        what was worked out per node, the compiled forward and the relevance pass are kept while
        every module object is the one they were made for."""
        root = self.root
        if self._same is not None and self._same[0] == len(self._paths) and self._same[1](root):
            return
        modules = {}
        for target, parts in self._paths.items():
            module = root
            for part in parts:  # plain dict lookups: get_submodule's checks cost more
                module = module._modules.get(part) if module is not None else None
            modules[target] = module
        old = self._modules
        if len(old) != len(modules) or any(old.get(target) is not module for target, module in modules.items()):
            self._identity, self._steps, self._plan, self.compiled = {}, {}, None, None
        self._modules = modules
        self._same = (len(self._paths), _generate_same_modules(self._paths, modules))

    @property
    def root(self) -> nn.Module:
        root = self._root()
        if root is None:  # pragma: no cover - a trace is only used while its network is in use
            raise ModelError("the traced network no longer exists")
        return root

    def module(self, node: fx.Node) -> nn.Module:
        return self.module_at(node.target)

    def passes_through(self, node: fx.Node) -> fx.Node | None:
        """The input node of a one-input node whose rule is the identity rule, else None (cached
        per node for this trace's module objects)."""
        cached = self._identity.get(node, False)
        if cached is False:
            cached = None
            kind = {"call_module": "module", "call_function": "function", "call_method": "method"}.get(node.op)
            inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
            if kind is not None and len(inputs) == 1 and len(node.all_input_nodes) == 1 and node.args \
                    and node.args[0] is inputs[0]:
                target = self.module(node) if kind == "module" else node.target
                if rule_for(kind, target) is identity_rule:
                    cached = inputs[0]
            self._identity[node] = cached
        return cached

    def module_at(self, target: str) -> nn.Module | None:
        module = self._modules.get(target)
        if module is None:
            module = self.root
            for part in self._paths.setdefault(target, tuple(target.split("."))):
                module = module._modules.get(part) if module is not None else None
            self._modules[target] = module
        return module

    def merged_weight(self, bn_node: fx.Node, conv: nn.Conv2d, bn: nn.BatchNorm2d, bn_input: torch.Tensor,
                      differentiable: bool) -> torch.Tensor:
        """W γ/σ of a convolution and the batch norm after it. In eval mode and without a graph to
        keep, it is computed once and reused while neither module's tensors change (identity and
        version checked): merging costs a pass over the weights, which dominated small batches."""
        if differentiable or bn.training:
            return conv.weight * batch_norm_scale(bn, bn_input).view(-1, 1, 1, 1)
        tensors = (conv.weight, bn.weight, bn.running_var)
        key = tuple((id(t), t._version) if t is not None else None for t in tensors) + (bn.eps,)
        cached = self.merged_weights.get(bn_node)
        if cached is None or cached[0] != key or cached[1].device != conv.weight.device:
            with torch.no_grad():
                weight = conv.weight * batch_norm_scale(bn, bn_input).view(-1, 1, 1, 1)
            cached = (key, weight)
            self.merged_weights[bn_node] = cached
        return cached[1]


def _define(lines: list[str], names: dict, what: str):
    """The function the generated ``lines`` define (its first line is its ``def``), with ``names`` as
    its globals; its source is kept on ``.source``. Per-call checks and the relevance pass are
    generated once per trace: straight-line code instead of loops that decide the same thing each call."""
    code = "\n".join(lines) + "\n"
    exec(compile(code, f"<auditkit lrp {what}>", "exec"), names)
    function = names[lines[0].split()[1].split("(")[0]]
    function.source = code
    return function


def _generate_same_modules(paths: dict, modules: dict):
    """``same(root)``: whether every module path of ``paths`` still leads to the object in ``modules``
    (a path that led nowhere must still lead nowhere), as straight-line code (each call of an
    explanation checks it; looping over the paths cost as much as a small layer)."""
    names, variables = {}, {(): "m"}
    lines = ["def same(m):"]
    for target, parts in sorted(paths.items(), key=lambda item: len(item[1])):
        for depth in range(1, len(parts) + 1):
            prefix = parts[:depth]
            if prefix not in variables:
                variables[prefix] = f"m{len(variables)}"
                parent = variables[prefix[:-1]]
                guard = f" if {parent} is not None else None" if depth > 1 else ""  # the root is never None
                lines.append(f"    {variables[prefix]} = {parent}._modules.get({prefix[-1]!r}){guard}")
        names[f"t{len(names)}"] = modules[target]
        lines.append(f"    if {variables[parts]} is not t{len(names) - 1}:")
        lines.append("        return False")
    lines.append("    return True")
    return _define(lines, names, "module check")


_TRACES: "weakref.WeakKeyDictionary[nn.Module, TracedNetwork]" = weakref.WeakKeyDictionary()


def trace(net: nn.Module) -> TracedNetwork:
    """The network's graph (cached per module object)."""
    cached = _TRACES.get(net)
    if cached is not None and cached.rules_version == rules_version():
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
    traced = TracedNetwork(weakref.ref(net), graph, rules_version())
    traced._paths = {node.target: tuple(node.target.split(".")) for node in graph.nodes if node.op == "call_module"}
    for node in graph.nodes:  # nodes are in topological order
        if node.op == "placeholder" or any(a in traced.dynamic for a in node.all_input_nodes):
            traced.dynamic.add(node)
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


def _pool_with_indices(node: fx.Node, traced: TracedNetwork, value):
    """For a max or adaptive max pool node, a function that computes (output, indices); else None
    (the winner-takes-all rule needs the positions of the maxima; computing them now saves a second
    pooling pass)."""
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    if node.op == "call_module":
        module = traced.module(node)
        if isinstance(module, nn.MaxPool2d) and not module.return_indices:
            params = (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
            return lambda x: F.max_pool2d(x, *params, return_indices=True)
        if isinstance(module, nn.AdaptiveMaxPool2d) and not module.return_indices:
            return lambda x: F.adaptive_max_pool2d(x, module.output_size, return_indices=True)
        return None
    if node.op == "call_function" and node.target is F.max_pool2d:
        given = {key: value(v) for key, v in {**dict(zip(names, node.args)), **node.kwargs}.items()}
        if given.get("return_indices"):
            return None
        kernel = given["kernel_size"]
        params = (kernel, given.get("stride") or kernel, given.get("padding", 0), given.get("dilation", 1),
                  given.get("ceil_mode", False))
        return lambda x: F.max_pool2d(x, *params, return_indices=True)
    if node.op == "call_function" and node.target is F.adaptive_max_pool2d:
        given = {key: value(v) for key, v in {**dict(zip(("input", "output_size", "return_indices"), node.args)),
                                              **node.kwargs}.items()}
        if given.get("return_indices"):
            return None
        return lambda x: F.adaptive_max_pool2d(x, given["output_size"], return_indices=True)
    return None


def _in_float32(env: dict) -> dict:
    """The forward's values with float16/bfloat16 tensors in float32 (differentiably: TEA)."""
    low = (torch.float16, torch.bfloat16)
    return {key: value.float() if isinstance(value, torch.Tensor) and value.dtype in low else value
            for key, value in env.items()}


def _direct_call(module: nn.Module):
    """``module(x)`` as its functional op, for builtin modules whose forward is exactly that op (the
    exact type, no forward of its own on the instance), else None. Module.__call__ and the
    parameter lookups through Module.__getattr__ were a tenth of a small network's forward; the
    compiled forward uses these only while no hook is registered (see run_forward)."""
    kind = type(module)
    if "forward" in module.__dict__:
        return None
    parameters, buffers = module._parameters, module._buffers
    if kind is nn.Conv2d and module.padding_mode == "zeros":
        def conv2d(x):
            return F.conv2d(x, parameters["weight"], parameters["bias"], module.stride, module.padding,
                            module.dilation, module.groups)
        return conv2d
    if kind is nn.Linear:
        def linear(x):
            return F.linear(x, parameters["weight"], parameters["bias"])
        return linear
    if kind is nn.ReLU:
        return F.relu  # out of place, as _OUT_OF_PLACE makes an in-place one
    if kind is nn.AdaptiveAvgPool2d:
        def adaptive_avg_pool2d(x):
            return F.adaptive_avg_pool2d(x, module.output_size)
        return adaptive_avg_pool2d
    if kind is nn.Flatten:
        def flatten(x):
            return x.flatten(module.start_dim, module.end_dim)
        return flatten
    if kind is nn.BatchNorm2d:
        def batch_norm(x):
            if module.training or buffers.get("running_mean") is None:
                return module(x)  # batch statistics, or none kept: the module's own logic
            return F.batch_norm(x, buffers["running_mean"], buffers["running_var"], parameters["weight"],
                                parameters["bias"], False, 0.0, module.eps)
        return batch_norm
    return None


def _hook_check(modules: list):
    """``hooked()``: whether a hook is registered on any of ``modules`` or globally (what
    Module.__call__ checks before running a forward without them), as one generated expression."""
    names = {f"m{i}": module for i, module in enumerate(modules)}
    names["hooks"] = torch.nn.modules.module
    terms = [f"hooks.{kind}" for kind in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                          "_global_backward_hooks", "_global_backward_pre_hooks")]
    terms += [f"{name}.{kind}" for name in names if name != "hooks"
              for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")]
    return _define(["def hooked():", f"    return bool({' or '.join(terms)})"], names, "hook check")


@dataclass
class _CompiledForward:
    """The traced graph as generated Python code (torch.fx codegen) that returns every node's value:
    interpreting the graph node by node cost a third of a ResNet-18 forward at batch 1."""

    module: fx.GraphModule | None  # every module called as a module (None until a hook needs it)
    keys: list  # env keys of the returned values, in order
    aliases: list  # (layer node, its ReLU node): the layer's value is replaced by relu(z) (see run_forward)
    direct: fx.GraphModule | None = None  # the same with builtin modules as functional ops (_direct_call)
    hooked: object = None  # () -> bool: a hook on a module ``direct`` calls as an op (then ``module`` runs)
    direct_modules: list = field(default_factory=list)  # the modules the code calls as their ops


def _compile_forward(traced: TracedNetwork) -> _CompiledForward:
    """The forward as code with builtin layers as their ops; the one calling every module is made
    when a hook needs it (see run_forward)."""
    compiled = _compile_graph(traced, direct=True)
    if compiled.direct_modules:
        compiled.direct, compiled.module = compiled.module, None
        compiled.hooked = _hook_check(compiled.direct_modules)
    return compiled


def _compile_graph(traced: TracedNetwork, direct: bool):
    graph = fx.Graph()
    direct_modules = []
    mapping: dict[fx.Node, fx.Node] = {}
    keys, values = [], []
    output_value = None

    def new(arg):
        return fx.node.map_arg(arg, lambda n: mapping[n])

    aliases = [(node.args[0], node) for node in traced.graph.nodes if _is_relu(traced, node) and _feeds_only(node.args[0], node)]
    # A layer whose value is replaced by its ReLU's (see run_forward) is not returned: the generated
    # code then frees z as soon as the ReLU has run, as autograd does (less memory touched per call).
    replaced = {layer for layer, _relu in aliases}
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            mapping[node] = graph.placeholder(node.name)
        elif node.op == "get_attr":
            mapping[node] = graph.get_attr(node.target)
        elif node.op == "output":
            output_value = new(node.args[0])
            continue
        elif (pool := _pool_with_indices(node, traced, lambda a: a)) is not None:
            pair = graph.call_function(pool, (new(node.args[0]),))
            mapping[node] = graph.call_function(operator.getitem, (pair, 0))
            keys.append((node, "indices"))
            values.append(graph.call_function(operator.getitem, (pair, 1)))
        elif node.op == "call_module":
            module = traced.module(node)
            args, kwargs = new(node.args), new(node.kwargs)
            out_of_place = _OUT_OF_PLACE.get(type(module)) if getattr(module, "inplace", False) else None
            function = _direct_call(module) if direct and len(args) == 1 and not kwargs else None
            if function is not None:
                mapping[node] = graph.call_function(function, args)
                direct_modules.append(module)
            elif out_of_place is not None and len(args) == 1 and not kwargs:
                mapping[node] = graph.call_function(out_of_place, (graph.get_attr(node.target), args[0]))
            else:
                if getattr(module, "inplace", False):
                    args = (graph.call_method("clone", (args[0],)), *args[1:])
                mapping[node] = graph.call_module(node.target, args, kwargs)
        elif node.op == "call_function":
            kwargs = dict(new(node.kwargs))
            if kwargs.get("inplace"):
                kwargs["inplace"] = False
            mapping[node] = graph.call_function(_OUT_OF_PLACE_OPERATORS.get(node.target, node.target), new(node.args), kwargs)
        else:  # call_method: in-place methods (relu_) out of place
            method = node.target[:-1] if node.target.endswith("_") and not node.target.endswith("__") else node.target
            mapping[node] = graph.call_method(method, new(node.args), new(node.kwargs))
        if node not in replaced:
            keys.append(node)
            values.append(mapping[node])
    graph.output((output_value, tuple(values)))
    return _CompiledForward(fx.GraphModule(traced.root, graph), keys, aliases, direct_modules=direct_modules)


def run_forward(traced: TracedNetwork, x: torch.Tensor,
                select=logits_from) -> tuple[torch.Tensor, dict[fx.Node, object]]:
    """Runs the graph with the network's own modules; returns (the logits ``select`` finds in its
    output, every node's value).

    Max pools also keep the positions of their maxima (under ``(node, "indices")``), which the
    winner-takes-all rule needs; computing them now saves a second pooling pass. The graph runs as
    generated code, compiled once per trace and module set (a replaced module compiles it again);
    the node-by-node interpreter below serves a graph the code generator cannot take.
    """
    traced.refresh()  # the user may have replaced a module since the last call
    compiled = traced.compiled
    if compiled is None and not traced.interpret:
        try:
            compiled = traced.compiled = _compile_forward(traced)
        except Exception:  # noqa: BLE001 - any codegen failure: interpret instead
            traced.interpret = True
    if compiled is not None:  # made for today's modules: refresh() drops it when one was replaced
        # Our own GraphModule: no hooks of its own to run, so forward() spares a call layer. Builtin
        # layers run as their ops unless the user hooked one of them (then as modules, hooks and all).
        if compiled.direct is not None and not compiled.hooked():
            code = compiled.direct
        else:
            if compiled.module is None:
                compiled.module = _compile_graph(traced, direct=False).module
            code = compiled.module
        output, values = code.forward(x)
        env = dict(zip(compiled.keys, values))
        for layer, relu in compiled.aliases:
            env[layer] = env[relu]  # see the interpreter's comment on relu(z)
        return select(output), env
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
        elif (pool := _pool_with_indices(node, traced, value)) is not None:
            env[node], env[(node, "indices")] = pool(value(node.args[0]))
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
    return select(output), env


# ---- propagation ------------------------------------------------------------------------------


def _producer(traced: TracedNetwork, node) -> object:
    """What computed a graph value: its module, function or method name (None for inputs, parameters)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        return traced.module(node)
    if node.op in ("call_function", "call_method"):
        return node.target
    return None


_KINDS = {"call_module": "module", "call_function": "function", "call_method": "method"}


def _node_facts(traced: TracedNetwork, node: fx.Node) -> tuple:
    """(kind, target, rule, producer and constancy per graph input): cached per node (see refresh)."""
    facts = traced._steps.get(node)
    if facts is None:
        kind = _KINDS[node.op]
        target = traced.module(node) if kind == "module" else node.target
        inputs = {n: (_producer(traced, n), n not in traced.dynamic) for n in node.all_input_nodes}
        facts = traced._steps[node] = (kind, target, rule_for(kind, target), inputs)
    return facts


def _step(traced: TracedNetwork, env: dict, node: fx.Node, relevance: torch.Tensor, k: int, epsilon: float,
          create_graph: bool) -> tuple[Step, list[fx.Node]]:
    """The rule's view of ``node``, and the graph nodes of its tensor inputs (in order)."""
    sources: list[fx.Node] = []

    def value(arg):
        if isinstance(arg, fx.Node):
            result = env[arg]
            if isinstance(result, torch.Tensor):
                sources.append(arg)
            return result
        return arg

    kind, target, _rule, inputs = _node_facts(traced, node)
    if all(isinstance(a, fx.Node) or not isinstance(a, (tuple, list, dict, slice)) for a in node.args):
        args = tuple(value(a) for a in node.args)  # the common flat case, without map_aggregate's walk
    else:
        args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value) if node.kwargs else {}
    extra = {"indices": env[(node, "indices")]} if (node, "indices") in env else {}
    step = Step(kind, target, tuple(args), dict(kwargs), [env[s] for s in sources],
                [inputs[s][0] for s in sources], env[node], relevance, k, epsilon, create_graph,
                node.target if kind == "module" else node.name, extra,
                [inputs[s][1] for s in sources])
    return step, sources


_INPUT, _PART, _MERGED, _PASS, _CONV, _LINEAR, _MAX_POOL, _FLATTEN, _SAME_POOL, _RULE = range(10)
_CONV_OP = torch.ops.auditkit.lrp_epsilon_conv2d.default
_LINEAR_OP = torch.ops.auditkit.lrp_epsilon_linear.default
_RATIO_OP = torch.ops.auditkit.lrp_epsilon_ratio.default


def _plan_for(traced: TracedNetwork) -> list:
    """The relevance pass as (node, kind, data) from the output back, worked out once per trace and
    module set: what each node does (a graph input, a tuple part, a merged convolution, the identity
    rule, a builtin convolution, linear or max-pool rule called directly, or its rule through a
    Step). Deciding this per call, and building a Step for every layer, was most of the Python time
    of LRP at batch 1 (a hand-written pass of the same kernels takes 0.8x a gradient)."""
    if traced._plan is not None:
        return traced._plan
    from .lrp_rules import average_pool_rule, linear_rule, reshape_rule, winner_takes_all_rule

    plan = []
    for node in reversed(list(traced.graph.nodes)):
        if node.op == "output":
            continue
        if node.op == "placeholder":
            plan.append((node, _INPUT, None))
        elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            plan.append((node, _PART, None))  # a tuple's part, or indexing a tensor: decided by the value
        elif node.op not in _KINDS:
            plan.append((node, _RULE, None))  # get_attr: no rule (the loop says so if relevance reaches it)
        elif node in traced.merged:
            plan.append((node, _MERGED, traced.merged[node]))
        elif (source := traced.passes_through(node)) is not None:
            plan.append((node, _PASS, source))
        else:
            kind, target, rule, _inputs = _node_facts(traced, node)
            plain = kind == "module" and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)
            if plain and rule is conv2d_rule and type(target) is nn.Conv2d and target.padding_mode == "zeros" \
                    and not isinstance(target.padding, str):
                plan.append((node, _CONV, target))
            elif plain and rule is linear_rule and type(target) is nn.Linear:
                plan.append((node, _LINEAR, target))
            elif plain and rule is winner_takes_all_rule and _pool_with_indices(node, traced, lambda a: a) is not None:
                plan.append((node, _MAX_POOL, None))
            elif plain and rule is reshape_rule and type(target) is nn.Flatten and target.start_dim == 1:
                plan.append((node, _FLATTEN, None))  # the batch stays first: R takes the input's shape back
            elif plain and rule is average_pool_rule and type(target) is nn.AdaptiveAvgPool2d:
                plan.append((node, _SAME_POOL, None))  # to the input's own size: the identity map (else the rule)
            else:
                plan.append((node, _RULE, None))
    traced._plan = plan
    traced._releases = _last_reads(plan)
    return plan


def _reads(node: fx.Node, kind: int, data) -> list:
    """The forward values (env keys) the step of ``node`` reads."""
    if kind == _INPUT:
        return []
    if kind in (_CONV, _LINEAR, _SAME_POOL):
        return [node, node.args[0]]
    if kind == _MAX_POOL:
        return [node.args[0], (node, "indices")]
    if kind == _FLATTEN:
        return [node.args[0]]
    if kind == _PASS:
        return [node, data]
    if kind == _MERGED:
        return [node, data, *data.all_input_nodes]
    return [node, *node.all_input_nodes, (node, "indices")]  # a rule through its Step, a tuple's part


def _last_reads(plan: list) -> list[list]:
    """Per plan step, the forward values no later step reads: dropped once it is done (release)."""
    last = {}
    for position, (node, kind, data) in enumerate(plan):
        for key in _reads(node, kind, data):
            last[key] = position
    releases = [[] for _ in plan]
    for key, position in last.items():
        releases[position].append(key)
    return releases


def _general_step(traced: TracedNetwork, env: dict, relevance: dict, node: fx.Node, kind: int, data, r, k: int,
                  epsilon: float, create_graph: bool) -> None:
    """One step of the relevance pass that the generated code does not inline: adds what ``node``
    passes back to its inputs' entries in ``relevance`` (a tuple's part, a merged convolution, a rule
    through its Step, and a direct step whose value it cannot take, e.g. a linear layer on 3-d input)."""
    if isinstance(r, dict):  # a tuple-valued node (chunk, split): its parts' relevances, zero where none came
        r = [r.get(i) if r.get(i) is not None else
             torch.zeros((k * part.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
             for i, part in enumerate(env[node])]
    if kind == _PART and isinstance(env[node.args[0]], (tuple, list)):
        # One part of a tuple: its relevance waits in the tuple node's slot for the part.
        parts = relevance.setdefault(node.args[0], {})
        index = node.args[1]
        parts[index] = parts[index] + r if index in parts else r
        return
    if kind == _MERGED:  # a conv followed by this batch norm: one linear layer, W' = W γ/σ
        conv_node = data
        conv = traced.module(conv_node)
        step, _ = _step(traced, env, conv_node, r, k, epsilon, create_graph)
        step.output = env[node]
        merged_weight = traced.merged_weight(node, conv, traced.module(node), env[conv_node],
                                             create_graph or torch.is_grad_enabled())
        contributions = ((conv_node.args[0], conv2d_rule(step, merged_weight)[0]),)
    else:
        if node.op not in _KINDS:
            raise UnsupportedLayerError(f"LRP-epsilon has no rule for graph node {node.name} ({node.op})")
        step, sources = _step(traced, env, node, r, k, epsilon, create_graph)
        rule = _node_facts(traced, node)[2]
        if rule is None:
            raise UnsupportedLayerError(no_rule_message(step.name, step.kind, step.target))
        contributions = zip(sources, rule(step))
    for source, value in contributions:
        if value is None or not isinstance(source, fx.Node) or source.op == "get_attr":
            continue
        relevance[source] = relevance[source] + value if source in relevance else value


# The direct steps, as code: ``s`` is the step's input node, ``m`` its module, ``i`` the pool's
# indices key; what conv2d_rule, linear_rule, winner_takes_all_rule, reshape_rule, average_pool_rule
# (to the input's own size: the identity map) and the identity rule compute (tested against them).
_DIRECT_CODE = {
    _CONV: ["with below():",
            "    v = CONV(env[{s}], env[{n}], r, {m}.weight, list({m}.stride), list({m}.padding), list({m}.dilation), "
            "{m}.groups, epsilon)"],
    _LINEAR: ["if env[{s}].dim() != 2:",
              "    general(traced, env, rel, {n}, {kind}, {m}, r, k, epsilon, create_graph)",
              "else:",
              "    with below():",
              "        v = LINEAR(env[{s}], env[{n}], r, {m}.weight, epsilon)"],
    _MAX_POOL: ["a = env[{s}]",
                "indices = env[{i}].flatten(2)",
                "if k > 1:",
                "    indices = indices.repeat(k, 1, 1)",
                "v = torch.zeros((r.shape[0], a.shape[1], a.shape[2] * a.shape[3]), dtype=r.dtype, device=r.device)",
                "v = v.scatter_add_(2, indices, r.flatten(2)).view(r.shape[0], *a.shape[1:])",
                "a = indices = None"],
    _FLATTEN: ["v = r.reshape(r.shape[0], *env[{s}].shape[1:])"],
    _SAME_POOL: ["a = env[{s}]",
                 "if env[{n}].shape != a.shape:",
                 "    general(traced, env, rel, {n}, {kind}, {m}, r, k, epsilon, create_graph)",
                 "else:",
                 "    with below():",
                 "        v = RATIO(r, env[{n}], epsilon)",  # R_in = a ⊙ R / (z + ε·sign z), z = a
                 "    v = (v.view(k, *a.shape) * a).view(r.shape)",
                 "a = None"],
    _PASS: ["if env[{s}].shape != env[{n}].shape:",
            "    general(traced, env, rel, {n}, {kind}, {m}, r, k, epsilon, create_graph)",
            "else:",
            "    v = r"],  # an elementwise layer under the identity rule (a ReLU, a dropout): R_in = R
}


def _generate_pass(plan: list, releases: list):
    """The relevance pass over ``plan`` as one generated Python function (straight-line code, the way
    torch.fx generates a forward): every step's kind, inputs and forward values are known when the
    plan is made, so the per-step dispatch of an interpreter loop is done once here. At one 28x28
    image that dispatch was a tenth of the call."""
    names: dict = {"CONV": _CONV_OP, "LINEAR": _LINEAR_OP, "RATIO": _RATIO_OP, "torch": torch,
                   "general": _general_step}
    constants: dict = {}

    def name(value, prefix: str) -> str:
        key = id(value)
        if key not in constants:
            constants[key] = f"{prefix}{len(constants)}"
            names[constants[key]] = value
        return constants[key]

    lines = ["def relevance_pass(traced, env, rel, k, epsilon, create_graph, release, below):",
             "    found = None"]
    for position, (node, kind, data) in enumerate(plan):
        n = name(node, "n")
        lines.append(f"    r = rel.pop({n}, None)  # {node.name}")
        if kind == _INPUT:
            lines.append("    if r is not None:")
            lines.append("        found = r")
        elif kind in _DIRECT_CODE:
            source = data if kind == _PASS else node.args[0]
            fields = {"n": n, "s": name(source, "n"), "m": name(data, "d"), "kind": kind,
                      "i": name((node, "indices"), "k") if kind == _MAX_POOL else ""}
            lines.append("    if r is not None:")
            lines.append("        v = None")
            lines.extend("        " + line.format(**fields) for line in _DIRECT_CODE[kind])
            lines.append("        if v is not None:")
            lines.append(f"            rel[{fields['s']}] = rel[{fields['s']}] + v if {fields['s']} in rel else v")
            lines.append("        r = v = None  # this step's tensors are gone before the next allocates")
        else:
            lines.append("    if r is not None:")
            lines.append(f"        general(traced, env, rel, {n}, {kind}, {name(data, 'd')}, r, k, epsilon, create_graph)")
            lines.append("        r = None")
        if releases[position]:
            keys = ", ".join(name(key, "k") if isinstance(key, tuple) else name(key, "n") for key in releases[position])
            lines.append("    if release:")
            lines.append(f"        for key in ({keys},):")
            lines.append("            env.pop(key, None)")
    lines.append("    return found")
    return _define(lines, names, "relevance pass")


def logits_node(traced: TracedNetwork, env: dict, logits: torch.Tensor) -> fx.Node:
    """The node whose value is ``logits``: the graph's output, or the part of a dict or tuple output
    that the model's output adapter picked (auditkit/models/outputs.py), found by identity."""
    output = next(n for n in reversed(traced.graph.nodes) if n.op == "output").args[0]
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


def propagate(
    traced: TracedNetwork,
    env: dict,
    output_relevance: torch.Tensor,
    *,
    k: int,
    epsilon: float,
    create_graph: bool,
    release: bool = False,
    start: fx.Node | None = None,
) -> torch.Tensor:
    """Relevance at the network input, (K*N, ...) target-major, from relevance at its output (at
    ``start``, the logits' node, when the output is a dict or tuple: :func:`logits_node`).
    ``release`` (the last pass over ``env``): drop each forward value from ``env`` after the last step
    that reads it, as autograd frees saved tensors. Holding every activation to the end raised the
    peak to 1.58x a gradient's, and each call then touched fresh memory the allocator had returned
    to the system (page faults: 1.2x a gradient's time at 256x28^2)."""
    output_node = next(n for n in reversed(traced.graph.nodes) if n.op == "output")
    plan = _plan_for(traced)
    if traced._pass is None or traced._pass[0] is not plan:
        traced._pass = (plan, _generate_pass(plan, traced._releases))
    # Without a graph to keep, the fused ops skip their (Python) autograd layer; the direct steps
    # compute what conv2d_rule, linear_rule and winner_takes_all_rule do.
    below = torch._C._AutoDispatchBelowAutograd if not create_graph else contextlib.nullcontext
    start = output_node.args[0] if start is None else start
    input_relevance = traced._pass[1](traced, env, {start: output_relevance}, k, epsilon, create_graph, release, below)
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
        # The network's output as the model's forward reads it (meta.output for an auditkit model).
        select = model.logits if isinstance(model, AuditModel) else logits_from
        logits, env = run_forward(traced, network_input, select)
        logits_at = logits_node(traced, env, logits)  # before autocast's float copies: found by identity
        check_targets(targets, n, check_logits(logits, n))
        device_type = x.device.type
        autocast = torch.is_autocast_enabled(device_type)
        if autocast:
            # Mixed precision: the forward ran in the low dtype; relevance flows in float32 (the
            # ratio R / (z + eps sign z) divides by activations, which bfloat16's 8-bit mantissa
            # would blur near 0), so the low dtype reaches the map only through the activations.
            env = _in_float32(env)
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
            start = torch.zeros((group.shape[0], logits.shape[1]), dtype=logits.dtype, device=logits.device)
            start.scatter_(1, group, values)
            last = group is groups[-1][0]
            relevance = propagate(traced, env, start, k=per_group, epsilon=epsilon, create_graph=create_graph,
                                  release=last, start=logits_at)
            if network_input is not normalised:  # undo the model's resize with the same rule
                resize = Step("function", F.interpolate, (normalised,),
                              {"size": tuple(network_input.shape[-2:]), "mode": "bilinear", "align_corners": False},
                              [normalised], [None], network_input, relevance, per_group, epsilon, create_graph, "resize")
                relevance = linear_map_rule(resize)[0]
            maps.append(relevance.sum(dim=1).view(per_group, n, *relevance.shape[2:]))  # (k, N, H, W)
        return (maps[0] if len(maps) == 1 else torch.cat(maps)).transpose(0, 1), logits

