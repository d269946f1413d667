"""What a stage group records about itself: the state attrs and its parameters.

``voxelflow`` (``STATE_ATTR``) in a group's attrs holds ``params`` (what made the
group), ``state`` (``templating``, ``writing``, ``complete``), ``runs``, ``format`` and
the block layout (``block_dim``, ``block_size``).  Parameters are compared after a
JSON round trip (:func:`_normalise`), so tuples and NumPy scalars compare equal to what
was stored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

STATE_ATTR = "voxelflow"
RUN_PREFIX = "run-"
FORMAT_VERSION = 2  # 2: every chunk written (dense), block digests; 1: neither


def run_node_name(run: int) -> str:
    """Name of the child node holding run ``run`` (0-based): ``run-000``."""
    return f"{RUN_PREFIX}{run:03d}"


def _normalise(params: Mapping[str, Any]) -> dict:
    """JSON round trip so that tuples/np scalars compare equal to what was stored."""
    return json.loads(json.dumps(params, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in attrs")


def describe_param_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """One-line summary of which parameters differ: ``fps: 20 -> 2; size: 224 -> 112``."""
    keys = sorted(set(old) | set(new))
    parts = []
    for key in keys:
        if old.get(key) != new.get(key):
            a, b = json.dumps(old.get(key)), json.dumps(new.get(key))
            if len(a) > 60:
                a = a[:57] + "..."
            if len(b) > 60:
                b = b[:57] + "..."
            parts.append(f"{key}: {a} -> {b}")
    return "; ".join(parts)
