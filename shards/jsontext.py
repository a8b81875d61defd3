"""JSON text as RFC 8259 has it: a non-finite float (NaN, ±Infinity), which ``json.dumps`` writes as a
bare ``NaN`` / ``Infinity`` that strict parsers refuse, is written as ``null``. Every JSON file mmcurate
writes from row data goes through :func:`dumps` (the tar writer's column-wise ``KEY.json`` spells its
float columns the same way)."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float, in lists, tuples and dict values too, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """``json.dumps(value, **options)`` with null for non-finite floats; as fast as ``json.dumps`` when there are none."""
    try:
        return json.dumps(value, allow_nan=False, **options)
    except ValueError:  # a NaN or an infinity somewhere (row data holds no circular references)
        return json.dumps(finite(value), allow_nan=False, **options)
