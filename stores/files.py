"""A result file written in steps (a training checkpoint) that a rewrite never loses.

``path`` is what readers use.  A rewrite of an existing file (``--overwrite``, or other
settings) saves its steps to ``<path>.next`` and replaces ``path`` only when complete
(:meth:`SteppedFile.commit`: one rename within the folder, atomic locally and on a
shared POSIX file system); a run killed on the way leaves the old file whole and
``.next`` to resume.  The writer holds the file's lock (``<folder>/.locks/<name>.lock``,
:mod:`voxelflow.stores.locks`) while it writes: a second writer is refused at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from voxelflow.stores.locks import GroupLock, acquire_group
from voxelflow.stores.replace import _sync_dir

NEXT_SUFFIX = ".next"


class SteppedFile:
    """``path`` and its pending replacement ``<path>.next`` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.next = self.path.with_name(self.path.name + NEXT_SUFFIX)
        self._lease: GroupLock | None = None

    def acquire(self, label: str | None = None) -> None:
        """Take the file's write lock (:class:`WorkspaceBusy` when another process has it)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lease = acquire_group(self.path.parent, self.path.name, label or str(self.path))

    def resume_point(self, read: Callable[[Path], Any], same: Callable[[Any], bool],
                     overwrite: bool, refuse: Callable[[Any], Exception]
                     ) -> tuple[Any | None, Path]:
        """``(what to resume or None, where to save the steps)``.

        ``read(path)`` loads a file, ``same(loaded)`` says whether it was made with the
        requested settings, ``refuse(loaded)`` is the error for another settings'
        file without ``overwrite``.  An interrupted replacement (``.next``, same
        settings) is resumed; an existing ``path`` is resumed (same settings) or, with
        ``overwrite``, replaced through ``.next``."""
        for path in (self.path, self.next):  # a killed save's leftover
            path.with_name(path.name + ".partial").unlink(missing_ok=True)
        if self.next.exists():
            pending = read(self.next)
            if same(pending) and (overwrite or not self.path.exists()):
                return pending, self.next
            if not same(pending):
                self.next.unlink()
        if not self.path.exists():
            return None, self.path
        if overwrite:
            return None, self.next
        existing = read(self.path)
        if not same(existing):
            raise refuse(existing)
        return existing, self.path

    def commit(self, saved: Path) -> None:
        """``saved`` (the complete file) becomes ``path`` (a no-op when it already is)."""
        if Path(saved) != self.path:
            os.replace(saved, self.path)
            _sync_dir(self.path.parent)

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
