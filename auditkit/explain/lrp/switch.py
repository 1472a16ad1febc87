"""One switch for the general path: every forward node interpreted as a call, every relevance step
through its rule's Step (no generated forward, no shortcut steps). Maps are the same either way
(the LRP tests run both); the switch exists to test and debug the general path on its own.

    AUDITKIT_LRP_GENERAL=1 python ...         # for a process
    with auditkit.explain.lrp.general_path():  # for a block
        ...
"""

from __future__ import annotations

import contextlib
import os

ENVIRONMENT_VARIABLE = "AUDITKIT_LRP_GENERAL"
_forced = [False]
# How many forwards and relevance passes ran on each path (tests assert which path really ran).
runs = {"forward": 0, "relevance": 0, "fast_forward": 0, "fast_relevance": 0}


def general_forced() -> bool:
    """Whether the general path is forced (by ``general_path()`` or AUDITKIT_LRP_GENERAL=1)."""
    return _forced[0] or os.environ.get(ENVIRONMENT_VARIABLE, "") not in ("", "0")


@contextlib.contextmanager
def general_path():
    """Forces the general path inside the block."""
    previous = _forced[0]
    _forced[0] = True
    try:
        yield
    finally:
        _forced[0] = previous
