"""The relevance pass: a plan of steps from the network's output back to its input, then a loop.

The plan is made once per binding (trace.py) and path: one ``(node, run, data, releases)`` per
graph node, in reverse topological order. ``run(p, node, data, r)`` adds what ``node`` passes back
to its inputs' entries in ``p.rel``; ``releases`` are the forward values no later step reads,
dropped when ``p.release`` (the last pass), as autograd frees saved tensors — holding every
activation to the end raised the peak to 1.58x a gradient's and cost page faults (RESULTS.md).

Every node runs through its rule (``_rule``: a :class:`Step`, then the rule from the table) except:
the network input, a tuple's part, a batch norm merged into the convolution before it (one linear
layer, W' = W γ/σ: the conv rule with the merged weight), and, on the fast path, the shortcuts in
``SHORTCUTS``: for common builtin layers, the rule's maths (rules.py) called on the forward's
tensors directly, without building a Step — at one 28x28 image, Steps and rule lookups were most
of LRP's Python time. A shortcut is keyed by the rule it stands for and must compute exactly what
the rule does (tests run both paths: switch.py). A new rule needs no shortcut.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import fx, nn

from . import switch
from .forward import pool_with_indices
from .registry import Step, UnsupportedLayerError, no_rule_message, rule_for
from .rules import (
    adaptive_avg_pool_relevance,
    average_pool_rule,
    conv2d_module_relevance,
    conv2d_relevance,
    conv2d_rule,
    identity_relevance,
    identity_rule,
    linear_relevance,
    linear_rule,
    rearranged_back,
    reshape_rule,
    winner_takes_all,
    winner_takes_all_rule,
)
from .trace import Binding, TracedNetwork

_KINDS = {"call_module": "module", "call_function": "function", "call_method": "method"}


class Pass:
    """One relevance pass's state: the forward's values, relevance waiting at nodes, settings."""

    __slots__ = ("env", "rel", "k", "epsilon", "create_graph", "binding", "found")

    def __init__(self, env: dict, rel: dict, k: int, epsilon: float, create_graph: bool, binding: Binding):
        self.env, self.rel, self.k, self.epsilon, self.create_graph = env, rel, k, epsilon, create_graph
        self.binding, self.found = binding, None


def _add(rel: dict, source, value) -> None:
    rel[source] = rel[source] + value if source in rel else value


# ---- steps every path takes -------------------------------------------------------------------


def _input(p: Pass, node: fx.Node, data, r) -> None:
    p.found = r


def _rule(p: Pass, node: fx.Node, facts: tuple, r) -> None:
    """Any node through its rule: a Step of the forward's values, the rule, its inputs' relevance."""
    kind, target, rule, inputs = facts
    env, sources = p.env, []

    def value(arg):
        if isinstance(arg, fx.Node):
            result = env[arg]
            if isinstance(result, torch.Tensor):
                sources.append(arg)
            return result
        return arg

    if isinstance(r, dict):  # a tuple-valued node (chunk, split): its parts' relevances, zero where none came
        r = [r[i] if r.get(i) is not None else
             torch.zeros((p.k * part.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
             for i, part in enumerate(env[node])]
    if all(isinstance(a, fx.Node) or not isinstance(a, (tuple, list, dict, slice)) for a in node.args):
        args = tuple(value(a) for a in node.args)  # the common flat case, without map_aggregate's walk
    else:
        args = tuple(fx.node.map_aggregate(node.args, value))
    kwargs = dict(fx.node.map_aggregate(node.kwargs, value)) if node.kwargs else {}
    extra = {"indices": env[(node, "indices")]} if (node, "indices") in env else {}
    step = Step(kind, target, args, kwargs, [env[s] for s in sources], [inputs[s][0] for s in sources], env[node],
                r, p.k, p.epsilon, p.create_graph, node.target if kind == "module" else node.name, extra,
                [inputs[s][1] for s in sources])
    if rule is None:
        raise UnsupportedLayerError(no_rule_message(step.name, kind, target))
    for source, contribution in zip(sources, rule(step)):
        if contribution is not None and source.op != "get_attr":
            _add(p.rel, source, contribution)


def _no_rule(p: Pass, node: fx.Node, data, r) -> None:
    raise UnsupportedLayerError(f"LRP-epsilon has no rule for graph node {node.name} ({node.op})")


def _part(p: Pass, node: fx.Node, facts: tuple, r) -> None:
    """``x[i]``: a tuple's part waits in the tuple node's slot for part i; a tensor's index, its rule."""
    if not isinstance(p.env[node.args[0]], (tuple, list)):
        return _rule(p, node, facts, r)
    parts = p.rel.setdefault(node.args[0], {})
    index = node.args[1]
    parts[index] = parts[index] + r if index in parts else r


