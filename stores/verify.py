"""``voxelflow verify``: re-read the stored chunks, report damage, make the rerun repair it.

For every done block of a group, each file the block owns
(:func:`voxelflow.stores.integrity.block_files`) must exist and have the CRC32C that
was recorded when the block was marked done.  A damaged or missing file is reported in
one line (group, run, block, file) and its block's done flag is cleared (the group's
state goes back to ``writing``), so the next run of the command that made the group
recomputes exactly those blocks, byte-identical to the original.

Arrays outside the blocks (coordinates, a BOLD group's mask and statistics, ...) are
written when the group is created or finished; they are checked by reading every
chunk, and damage there marks the group for a rebuild (state ``templating``: the next
run of the same command recreates it).  Groups made before digests existed (format 1)
are checked by reading every chunk of their data; damage there clears every block of
the run it is in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from voxelflow.pipeline.errors import DamagedData, InputError
from voxelflow.stores import integrity
from voxelflow.stores.integrity import BOOKKEEPING, DIGEST_VAR, DONE_VAR
from voxelflow.stores.inventory import iter_stage_groups
from voxelflow.stores.workspace import STATE_ATTR, Workspace


@dataclass
class GroupCheck:
    """What verify found in one group."""

    group: str
    files: int = 0
    damaged: list[str] = field(default_factory=list)    # one line per damaged file
    blocks: set[tuple[str, int]] = field(default_factory=set)  # (node, block) cleared
    bad_files: list[Path] = field(default_factory=list)  # removed: the rerun rewrites them
    rebuild: bool = False                                # damage outside the blocks
    digests: bool = True                                 # False: format-1 group


def verify_workspace(ws: Workspace, groups: list[str] | None = None) -> list[GroupCheck]:
    """Check ``groups`` (``/``-less paths such as ``bold/s1``; all stage groups when
    None), clear the done flags of damaged blocks, and return what was found."""
    with ws.storage_errors():
        root = ws._root("r")
        every = [path for path, _ in iter_stage_groups(root)]
    if groups:
        groups = [g.strip("/") for g in groups]
        unknown = [g for g in groups if g not in every]
        if unknown:
            raise InputError(f"{ws.path}: no group /{unknown[0]} (groups: "
                             f"{', '.join('/' + g for g in every) or 'none'})")
    checks = []
    for group in groups or every:
        with ws._write_lock(group), ws.storage_errors():
            check = _check_group(ws, group)
            _apply(ws, check)
        checks.append(check)
    return checks


def _check_group(ws: Workspace, group: str) -> GroupCheck:
    info = ws.attrs(group).get(STATE_ATTR, {})
    check = GroupCheck(group, digests=int(info.get("format", 1)) >= 2)
    node = ws._node(group)
    runs = int(info.get("runs", 0))
    nodes = [f"{group}/run-{r:03d}" for r in range(runs)] if runs else [group]
    for path in nodes:
        _check_blocks(ws, path, info, check)
    for path, arr in _other_arrays(node, group, bool(runs), check.digests, info):
        _check_array(ws, path, arr, check)
    return check


def _check_blocks(ws: Workspace, node_path: str, info: dict, check: GroupCheck) -> None:
    """Done blocks of one run node: digests (format 2) or a full read (format 1)."""
    node = ws._node(node_path)
    done = np.asarray(node[DONE_VAR][:])
    if not check.digests:
        names = [n for n, a in node.arrays() if n not in BOOKKEEPING and len(a.shape) >= 2]
        for name in names:
            bad = _check_array(ws, f"{node_path}/{name}", node[name], check, rebuild=False,
                               must_exist=True)
            if bad:
                check.blocks.update((node_path, int(b)) for b in np.flatnonzero(done))
        return
    dim, size = info["block_dim"], int(info["block_size"])
    names = sorted(info.get("block_vars", ()))
    length = int(node[names[0]].shape[list(node[names[0]].metadata.dimension_names)
                                       .index(dim)]) if names else 0
    for block in map(int, np.flatnonzero(done)):
        region = slice(block * size, min((block + 1) * size, length))
        keys = integrity.block_files(node, names, dim, region)
        row = _digest_row(node, block)
        for slot, key in enumerate(keys):
            check.files += 1
            problem = _file_problem(ws.node_dir(node_path) / key,
                                    int(row[slot]) if row is not None and slot < row.size
                                    else 0, node, key)
            if problem:
                check.damaged.append(f"{ws.path}: /{check.group} {_where(node_path, check)}"
                                     f"block {block}: {node_path}/{key} {problem}")
                check.blocks.add((node_path, block))
                check.bad_files.append(ws.node_dir(node_path) / key)


def _digest_row(node: zarr.Group, block: int) -> np.ndarray | None:
    try:
        return np.asarray(node[DIGEST_VAR][block])
    except Exception:  # noqa: BLE001 - an unreadable digest: fall back to decoding
        return None


def _file_problem(path: Path, recorded: int, node: zarr.Group, key: str) -> str:
    """'' when the file is intact, else what is wrong with it."""
    if not path.is_file():
        return "is missing"
    if recorded:
        return "" if integrity.file_digest(path) == recorded else (
            "is damaged (its CRC32C differs from the one recorded when it was written)")
    name, _, chunk = key.partition("/c/")
    return _decode_problem(node[name], [int(c) for c in chunk.split("/")])


def _decode_problem(arr: zarr.Array, coords: list[int]) -> str:
    outer = arr.metadata.chunk_grid.chunk_shape
    index = tuple(slice(c * s, (c + 1) * s) for c, s in zip(coords, outer))
    try:
        arr[index]
    except Exception as exc:  # noqa: BLE001 - any decode failure is damage
        reason = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
        return f"cannot be decoded ({reason})"
    return ""


def _other_arrays(node: zarr.Group, group: str, per_run: bool, strict: bool, info: dict):
    """``(path, array)`` of the arrays outside the blocks (checked by reading)."""
    block_vars = set(info.get("block_vars", ()))
    for path, arr in integrity._arrays(node):
        parent, _, name = path.rpartition("/")
        in_block_node = bool(parent) if per_run else not parent
        owned = name in block_vars if strict else len(arr.shape) >= 2
        if name in BOOKKEEPING or (in_block_node and owned):
            continue
        yield f"{group}/{path}", arr


def _check_array(ws: Workspace, path: str, arr: zarr.Array, check: GroupCheck,
                 rebuild: bool = True, must_exist: bool | None = None) -> bool:
    """Read every chunk of ``arr``; report the bad ones; return whether any was bad.
    ``must_exist`` (default: format 2) counts an absent chunk file as damage."""
    must_exist = check.digests if must_exist is None else must_exist
    bad = False
    outer = arr.metadata.chunk_grid.chunk_shape
    grid = [range(-(-n // c)) for n, c in zip(arr.shape, outer)]
    folder = ws.node_dir(path)
    for coords in itertools.product(*grid):
        key = arr.metadata.encode_chunk_key(coords)
        check.files += 1
        problem = "is missing" if must_exist and not (folder / key).is_file() else ""
        problem = problem or _decode_problem(arr, list(coords))
        if problem:
            bad = True
            check.damaged.append(f"{ws.path}: /{check.group} {path}/{key} {problem}")
            check.bad_files.append(folder / key)
    if bad and rebuild:
        check.rebuild = True
    return bad


def _where(node_path: str, check: GroupCheck) -> str:
    last = node_path.rsplit("/", 1)[-1]
    return f"{last} " if node_path != check.group else ""


def _apply(ws: Workspace, check: GroupCheck) -> None:
    """Remove the damaged files (a rewrite of a shard reads the old one first), clear
    the flags of their blocks, send the group back to writing (or templating)."""
    if not (check.blocks or check.rebuild):
        return
    for path in check.bad_files:
        path.unlink(missing_ok=True)
    for node_path, block in sorted(check.blocks):
        node = ws._node(node_path, "r+")
        node[DONE_VAR][block] = 0
        if DIGEST_VAR in node:
            node[DIGEST_VAR][block] = 0
    state = "templating" if check.rebuild else "writing"
    if ws.state(check.group) == "complete" or check.rebuild:
        ws._set_state(check.group, state)
    ws.consolidate()


def summary_line(ws: Workspace, check: GroupCheck) -> str:
    """The closing line for one group: intact, or what the next run will redo."""
    stage = str((ws.params(check.group) or {}).get("stage", "")) or "stage"
    how = "" if check.digests else " (made before digests were recorded: checked by reading)"
    if not check.damaged:
        return f"/{check.group}: {check.files} files checked, intact{how}"
    if check.rebuild:
        return (f"/{check.group}: {len(check.damaged)} damaged file(s) outside the blocks; "
                f"the group is marked for a rebuild: rerun the same voxelflow {stage} "
                f"command to recreate it{how}")
    return (f"/{check.group}: {len(check.damaged)} damaged file(s) in "
            f"{len(check.blocks)} block(s), removed and their done flags cleared: rerun "
            f"the same voxelflow {stage} command to recompute exactly those blocks{how}")


def raise_if_damaged(checks: list[GroupCheck]) -> None:
    """For callers that want an exception rather than a report."""
    bad = [c for c in checks if c.damaged]
    if bad:
        raise DamagedData(bad[0].damaged[0])
