"""Where a stage's blocks run: on threads in this process, or on a Dask cluster.

- :mod:`~voxelflow.pipeline.execution.blocks`: :func:`run_blocks` runs a stage's one
  per-block work object here (compute on this thread, a writer thread behind it) or as
  one task per block on a cluster; :func:`prefetch` reads ahead on a thread;
- :mod:`~voxelflow.pipeline.execution.cluster`: opening a cluster for a command
  (``--scheduler``/``--workers``), submitting block tasks with retries, checking that
  workers see the workspace;
- :mod:`~voxelflow.pipeline.execution.resources`: bounded requests: a block's memory
  and a stage's output on disk checked against what this machine has, before any work.
"""

from voxelflow.pipeline.execution.blocks import BlockWork, prefetch, run_blocks
from voxelflow.pipeline.execution.cluster import (active_client, dask_client,
                                                  require_shared_path, run_block_tasks)
from voxelflow.pipeline.execution.resources import check_disk, check_memory, check_request

__all__ = ["BlockWork", "active_client", "check_disk", "check_memory", "check_request",
           "dask_client", "prefetch", "require_shared_path", "run_block_tasks", "run_blocks"]
