"""A stage group while it is written: one template per run, and the block writer.

:class:`RunTemplate` describes one run's arrays before any data exists (shapes,
chunks, shards, coordinates) and how they divide into resumable blocks;
:class:`StageWriter` (made by :meth:`Workspace.start_stage
<voxelflow.stores.workspace.Workspace.start_stage>`) writes a block's data region,
then its digests and its ``block_done`` flag, and at the end marks the group complete
(swapping a replacement built beside the old group into place) and releases the
group's write lock.  Storage only: no maths.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import dask.array as da
import numpy as np
import xarray as xr

from voxelflow.pipeline.errors import WorkspaceConflict
from voxelflow.stores import guard, integrity, locks, replace
from voxelflow.stores.faults import fault_point
from voxelflow.stores.integrity import DIGEST_VAR, DONE_VAR
from voxelflow.stores.params import FORMAT_VERSION, STATE_ATTR, describe_param_change

if TYPE_CHECKING:
    from voxelflow.stores.locks import GroupLock
    from voxelflow.stores.workspace import Workspace


@dataclass
class RunTemplate:
    """The arrays of one run before any data is written.

    ``dataset`` holds the coordinates as NumPy arrays (written at once) and each data
    variable as a lazy placeholder (``dask.array.empty`` is fine: never computed).
    ``encoding`` gives per-variable ``{"chunks": ..., "shards": ...}``.  Blocks run
    along ``block_dim`` in steps of ``block_size`` samples; ``block_size`` must be a
    whole number of shards of every variable that has ``block_dim``.  ``final`` names
    variables with ``block_dim`` that no block writes: :meth:`StageWriter.write_final`
    writes them whole once every block is done (they get no block digests; ``voxelflow
    verify`` checks them by reading).
    """

    dataset: xr.Dataset
    encoding: dict[str, dict]
    block_dim: str
    block_size: int
    final: tuple[str, ...] = ()

    @property
    def length(self) -> int:
        return int(self.dataset.sizes[self.block_dim])

    @property
    def n_blocks(self) -> int:
        return max(1, -(-self.length // self.block_size))

    def block_slice(self, block: int) -> slice:
        start = block * self.block_size
        return slice(start, min(start + self.block_size, self.length))

    @property
    def block_variables(self) -> list[str]:
        """The data variables each block writes (those with the block dimension, but
        not the ``final`` ones)."""
        return integrity.block_variables(
            {name: var.dims for name, var in self.dataset.data_vars.items()
             if name not in self.final}, self.block_dim)

    def files_per_block(self) -> int:
        """Chunk (or shard) files a full block writes: the width of ``block_digest``."""
        total = 0
        for name in self.block_variables:
            var = self.dataset[name]
            enc = self.encoding.get(name, {})
            unit = enc.get("shards") or enc.get("chunks") or tuple(c[0] for c in var.chunks)
            count = 1
            for dim, size, step in zip(var.dims, var.shape, unit):
                extent = min(self.block_size, size) if dim == self.block_dim else size
                count *= -(-extent // step)
            total += count
        return total

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
    """Writes one stage group block by block; obtained from :meth:`Workspace.start_stage`.

    ``workspace`` is where the group is being written: the workspace itself, or (for a
    replacement of a complete group) a view of it whose ``group`` lives in a staging
    store until :meth:`finish` swaps it in.  Only the process that started the stage
    (the client on a cluster) marks blocks done and finishes; :meth:`for_workers` gives
    the copy that cluster workers use to write block data.
    """

    workspace: "Workspace"
    group: str
    templates: list[RunTemplate]
    _done: list[np.ndarray] = field(default_factory=list)
    per_run: bool = True
    _digest_width: list[int] = field(default_factory=list, repr=False)
    _lease: "GroupLock | None" = field(default=None, repr=False, compare=False)
    _replaces: "Workspace | None" = field(default=None, repr=False, compare=False)
    _finish_attrs: dict = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_lease=None, _replaces=None)  # the lock stays with this process
        return state

    def run_path(self, run: int) -> str:
        return self.workspace.run_path(self.group, run, self.per_run)

    @property
    def replacing(self) -> bool:
        """Whether this writer builds a replacement of a complete group (``--overwrite``)."""
        return self._replaces is not None

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
        return dataclasses.replace(self, workspace=self.workspace.resolved(), _lease=None,
                                   _replaces=None)

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
        Every chunk is written, also one equal to the fill value (a missing chunk file
        then always means damage).

        A variable whose first dimension is ``<block_dim>_block`` (one row per block,
        e.g. a per-block summary ``(voxel_block, permutation)`` chunked one row per
        chunk) gets row ``block``."""
        template = self.templates[run]
        region = template.block_slice(block)
        with self.workspace.storage_errors():
            node = self.workspace._node(self.run_path(run), "r+")
            for name, data in arrays.items():
                var = template.dataset[name]
                if var.dims[0] == f"{template.block_dim}_block":
                    integrity.dense(node[name])[block] = np.asarray(data, dtype=var.dtype)
                    continue
                axis = var.dims.index(template.block_dim)
                expected = region.stop - region.start
                if data.shape[axis] != expected:
                    raise AssertionError(f"block {block} of {name} has {data.shape[axis]} "
                                         f"samples, expected {expected}")
                index = [slice(None)] * var.ndim
                index[axis] = region
                integrity.dense(node[name])[tuple(index)] = np.asarray(data, dtype=var.dtype)
        fault_point("block:data-written")

    def write_final(self, run: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Write whole variables computed from every block (e.g. statistics over all
        voxels), once no block is pending and before :meth:`finish`; a run killed in
        between recomputes them, since the group is not complete yet."""
        if self.n_pending():
            raise AssertionError(f"{self.group}: {self.n_pending()} blocks not written")
        with self.workspace.storage_errors():
            node = self.workspace._node(self.run_path(run), "r+")
            for name, data in arrays.items():
                var = self.templates[run].dataset[name]
                integrity.dense(node[name])[...] = np.asarray(data, dtype=var.dtype)

    def mark_done(self, run: int, block: int) -> None:
        """Record the digests of the block's files, then set its done flag (only the
        client process does this; the flag is what makes the block count as written)."""
        with self.workspace.storage_errors():
            node_path = self.run_path(run)
            node = self.workspace._node(node_path, "r+")
            width = self._digest_width[run] if self._digest_width else 0
            if width:
                template = self.templates[run]
                keys = integrity.block_files(node, template.block_variables,
                                             template.block_dim, template.block_slice(block))
                if len(keys) > width:
                    raise AssertionError(f"{node_path}: block {block} has {len(keys)} "
                                         f"files, block_digest has room for {width}")
                node_dir = self.workspace.node_dir(node_path)
                node[DIGEST_VAR][block] = integrity.digest_row(node_dir, keys, width)
            fault_point("block:digest-written")
            node[DONE_VAR][block] = 1
        self._done[run][block] = 1
        fault_point("block:marked")

    def finish(self, extra_attrs: Mapping[str, Any] | None = None) -> None:
        """Mark the group complete (after checking every block), swap a replacement into
        place, refresh the consolidated metadata and release the group's lock."""
        if self.n_pending():
            raise AssertionError(f"{self.group}: {self.n_pending()} blocks not written")
        extra = {**self._finish_attrs, **(extra_attrs or {})}
        ws = self.workspace
        if ws.state(self.group) != "complete" or any(
                ws.attrs(self.group).get(k) != v for k, v in ws.normalised(extra).items()):
            ws._set_state(self.group, "complete", extra)
        fault_point("finish:complete")
        main = self._replaces
        if main is not None:
            staging = replace.staging_root(main.path, self.group)
            if not (staging / self.group).exists():
                raise AssertionError(f"{staging}: the replacement of {self.group} is gone")
            replace.swap_in(main.path, self.group, main.consolidate)
        else:
            ws.consolidate()
        self.release()

    def release(self) -> None:
        """Release the group's write lock (``finish`` does; also safe to call twice)."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None


# ------------------------------------------------------------ starting a stage
def open_stage(ws: "Workspace", group: str, params: dict, templates: list[RunTemplate], *,
               overwrite: bool, group_attrs: dict, per_run: bool) -> StageWriter:
    """What :meth:`Workspace.start_stage` does (``params``/``group_attrs`` normalised):
    check, lock, decide where the group is written, create or reopen it."""
    for t in templates:
        t.check_alignment()
    ws.state(group)  # a damaged zarr.json or a --store that is a file: refused here
    guard.check_writable(ws.path, group)
    with ws.storage_errors():
        lease = locks.acquire_group(ws.path, group, ws._label(group))
    try:
        with ws.storage_errors():
            target = _where_to_write(ws, group, params, overwrite)
            if target.state(group) is None:
                _create_group(target, group, params, templates, group_attrs, per_run)
            else:
                target._remove_partial_files(group)
            root = target._open(target._store_for(group), "r")
            nodes = [ws.run_path(group, r, per_run) for r in range(len(templates))]
            done = [np.asarray(root[f"{n}/{DONE_VAR}"][:]).astype("u1") for n in nodes]
            widths = [int(root[n][DIGEST_VAR].shape[1]) if DIGEST_VAR in root[n] else 0
                      for n in nodes]
    except BaseException:
        lease.release()
        raise
    fault_point("stage:started")
    return StageWriter(target, group, templates, done, per_run, widths, lease,
                       ws if target is not ws else None,
                       dict(ws._finish_attrs.get(group, {})))


def _where_to_write(ws: "Workspace", group: str, params: dict, overwrite: bool) -> "Workspace":
    """``ws`` (write in place: new group, resume, or an incomplete group replaced) or a
    view that builds ``group`` in its staging store (a complete group replaced).  Runs
    under the group's lock: finishes an interrupted swap, drops an abandoned
    replacement made with other params."""
    replace.roll_forward(ws.path, group, ws.consolidate)
    state, old = ws.state(group), ws.params(group)
    staged = replace.staged_info(ws.path, group)
    if state is not None and old != params and not overwrite:
        waiting = staged is not None and staged.get("params") == params
        raise WorkspaceConflict(
            f"{ws.path}: /{group} was made with other parameters "
            f"({describe_param_change(old or {}, params)}); rerun with --overwrite to "
            + ("finish its interrupted replacement with these parameters" if waiting else
               "replace it, or choose another name"))
    rebuild = state == "complete" and old != params
    if staged is not None and not (rebuild and staged.get("params") == params
                                   and staged.get("state") in ("writing", "complete")):
        replace.discard(ws.path, group)
    if rebuild:
        return ws._building(group)
    if state is not None and (old != params or state == "templating"):
        ws._delete(group)  # nothing complete to keep
    return ws


def _create_group(ws: "Workspace", group: str, params: dict, templates: list[RunTemplate],
                  group_attrs: dict, per_run: bool) -> None:
    """The group node with its state attrs, then every run's arrays from its template
    (coordinates written, data placeholders, ``block_done`` and ``block_digest``)."""
    node = ws._open(ws._store_for(group), "a").require_group(group)
    info = {"params": params, "state": "templating",
            "runs": len(templates) if per_run else 0, "format": FORMAT_VERSION,
            "block_dim": templates[0].block_dim, "block_size": int(templates[0].block_size),
            "block_vars": templates[0].block_variables}
    attrs = {**group_attrs, STATE_ATTR: info}
    node.attrs.put(attrs)
    fault_point("stage:templating")
    for run, template in enumerate(templates):
        n_blocks, width = template.n_blocks, max(template.files_per_block(), 1)
        ds = template.dataset.copy()
        ds[DONE_VAR] = (("block",), da.zeros(n_blocks, dtype="u1", chunks=1))
        ds[DIGEST_VAR] = (("block", integrity.DIGEST_DIM),
                          da.zeros((n_blocks, width), dtype="u8", chunks=(1, width)))
        encoding = {DONE_VAR: {"chunks": (1,)}, DIGEST_VAR: {"chunks": (1, width)},
                    **template.encoding}
        if not per_run:
            # The template is the group node itself: keep the state attrs on it.
            ds.attrs = {**ws.normalised(ds.attrs), **attrs}
        ds.to_zarr(ws._store_for(group), group=ws.run_path(group, run, per_run),
                   mode="w" if per_run else "a", compute=False, zarr_format=3,
                   consolidated=False, encoding=encoding, write_empty_chunks=True)
    ws._set_state(group, "writing")
