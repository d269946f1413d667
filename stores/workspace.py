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

1. The stage group is created with attrs ``voxelflow = {"params": ..., "state":
   "templating"}``; every run's arrays are created from a template (shape, chunks,
   shards, dtype, coordinates) with no data; then ``state`` becomes ``"writing"``.
2. Blocks are written by region writes aligned to whole shards; after a block's
   data, its flag in ``block_done (block)`` is set.
3. When every block is done, ``state`` becomes ``"complete"`` and the root's
   consolidated metadata is refreshed (``xr.open_datatree`` reads it, so a group
   that is still being written is not shown as if it were finished).

A rerun with the same parameters skips done blocks; a rerun with other parameters
is refused unless ``overwrite=True`` (``--overwrite`` on the command line).
This module does storage only; it never computes on the data.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from voxelflow.pipeline.errors import InputError, WorkspaceConflict
from voxelflow.stores.scratch import SCRATCH_DIR, TransposeScratch
from voxelflow.stores.stage import DONE_VAR, RunTemplate, StageWriter

DEFAULT_STORE = "voxelflow.zarr"
STATE_ATTR = "voxelflow"
RUN_PREFIX = "run-"
FORMAT_VERSION = 1
STAGING_SUFFIX = "~staged"  # a group's replacement while it is written (replace_group)


def run_node_name(run: int) -> str:
    """Name of the child node holding run ``run`` (0-based): ``run-000``."""
    return f"{RUN_PREFIX}{run:03d}"


def _normalise(params: Mapping[str, Any]) -> dict:
    """JSON round trip so that tuples/np scalars compare equal to what was stored."""
    return json.loads(json.dumps(params, sort_keys=True, default=_json_default))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store {type(obj).__name__} in attrs")


def describe_param_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """One-line summary of which parameters differ: ``fps: 20 -> 2; size: 224 -> 112``."""
    keys = sorted(set(old) | set(new))
    parts = []
    for key in keys:
        if old.get(key) != new.get(key):
            a, b = json.dumps(old.get(key)), json.dumps(new.get(key))
            if len(a) > 60:
                a = a[:57] + "..."
            if len(b) > 60:
                b = b[:57] + "..."
            parts.append(f"{key}: {a} -> {b}")
    return "; ".join(parts)


