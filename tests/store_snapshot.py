"""A workspace's whole content, for "the store is unchanged" checks: every array's bytes
(hashed) and every group's and array's attrs, walked with zarr."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import zarr


def snapshot(store_path: str | Path, group: str | None = None) -> dict:
    """``{path: (dtype, shape, sha256 of the bytes)}`` for every array and
    ``{path + "@attrs": attrs}`` for every group and array (``"/"`` is the root);
    ``{}`` when there is no store.  ``group``: only the paths under it (the same API as
    the storage half's helper, which replaces this one at merge)."""
    store_path = Path(store_path)
    if not (store_path / "zarr.json").is_file():
        return {}
    root = zarr.open_group(store_path, mode="r", use_consolidated=False)
    out: dict = {"/@attrs": dict(root.attrs)}
    for name, node in root.members(max_depth=None):
        out[f"{name}@attrs"] = dict(node.attrs)
        if isinstance(node, zarr.Array):
            data = np.ascontiguousarray(node[...])
            out[name] = (str(data.dtype), data.shape, hashlib.sha256(data.tobytes()).hexdigest())
    if group is not None:
        prefix = group.strip("/")
        out = {k: v for k, v in out.items() if k == prefix or k.startswith(prefix + "/")
               or k == f"{prefix}@attrs"}
    return out


def differences(a: dict, b: dict) -> list[str]:
    """One line per path whose content differs between two snapshots."""
    return [f"{k}: {'added' if k not in a else 'removed' if k not in b else 'changed'}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
