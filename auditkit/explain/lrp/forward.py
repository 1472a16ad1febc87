"""The forward pass that keeps every node's value, on the network's own modules.

Nothing is copied, replaced or hooked: the model, its optimizer and its gradients are untouched.
Two engines compute the same values:

- the generated forward (the fast path): the graph as torch.fx-generated code that returns every
  value, with builtin layers (conv, linear, ReLU, eval batch norm, adaptive average pool, flatten)
  called as their functional ops — Module.__call__ and parameter lookups were a tenth of a small
  network's forward. Used while no hook is registered on those layers or globally;
- the interpreter (the general path): node by node, every module called as a module (hooks run).
  It serves hooked layers, graphs the code generator refuses, and ``general_path()``.

In-place activations would overwrite values the rules need (torchvision's ResNet applies
ReLU(inplace=True) to batch-norm outputs), so both run them out of place.

Private torch internals used, and why: ``Module._parameters``/``_buffers`` (the functional ops read
the module's current tensors without Module.__getattr__), ``Module._forward_hooks`` etc. and
``torch.nn.modules.module._global_*_hooks`` (a layer run as its op must not skip a hook: if any is
registered, the interpreter runs instead).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..validate import logits_from
from . import switch
from .registry import _method_key
from .trace import Binding, TracedNetwork

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
_OUT_OF_PLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                           operator.itruediv: operator.truediv}
_HOOK_KINDS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def is_relu(binding: Binding, node: fx.Node) -> bool:
    """max(x, 0) exactly: not ReLU6, leaky or other variants, whose outputs differ from x where x > 0
    or are non-zero where x < 0."""
    if node.op == "call_module":
        return type(binding.module(node)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu, torch.relu_)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def relu_aliases(binding: Binding, graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """(layer, its ReLU) for each layer whose output only a ReLU reads. Such a layer's value is kept
    as relu(z): the rules need z only in s = R / (z + ε sign z), and there R = 0 wherever relu(z) = 0
    (relevance at a tensor is that tensor times something, Eq. A1), so relu(z) gives the same s and,
    through the ReLU's backward, the same gradients; autograd holds relu(z) anyway, so one
    activation-sized tensor per layer is saved (TEA's double backward: benchmarks/RESULTS.md)."""
    return [(node.args[0], node) for node in graph.nodes if is_relu(binding, node) and _feeds_only(node.args[0], node)]


def _feeds_only(source, node: fx.Node) -> bool:
    return isinstance(source, fx.Node) and source.op in ("call_module", "call_function", "call_method") \
        and list(source.users) == [node] and len(node.args) >= 1


def pool_with_indices(node: fx.Node, binding: Binding, value):
    """For a max or adaptive max pool node, a function x -> (output, indices); else None (the
    winner-takes-all rule needs the positions of the maxima; computing them now saves a second
    pooling pass). ``value`` turns the node's constant arguments into values."""
    if node.op == "call_module":
        module = binding.module(node)
        if isinstance(module, nn.MaxPool2d) and not module.return_indices:
            params = (module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
            return lambda x: max_pool2d_with_indices(x, *params)
        if isinstance(module, nn.AdaptiveMaxPool2d) and not module.return_indices:
            return lambda x: F.adaptive_max_pool2d(x, module.output_size, return_indices=True)
        return None
    if node.op != "call_function" or node.target not in (F.max_pool2d, F.adaptive_max_pool2d):
        return None
    names = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    if node.target is F.adaptive_max_pool2d:
        names = ("input", "output_size", "return_indices")
    given = {key: value(v) for key, v in {**dict(zip(names, node.args)), **node.kwargs}.items()}
    if given.get("return_indices"):
        return None
    if node.target is F.adaptive_max_pool2d:
        return lambda x: F.adaptive_max_pool2d(x, given["output_size"], return_indices=True)
    kernel = given["kernel_size"]
    params = (kernel, given.get("stride") or kernel, given.get("padding", 0), given.get("dilation", 1),
              given.get("ceil_mode", False))
    return lambda x: max_pool2d_with_indices(x, *params)


_CHANNELS_LAST_FROM = 65536  # elements (see max_pool2d_with_indices)


def max_pool2d_with_indices(x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode: bool):
    """``F.max_pool2d(x, ..., return_indices=True)``. On CPU it runs on a channels-last copy and
    converts both results back: the same values and indices bit for bit (indices count positions in
    each channel's plane either way; ties go to the first maximum either way), but ATen's kernel for
    contiguous (NCHW) memory measured 1.6-6x slower than the channels-last kernel and both copies
    (torch 2.14 CPU, 1 thread: 1x32x28x28 47 -> 29 µs, 256x32x28x28 32 -> 12 ms, 8x64x56x56 3x3
    stride 2: 11.7 -> 2.1 ms). Small tensors on several threads stay as they are: their copies run
    on one thread (below 32768 elements), the NCHW kernel on all (2 threads, 1x32x28x28: 26 vs 30 µs).
    Under autograd (TEA) too: the pool would save the channels-last copy for its backward, one more
    activation held per pool."""
    if x.is_cpu and x.dim() == 4 and x.is_contiguous() and not (x.requires_grad and torch.is_grad_enabled()) \
            and (x.numel() >= _CHANNELS_LAST_FROM or torch.get_num_threads() == 1):
        out, indices = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), kernel_size, stride, padding,
                                    dilation, ceil_mode, return_indices=True)
        return out.contiguous(), indices.contiguous()
    return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)


