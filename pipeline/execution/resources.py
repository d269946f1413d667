"""Bounded requests: what a stage will hold in memory and write to disk, checked up front.

Before any work, each stage states the bytes one block needs in memory (its
*working set*: the block and the copies its code makes of it) and the bytes its whole
output will take on disk, and calls :func:`check_request`.  A request whose block
needs more than :data:`MEMORY_FRACTION` of the memory available now
(``psutil.virtual_memory().available``; on a Dask cluster, the smallest worker's
memory limit), or whose output needs more than the free space of the store's file
system (``shutil.disk_usage``), is refused with one line giving both sizes and the
option to change.  So ``--size 100000`` is refused at once instead of allocating
terabytes, and a run that cannot fit on the disk does not stop half way.

The disk figures are estimates: float arrays are counted uncompressed (BOLD is stored
uncompressed; features and fits compress little), frames at the uncompressed size
divided by :data:`FRAMES_COMPRESSION` (the zstd ratio measured on real video; a noisy
video compresses less and may need up to twice the estimate).  Bytes the group already
holds (an interrupted run being resumed) are counted as available.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from voxelflow.pipeline.errors import InputError

__all__ = ["FRAMES_COMPRESSION", "MEMORY_FRACTION", "available_memory", "check_disk",
           "check_memory", "check_request", "format_bytes", "free_disk"]

MEMORY_FRACTION = 0.8  # a block may use this share of the memory available now
FRAMES_COMPRESSION = 2.0  # uncompressed / stored frames (zstd level 1: 2.2x on real video)


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, 3 significant digits)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def available_memory() -> tuple[int, str]:
    """``(bytes, where)``: memory a block may use now, here or on the active cluster."""
    from voxelflow.pipeline.execution.cluster import active_client

    client = active_client()
    if client is not None:
        limits = [int(w.get("memory_limit") or 0)
                  for w in client.scheduler_info().get("workers", {}).values()]
        limits = [n for n in limits if n > 0]
        if limits:
            return min(limits), "the smallest dask worker's memory limit"
    import psutil

    return int(psutil.virtual_memory().available), "available on this machine"


def free_disk(path: str | Path) -> int:
    """Free bytes of the file system that holds ``path`` (or its nearest existing parent)."""
    target = Path(os.path.abspath(path))
    while not target.exists() and target != target.parent:
        target = target.parent
    return int(shutil.disk_usage(target).free)


def check_memory(what: str, block_bytes: float, option: str) -> None:
    """Refuse (one-line :class:`InputError`) a block whose working set of
    ``block_bytes`` cannot fit in memory; ``option``: what the user can change."""
    memory, where = available_memory()
    if block_bytes > MEMORY_FRACTION * memory:
        raise InputError(
            f"{what}: one block needs {format_bytes(block_bytes)} of memory but "
            f"{format_bytes(memory)} is {where}; {option}")


def check_disk(what: str, output_bytes: float, store: str | Path, option: str,
               already_written: float = 0.0) -> None:
    """Refuse an output of ``output_bytes`` (of which ``already_written`` exist: a
    resume) that cannot fit in the free space at ``store``; ``option``: what to change."""
    free = free_disk(store) + max(0.0, already_written)
    if output_bytes > free:
        raise InputError(
            f"{what}: the output needs about {format_bytes(output_bytes)} on disk but "
            f"{format_bytes(free)} is free at {store}; {option}, free some space or "
            f"choose another store")


def check_request(what: str, *, block_bytes: float, block_option: str,
                  output_bytes: float, store: str | Path, disk_option: str,
                  already_written: float = 0.0) -> None:
    """:func:`check_memory` then :func:`check_disk` (see there)."""
    check_memory(what, block_bytes, block_option)
    check_disk(what, output_bytes, store, disk_option, already_written)
