"""Everything a workspace holds, for "the store is unchanged" and "byte for byte" checks.

``snapshot(store)`` walks every node with Zarr (attrs of every group and array, the
values of every array as a SHA-256 of their bytes) and every file on disk (SHA-256 of
its bytes); two snapshots are equal exactly when the stores are.  ``group=`` limits
both walks to one group's subtree (for comparing a group against the same group made
in another store).  Lock files (``.locks/``) are not data and are left out by default.
Works on whatever is at the path: a missing store, a regular file, a store whose
``zarr.json`` is not JSON (the walk's error is recorded instead of the nodes).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
import zarr

IGNORED = (".locks",)


def file_digests(root: Path, ignore: tuple[str, ...] = IGNORED) -> dict[str, str]:
    """``relative path -> sha256`` of every file below ``root`` (``root`` itself when it
    is a file), skipping the top-level folders in ``ignore``."""
    if root.is_file():
        return {"": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for folder, subfolders, files in os.walk(root):
        if Path(folder) == root:
            subfolders[:] = [d for d in subfolders if d not in ignore]
        for name in files:
            path = Path(folder) / name
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return dict(sorted(out.items()))


def zarr_contents(store: Path, group: str | None = None) -> dict[str, object]:
    """``node path -> attrs`` and ``array path -> (shape, dtype, sha256 of values)``."""
    out: dict[str, object] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            root = zarr.open_group(store, mode="r", use_consolidated=False)
            top = root[group] if group else root
            out["attrs:/"] = _plain(dict(top.attrs))
            for name, node in sorted(top.members(max_depth=None)):
                out[f"attrs:{name}"] = _plain(dict(node.attrs))
                if isinstance(node, zarr.Array):
                    values = np.ascontiguousarray(node[...])
                    out[f"array:{name}"] = (tuple(node.shape), str(node.dtype),
                                            hashlib.sha256(values.tobytes()).hexdigest())
    except Exception as exc:  # noqa: BLE001 - recorded: e.g. a damaged zarr.json
        out["walk-error"] = type(exc).__name__
    return out


def _plain(attrs: dict) -> dict:
    """Attrs without the consolidated metadata (a cache of the other nodes' attrs)."""
    return {k: v for k, v in attrs.items() if k != "consolidated_metadata"}


def snapshot(store: str | Path, group: str | None = None,
             ignore: tuple[str, ...] = IGNORED) -> dict[str, object]:
    """Every file (bytes) and, through Zarr, every attr and array value of ``store``
    (or of ``group`` in it)."""
    store = Path(store)
    if not store.exists():
        return {"exists": False}
    root = store / group if group else store
    return {"files": file_digests(root, ignore) if root.exists() else None,
            "zarr": zarr_contents(store, group) if store.is_dir() else None}


def differences(a: dict, b: dict) -> list[str]:
    """Keys whose values differ between two snapshots (for assertion messages)."""
    out = []
    for part in sorted(set(a) | set(b)):
        x, y = a.get(part), b.get(part)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{part}:{k}" for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
        elif x != y:
            out.append(part)
    return out
