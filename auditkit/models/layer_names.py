"""Module names of a network: the layers TAP, Grad-CAM and the audit are told to use.

:func:`resolve_layers` checks names against ``named_modules()``, with or without the ``net.``
prefix of an :class:`~auditkit.models.zoo.AuditModel` and torch.compile's ``_orig_mod.`` segments,
and answers an unknown name in one line with the closest names. :func:`unwrap_compiled` gives the
eager module a ``torch.compile`` wrapper holds.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import nn

from ..errors import ModelError


def _layer_names_message(name: str, modules: Sequence[str], model: nn.Module) -> str:
    """One line: unknown ``name``, with the closest module names (matched with or without 'net.')."""
    # An AuditModel names its architecture (duck-typed: models/zoo.py builds on this module).
    owner = getattr(getattr(model, "meta", None), "arch", None) or type(model).__name__
    by_short_name: dict[str, str] = {}
    for full in modules:
        by_short_name.setdefault(full, full)
        by_short_name.setdefault(full.removeprefix("net."), full)
    query = name.removeprefix("net.")
    close = difflib.get_close_matches(query, by_short_name, n=6, cutoff=0.6)
    suggestions = list(dict.fromkeys(by_short_name[match] for match in close))[:3]
    if suggestions:
        return f"unknown layer '{name}' in {owner}; closest: {', '.join(suggestions)}"
    top_level = [n for n in modules if n.count(".") <= (1 if n.startswith("net.") else 0)]
    shown = ", ".join(top_level[:12]) + (", ..." if len(top_level) > 12 else "")
    return f"unknown layer '{name}' in {owner}; no similar names (top-level modules: {shown})"


_COMPILED = "_orig_mod"  # the attribute under which torch.compile's OptimizedModule holds the original module


def _is_compiled(module: nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, _COMPILED, None), nn.Module)


def unwrap_compiled(module: nn.Module, *, inner: bool = False) -> nn.Module:
    """The module a ``torch.compile`` wrapper (OptimizedModule) holds, or ``module`` itself. With
    ``inner``, compiled submodules inside it are replaced by their original modules too (in place).
    Hooks, double backward and torch.fx need the eager module; the weights are the same objects."""
    while _is_compiled(module):
        module = getattr(module, _COMPILED)
    if inner:
        for parent in list(module.modules()):
            for name, child in list(parent._modules.items()):
                if child is not None and _is_compiled(child):
                    parent._modules[name] = unwrap_compiled(child, inner=True)
    return module


def _without_compiled(name: str) -> str:
    """``name`` without torch.compile's "_orig_mod" segments ("_orig_mod.layer4" -> "layer4")."""
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def resolve_layers(model: nn.Module, names: str | Sequence[str]) -> list[str]:
    """Full module names for ``names``, checked against ``model.named_modules()``.

    Inside an :class:`AuditModel` a name may omit the ``net.`` prefix
    ("layer4" and "net.layer4" are the same layer), and torch.compile's
    ``_orig_mod.`` segments may be given or left out ("_orig_mod.layer4",
    "layer4"), whether or not the model is still compiled. Unknown names raise
    ModelError with the closest valid names; a layer given twice raises too
    (TAP would penalise it twice). A single string is one name.
    """
    if isinstance(names, str):
        names = [names]
    modules = dict(model.named_modules())
    has_net = isinstance(modules.get("net"), nn.Module)
    # Names without "_orig_mod" segments -> the module's own name (the first, outermost, wins).
    plain: dict[str, str] = {}
    for full_name in modules:
        plain.setdefault(_without_compiled(full_name), full_name)
    resolved: list[str] = []
    for name in names:
        name = str(name).strip()
        bare = _without_compiled(name)
        if name and name in modules:
            full = name
        elif name and has_net and f"net.{name}" in modules:
            full = f"net.{name}"
        elif bare and bare in plain:
            full = plain[bare]
        elif bare and has_net and f"net.{bare}" in plain:
            full = plain[f"net.{bare}"]
        else:
            raise ModelError(_layer_names_message(name, [n for n in modules if n], model))
        if full in resolved:
            raise ModelError(f"layer '{full}' is listed twice")
        resolved.append(full)
    return resolved


CALL_MARK = "#"  # "block#2": the second call of module "block"


def split_call(name: str) -> tuple[str, int | None]:
    """``("block", 2)`` for ``"block#2"``, ``("block", None)`` for a bare ``"block"``; ModelError in
    one line for a call that is not a whole number from 1."""
    module, mark, call = str(name).strip().rpartition(CALL_MARK)
    if not mark:
        return call, None
    if not call.isdigit() or int(call) < 1:
        raise ModelError(f"layer '{name}': after '{CALL_MARK}' comes the number of the call, counted from 1 "
                         f"(e.g. '{module}{CALL_MARK}1' for its first call)")
    return module, int(call)


def call_name(module: str, call: int | None) -> str:
    """The layer name of ``module``'s ``call`` (the bare module name for None)."""
    return module if call is None else f"{module}{CALL_MARK}{call}"
