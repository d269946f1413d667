"""What a workspace holds: groups, their state, runs and array shapes (``voxelflow status``)."""

from __future__ import annotations

import warnings

import zarr

from voxelflow.stores.integrity import BOOKKEEPING
from voxelflow.stores.locks import LOCK_DIR, holder_alive, lock_file, read_holder
from voxelflow.stores.replace import staged_groups
from voxelflow.stores.scratch import SCRATCH_DIR
from voxelflow.stores.workspace import STATE_ATTR, Workspace


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
        if name in BOOKKEEPING:
            continue
        dims = arr.metadata.dimension_names or ()
        if len(arr.shape) >= 2 or name in ("r_test", "bold", "features", "frames"):
            shape = " x ".join(f"{d}={n}" if d else str(n) for d, n in zip(dims, arr.shape))
            out.append(f"{name} ({shape}) {arr.dtype}")
    return out


def iter_stage_groups(root: zarr.Group, prefix: str = ""):
    """Yield ``(path, group)`` for every group that carries stage state attrs."""
    with warnings.catch_warnings():
        # voxelflow's own folders (.locks, .staging, .scratch) are not Zarr nodes
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        children = sorted(root.groups())
    for name, child in children:
        path = f"{prefix}{name}"
        if STATE_ATTR in child.attrs:
            yield path, child
        else:
            yield from iter_stage_groups(child, path + "/")


def describe_workspace(ws: Workspace) -> list[str]:
    """One line per stage group: path, state, runs, and its main arrays' shapes; then a
    line per replacement being built beside a group (``--overwrite`` in progress or
    interrupted) and per group whose lock a running writer holds."""
    if not ws.path.exists():
        return [f"{ws.path}: no workspace yet"]
    with ws.storage_errors():
        root = ws._root("r")
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
    for group in staged_groups(ws.path):
        info = ws.replacement(group) or {}
        lines.append(f"  /{group:<40} replacement being built beside it "
                     f"({info.get('state', '?')}; swapped in when complete)")
    for group in _locked_groups(ws):
        holder = read_holder(lock_file(ws.path, group))
        if not holder:
            continue
        who = f"pid {holder.get('pid')} on {holder.get('host')}"
        if holder_alive(holder) is False:
            lines.append(f"  /{group:<40} lock left by {who}, which no longer runs (the "
                         f"next writer takes it over)")
        else:
            lines.append(f"  /{group:<40} being written by {who}")
    return lines


def _locked_groups(ws: Workspace) -> list[str]:
    """Groups with a holder record (a writer running now, or one that died)."""
    base = ws.path / LOCK_DIR
    if not base.is_dir():
        return []
    return sorted(str(p.relative_to(base))[: -len(".lock.json")]
                  for p in base.rglob("*.lock.json"))