def _call_module(module: nn.Module, args, kwargs):
    if getattr(module, "inplace", False):
        out_of_place = _OUT_OF_PLACE.get(type(module))
        if out_of_place is not None and len(args) == 1 and not kwargs:
            return out_of_place(module, args[0])
        args = (args[0].clone(), *args[1:])
    return module(*args, **kwargs)


def _direct_call(module: nn.Module):
    """``module(x)`` as its functional op, for builtin modules whose forward is exactly that op (the
    exact type, no forward of its own on the instance), else None."""
    kind = type(module)
    if "forward" in module.__dict__:
        return None
    parameters, buffers = module._parameters, module._buffers
    if kind is nn.Conv2d and module.padding_mode == "zeros":
        return lambda x: F.conv2d(x, parameters["weight"], parameters["bias"], module.stride, module.padding,
                                  module.dilation, module.groups)
    if kind is nn.Linear:
        return lambda x: F.linear(x, parameters["weight"], parameters["bias"])
    if kind is nn.ReLU:
        return F.relu  # out of place, as _OUT_OF_PLACE makes an in-place one
    if kind is nn.AdaptiveAvgPool2d:
        return lambda x: F.adaptive_avg_pool2d(x, module.output_size)
    if kind is nn.Flatten:
        return lambda x: x.flatten(module.start_dim, module.end_dim)
    if kind is nn.BatchNorm2d:
        def batch_norm(x):
            if module.training or buffers.get("running_mean") is None:
                return module(x)  # batch statistics, or none kept: the module's own logic
            return F.batch_norm(x, buffers["running_mean"], buffers["running_var"], parameters["weight"],
                                parameters["bias"], False, 0.0, module.eps)
        return batch_norm
    return None


class GeneratedForward:
    """The traced graph as torch.fx-generated code returning (output, every kept value)."""

    __slots__ = ("code", "keys", "aliases", "direct_modules")

    def __init__(self, traced: TracedNetwork, binding: Binding):
        graph, mapping = fx.Graph(), {}
        self.keys, values, output_value, self.direct_modules = [], [], None, []
        self.aliases = relu_aliases(binding, traced.graph)
        # A layer whose value is replaced by its ReLU's is not returned: the generated code then
        # frees z as soon as the ReLU has run, as autograd does (less memory touched per call).
        replaced = {layer for layer, _relu in self.aliases}

        def new(arg):
            return fx.node.map_arg(arg, lambda n: mapping[n])

        for node in traced.graph.nodes:
            if node.op == "placeholder":
                mapping[node] = graph.placeholder(node.name)
            elif node.op == "get_attr":
                mapping[node] = graph.get_attr(node.target)
            elif node.op == "output":
                output_value = new(node.args[0])
                continue
            elif (pool := pool_with_indices(node, binding, lambda a: a)) is not None:
                pair = graph.call_function(pool, (new(node.args[0]),))
                mapping[node] = graph.call_function(operator.getitem, (pair, 0))
                self.keys.append((node, "indices"))
                values.append(graph.call_function(operator.getitem, (pair, 1)))
            elif node.op == "call_module":
                mapping[node] = self._module_call(graph, node, binding.module(node), new(node.args), new(node.kwargs))
            elif node.op == "call_function":
                kwargs = dict(new(node.kwargs))
                if kwargs.get("inplace"):
                    kwargs["inplace"] = False
                function = _OUT_OF_PLACE_OPERATORS.get(node.target, node.target)
                mapping[node] = graph.call_function(function, new(node.args), kwargs)
            else:  # call_method: in-place methods (relu_) out of place
                mapping[node] = graph.call_method(_method_key(node.target), new(node.args), new(node.kwargs))
            if node not in replaced:
                self.keys.append(node)
                values.append(mapping[node])
        graph.output((output_value, tuple(values)))
        self.code = fx.GraphModule(traced.root, graph)

    def _module_call(self, graph: fx.Graph, node: fx.Node, module: nn.Module, args, kwargs) -> fx.Node:
        function = _direct_call(module) if len(args) == 1 and not kwargs else None
        if function is not None:
            self.direct_modules.append(module)
            return graph.call_function(function, args)
        if getattr(module, "inplace", False):
            out_of_place = _OUT_OF_PLACE.get(type(module))
            if out_of_place is not None and len(args) == 1 and not kwargs:
                return graph.call_function(out_of_place, (graph.get_attr(node.target), args[0]))
            args = (graph.call_method("clone", (args[0],)), *args[1:])
        return graph.call_module(node.target, args, kwargs)

    def hooked(self) -> bool:
        """Whether a hook is registered globally or on a layer this code runs as its op."""
        hooks = torch.nn.modules.module
        if (hooks._global_forward_hooks or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                or hooks._global_backward_pre_hooks):
            return True
        for m in self.direct_modules:  # a plain loop: any() over a generator cost twice as much here
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
                return True
        return False

    def __call__(self, x: torch.Tensor) -> tuple[object, dict]:
        output, values = self.code.forward(x)  # our own GraphModule: no hooks, so forward() spares a layer
        env = dict(zip(self.keys, values))
        for layer, relu in self.aliases:
            env[layer] = env[relu]
        return output, env


