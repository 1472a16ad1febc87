"""JSON that every reader accepts: no NaN or Infinity (``JSON.parse``, jq and most non-Python tools
reject them; Python's ``json`` writes them by default).

A number that could not be computed is ``null`` in auditkit's documents, with its reason beside it
where the document has one (an estimate's ``reason``); ``finite`` is the last line of defence that
turns any non-finite float left over into ``null``, and ``dumps`` writes with ``allow_nan=False`` so
a non-finite value can never reach a file.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def finite(value: Any) -> Any:
    """``value`` with every non-finite float (Python or NumPy) replaced by ``None``, NumPy scalars
    made Python numbers, and tuples made lists; dicts and lists are copied, other objects kept."""
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def dumps(payload: Any, **options) -> str:
    """``json.dumps`` of ``finite(payload)`` with ``allow_nan=False`` (``options`` as json.dumps's)."""
    return json.dumps(finite(payload), allow_nan=False, **options)
