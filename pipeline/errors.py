"""Errors that the command line turns into a one-line message and a non-zero exit."""

from __future__ import annotations


class VoxelflowError(Exception):
    """A problem with the user's input or workspace, explained in one line.

    The message names the file (or group) at fault and, where there is one, the fix.
    ``cli.main`` prints ``voxelflow: error: <message>`` and exits with status 2.
    """


class InputError(VoxelflowError):
    """A bad input file or argument (missing, unreadable, wrong kind of data)."""


class WorkspaceConflict(VoxelflowError):
    """A workspace group already holds results made with other parameters."""


def exception_reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its class name when the message is empty),
    for quoting a library's error inside a one-line voxelflow message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class WorkspaceBusy(VoxelflowError):
    """Another process holds the write lock of a workspace group."""


class StorageError(VoxelflowError):
    """The workspace cannot be written or read as it is: the disk is full, the store is
    read-only or is not a folder, or its metadata is damaged."""


class DamagedData(VoxelflowError):
    """Stored chunks are missing or unreadable (``voxelflow verify`` finds and clears them)."""
