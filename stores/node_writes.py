"""Array-level writes into existing nodes, for stages with group-level variables and a
two-pass transpose (the BOLD stage): :class:`NodeWrites`, a part of
:class:`~voxelflow.stores.workspace.Workspace`.

Storage only; the maths stays in ``pipeline/``.  These methods write into a node that
a stage created (through :meth:`Workspace.start_stage`) and whose lock it holds; they
resolve the node like every other workspace access (to the staging store while a
replacement is built).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import xarray as xr

from voxelflow.stores import integrity
from voxelflow.stores.params import run_node_name
from voxelflow.stores.scratch import SCRATCH_DIR, TransposeScratch


class NodeWrites:
    """Writes of single arrays and variables into existing nodes, and the transpose
    scratch of a run (mixed into :class:`~voxelflow.stores.workspace.Workspace`, whose
    ``path``, ``_node``, ``_store_for`` and ``storage_errors`` these use)."""

    @contextlib.contextmanager
    def dense_writes(self) -> Iterator[None]:
        """Within this block, chunk writes skip Zarr's "is this chunk all fill value?" test.

        That test (``write_empty_chunks=False``, Zarr's default) allocates several
        chunk-sized temporaries per write (14-19 MB for a 1,200 x 4,096 float32 BOLD
        chunk); data that is never all fill value gains nothing from it.  Every write
        through the workspace now skips it (a missing chunk file must mean damage), per
        array rather than through Zarr's process-wide config (which two threads would
        undo for each other), so this block only keeps stages that ask for it working.
        """
        yield

    def write_array(self, node: str, name: str, values: np.ndarray,
                    index: Any = slice(None)) -> None:
        """Write ``values`` into the existing array ``node/name`` at ``index``."""
        with self.storage_errors():
            arr = integrity.dense(self._node(f"{node}/{name}", "r+"))
            arr[index] = np.asarray(values, dtype=arr.dtype)

    def add_variables(self, node: str, ds: xr.Dataset, *,
                      encoding: dict | None = None) -> None:
        """Add the variables (and coordinates) of ``ds`` to the existing node ``node``.

        The node's attrs are kept.  NumPy-backed variables are written now; dask-backed
        ones are placeholders (array metadata only, filled later with :meth:`write_array`).
        Writing the same variables again is harmless (placeholders are not rewritten).
        """
        with self.storage_errors():
            attrs = dict(self._node(node).attrs)
            ds = ds.copy()
            ds.attrs = attrs
            ds.to_zarr(self._store_for(node), group=node, mode="a", compute=False,
                       zarr_format=3, consolidated=False, encoding=encoding or {},
                       write_empty_chunks=True)
            # to_zarr rewrites the node's attrs from ds.attrs; put back exactly what was
            # there plus anything xarray added (e.g. a "coordinates" list).
            now = dict(self._node(node).attrs)
            if now != attrs:
                self._node(node, "r+").attrs.put({**now, **attrs})

    def scratch(self, group: str, run: int, n_time: int, n_voxel: int,
                time_block: int, voxel_chunk: int, token: str) -> TransposeScratch:
        """The transpose scratch of one run of ``group`` (created or reopened for resume)."""
        path = self.path / SCRATCH_DIR / group / run_node_name(run)
        with self.storage_errors():
            return TransposeScratch(path, n_time, n_voxel, time_block, voxel_chunk, token)

    def scratch_folder(self, group: str, name: str) -> Path:
        """An empty folder ``name`` in the scratch space of ``group`` (created; emptied
        if it held files), for a stage's temporary files (e.g. the joint fit's spilled
        factors); :meth:`remove_scratch` deletes it."""
        path = self.path / SCRATCH_DIR / group / name
        with self.storage_errors():
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        return path

    def remove_scratch(self, group: str) -> None:
        """Delete every scratch array of ``group`` (and empty parent folders)."""
        base = self.path / SCRATCH_DIR
        target = base / group
        if target.exists():
            shutil.rmtree(target)
        parent = target.parent
        while parent != base.parent and parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
