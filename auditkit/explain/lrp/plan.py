"""The relevance pass: a plan of steps from the network's output back to its input, then a loop.

The plan is made once per binding (trace.py) and path: one ``(node, run, data, releases)`` per
graph node, in reverse topological order. ``run(node, data, binding)`` binds the step once per
binding (what the graph and the module objects fix is captured then, not looked up per call): it
returns ``step(env, rel, r, k, epsilon, create_graph)``, which adds what ``node`` passes back to its
inputs' entries in ``rel`` (None for the network input). ``releases`` are the forward values no
later step reads, dropped when ``release`` (the last pass), as autograd frees saved tensors —
holding every activation to the end raised the peak to 1.58x a gradient's and cost page faults
(RESULTS.md).

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


def _add(rel: dict, source, value) -> None:
    rel[source] = rel[source] + value if source in rel else value


# ---- steps every path takes -------------------------------------------------------------------
# A step's ``run(node, data, binding)`` binds it once per binding: it returns the function
# ``step(env, rel, r, k, epsilon, create_graph)`` that the pass calls (or None for the network
# input, whose relevance is the result). What the graph and the binding fix (the source node, the
# module, the rule) is captured then; the forward's values, parameters and module attributes are
# read at every call (trace.py's contract).


def _input(node: fx.Node, data, binding: Binding) -> None:
    return None  # the pass keeps what reaches the network input


def _rule(node: fx.Node, facts: tuple, binding: Binding):
    """Any node through its rule: a Step of the forward's values, the rule, its inputs' relevance."""
    kind, target, rule, inputs = facts
    node_args, node_kwargs, indices_key = node.args, node.kwargs, (node, "indices")
    name = node.target if kind == "module" else node.name
    # The common flat case, without map_aggregate's walk.
    flat = all(isinstance(a, fx.Node) or not isinstance(a, (tuple, list, dict, slice)) for a in node_args)

    def step(env: dict, rel: dict, r, k: int, epsilon: float, create_graph: bool) -> None:
        sources = []

        def value(arg):
            if isinstance(arg, fx.Node):
                result = env[arg]
                if isinstance(result, torch.Tensor):
                    sources.append(arg)
                return result
            return arg

        if isinstance(r, dict):  # a tuple-valued node (chunk, split): its parts' relevances, zero where none came
            r = [r[i] if r.get(i) is not None else
                 torch.zeros((k * part.shape[0], *part.shape[1:]), dtype=part.dtype, device=part.device)
                 for i, part in enumerate(env[node])]
        args = tuple(value(a) for a in node_args) if flat else tuple(fx.node.map_aggregate(node_args, value))
        kwargs = dict(fx.node.map_aggregate(node_kwargs, value)) if node_kwargs else {}
        extra = {"indices": env[indices_key]} if indices_key in env else {}
        view = Step(kind, target, args, kwargs, [env[s] for s in sources], [inputs[s][0] for s in sources], env[node],
                    r, k, epsilon, create_graph, name, extra, [inputs[s][1] for s in sources])
        if rule is None:
            raise UnsupportedLayerError(no_rule_message(view.name, kind, target))
        for source, contribution in zip(sources, rule(view)):
            if contribution is not None and source.op != "get_attr":
                _add(rel, source, contribution)

    return step


def _no_rule(node: fx.Node, data, binding: Binding):
    def step(env: dict, rel: dict, r, k: int, epsilon: float, create_graph: bool) -> None:
        raise UnsupportedLayerError(f"LRP-epsilon has no rule for graph node {node.name} ({node.op})")

    return step


def _part(node: fx.Node, facts: tuple, binding: Binding):
    """``x[i]``: a tuple's part waits in the tuple node's slot for part i; a tensor's index, its rule."""
    by_rule, whole, index = _rule(node, facts, binding), node.args[0], node.args[1]

    def step(env: dict, rel: dict, r, k: int, epsilon: float, create_graph: bool) -> None:
        if not isinstance(env[whole], (tuple, list)):
            return by_rule(env, rel, r, k, epsilon, create_graph)
        parts = rel.setdefault(whole, {})
        parts[index] = parts[index] + r if index in parts else r
        return None

    return step