def _merged(p: Pass, node: fx.Node, conv_node: fx.Node, r) -> None:
    """A batch norm after a convolution (whose only reader it is): one layer, the conv rule with W γ/σ."""
    binding, env = p.binding, p.env
    conv, bn = binding.module(conv_node), binding.module(node)
    weight = binding.merged_weight(node, conv, bn, env[conv_node], p.create_graph or torch.is_grad_enabled())
    source = conv_node.args[0]
    _add(p.rel, source, conv2d_module_relevance(conv, env[source], env[node], r, p.epsilon, p.create_graph, weight))


# ---- shortcuts: a rule's maths on the forward's tensors, for plain calls of builtin layers --------


def _conv(p: Pass, node: fx.Node, conv: nn.Conv2d, r) -> None:
    source = node.args[0]  # a zero-padded convolution with numeric padding (_zero_padded_conv)
    _add(p.rel, source, conv2d_relevance(p.env[source], p.env[node], r, conv.weight, conv.stride, conv.padding,
                                         conv.dilation, conv.groups, p.epsilon, p.create_graph))


def _linear(p: Pass, node: fx.Node, linear: nn.Linear, r) -> None:
    source = node.args[0]
    _add(p.rel, source, linear_relevance(p.env[source], p.env[node], r, linear.weight, p.epsilon, p.create_graph,
                                         node.name))


def _max_pool(p: Pass, node: fx.Node, data, r) -> None:
    source = node.args[0]
    _add(p.rel, source, winner_takes_all(p.env[source], p.env[(node, "indices")], r, p.k))


def _flatten(p: Pass, node: fx.Node, data, r) -> None:
    source = node.args[0]
    _add(p.rel, source, rearranged_back(p.env[source], r))


def _adaptive_avg_pool(p: Pass, node: fx.Node, data, r) -> None:
    source = node.args[0]
    _add(p.rel, source, adaptive_avg_pool_relevance(p.env[source], p.env[node], r, p.k, p.epsilon, p.create_graph))


def _identity(p: Pass, node: fx.Node, data, r) -> None:
    source = node.args[0]
    _add(p.rel, source, identity_relevance(p.env[source], p.env[node], r, node.name))


def _plain(node: fx.Node, binding: Binding, module_type: type | None = None) -> bool:
    """A module (of exactly ``module_type``, if given) called on one graph value, no other arguments."""
    return node.op == "call_module" and (module_type is None or type(binding.module(node)) is module_type) \
        and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)


def _zero_padded_conv(node: fx.Node, binding: Binding) -> bool:
    conv = binding.module(node) if node.op == "call_module" else None
    return _plain(node, binding, nn.Conv2d) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _max_pool_with_indices(node: fx.Node, binding: Binding) -> bool:
    return _plain(node, binding) and pool_with_indices(node, binding, lambda a: a) is not None


def _flatten_from_1(node: fx.Node, binding: Binding) -> bool:
    return _plain(node, binding, nn.Flatten) and binding.module(node).start_dim == 1


def _one_input(node: fx.Node, binding: Binding) -> bool:
    """A module, function or method whose only graph input is its first argument (not a parameter)."""
    inputs = node.all_input_nodes
    return len(inputs) == 1 and bool(node.args) and node.args[0] is inputs[0] and inputs[0].op != "get_attr"


def _reads_in_out(node: fx.Node) -> list:
    return [node, node.args[0]]


class Shortcut(NamedTuple):
    applies: Callable[[fx.Node, Binding], bool]
    run: Callable  # (Pass, node, the node's module or None, r) -> None
    reads: Callable[[fx.Node], list]  # the forward values (env keys) the step reads


