"""The store's own failures as one-line errors: not a folder, read-only, disk full,
damaged metadata.

:func:`check_store_path` and :func:`check_writable` refuse before anything is written
(so the store stays as it was); :func:`storage_errors` turns what the file system or
Zarr raises in the middle of a write or read into a :class:`StorageError` naming the
file and the fix.  A write interrupted by a full disk leaves what the block protocol
leaves after a kill: finished blocks flagged, the rest pending, so the same command
resumes once there is space.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Iterator

from voxelflow.pipeline.errors import StorageError, VoxelflowError

DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
OWN_FOLDERS = {".locks", ".staging", ".scratch"}


def check_store_path(store: Path) -> None:
    """Refuse a ``--store`` that is an existing file, or a non-empty folder that is not
    a workspace (no ``zarr.json``): nothing would be written where the user keeps other
    things."""
    if not store.exists():
        return
    if not store.is_dir():
        raise StorageError(f"{store}: is a file, not a workspace folder; pass --store with "
                           f"a folder (a new one is created)")
    if (store / "zarr.json").exists():
        return
    try:
        entries = set(os.listdir(store))
    except OSError as exc:
        raise StorageError(message_for(exc, store)) from None
    if entries - OWN_FOLDERS:
        raise StorageError(f"{store}: is a folder that is not a voxelflow workspace (no "
                           f"zarr.json); pass --store with a new folder or an existing "
                           f"workspace")


def check_writable(store: Path, group: str | None = None) -> None:
    """Refuse now when the store (or the group's folder) cannot be written; the store
    is left as it was.  (``os.access``: the real permission, without trying a write.)"""
    target = store
    while not target.exists() and target != target.parent:
        target = target.parent
    folders = [target] + ([store / group] if group and (store / group).exists() else [])
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StorageError(f"{folder}: is read-only (no write permission); make it "
                               f"writable (chmod -R u+w {store}) or pass --store with "
                               f"another folder")


def message_for(exc: OSError, store: Path) -> str:
    """One line for a file-system error met while using the store."""
    where = exc.filename or store
    if exc.errno in DISK_FULL:
        return (f"{store}: the disk is full (writing {where}); free some space (or pass "
                f"--store on another disk) and rerun the same command: it resumes where "
                f"it stopped")
    if exc.errno in NOT_WRITABLE:
        return (f"{where}: cannot be written ({os.strerror(exc.errno)}); make the store "
                f"writable (chmod -R u+w {store}) or pass --store with another folder")
    return f"{where}: {exc.strerror or exc}"


def bad_metadata_file(store: Path) -> Path | None:
    """The first ``zarr.json`` under ``store`` (its own folders excluded) that is not a
    JSON object with ``zarr_format`` and ``node_type``."""
    for folder, subfolders, files in os.walk(store):
        subfolders[:] = sorted(d for d in subfolders if d not in OWN_FOLDERS)
        if "zarr.json" in files:
            path = Path(folder) / "zarr.json"
            try:
                meta = json.loads(path.read_text())
            except (OSError, ValueError):
                return path
            if not isinstance(meta, dict) or not {"zarr_format", "node_type"} <= set(meta):
                return path
    return None


def metadata_message(path: Path, store: Path) -> str:
    node = path.parent
    fix = ("restore it from a backup, or remove the folder " + str(node) + " and rerun the "
           "stage that makes it") if node != store else (
           'restore it, or write {"zarr_format": 3, "node_type": "group"} into it')
    return f"{path}: damaged workspace metadata (not a valid zarr.json); {fix}"


@contextlib.contextmanager
def storage_errors(store: Path) -> Iterator[None]:
    """Re-raise disk-full, permission and damaged-metadata errors as one-line
    :class:`StorageError` s (other exceptions pass through unchanged)."""
    try:
        yield
    except VoxelflowError:
        raise
    except OSError as exc:
        if exc.errno in DISK_FULL | NOT_WRITABLE:
            raise StorageError(message_for(exc, store)) from None
        if isinstance(exc, NotADirectoryError) and store.exists() and not store.is_dir():
            check_store_path(store)
        raise
    except (ValueError, KeyError, TypeError) as exc:
        bad = bad_metadata_file(store) if store.is_dir() else None
        if bad is None:
            raise
        raise StorageError(metadata_message(bad, store)) from exc
