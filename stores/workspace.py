"""The voxelflow workspace: one Zarr v3 group holding every stage's results.

Layout (each stage writes one group; each run of a group is a child node)::

    /frames/<name>/run-000    frames   (time, y, x, rgb) uint8
    /features/<name>/run-000  features (time, feature)   float32
    /bold/<subject>/run-000   bold     (time, voxel)     float32
    /fits/<experiment>/...    r_test (alpha, voxel), best_alpha (voxel), ...

Why one child per run: ``time`` restarts at 0 s in every run, so a single array
over all runs would have a non-monotonic, non-unique ``time`` index on which
``.sel(time=slice(1, 2))`` cannot work.  With one node per run,
``xr.open_datatree(store, engine="zarr")["frames/clip"].sel(time=slice(1, 2))``
selects 1-2 s of every run, and :meth:`Workspace.open_concat` gives the
concatenated (time, ...) view with a ``run`` coordinate for computation.

Write protocol (crash safe, resumable, byte-identical after resume):

1. The writer takes the group's lock (:mod:`voxelflow.stores.locks`: one writer per
   group; a second one is refused at once, naming the holder).
2. The stage group is created with attrs ``voxelflow = {"params": ..., "state":
   "templating"}``; every run's arrays are created from a template (shape, chunks,
   shards, dtype, coordinates) with no data; then ``state`` becomes ``"writing"``.
   Replacing a *complete* group made with other parameters (``--overwrite``) builds
   the new group in a staging store beside it (:mod:`voxelflow.stores.replace`);
   readers keep seeing the old one until the new one is complete.
3. Blocks are written by region writes aligned to whole shards (every chunk written,
   also one equal to the fill value); then the CRC32C of each of the block's files
   goes into ``block_digest`` and its flag in ``block_done (block)`` is set
   (:mod:`voxelflow.stores.integrity`).
4. When every block is done, ``state`` becomes ``"complete"``, a replacement is swapped
   into place (two renames, journalled), the root's consolidated metadata is refreshed
   (``xr.open_datatree`` reads it, so a group that is still being written is not shown
   as if it were finished) and the lock is released.

A rerun with the same parameters skips done blocks; a rerun with other parameters
is refused unless ``overwrite=True`` (``--overwrite`` on the command line).
``voxelflow verify`` (:mod:`voxelflow.stores.verify`) re-reads the files of done
blocks against their digests and clears the flags of damaged ones.
This module does storage only; it never computes on the data.
"""

from __future__ import annotations

import contextlib
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import xarray as xr
import zarr

from voxelflow.pipeline.errors import DamagedData, InputError, WorkspaceBusy, WorkspaceConflict
from voxelflow.stores import guard, integrity, locks, replace
from voxelflow.stores.integrity import BOOKKEEPING, DONE_VAR  # noqa: F401 - re-exported
from voxelflow.stores.params import (FORMAT_VERSION, RUN_PREFIX, STATE_ATTR,  # noqa: F401
                                     _normalise, describe_param_change, run_node_name)
from voxelflow.stores.scratch import SCRATCH_DIR, TransposeScratch
from voxelflow.stores.stage import RunTemplate, StageWriter

DEFAULT_STORE = "voxelflow.zarr"
STAGING_SUFFIX = "~staged"  # a group's replacement while it is written (replace_group)