SHORTCUTS: dict[Callable, Shortcut] = {  # rule -> the shortcut that computes exactly what it does
    conv2d_rule: Shortcut(_zero_padded_conv, _conv, _reads_in_out),
    linear_rule: Shortcut(lambda node, binding: _plain(node, binding, nn.Linear), _linear, _reads_in_out),
    winner_takes_all_rule: Shortcut(_max_pool_with_indices, _max_pool, lambda node: [node.args[0], (node, "indices")]),
    reshape_rule: Shortcut(_flatten_from_1, _flatten, lambda node: [node.args[0]]),
    average_pool_rule: Shortcut(lambda node, binding: _plain(node, binding, nn.AdaptiveAvgPool2d), _adaptive_avg_pool,
                                _reads_in_out),
    identity_rule: Shortcut(_one_input, _identity, _reads_in_out),
}


# ---- the plan -------------------------------------------------------------------------------------


def _facts(traced: TracedNetwork, binding: Binding, node: fx.Node) -> tuple:
    """(kind, target, rule, {input node: (what computed it, whether it is independent of the input)})."""
    kind = _KINDS[node.op]
    target = binding.module(node) if kind == "module" else node.target

    def producer(n: fx.Node):
        if n.op == "call_module":
            return binding.module(n)
        return n.target if n.op in ("call_function", "call_method") else None

    inputs = {n: (producer(n), n not in traced.dynamic) for n in node.all_input_nodes}
    return kind, target, rule_for(kind, target), inputs


def _full_reads(node: fx.Node) -> list:
    return [node, *node.all_input_nodes, (node, "indices")]


def plan_for(traced: TracedNetwork, binding: Binding, general: bool) -> list:
    """The relevance pass as (node, run, data, releases), output to input (cached in the binding)."""
    plan = binding.plans.get(general)
    if plan is not None:
        return plan
    steps = []  # (node, run, data, reads)
    for node in reversed(traced.graph.nodes):
        if node.op == "output":
            continue
        if node.op == "placeholder":
            steps.append((node, _input, None, []))
        elif node.op not in _KINDS:  # get_attr: no rule (refused if relevance reaches it)
            steps.append((node, _no_rule, None, [node]))
        elif node in binding.merged:
            conv = binding.merged[node]
            steps.append((node, _merged, conv, [node, conv, *conv.all_input_nodes]))
        else:
            facts = _facts(traced, binding, node)
            shortcut = None if general else SHORTCUTS.get(facts[2])
            if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
                steps.append((node, _part, facts, _full_reads(node)))  # a tuple's part or an index: by value
            elif shortcut is not None and shortcut.applies(node, binding):
                steps.append((node, shortcut.run, binding.module(node) if node.op == "call_module" else None,
                              shortcut.reads(node)))
            else:
                steps.append((node, _rule, facts, _full_reads(node)))
    last = {}  # env key -> the position of the last step that reads it
    for position, (_node, _run, _data, reads) in enumerate(steps):
        for key in reads:
            last[key] = position
    releases = [[] for _ in steps]
    for key, position in last.items():
        releases[position].append(key)
    plan = binding.plans[general] = [(node, run, data, tuple(releases[i]))
                                     for i, (node, run, data, _reads) in enumerate(steps)]
    return plan


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
    """Relevance at the network input, (K*N, ...) target-major, from relevance (K*N, ...) at its
    output (at ``start``, the logits' node, when the output is a dict or tuple). ``release``: drop
    each forward value from ``env`` after the last step that reads it. UnsupportedLayerError if a
    layer has no rule or no relevance reaches the input."""
    binding = traced.binding
    general = switch.general_forced()
    switch.runs["relevance" if general else "fast_relevance"] += 1
    if start is None:
        start = next(n for n in reversed(traced.graph.nodes) if n.op == "output").args[0]
    p = Pass(env, {start: output_relevance}, k, epsilon, create_graph, binding)
    rel = p.rel
    for node, run, data, releases in plan_for(traced, binding, general):
        r = rel.pop(node, None)
        if r is not None:
            run(p, node, data, r)
            r = None  # this step's tensors are gone before the next allocates
        if release and releases:
            for key in releases:
                env.pop(key, None)
    if p.found is None:
        raise UnsupportedLayerError("no relevance reached the network input (is the output independent of it?)")
    return p.found
