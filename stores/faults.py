"""Fault injection for the crash tests: SIGKILL this process at a named write step.

``VOXELFLOW_FAULT=STEP`` (or ``STEP@N``) makes the process kill itself with SIGKILL the
first (or ``N``-th) time it reaches :func:`fault_point` ``(STEP)``.  The steps are the
points of the write protocol where a crash leaves a distinct state on disk (a block's
data written but not flagged, a journal written but nothing renamed, ...); the tests
kill a child process at each of them and check what the next run finds.  Unset (the
normal case) it costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

FAULT_ENV = "VOXELFLOW_FAULT"
_reached: Counter = Counter()


def fault_point(step: str) -> None:
    """Die here (SIGKILL, no cleanup) if ``VOXELFLOW_FAULT`` names ``step``."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, nth = spec.partition("@")
    if name != step:
        return
    _reached[step] += 1
    if _reached[step] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
