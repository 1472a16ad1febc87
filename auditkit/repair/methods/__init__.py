"""The repair methods, one file each: every module of this package that defines ``SPEC`` (a
MethodSpec) is a method, found here by name. A new method is one new file (see base.py)."""

from __future__ import annotations

import importlib
import pkgutil

from .base import MethodSpec, NoOptions


def _discover() -> dict[str, MethodSpec]:
    found: dict[str, MethodSpec] = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("_") or module.name == "base":
            continue
        spec = getattr(importlib.import_module(f"{__name__}.{module.name}"), "SPEC", None)
        if isinstance(spec, MethodSpec):
            found[spec.name] = spec
    # The order users see (cheapest first; docs/repair.md), then any others by name.
    order = ["tap", "rrr", "energy", "tea", "masktune"]
    return {name: found[name] for name in sorted(found, key=lambda n: (order.index(n) if n in order else len(order), n))}


#: Every repair method, by name.
METHODS: dict[str, MethodSpec] = _discover()

__all__ = ["METHODS", "MethodSpec", "NoOptions"]
