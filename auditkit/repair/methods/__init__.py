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
    # The order users see: each spec's rank (cheapest first; docs/repair.md), then by name.
    return {name: found[name] for name in sorted(found, key=lambda n: (found[n].rank, n))}


#: Every repair method, by name.
METHODS: dict[str, MethodSpec] = _discover()

#: The order ``method="auto"`` tries the methods in: each spec's ``auto_rank``, cheapest first.
AUTO_ORDER: tuple[str, ...] = tuple(sorted((n for n, s in METHODS.items() if s.auto_rank is not None),
                                           key=lambda n: (METHODS[n].auto_rank, n)))

__all__ = ["AUTO_ORDER", "METHODS", "MethodSpec", "NoOptions"]