def _generated(traced: TracedNetwork, binding: Binding) -> GeneratedForward | None:
    if binding.forward is None:
        try:
            binding.forward = GeneratedForward(traced, binding)
        except Exception:  # noqa: BLE001 - any codegen failure: interpret instead
            binding.forward = False
    return binding.forward or None


def interpret(traced: TracedNetwork, binding: Binding, x: torch.Tensor) -> tuple[object, dict]:
    """The general path: (the network's output, every node's value), node by node."""
    switch.runs["forward"] += 1
    env: dict = {}
    aliases = {relu: layer for layer, relu in relu_aliases(binding, traced.graph)}  # see relu_aliases

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
        elif (pool := pool_with_indices(node, binding, value)) is not None:
            env[node], env[(node, "indices")] = pool(value(node.args[0]))
        elif node.op == "call_module":
            env[node] = _call_module(binding.module(node), value(node.args), value(node.kwargs))
        elif node.op == "call_function":
            kwargs = value(node.kwargs)
            if kwargs.get("inplace"):
                kwargs = {**kwargs, "inplace": False}
            env[node] = _OUT_OF_PLACE_OPERATORS.get(node.target, node.target)(*value(node.args), **kwargs)
        elif node.op == "call_method":
            receiver, *rest = value(node.args)
            env[node] = getattr(receiver, _method_key(node.target))(*rest, **value(node.kwargs))
        elif node.op == "output":
            output = value(node.args[0])
        if node in aliases:
            env[aliases[node]] = env[node]  # z is dropped as soon as its ReLU has run
    return output, env


def run_forward(traced: TracedNetwork, x: torch.Tensor, select=logits_from, *,
                general: bool | None = None) -> tuple[torch.Tensor, dict[fx.Node, object]]:
    """Runs the graph with the network's own modules; returns (the logits ``select`` finds in its
    output, every node's value). Max pools also keep the positions of their maxima under
    ``(node, "indices")``; a layer that only a ReLU reads holds relu(z) (relu_aliases). ``general``:
    whether the general path is forced (default: ``switch.general_forced()``, read here)."""
    binding = traced.bind()  # the user may have replaced a module since the last call
    if general is None:
        general = switch.general_forced()
    forward = None if general else _generated(traced, binding)
    if forward is not None and not forward.hooked():
        switch.runs["fast_forward"] += 1
        output, env = forward(x)
    else:
        output, env = interpret(traced, binding, x)
    return select(output), env


def in_float32(env: dict) -> dict:
    """The forward's values with float16/bfloat16 tensors in float32 (differentiably: TEA)."""
    low = (torch.float16, torch.bfloat16)
    return {key: value.float() if isinstance(value, torch.Tensor) and value.dtype in low else value
            for key, value in env.items()}
