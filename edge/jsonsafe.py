"""Strict JSON output: no NaN or Infinity (not JSON; strict parsers reject them).

:func:`sanitize` turns non-finite floats into ``null`` (and numpy scalars into Python
numbers); :func:`dumps` then encodes with ``allow_nan=False`` so that nothing slips by.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def sanitize(obj: Any) -> Any:
    """A copy of ``obj`` fit for strict JSON: non-finite floats become None."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return sanitize(obj.tolist())
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """``json.dumps`` of :func:`sanitize` (obj) with ``allow_nan=False``."""
    return json.dumps(sanitize(obj), allow_nan=False, **kw)
