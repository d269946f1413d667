"""What a workspace holds: groups, their state, runs and array shapes (``voxelflow status``)."""

from __future__ import annotations

import zarr

from voxelflow.stores.scratch import SCRATCH_DIR
from voxelflow.stores.workspace import DONE_VAR, STATE_ATTR, Workspace


def stored_bytes(ws: Workspace, group: str) -> int:
    """Bytes the files of ``group`` (and of its transpose scratch) take now (0: absent);
    what a resumed stage has already written."""
    total = 0
    for folder in (ws.path / group, ws.path / SCRATCH_DIR / group):
        if folder.is_dir():
            total += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    return total


def _arrays(group: zarr.Group) -> list[str]:
    out = []
    for name, arr in sorted(group.arrays()):
        if name == DONE_VAR:
            continue
        dims = arr.metadata.dimension_names or ()
        if len(arr.shape) >= 2 or name in ("r_test", "bold", "features", "frames"):
            shape = " x ".join(f"{d}={n}" if d else str(n) for d, n in zip(dims, arr.shape))
            out.append(f"{name} ({shape}) {arr.dtype}")
    return out


def iter_stage_groups(root: zarr.Group, prefix: str = ""):
    """Yield ``(path, group)`` for every group that carries stage state attrs."""
    for name, child in sorted(root.groups()):
        path = f"{prefix}{name}"
        if STATE_ATTR in child.attrs:
            yield path, child
        else:
            yield from iter_stage_groups(child, path + "/")


def describe_workspace(ws: Workspace) -> list[str]:
    """One line per stage group: path, state, runs, and its main arrays' shapes."""
    if not ws.path.exists():
        return [f"{ws.path}: no workspace yet"]
    root = zarr.open_group(ws.path, mode="r", use_consolidated=False)
    lines = [f"workspace {ws.path}"]
    for path, group in iter_stage_groups(root):
        info = group.attrs[STATE_ATTR]
        runs = int(info.get("runs", 0))
        arrays = _arrays(group)
        if runs:
            first = group["run-000"]
            arrays = _arrays(first)
            detail = f"{runs} run(s); run-000: " + ", ".join(arrays)
        else:
            detail = ", ".join(arrays)
        lines.append(f"  /{path:<40} {info.get('state'):<9} {detail}")
    if len(lines) == 1:
        lines.append("  (empty)")
    return lines