class Workspace:
    """A voxelflow workspace on disk (a Zarr v3 group, default ``./voxelflow.zarr``)."""

    def __init__(self, path: str | Path = DEFAULT_STORE) -> None:
        self.path = Path(path)

    # ------------------------------------------------------------------ reading
    def _root(self, mode: str = "r") -> zarr.Group:
        if mode == "r" and not self.path.exists():
            raise InputError(
                f"{self.path}: no workspace here; run a stage first (voxelflow frames ...) "
                f"or pass --store PATH"
            )
        # Our own reads must see groups still being written: never the consolidated view.
        return zarr.open_group(self.path, mode=mode, zarr_format=3 if mode != "r" else None,
                               use_consolidated=False)

    def attrs(self, group: str) -> dict:
        """The group's attributes (empty dict when the group does not exist)."""
        try:
            return dict(self._root("r")[group].attrs)
        except (KeyError, InputError, FileNotFoundError):
            return {}

    def state(self, group: str) -> str | None:
        """``None`` (absent), ``"templating"``, ``"writing"`` or ``"complete"``."""
        info = self.attrs(group).get(STATE_ATTR)
        return None if info is None else info.get("state")

    def params(self, group: str) -> dict | None:
        info = self.attrs(group).get(STATE_ATTR)
        return None if info is None else info.get("params")

    def list_groups(self, kind: str) -> list[str]:
        """Names of the complete groups under ``/kind`` (e.g. ``frames``)."""
        try:
            node = self._root("r")[kind]
        except (KeyError, InputError, FileNotFoundError):
            return []
        names = []
        for name, child in node.groups():
            if child.attrs.get(STATE_ATTR, {}).get("state") == "complete":
                names.append(name)
        return sorted(names)

    def require_complete(self, group: str, hint: str) -> dict:
        """Return the group's attrs or raise naming the command (``hint``) that makes it."""
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
        return self.attrs(group)

    def n_runs(self, group: str) -> int:
        return int(self.attrs(group)[STATE_ATTR]["runs"])

    def open_run(self, group: str, run: int) -> xr.Dataset:
        """One run of a group as a lazy (dask-backed) Dataset, without bookkeeping vars."""
        ds = xr.open_zarr(
            self.path, group=f"{group}/{run_node_name(run)}", consolidated=False,
            zarr_format=3, chunks={}, decode_timedelta=False,
        )
        return ds.drop_vars([DONE_VAR], errors="ignore")

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
        return xr.open_datatree(self.path, engine="zarr")

    # ------------------------------------------------------------------ writing
    @staticmethod
    def run_path(group: str, run: int, per_run: bool = True) -> str:
        """Node of run ``run``: ``group/run-NNN``, or ``group`` itself for one-node stages."""
        if not per_run:
            if run != 0:
                raise AssertionError("a one-node stage has a single template")
            return group
        return f"{group}/{run_node_name(run)}"

    def _set_state(self, group: str, state: str, extra: Mapping[str, Any] | None = None) -> None:
        node = self._root("r+")[group]
        info = dict(node.attrs[STATE_ATTR])
        info["state"] = state
        attrs = dict(node.attrs)
        attrs[STATE_ATTR] = info
        if extra:
            attrs.update(_normalise(extra))
        node.attrs.put(attrs)

    def delete(self, group: str) -> None:
        """Remove a group and everything under it, then refresh the metadata."""
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
        """Refresh the root's consolidated metadata so ``xr.open_datatree`` is fast and current."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self.path, zarr_format=3)

    def _remove_partial_files(self, group: str) -> None:
        """Drop ``*.partial`` temp files a killed writer left behind (local stores)."""
        local = self.path / group
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
        """Create (or reopen for resume) the stage group ``group`` and return its writer.

        ``params`` are the parameters that determine the group's content; a group made
        with other params is refused unless ``overwrite``.  ``templates`` gives one
        :class:`RunTemplate` per run.  A complete group comes back with no pending
        blocks; an interrupted one with its unfinished blocks pending.
        """
        params = _normalise(params)
        for t in templates:
            t.check_alignment()
        state = self.state(group)
        if state is not None:
            old = self.params(group)
            if old != params and not overwrite:
                raise WorkspaceConflict(
                    f"{self.path}: /{group} was made with other parameters "
                    f"({describe_param_change(old or {}, params)}); rerun with --overwrite "
                    f"to replace it, or choose another --name"
                )
            if old != params or state == "templating":
                self.delete(group)
                state = None
        if state is None:
            self._create_group(group, params, templates, group_attrs or {}, per_run)
        else:
            self._remove_partial_files(group)
        done = [self._read_done(self.run_path(group, r, per_run)) for r in range(len(templates))]
        return StageWriter(self, group, templates, done, per_run)

    def _create_group(self, group: str, params: dict, templates: list[RunTemplate],
                      group_attrs: Mapping[str, Any], per_run: bool = True) -> None:
        root = self._root("a")
        node = root.require_group(group)
        attrs = _normalise(group_attrs)
        info = {"params": params, "state": "templating",
                "runs": len(templates) if per_run else 0, "format": FORMAT_VERSION}
        attrs[STATE_ATTR] = info
        node.attrs.put(attrs)
        for run, template in enumerate(templates):
            ds = template.dataset.copy()
            ds[DONE_VAR] = (("block",), da.zeros(template.n_blocks, dtype="u1", chunks=1))
            encoding = {DONE_VAR: {"chunks": (1,)}, **template.encoding}
            if not per_run:
                # The template is the group node itself: keep the state attrs on it.
                ds.attrs = {**_normalise(ds.attrs), **attrs}
            ds.to_zarr(
                self.path, group=self.run_path(group, run, per_run), mode="w" if per_run else "a",
                compute=False, zarr_format=3, consolidated=False, encoding=encoding,
            )
        self._set_state(group, "writing")

    def _read_done(self, node: str) -> np.ndarray:
        arr = self._root("r")[f"{node}/{DONE_VAR}"]
        return np.asarray(arr[:]).astype("u1")

    def write_dataset(self, group: str, ds: xr.Dataset, params: Mapping[str, Any], *,
                      overwrite: bool = False, encoding: dict | None = None) -> None:
        """Write a small, already computed result group in one go (e.g. fit summaries)."""
        params = _normalise(params)
        state = self.state(group)
        if state is not None and self.params(group) != params and not overwrite:
            raise WorkspaceConflict(
                f"{self.path}: /{group} was made with other parameters "
                f"({describe_param_change(self.params(group) or {}, params)}); rerun with "
                f"--overwrite to replace it"
            )
        if state is not None:
            self.delete(group)
        ds = ds.copy()
        ds.attrs = {**_normalise(ds.attrs), STATE_ATTR: {
            "params": params, "state": "writing", "runs": 0, "format": FORMAT_VERSION}}
        ds.to_zarr(self.path, group=group, mode="w", zarr_format=3, consolidated=False,
                   encoding=encoding or {})
        self._set_state(group, "complete")
        self.consolidate()

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
        self._set_state(group, self.state(group), extra)

    def root_attrs(self) -> dict:
        """The workspace root's attributes (empty when there is no workspace yet)."""
        if not (self.path / "zarr.json").is_file():
            return {}
        return dict(self._root("r").attrs)

    def set_root_attr(self, key: str, value: Any | None) -> None:
        """Set one attribute of the workspace root (``None``: remove it), then refresh the
        consolidated metadata, which rewriting the root's attributes drops."""
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
        chunk); data that is never all fill value gains nothing from it.
        """
        with zarr.config.set({"array.write_empty_chunks": True}):
            yield

    def has_array(self, node: str, name: str) -> bool:
        """Whether ``node`` (e.g. ``bold/s1`` or ``bold/s1/run-000``) holds array ``name``."""
        try:
            return isinstance(self._root("r")[f"{node}/{name}"], zarr.Array)
        except (KeyError, InputError, FileNotFoundError):
            return False

    def read_array(self, node: str, name: str, index: Any = slice(None)) -> np.ndarray:
        """``node/name[index]`` as a NumPy array (reads only the chunks ``index`` touches)."""
        return np.asarray(self._root("r")[f"{node}/{name}"][index])

    def write_array(self, node: str, name: str, values: np.ndarray,
                    index: Any = slice(None)) -> None:
        """Write ``values`` into the existing array ``node/name`` at ``index``."""
        arr = self._root("r+")[f"{node}/{name}"]
        arr[index] = np.asarray(values, dtype=arr.dtype)

    def add_variables(self, node: str, ds: xr.Dataset, *,
                      encoding: dict | None = None) -> None:
        """Add the variables (and coordinates) of ``ds`` to the existing node ``node``.

        The node's attrs are kept.  NumPy-backed variables are written now; dask-backed
        ones are placeholders (array metadata only, filled later with :meth:`write_array`).
        Writing the same variables again is harmless (placeholders are not rewritten).
        """
        attrs = dict(self._root("r")[node].attrs)
        ds = ds.copy()
        ds.attrs = attrs
        ds.to_zarr(self.path, group=node, mode="a", compute=False, zarr_format=3,
                   consolidated=False, encoding=encoding or {})
        # to_zarr rewrites the node's attrs from ds.attrs; put back exactly what was there
        # plus anything xarray added (e.g. a "coordinates" list).
        now = dict(self._root("r")[node].attrs)
        if now != attrs:
            merged = {**now, **attrs}
            self._root("r+")[node].attrs.put(merged)

    def open_node(self, node: str) -> xr.Dataset:
        """The arrays stored directly in any node (a group or a run) as a lazy Dataset."""
        try:
            self._root("r")[node]
        except KeyError:
            raise InputError(f"{self.path}: no group /{node}") from None
        ds = xr.open_zarr(self.path, group=node, consolidated=False, zarr_format=3, chunks={},
                          decode_timedelta=False)
        return ds.drop_vars([DONE_VAR], errors="ignore")

    def scratch(self, group: str, run: int, n_time: int, n_voxel: int,
                time_block: int, voxel_chunk: int, token: str) -> TransposeScratch:
        """The transpose scratch of one run of ``group`` (created or reopened for resume)."""
        path = self.path / SCRATCH_DIR / group / run_node_name(run)
        return TransposeScratch(path, n_time, n_voxel, time_block, voxel_chunk, token)

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

