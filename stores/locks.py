"""One writer per group: an exclusive lock file per group inside the store.

``<store>/.locks/<group>.lock`` is locked with :mod:`filelock` (``flock``; filelock
falls back to its own soft lock on file systems without ``flock``) for as long as a
stage writes the group; ``<group>.lock.json`` beside it names the holder (pid, host,
start time, command line) so that a second writer can say who holds it.  The
``.locks`` folder has no ``zarr.json``: Zarr and xarray never list it.

* A second writer refuses at once (:class:`WorkspaceBusy`, one line naming the holder).
* A lock whose holder died (``kill -9``, a crash, a lost node) is free again (the
  kernel drops a dead process's ``flock``); the next writer takes it over and prints
  one note naming the process that left it.
* Readers never lock.  On a Dask cluster the client process holds the lock; workers
  write block regions without it.
* Within one process, the thread that started a group may start it again (the earlier
  attempt has ended, e.g. with an error); another live thread is refused like another
  process.

:func:`metadata_lock` serialises the short read-modify-writes of the root's
``zarr.json`` (consolidated metadata, root attributes) between processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import filelock

from voxelflow.pipeline.errors import WorkspaceBusy

LOCK_DIR = ".locks"
METADATA_LOCK = ".workspace"  # not a valid group name (names never start with ".")
METADATA_WAIT_S = 300.0

_held: dict[str, "GroupLock"] = {}  # lock file (absolute) -> the lock this process holds
_held_guard = threading.Lock()


def lock_file(store: Path, name: str) -> Path:
    """``<store>/.locks/<name>.lock`` (``name``: a group path such as ``frames/clip``)."""
    return Path(store) / LOCK_DIR / f"{name}.lock"


@dataclass
class GroupLock:
    """The write lock of one group, held by this process (see :func:`acquire_group`)."""

    path: Path
    label: str
    _lock: filelock.BaseFileLock = field(repr=False)
    thread: threading.Thread = field(default_factory=threading.current_thread, repr=False)
    released: bool = False

    @property
    def info_path(self) -> Path:
        return self.path.with_name(self.path.name + ".json")

    def release(self) -> None:
        """Drop the lock (the holder record first, while the lock is still ours)."""
        with _held_guard:
            if self.released:
                return
            self.released = True
            if _held.get(str(self.path)) is self:
                del _held[str(self.path)]
        with contextlib.suppress(OSError):
            self.info_path.unlink()
        self._lock.release(force=True)


def held_here(store: Path, group: str) -> GroupLock | None:
    """The lock of ``group`` if this process holds it (else None)."""
    with _held_guard:
        return _held.get(str(lock_file(Path(store).absolute(), group)))


def acquire_group(store: Path, group: str, label: str | None = None, *,
                  quiet: bool = False) -> GroupLock:
    """Take the write lock of ``group`` now, or raise :class:`WorkspaceBusy` naming the
    process that holds it.  A lock left by a dead process is taken over with a note on
    stderr (``quiet``: without it, for housekeeping that is not a stage)."""
    path = lock_file(Path(store).absolute(), group)
    label = label or f"{store}: /{group}"
    with _held_guard:
        held = _held.get(str(path))
        if held is not None:
            me = threading.current_thread()
            if held.thread is not me and held.thread.is_alive():
                raise WorkspaceBusy(f"{label} is being written by another thread of this "
                                    f"process ({held.thread.name}); wait for it to finish")
            held.thread = me  # the same thread's earlier attempt has ended
            return held
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise WorkspaceBusy(busy_message(label, read_holder(path))) from None
    taken = GroupLock(path, label, lock)
    try:
        previous = read_holder(path)
        if previous and previous.get("pid") != os.getpid() and not quiet:
            print(f"voxelflow: note: taking over the lock of {label}: "
                  f"{_describe(previous)} no longer holds it (it stopped without "
                  f"finishing); its finished blocks are kept", file=sys.stderr)
        _write_holder(taken.info_path)
    except BaseException:
        lock.release(force=True)
        raise
    with _held_guard:
        _held[str(path)] = taken
    return taken


def read_holder(path: Path) -> dict | None:
    """The holder record beside lock file ``path`` (``None``: none or unreadable)."""
    try:
        info = json.loads(path.with_name(path.name + ".json").read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def holder_alive(holder: dict) -> bool | None:
    """Whether the holder's process still runs (None: it runs on another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def busy_message(label: str, holder: dict | None) -> str:
    """``LABEL is being written by pid 4121 on host-a since 10:02 (voxelflow ...); ...``."""
    if not holder:
        return (f"{label} is being written by another process (its lock is held); "
                f"wait or stop it")
    return f"{label} is being written by {_describe(holder)}; wait or stop it"


def _describe(holder: dict) -> str:
    since = holder.get("started", 0.0)
    try:
        moment = time.localtime(float(since))
        today = time.localtime()
        fmt = "%H:%M" if moment[:3] == today[:3] else "%Y-%m-%d %H:%M"
        when = time.strftime(fmt, moment)
    except (TypeError, ValueError, OverflowError):
        when = "?"
    command = str(holder.get("command", ""))
    if len(command) > 70:
        command = command[:67] + "..."
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {when}"
            + (f" ({command})" if command else ""))


def _command_line() -> str:
    argv = list(sys.argv) or ["python"]
    name = Path(argv[0]).name
    if name in ("cli.py", "__main__.py"):
        name = "voxelflow"
    return " ".join([name, *argv[1:]])


def _write_holder(info_path: Path) -> None:
    """Write the holder record atomically (temp file + rename)."""
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": _command_line()}
    tmp = info_path.with_name(f"{info_path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, info_path)


@contextlib.contextmanager
def metadata_lock(store: Path) -> Iterator[None]:
    """Hold the workspace's metadata lock (blocking, re-entrant within a thread) around a
    read-modify-write of the root's ``zarr.json``."""
    path = lock_file(Path(store).absolute(), METADATA_LOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path), timeout=METADATA_WAIT_S, is_singleton=True)
    with lock:
        yield
