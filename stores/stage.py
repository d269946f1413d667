"""A stage group while it is written: one template per run, and the block writer.

:class:`RunTemplate` describes one run's arrays before any data exists (shapes,
chunks, shards, coordinates) and how they divide into resumable blocks;
:class:`StageWriter` (made by :meth:`Workspace.start_stage
<voxelflow.stores.workspace.Workspace.start_stage>`) writes a block's data region and
then its ``block_done`` flag, and marks the group complete.  Storage only: no maths.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import xarray as xr

if TYPE_CHECKING:
    from voxelflow.stores.workspace import Workspace

DONE_VAR = "block_done"


@dataclass
class RunTemplate:
    """The arrays of one run before any data is written.

    ``dataset`` holds the coordinates as NumPy arrays (written at once) and each data
    variable as a lazy placeholder (``dask.array.empty`` is fine: never computed).
    ``encoding`` gives per-variable ``{"chunks": ..., "shards": ...}``.  Blocks run
    along ``block_dim`` in steps of ``block_size`` samples; ``block_size`` must be a
    whole number of shards of every variable that has ``block_dim``.
    """

    dataset: xr.Dataset
    encoding: dict[str, dict]
    block_dim: str
    block_size: int

    @property
    def length(self) -> int:
        return int(self.dataset.sizes[self.block_dim])

    @property
    def n_blocks(self) -> int:
        return max(1, -(-self.length // self.block_size))

    def block_slice(self, block: int) -> slice:
        start = block * self.block_size
        return slice(start, min(start + self.block_size, self.length))

    def check_alignment(self) -> None:
        """Raise if a block would not cover whole shards (a misaligned write is a bug)."""
        for name, var in self.dataset.data_vars.items():
            if self.block_dim not in var.dims:
                continue
            enc = self.encoding.get(name, {})
            unit = enc.get("shards") or enc.get("chunks")
            if unit is None:
                continue
            axis = var.dims.index(self.block_dim)
            if self.block_size % unit[axis]:
                raise AssertionError(
                    f"block of {self.block_size} along {self.block_dim} is not a whole "
                    f"number of shards ({unit[axis]}) of {name}"
                )


@dataclass
class StageWriter:
    """Writes one stage group block by block; obtained from :meth:`Workspace.start_stage`."""

    workspace: "Workspace"
    group: str
    templates: list[RunTemplate]
    _done: list[np.ndarray] = field(default_factory=list)
    per_run: bool = True

    def run_path(self, run: int) -> str:
        return self.workspace.run_path(self.group, run, self.per_run)

    def pending_blocks(self, run: int) -> list[int]:
        """Indices of the blocks of ``run`` whose data is not yet known to be written."""
        return [int(b) for b in np.flatnonzero(self._done[run] == 0)]

    def pending_keys(self) -> list[tuple[int, int]]:
        """``(run, block)`` of every block not yet known to be written, run by run."""
        return [(run, block) for run in range(len(self.templates))
                for block in self.pending_blocks(run)]

    def for_workers(self) -> "StageWriter":
        """A copy whose workspace path is absolute, for processes with another cwd
        (cluster workers); it writes block data only, the client marks blocks done."""
        return dataclasses.replace(
            self, workspace=type(self.workspace)(Path(self.workspace.path).resolve()))

    def n_pending(self) -> int:
        return int(sum((d == 0).sum() for d in self._done))

    def block_slice(self, run: int, block: int) -> slice:
        return self.templates[run].block_slice(block)

    def write_block(self, run: int, block: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write the data of one block of ``run`` and then mark it done.

        ``arrays`` maps variable name -> data for ``block_slice(run, block)`` along the
        block dimension (full extent along the other dimensions).
        """
        self.write_block_data(run, block, arrays)
        self.mark_done(run, block)

    def write_block_data(self, run: int, block: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write one block's data region only (what a Dask worker does); the client
        process then calls :meth:`mark_done`.  Safe to call concurrently for different
        blocks: regions are shard-aligned, so no two writers touch the same file.

        A variable whose first dimension is ``<block_dim>_block`` (one row per block,
        e.g. a per-block summary ``(voxel_block, permutation)`` chunked one row per
        chunk) gets row ``block``."""
        template = self.templates[run]
        region = template.block_slice(block)
        root = self.workspace._root("r+")
        for name, data in arrays.items():
            var = template.dataset[name]
            if var.dims[0] == f"{template.block_dim}_block":
                root[f"{self.run_path(run)}/{name}"][block] = np.asarray(data, dtype=var.dtype)
                continue
            axis = var.dims.index(template.block_dim)
            expected = region.stop - region.start
            if data.shape[axis] != expected:
                raise AssertionError(
                    f"block {block} of {name} has {data.shape[axis]} samples, expected {expected}"
                )
            index = [slice(None)] * var.ndim
            index[axis] = region
            root[f"{self.run_path(run)}/{name}"][tuple(index)] = np.asarray(data, dtype=var.dtype)

    def write_final(self, run: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write whole variables computed from every block (e.g. statistics over all
        voxels), once no block is pending and before :meth:`finish`; a run killed in
        between recomputes them, since the group is not complete yet."""
        if self.n_pending():
            raise AssertionError(f"{self.group}: {self.n_pending()} blocks not written")
        root = self.workspace._root("r+")
        for name, data in arrays.items():
            var = self.templates[run].dataset[name]
            root[f"{self.run_path(run)}/{name}"][...] = np.asarray(data, dtype=var.dtype)

    def mark_done(self, run: int, block: int) -> None:
        """Set the block's done flag (only the client process does this)."""
        self.workspace._root("r+")[f"{self.run_path(run)}/{DONE_VAR}"][block] = 1
        self._done[run][block] = 1

    def finish(self, extra_attrs: Mapping[str, Any] | None = None) -> None:
        """Mark the group complete (after checking every block) and refresh metadata."""
        if self.n_pending():
            raise AssertionError(f"{self.group}: {self.n_pending()} blocks not written")
        self.workspace._set_state(self.group, "complete", extra_attrs)
        self.workspace.consolidate()
