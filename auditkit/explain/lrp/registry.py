"""The rule registry: what a rule receives (:class:`Step`), and the table that maps a layer to its rule.

A rule is a function ``rule(step) -> list`` that receives one layer of the traced network as a
:class:`Step` (what was called, its tensor inputs, its output z, the relevance R arriving at the
output, shaped (K*N, ...) for K explanations per sample) and returns the relevance of each tensor
input (``None`` where an input gets none). Rules are keyed by module type (looked up along the
class's MRO, so a subclass inherits its base's rule), by function, or by method name:

    from auditkit.explain import register_rule, identity_rule
    register_rule(MyNorm, identity_rule)             # a module type
    register_rule(my_function, my_rule)              # a function the forward calls
    register_rule("my_method", my_rule)              # a tensor method, by name

The built-in rows are the table ``BUILTIN_RULES`` at the bottom of rules.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import ModelError


class UnsupportedLayerError(ModelError):
    """The network contains a layer LRP-epsilon has no rule for."""


_BELOW_AUTOGRAD = getattr(torch._C, "_AutoDispatchBelowAutograd", None)
_NOTHING = contextlib.nullcontext()


def below_autograd(enabled: bool):
    """Without a graph to build, the fused ops skip the autograd layer (for our ops a Python one,
    tens of microseconds a call: a noticeable share of LRP at batch 1). Private torch internal:
    ``torch._C._AutoDispatchBelowAutograd`` (absent: the autograd layer runs, results are the same)."""
    return _BELOW_AUTOGRAD() if enabled and _BELOW_AUTOGRAD is not None else _NOTHING


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

    def per_target(self, t: torch.Tensor) -> torch.Tensor:
        """(K*N, ...) -> (K, N, ...)."""
        return t.view(self.k, t.shape[0] // self.k, *t.shape[1:])

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """(K, N, ...) -> (K*N, ...)."""
        return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])

    def call_on(self, t: torch.Tensor) -> torch.Tensor:
        """The same call with its first input replaced by ``t`` (a linear map applied again)."""
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
    with a rule is one step of the trace (its forward is not traced into).

    Raises TypeError for any other key."""
    if isinstance(key, type) and issubclass(key, nn.Module):
        _MODULE_RULES[key] = rule
    elif isinstance(key, str):
        _METHOD_RULES[key] = rule
    elif callable(key):
        _FUNCTION_RULES[key] = rule
    else:
        raise TypeError(f"register_rule: key must be an nn.Module subclass, a function or a method name; got {key!r}")
    _version[0] += 1


def unregister_rule(key: type | Callable | str) -> None:
    """Removes the rule registered for ``key`` itself (nothing if none was; a base class's rule stays)."""
    table = _MODULE_RULES if isinstance(key, type) else _METHOD_RULES if isinstance(key, str) else _FUNCTION_RULES
    if table.pop(key, None) is not None:
        _version[0] += 1


def _method_key(name: str) -> str:
    """An in-place method (``relu_``) has its out-of-place method's rule; dunders are kept."""
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def rule_for(kind: str, target: Any) -> Rule | None:
    """The rule of a module instance (``kind`` "module", by its class's MRO), a function, or a
    method name; None if there is none."""
    if kind == "module":
        for cls in type(target).__mro__:
            if cls in _MODULE_RULES:
                return _MODULE_RULES[cls]
        return None
    if kind == "method":
        return _METHOD_RULES.get(_method_key(target))
    return _FUNCTION_RULES.get(target)


def no_rule_message(step_name: str, kind: str, target: Any) -> str:
    """The one line that refuses a layer without a rule: what it is and how to register one."""
    if kind == "module":
        what, key = f"module {step_name!r} ({type(target).__name__})", type(target).__name__
    elif kind == "method":
        what, key = f"method {target!r} (graph node {step_name})", repr(target)
    else:
        name = getattr(target, "__name__", target)
        what, key = f"function {name!r} (graph node {step_name})", getattr(target, "__name__", "fn")
    return (f"LRP-epsilon has no rule for {what}; register one with auditkit.explain.register_rule({key}, rule) "
            "(docs/explain.md), or use a gradient-based method")
