"""Atomic replace of a complete group: build the new one beside it, swap it in when done.

``--overwrite`` of a complete group (and a changed request in ``voxelflow run``) never
writes into the group that readers see.  The new group is built in a *staging store*,
``<store>/.staging/<quoted group>/``, a Zarr store of its own holding the group at its
full path (``.../.staging/frames%2Fclip/frames/clip``).  ``.staging`` has no
``zarr.json``, so the workspace's listing, ``xr.open_datatree`` and the consolidated
metadata never show it; readers, ``voxelflow status`` and the next stage keep seeing the
old complete group while the new one is written, resumed after a kill, or abandoned.

When the new group is complete it is swapped in with two renames inside the store (one
file system, so each rename is atomic, locally and on a shared POSIX file system):

1. journal ``.staging/<q>.swap.json`` written (temp file, fsync, rename);
2. ``<store>/<group>`` -> ``.staging/<q>.old``;
3. ``.staging/<q>/<group>`` -> ``<store>/<group>``;
4. the root's consolidated metadata refreshed;
5. journal removed, then the old group and the staging store deleted.

A kill between 1 and 5 leaves the journal, and :func:`roll_forward` (run under the
group's lock by the next open of the workspace) finishes the steps from wherever they
stopped; a kill before 1 leaves the old group in place and the staging build to resume.
At every moment one complete group exists on disk: in place, or (between 2 and 3) at
``.staging/<q>/<group>`` with the journal naming it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, unquote

from voxelflow.stores.faults import fault_point

STAGING_DIR = ".staging"
JOURNAL_SUFFIX = ".swap.json"
OLD_SUFFIX = ".old"


def staging_root(store: Path, group: str) -> Path:
    """Root of the staging store in which a replacement of ``group`` is built."""
    return Path(store) / STAGING_DIR / quote(group, safe="")


def _journal(store: Path, group: str) -> Path:
    return staging_root(store, group).with_name(quote(group, safe="") + JOURNAL_SUFFIX)


def _old(store: Path, group: str) -> Path:
    return staging_root(store, group).with_name(quote(group, safe="") + OLD_SUFFIX)


def staged_info(store: Path, group: str) -> dict | None:
    """The ``voxelflow`` attrs (params, state) of a replacement being built, or None."""
    meta = staging_root(store, group) / group / "zarr.json"
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None if not meta.parent.exists() else {"state": "templating"}
    info = attrs.get("voxelflow")
    return info if isinstance(info, dict) else {"state": "templating"}


def discard(store: Path, group: str) -> None:
    """Delete an abandoned replacement build of ``group`` (no journal: never swapped)."""
    root = staging_root(store, group)
    if root.exists():
        shutil.rmtree(root)
    _remove_empty(Path(store) / STAGING_DIR)


def swap_in(store: Path, group: str, consolidate: Callable[[], None]) -> None:
    """Replace ``<store>/<group>`` by its complete staging build (steps 1-5 above).

    The caller holds the group's write lock."""
    store = Path(store)
    parent = (store / group).parent
    parent.mkdir(parents=True, exist_ok=True)
    journal = _journal(store, group)
    _write_json_durably(journal, {"group": group, "staging": staging_root(store, group).name,
                                  "old": _old(store, group).name})
    fault_point("swap:journal-written")
    roll_forward(store, group, consolidate)


def roll_forward(store: Path, group: str, consolidate: Callable[[], None]) -> bool:
    """Finish an interrupted swap of ``group`` (journal present); return whether there
    was one.  Each step checks what is on disk, so it may be repeated after a kill at
    any point.  The caller holds the group's write lock."""
    store = Path(store)
    journal = _journal(store, group)
    if not journal.exists():
        _cleanup(store, group, keep_staging=True)
        return False
    new = staging_root(store, group) / group
    target = store / group
    old = _old(store, group)
    if new.exists():
        if target.exists():
            if old.exists():
                shutil.rmtree(old)  # a previous swap's leftover: the journal is newer
            os.rename(target, old)
            _sync_dir(target.parent)
            fault_point("swap:old-moved")
        os.rename(new, target)
        _sync_dir(target.parent)
        _sync_dir(new.parent)
        fault_point("swap:new-moved")
    consolidate()
    fault_point("swap:consolidated")
    journal.unlink()
    _sync_dir(journal.parent)
    fault_point("swap:journal-removed")
    _cleanup(store, group, keep_staging=False)
    return True


def _cleanup(store: Path, group: str, keep_staging: bool) -> None:
    """Delete the replaced group (``.old``) and the staging store once its group has
    been moved out (``keep_staging``: a staging store that still holds its group is a
    build to resume, kept)."""
    old = _old(store, group)
    if old.exists():
        shutil.rmtree(old)
    root = staging_root(store, group)
    if root.exists() and (not keep_staging or not (root / group).exists()):
        shutil.rmtree(root)  # swapped in (or emptied by a swap that was then killed)
    _remove_empty(Path(store) / STAGING_DIR)


def interrupted_swaps(store: Path) -> list[str]:
    """Groups whose swap was interrupted (a journal or an ``.old`` leftover is present)."""
    folder = Path(store) / STAGING_DIR
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    groups = set()
    for name in names:
        for suffix in (JOURNAL_SUFFIX, OLD_SUFFIX):
            if name.endswith(suffix):
                groups.add(unquote(name[: -len(suffix)]))
    return sorted(groups)


def staged_groups(store: Path) -> list[str]:
    """Groups with a replacement build in the staging area (finished or not)."""
    folder = Path(store) / STAGING_DIR
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(unquote(n) for n in names
                  if not n.endswith((JOURNAL_SUFFIX, OLD_SUFFIX)) and (folder / n).is_dir())


def write_durably(path: Path, write: Callable[[Any], None], suffix: str = ".tmp") -> None:
    """Write a file whole or not at all: ``write(binary file)`` fills ``path + suffix``,
    which is fsynced and renamed onto ``path`` (then the folder is synced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + suffix)
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _write_json_durably(path: Path, record: dict) -> None:
    write_durably(path, lambda fh: fh.write(json.dumps(record).encode()))


def _sync_dir(folder: Path) -> None:
    """fsync a folder so that a rename in it survives a power loss (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