def _merged(node: fx.Node, conv_node: fx.Node, binding: Binding):
    """A batch norm after a convolution (whose only reader it is): one layer, the conv rule with W γ/σ."""
    conv, bn, source, merged_weight = binding.module(conv_node), binding.module(node), conv_node.args[0], \
        binding.merged_weight

    def step(env: dict, rel: dict, r, k: int, epsilon: float, create_graph: bool) -> None:
        weight = merged_weight(node, conv, bn, env[conv_node], create_graph or torch.is_grad_enabled())
        v = conv2d_module_relevance(conv, env[source], env[node], r, epsilon, create_graph, weight)
        rel[source] = rel[source] + v if source in rel else v

    return step


# ---- shortcuts: a rule's maths on the forward's tensors, for plain calls of builtin layers --------
# Each adds its input's relevance to ``rel`` in place (what _add does, inlined: one call less a step).


def _conv(node: fx.Node, conv: nn.Conv2d, binding: Binding):
    source = node.args[0]  # a zero-padded convolution with numeric padding (_zero_padded_conv)

    def step(env: dict, rel: dict, r, k: int, epsilon: float, create_graph: bool) -> None:
        v = conv2d_relevance(env[source], env[node], r, conv.weight, conv.stride, conv.padding, conv.dilation,
                             conv.groups, epsilon, create_graph)
        rel[source] = rel[source] + v if source in rel else v

    return step


def _linear(node: fx.Node, linear: nn.Linear, binding: Binding):
    source, name = node.args[0], node.name

    def step(env: dict, rel: dict, r, k: int, epsilon: float, create_graph: bool) -> None:
        v = linear_relevance(env[source], env[node], r, linear.weight, epsilon, create_graph, name)
        rel[source] = rel[source] + v if source in rel else v

    return step


def _max_pool(node: fx.Node, data, binding: Binding):
    source, indices = node.args[0], (node, "indices")

    def step(env: dict, rel: dict, r, k: int, epsilon: float, create_graph: bool) -> None:
        v = winner_takes_all(env[source], env[indices], r, k)
        rel[source] = rel[source] + v if source in rel else v

    return step


def _flatten(node: fx.Node, data, binding: Binding):
    source = node.args[0]

    def step(env: dict, rel: dict, r, k: int, epsilon: float, create_graph: bool) -> None:
        v = rearranged_back(env[source], r)
        rel[source] = rel[source] + v if source in rel else v

    return step


def _adaptive_avg_pool(node: fx.Node, data, binding: Binding):
    source = node.args[0]

    def step(env: dict, rel: dict, r, k: int, epsilon: float, create_graph: bool) -> None:
        v = adaptive_avg_pool_relevance(env[source], env[node], r, k, epsilon, create_graph)
        rel[source] = rel[source] + v if source in rel else v

    return step


def _identity(node: fx.Node, data, binding: Binding):
    source, name = node.args[0], node.name

    def step(env: dict, rel: dict, r, k: int, epsilon: float, create_graph: bool) -> None:
        v = identity_relevance(env[source], env[node], r, name)
        rel[source] = rel[source] + v if source in rel else v

    return step


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
    run: Callable  # (node, the node's module or None, binding) -> step(env, rel, r, k, epsilon, create_graph)
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
    general: bool | None = None,
) -> torch.Tensor:
    """Relevance at the network input, (K*N, ...) target-major, from relevance (K*N, ...) at its
    output (at ``start``, the logits' node, when the output is a dict or tuple). ``release``: drop
    each forward value from ``env`` after the last step that reads it. ``general``: whether the
    general path is forced (default: ``switch.general_forced()``, read here). UnsupportedLayerError
    if a layer has no rule or no relevance reaches the input."""
    binding = traced.binding
    if general is None:
        general = switch.general_forced()
    switch.runs["relevance" if general else "fast_relevance"] += 1
    if start is None:
        start = traced.output.args[0]
    steps = binding.steps.get(general)
    if steps is None:  # each step bound once per binding (see _input)
        steps = binding.steps[general] = [(node, run(node, data, binding), releases)
                                          for node, run, data, releases in plan_for(traced, binding, general)]
    rel, found = {start: output_relevance}, None
    for node, step, releases in steps:
        r = rel.pop(node, None)
        if r is not None:
            if step is None:  # the network input
                found = r
            else:
                step(env, rel, r, k, epsilon, create_graph)
            r = None  # this step's tensors are gone before the next allocates
        if release and releases:
            for key in releases:
                env.pop(key, None)
    if found is None:
        raise UnsupportedLayerError("no relevance reached the network input (is the output independent of it?)")
    return found
