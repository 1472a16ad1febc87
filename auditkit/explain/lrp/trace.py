"""Tracing a network once, and what is cached on the trace.

Contract (what is cached, and what invalidates it):

- ``trace(net)`` returns the :class:`TracedNetwork` cached for that module object (a weak-keyed
  table: the cache never keeps a deleted network alive). It holds what depends on the *code* of the
  network only: the torch.fx graph and its output node, the attribute path of every called module,
  and which nodes depend on the network input. It is traced again when the rule table changed since
  (``register_rule`` bumps ``rules_version``: which module types are leaves depends on it).
- Everything that depends on the *module objects* lives in one :class:`Binding`: the modules by
  path, which batch norms merge into their convolution, the relevance plans and their steps bound
  to the modules (plan.py), the generated forward (forward.py) and merged conv + batch-norm
  weights. ``TracedNetwork.bind()`` runs at every explanation: it checks that each path still
  leads to the same object and, if any does not (the user replaced a layer), drops the whole
  binding and makes a new one. Nothing is invalidated piecemeal.
- What is *not* cached: parameters, buffers and module attributes (stride, eps, training mode) are
  read at every call; the merged weights are kept only while the convolution weight, γ and the
  running variance are the same tensors at the same version (``Tensor._version``), in eval mode
  and without a graph to build. Changing a module's type-defining attribute in place
  (``conv.padding_mode``) is not seen: replace the module instead.

Private torch internals used, and why: ``Module._modules`` (a path walk of plain dict lookups per
call; ``get_submodule`` checks cost more than the small layers), ``Tensor._version`` (above);
forward.py and rules.py list theirs.
"""

from __future__ import annotations

import weakref

import torch
from torch import fx, nn

from ...errors import AuditkitError, ModelError
from .registry import UnsupportedLayerError, rule_for, rules_version
from .rules import STOCHASTIC_DEPTH_MODULES, batch_norm_scale


class _Tracer(fx.Tracer):
    # Keep torchvision's stochastic depth, and any module type a rule is registered for, as one call
    # instead of tracing into it.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, STOCHASTIC_DEPTH_MODULES) or rule_for("module", m) is not None
                or super().is_leaf_module(m, qualname))


def _lookup(root: nn.Module, parts: tuple) -> nn.Module | None:
    module = root
    for part in parts:
        module = module._modules.get(part) if module is not None else None
    return module


class Binding:
    """What was worked out for one set of module objects (see the module docstring): valid while
    every traced path leads to the object in ``modules``; filled lazily by plan.py and forward.py."""

    __slots__ = ("modules", "merged", "plans", "steps", "forward", "merged_weights")

    def __init__(self, traced: "TracedNetwork", root: nn.Module):
        self.modules = {target: _lookup(root, parts) for target, parts in traced.paths.items()}
        self.plans: dict = {}  # general (bool) -> the relevance plan (plan.py)
        self.steps: dict = {}  # general (bool) -> the plan's steps bound to these modules (plan.py)
        self.forward = None  # the generated forward (forward.py); False: the code generator refused
        self.merged_weights: dict = {}  # bn node -> (key of the tensors, W γ/σ)
        # Batch norms whose input is a convolution's output used by nothing else: merged into it.
        self.merged: dict[fx.Node, fx.Node] = {}  # bn node -> conv node
        for node in traced.graph.nodes:
            source = node.args[0] if node.op == "call_module" and node.args else None
            if (isinstance(self.modules[node.target] if node.op == "call_module" else None, nn.BatchNorm2d)
                    and isinstance(source, fx.Node) and source.op == "call_module"
                    and isinstance(self.modules[source.target], nn.Conv2d) and len(source.users) == 1):
                self.merged[node] = source

    def holds(self, root: nn.Module, paths: dict) -> bool:
        """Whether every path still leads to the module object this binding was made for."""
        modules = self.modules
        for target, parts in paths.items():
            module = root  # _lookup, inlined: this runs at every explanation
            for part in parts:
                module = module._modules.get(part) if module is not None else None
            if module is not modules[target]:
                return False
        return True

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def merged_weight(self, bn_node: fx.Node, conv: nn.Conv2d, bn: nn.BatchNorm2d, bn_input: torch.Tensor,
                      differentiable: bool) -> torch.Tensor:
        """W γ/σ of a convolution and the batch norm after it. In eval mode and without a graph to
        keep it is reused while neither module's tensors change: merging is a pass over the weights,
        which dominated small batches."""
        if differentiable or bn.training:
            return conv.weight * batch_norm_scale(bn, bn_input).view(-1, 1, 1, 1)
        key = tuple((id(t), t._version) if t is not None else None
                    for t in (conv.weight, bn.weight, bn.running_var)) + (bn.eps, conv.weight.device)
        cached = self.merged_weights.get(bn_node)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                weight = conv.weight * batch_norm_scale(bn, bn_input).view(-1, 1, 1, 1)
            cached = self.merged_weights[bn_node] = (key, weight)
        return cached[1]


class TracedNetwork:
    """A traced network: its graph, the network held weakly, and the binding to its module objects."""

    __slots__ = ("_root", "graph", "output", "rules_version", "paths", "dynamic", "_binding", "__weakref__")

    def __init__(self, net: nn.Module, graph: fx.Graph):
        self._root = weakref.ref(net)
        self.graph = graph
        self.output = next(n for n in reversed(graph.nodes) if n.op == "output")  # the graph's output node
        self.rules_version = rules_version()
        # module target -> its attribute path, split once
        self.paths = {node.target: tuple(node.target.split(".")) for node in graph.nodes if node.op == "call_module"}
        self.dynamic: set[fx.Node] = set()  # nodes whose value depends on the network input
        for node in graph.nodes:  # in topological order
            if node.op == "placeholder" or any(a in self.dynamic for a in node.all_input_nodes):
                self.dynamic.add(node)
        self._binding: Binding | None = None

    @property
    def root(self) -> nn.Module:
        root = self._root()
        if root is None:  # pragma: no cover - a trace is only used while its network is in use
            raise ModelError("the traced network no longer exists")
        return root

    def bind(self) -> Binding:
        """The binding to today's module objects: kept if every path leads to the same object, else
        made anew (the user replaced a layer since the last explanation)."""
        root = self.root
        binding = self._binding
        if binding is None or not binding.holds(root, self.paths):
            binding = self._binding = Binding(self, root)
        return binding

    @property
    def binding(self) -> Binding:
        """The binding made by the last ``bind`` (the forward's), without checking it again."""
        return self._binding or self.bind()

    def module(self, node: fx.Node) -> nn.Module:
        """The module a call_module node calls (as bound at the last ``bind``)."""
        return self.binding.modules[node.target]


_TRACES: "weakref.WeakKeyDictionary[nn.Module, TracedNetwork]" = weakref.WeakKeyDictionary()


def trace(net: nn.Module) -> TracedNetwork:
    """The network's graph, cached per module object. UnsupportedLayerError if torch.fx cannot trace it."""
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
    traced = _TRACES[net] = TracedNetwork(net, graph)
    return traced