class Workspace:
    """A voxelflow workspace on disk (a Zarr v3 group, default ``./voxelflow.zarr``).

    A handle may also be a *view* made by :meth:`start_stage` for a replacement: the
    group being rebuilt resolves to its staging store (``_builds``), every other node
    to the workspace itself.  The stage's writer holds that view; everyone else sees
    the old complete group until the replacement is swapped in.
    """

    def __init__(self, path: str | Path = DEFAULT_STORE) -> None:
        self.path = Path(path)
        self._builds: dict[str, Path] = {}        # group -> staging store it is built in
        self._finish_attrs: dict[str, dict] = {}  # group -> attrs set when it completes
        self._recovered = False

    # ------------------------------------------------------------ where nodes live
    def resolved(self) -> "Workspace":
        """The same handle with absolute paths (for processes with another cwd)."""
        ws = self._copy(self.path.resolve())
        ws._builds = {g: p.resolve() for g, p in self._builds.items()}
        return ws

    def _copy(self, path: Path) -> "Workspace":
        ws = type(self)(path)
        ws._builds = dict(self._builds)
        ws._finish_attrs = dict(self._finish_attrs)
        ws._recovered = True
        return ws

    def _building(self, group: str) -> "Workspace":
        """A view in which ``group`` lives in its staging store."""
        ws = self._copy(self.path)
        ws._builds[group] = replace.staging_root(self.path, group)
        return ws

    def _store_for(self, node: str) -> Path:
        for group, root in self._builds.items():
            if node == group or node.startswith(group + "/"):
                return root
        return self.path

    def node_dir(self, node: str) -> Path:
        """The folder of ``node`` on disk (in the staging store while it is rebuilt)."""
        return self._store_for(node) / node

    def storage_errors(self) -> contextlib.AbstractContextManager:
        """Context in which disk-full, permission and damaged-metadata errors become
        one-line :class:`StorageError` s."""
        return guard.storage_errors(self.path)

    def _label(self, group: str) -> str:
        return f"{self.path}: /{group}"

    # ------------------------------------------------------------------ reading
    def _open(self, store: Path, mode: str) -> zarr.Group:
        if store == self.path:
            guard.check_store_path(self.path)
            if mode == "r" and not self.path.exists():
                raise InputError(
                    f"{self.path}: no workspace here; run a stage first (voxelflow frames "
                    f"...) or pass --store PATH"
                )
            self._recover()
        # Our own reads must see groups still being written: never the consolidated view.
        return zarr.open_group(store, mode=mode, zarr_format=3 if mode != "r" else None,
                               use_consolidated=False)

    def _root(self, mode: str = "r") -> zarr.Group:
        return self._open(self.path, mode)

    def _node(self, node: str, mode: str = "r") -> zarr.Group | zarr.Array:
        return self._open(self._store_for(node), mode)[node]

    def _recover(self) -> None:
        """Finish the swaps that killed writers left half done (once per handle; a
        swap whose writer still runs, or a read-only store, is left alone)."""
        if self._recovered:
            return
        self._recovered = True
        for group in replace.interrupted_swaps(self.path):
            if locks.held_here(self.path, group) is not None:
                continue
            try:
                lease = locks.acquire_group(self.path, group, self._label(group), quiet=True)
            except (WorkspaceBusy, OSError):
                continue
            try:
                with self.storage_errors():
                    replace.roll_forward(self.path, group, self.consolidate)
            finally:
                lease.release()

    def attrs(self, group: str) -> dict:
        """The group's attributes (empty dict when the group does not exist)."""
        with self.storage_errors():
            try:
                return dict(self._node(group).attrs)
            except (KeyError, InputError, FileNotFoundError):
                return {}

    def state(self, group: str) -> str | None:
        """``None`` (absent), ``"templating"``, ``"writing"`` or ``"complete"``."""
        info = self.attrs(group).get(STATE_ATTR)
        return None if info is None else info.get("state")

    def params(self, group: str) -> dict | None:
        info = self.attrs(group).get(STATE_ATTR)
        return None if info is None else info.get("params")

    def replacement(self, group: str) -> dict | None:
        """``{"state", "params"}`` of a replacement of ``group`` being built beside it
        (an ``--overwrite`` in progress or interrupted), or None."""
        return replace.staged_info(self.path, group)

    def list_groups(self, kind: str) -> list[str]:
        """Names of the complete groups under ``/kind`` (e.g. ``frames``)."""
        with self.storage_errors():
            try:
                node = self._root("r")[kind]
            except (KeyError, InputError, FileNotFoundError):
                return []
            return sorted(name for name, child in node.groups()
                          if child.attrs.get(STATE_ATTR, {}).get("state") == "complete")

    def child_groups(self, node: str) -> list[str]:
        """Names of the groups directly under ``node`` (any state; [] when absent)."""
        try:
            return sorted(name for name, _ in self._root("r")[node].groups())
        except (KeyError, InputError, FileNotFoundError):
            return []

    def require_complete(self, group: str, hint: str) -> dict:
        """Return the group's attrs or raise naming the command (``hint``) that makes it.

        A complete group is also checked for missing chunk files (a listing, no reads):
        :class:`DamagedData` names the group, run and block and ``voxelflow verify``."""
        state = self.state(group)
        if state is None:
            kind = group.split("/")[0]
            have = ", ".join(self.list_groups(kind)) or "none"
            raise InputError(
                f"{self.path}: no group /{group} (complete {kind} groups: {have}); "
                f"create it with: {hint}"
            )
        if state != "complete":
            raise InputError(
                f"{self.path}: /{group} is unfinished (interrupted run); rerun: {hint}"
            )
        self.check_files(group)
        return self.attrs(group)

    def check_files(self, group: str) -> None:
        """Raise :class:`DamagedData` if a chunk file of the complete ``group`` is missing."""
        strict = int(self.attrs(group).get(STATE_ATTR, {}).get("format", 1)) >= 2
        with self.storage_errors():
            missing = integrity.missing_files(self.node_dir(group), self._node(group), strict)
        if missing:
            more = f" (and {len(missing) - 1} more files)" if len(missing) > 1 else ""
            raise DamagedData(integrity.damage_message(
                self.path, f"{group}/{missing[0]}", "is missing" + more))

    def n_runs(self, group: str) -> int:
        return int(self.attrs(group)[STATE_ATTR]["runs"])

    def open_run(self, group: str, run: int) -> xr.Dataset:
        """One run of a group as a lazy (dask-backed) Dataset, without bookkeeping vars.

        Its reads raise :class:`DamagedData` for a missing or undecodable chunk."""
        return self.open_node(f"{group}/{run_node_name(run)}")

    def open_runs(self, group: str) -> list[xr.Dataset]:
        return [self.open_run(group, r) for r in range(self.n_runs(group))]

    def open_concat(self, group: str) -> xr.Dataset:
        """All runs of a group concatenated along ``time`` (lazy), with the ``run`` coord.

        The ``time`` index of the result is not monotonic (it restarts in each run):
        select by time per run (``open_run``/the DataTree) or by ``run`` first.
        """
        runs = self.open_runs(group)
        if len(runs) == 1:
            return runs[0]
        return xr.concat(runs, dim="time", data_vars="minimal", coords="minimal",
                         compat="override", join="override", combine_attrs="override")

    def open_tree(self) -> xr.DataTree:
        """The whole workspace as an ``xarray.DataTree`` (finished groups)."""
        self._root("r")  # finishes an interrupted swap first
        return xr.open_datatree(self.path, engine="zarr")

    def open_node(self, node: str) -> xr.Dataset:
        """The arrays stored directly in any node (a group or a run) as a lazy Dataset."""
        with self.storage_errors():
            try:
                self._node(node)
            except KeyError:
                raise InputError(f"{self.path}: no group /{node}") from None
            ds = xr.open_zarr(self._store_for(node), group=node, consolidated=False,
                              zarr_format=3, chunks={}, decode_timedelta=False)
        return ds.drop_vars(list(BOOKKEEPING), errors="ignore")

    def has_array(self, node: str, name: str) -> bool:
        """Whether ``node`` (e.g. ``bold/s1`` or ``bold/s1/run-000``) holds array ``name``."""
        with self.storage_errors():
            try:
                return isinstance(self._node(f"{node}/{name}"), zarr.Array)
            except (KeyError, InputError, FileNotFoundError):
                return False

    def read_array(self, node: str, name: str, index: Any = slice(None)) -> np.ndarray:
        """``node/name[index]`` as a NumPy array (reads only the chunks ``index`` touches);
        a missing or undecodable chunk raises :class:`DamagedData`."""
        with self.storage_errors():
            return np.asarray(self._node(f"{node}/{name}")[index])

    def root_attrs(self) -> dict:
        """The workspace root's attributes (empty when there is no workspace yet)."""
        if not (self.path / "zarr.json").is_file():
            return {}
        with self.storage_errors():
            return dict(self._root("r").attrs)

    # ------------------------------------------------------------------ writing
    @staticmethod
    def run_path(group: str, run: int, per_run: bool = True) -> str:
        """Node of run ``run``: ``group/run-NNN``, or ``group`` itself for one-node stages."""
        if not per_run:
            if run != 0:
                raise AssertionError("a one-node stage has a single template")
            return group
        return f"{group}/{run_node_name(run)}"

    @staticmethod
    def normalised(attrs: Mapping[str, Any]) -> dict:
        """``attrs`` as they read back from the store (JSON round trip)."""
        return _normalise(attrs)

    @contextlib.contextmanager
    def _write_lock(self, group: str) -> Iterator[None]:
        """Hold ``group``'s write lock (or use this process's hold of it)."""
        if locks.held_here(self.path, group) is not None:
            yield
            return
        guard.check_writable(self.path, group)
        with self.storage_errors():
            lease = locks.acquire_group(self.path, group, self._label(group))
        try:
            yield
        finally:
            lease.release()

    @contextlib.contextmanager
    def attrs_at_finish(self, group: str, attrs: Mapping[str, Any]) -> Iterator[None]:
        """Within this block, a stage that finishes ``group`` (through this handle) sets
        ``attrs`` on it in the same write that marks it complete (before a replacement
        is swapped in): e.g. the request ``voxelflow run`` records."""
        self._finish_attrs[group] = _normalise(attrs)
        try:
            yield
        finally:
            self._finish_attrs.pop(group, None)

    def _set_state(self, group: str, state: str, extra: Mapping[str, Any] | None = None) -> None:
        with self.storage_errors():
            node = self._node(group, "r+")
            info = dict(node.attrs[STATE_ATTR])
            info["state"] = state
            attrs = dict(node.attrs)
            attrs[STATE_ATTR] = info
            if extra:
                attrs.update(_normalise(extra))
            node.attrs.put(attrs)

    def delete(self, group: str) -> None:
        """Remove a group and everything under it (with its write lock), then refresh
        the metadata.  Through the view of a replacement being built (``writer.workspace``
        of an ``--overwrite``) it drops the replacement only: the old group stays."""
        with self._write_lock(group):
            if group in self._builds:
                with self.storage_errors():
                    replace.discard(self.path, group)
                return
            self._delete(group)

    def _delete(self, group: str) -> None:
        with self.storage_errors():
            root = self._root("r+")
            if group in root:
                del root[group]
            local = self.path / group
            if local.exists():
                shutil.rmtree(local)
            self.consolidate()

    @staticmethod
    def staging_group(group: str) -> str:
        """Where a replacement of ``group`` is written until it is complete."""
        return f"{group}{STAGING_SUFFIX}"

    def replace_group(self, staged: str, group: str) -> None:
        """Put the complete group ``staged`` in the place of ``group`` (local stores).

        The old group is moved aside first and removed only after the new one is in
        place, so a kill leaves either group complete (a leftover ``staged`` or aside
        copy is removed by the next call)."""
        if self.state(staged) != "complete":
            raise AssertionError(f"/{staged} is not complete; nothing replaced")
        target, source = self.path / group, self.path / staged
        aside = self.path / f"{group}{STAGING_SUFFIX}.old"
        if aside.exists():
            shutil.rmtree(aside)
        if target.exists():
            target.rename(aside)
        source.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
        self.consolidate()

    def consolidate(self) -> None:
        """Refresh the root's consolidated metadata so ``xr.open_datatree`` is fast and
        current (under the metadata lock: one process rewrites the root at a time)."""
        with self.storage_errors(), locks.metadata_lock(self.path), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self.path, zarr_format=3)

    def _remove_partial_files(self, group: str) -> None:
        """Drop ``*.partial`` temp files a killed writer left behind (local stores)."""
        local = self.node_dir(group)
        if local.exists():
            for tmp in local.rglob("*.partial"):
                tmp.unlink(missing_ok=True)

    def start_stage(
        self,
        group: str,
        params: Mapping[str, Any],
        templates: list[RunTemplate],
        *,
        overwrite: bool = False,
        group_attrs: Mapping[str, Any] | None = None,
        per_run: bool = True,
    ) -> StageWriter:
        """Lock, create (or reopen for resume) the stage group ``group``; return its writer.

        ``params`` are the parameters that determine the group's content; a group made
        with other params is refused unless ``overwrite``, and then a complete one is
        rebuilt beside it and swapped in by :meth:`StageWriter.finish` (an incomplete
        one is simply replaced).  ``templates`` gives one :class:`RunTemplate` per run.
        A complete group comes back with no pending blocks; an interrupted one (or an
        interrupted replacement with the same params) with its unfinished blocks
        pending.  The writer holds the group's lock until it finishes (or this process
        ends); another writer of the group is refused with :class:`WorkspaceBusy`.
        """
        from voxelflow.stores.stage import open_stage

        return open_stage(self, group, _normalise(params), templates, overwrite=overwrite,
                          group_attrs=_normalise(group_attrs or {}), per_run=per_run)

    def write_dataset(self, group: str, ds: xr.Dataset, params: Mapping[str, Any], *,
                      overwrite: bool = False, encoding: dict | None = None) -> None:
        """Write a small, already computed result group in one go (e.g. fit summaries);
        an existing group is replaced atomically (built beside it, then swapped in)."""
        params = _normalise(params)
        with self._write_lock(group), self.storage_errors():
            self.check_params(group, params, overwrite=overwrite)
            replace.roll_forward(self.path, group, self.consolidate)
            replace.discard(self.path, group)
            target = self if self.state(group) is None else self._building(group)
            ds = ds.copy()
            ds.attrs = {**_normalise(ds.attrs), STATE_ATTR: {
                "params": params, "state": "writing", "runs": 0, "format": FORMAT_VERSION}}
            ds.to_zarr(target._store_for(group), group=group, mode="w", zarr_format=3,
                       consolidated=False, encoding=encoding or {}, write_empty_chunks=True)
            target._set_state(group, "complete")
            if target is self:
                self.consolidate()
            else:
                replace.swap_in(self.path, group, self.consolidate)

    # ------------------------------------------------ per-voxel groups (bold stage)
    # Storage helpers for stages with group-level variables and a two-pass
    # transpose; the maths stays in pipeline/.
    def check_params(self, group: str, params: Mapping[str, Any], *,
                     overwrite: bool = False) -> None:
        """Raise :class:`WorkspaceConflict` now if ``group`` was made with other ``params``.

        :meth:`start_stage` does the same check; calling this first lets a stage refuse a
        conflicting rerun before any expensive work (e.g. computing a mask).
        """
        params = _normalise(params)
        if self.state(group) is None or overwrite:
            return
        old = self.params(group)
        if old != params:
            raise WorkspaceConflict(
                f"{self.path}: /{group} was made with other parameters "
                f"({describe_param_change(old or {}, params)}); rerun with --overwrite "
                f"to replace it, or choose another name"
            )

    def update_attrs(self, group: str, extra: Mapping[str, Any]) -> None:
        """Merge ``extra`` into the attrs of an existing stage group (state unchanged)."""
        with self._write_lock(group):
            self._set_state(group, self.state(group), extra)

    def set_root_attr(self, key: str, value: Any | None) -> None:
        """Set one attribute of the workspace root (``None``: remove it), then refresh the
        consolidated metadata, which rewriting the root's attributes drops."""
        guard.check_writable(self.path)
        with self.storage_errors(), locks.metadata_lock(self.path):
            root = self._root("a")
            attrs = {k: v for k, v in root.attrs.items() if k != key}
            if value is not None:
                attrs.update(_normalise({key: value}))
            root.attrs.put(attrs)
            self.consolidate()

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
