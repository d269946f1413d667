"""Any ``(time, feature)`` arrays -> a features group, like the features stage writes.

``/features/<name>/run-NNN``  features (time, feature) float32, with coordinates
``time`` (s from the run's onset), ``run`` (time,) and ``feature`` (names, strings)

:func:`write_features` is the public way to store features that voxelflow did not
compute (annotations, word embeddings, motion energy, audio, another toolbox's
outputs): one :class:`xarray.DataArray` per run, checked (dims, dtype, finite values,
strictly increasing times, the same feature names in every run), converted to
float32 (a warning says so when the values were another dtype) and written through
the same template / block / done-flag protocol as every stage, so the group is
resumable, refuses other content without ``overwrite``, and is read by ``voxelflow
fit`` like CNN features.  ``voxelflow events`` and ``voxelflow import-features`` use
it too.

Every features group has a ``feature`` coordinate: :func:`feature_labels` gives the
CNN stage's (``unit-0000`` ... for a vector layer, ``c12_y3_x4`` for a flattened
``(channel, y, x)`` map); events use their category names, tables their column names.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import dask.array as da
import numpy as np
import xarray as xr

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.execution.blocks import run_blocks
from voxelflow.stores.names import check_name
from voxelflow.stores.workspace import RunTemplate, StageWriter, Workspace

__all__ = ["FEATURE_DTYPE", "check_feature_runs", "choose_block_size", "feature_labels",
           "feature_template", "file_sha256", "write_features"]

FEATURE_DTYPE = np.dtype(np.float32)
BLOCK_MAX = 1024  # time points per block (= per chunk) for narrow features
BLOCK_MIN = 16
BLOCK_BYTES = 64 * 2**20  # a block of all layers' features stays below this


def choose_block_size(n_features: Sequence[int]) -> int:
    """Time points per block: 1,024, halved until a block of all layers is <= 64 MB."""
    per_frame = 4 * sum(n_features)
    size = BLOCK_MAX
    while size > BLOCK_MIN and size * per_frame > BLOCK_BYTES:
        size //= 2
    return size


def feature_labels(shape: Sequence[int]) -> np.ndarray:
    """Names of the flattened features of a per-sample output of ``shape`` (C order).

    ``(n,)`` -> ``unit-0000 .. unit-{n-1}`` (zero-padded to at least 4 digits);
    ``(C, H, W)`` -> ``c{c}_y{y}_x{x}``; other ranks -> ``u{i}_{j}...``.  An object
    array of ``str`` (stored as Zarr's variable-length ``string`` type).
    """
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape)) if shape else 1
    if len(shape) <= 1:
        width = max(4, len(str(max(n - 1, 0))))
        return np.array([f"unit-{i:0{width}d}" for i in range(n)], dtype=object)
    index = np.unravel_index(np.arange(n), shape)
    if len(shape) == 3:
        return np.array([f"c{c}_y{y}_x{x}" for c, y, x in zip(*index)], dtype=object)
    return np.array(["u" + "_".join(str(int(i)) for i in idx) for idx in zip(*index)],
                    dtype=object)


def feature_template(times: np.ndarray, run: int, names: np.ndarray, block: int,
                     long_name: str, time_attrs: Mapping[str, Any] | None = None,
                     run_values: np.ndarray | None = None,
                     run_attrs: Mapping[str, Any] | None = None) -> RunTemplate:
    """``features (time, feature) float32`` of one run, with ``time``, ``run`` and
    ``feature`` coordinates; blocks of ``block`` time points (one chunk each)."""
    n, n_features = int(times.size), int(len(names))
    data = da.empty((n, n_features), dtype=FEATURE_DTYPE,
                    chunks=(min(block, max(n, 1)), n_features))
    runs = np.full(n, run, np.int32) if run_values is None else np.asarray(run_values)
    ds = xr.Dataset(
        {"features": (("time", "feature"), data, {"long_name": long_name})},
        coords={
            "time": ("time", np.asarray(times),
                     dict(time_attrs or {"units": "s", "long_name": "time from run onset"})),
            "run": ("time", runs, dict(run_attrs or {"long_name": "run index"})),
            "feature": ("feature", np.asarray([str(v) for v in names], dtype=object),
                        {"long_name": "feature name"}),
        },
    )
    encoding = {
        "features": {"chunks": (block, n_features)},
        "time": {"chunks": (max(n, 1),)},
        "run": {"chunks": (max(n, 1),)},
        "feature": {"chunks": (max(n_features, 1),)},
    }
    return RunTemplate(ds, encoding, block_dim="time", block_size=block)


# ------------------------------------------------------------------ checking input
def _seconds(values: np.ndarray, where: str) -> np.ndarray:
    """A time coordinate as float64 seconds (timedelta64 converted)."""
    if values.dtype.kind == "m":
        return values.astype("timedelta64[ns]").astype(np.float64) / 1e9
    if values.dtype.kind not in "iuf":
        raise InputError(f"{where}: time must be seconds from the run's onset (numbers or "
                         f"timedelta64), got dtype {values.dtype}")
    return values.astype(np.float64)


def _check_times(times: np.ndarray, where: str) -> None:
    if times.size == 0:
        raise InputError(f"{where}: no time points")
    if not np.isfinite(times).all():
        raise InputError(f"{where}: time has NaN or infinite values")
    steps = np.diff(times)
    if (steps <= 0).any():
        k = int(np.flatnonzero(steps <= 0)[0])
        raise InputError(f"{where}: time must increase strictly (time[{k + 1}] = "
                         f"{times[k + 1]:g} s follows {times[k]:g} s); sort the samples")


def _canonical(run: Any, where: str) -> xr.DataArray:
    """One run as a ``(time, feature)`` DataArray with float64 seconds as ``time``."""
    if isinstance(run, xr.Dataset):
        raise InputError(f"{where}: give a DataArray (time, feature), not a Dataset; pick "
                         f"its variable, e.g. ds['features']")
    if not isinstance(run, xr.DataArray):
        raise InputError(f"{where}: expected an xarray.DataArray (time, feature) with a "
                         f"time coordinate in seconds, got {type(run).__name__}")
    if run.dims == ("time",):
        label = str(run.name) if run.name is not None else "unit-0000"
        run = run.expand_dims(feature=[label], axis=1)
    if set(run.dims) != {"time", "feature"} or run.ndim != 2:
        raise InputError(f"{where}: dims must be (time, feature), got {run.dims}; rename "
                         f"or stack the others (DataArray.rename / .stack)")
    run = run.transpose("time", "feature")
    if "time" not in run.coords:
        raise InputError(f"{where}: no time coordinate; give one in seconds from the run's "
                         f"onset, e.g. .assign_coords(time=np.arange(n) / rate)")
    times = _seconds(np.asarray(run["time"].values), where)
    _check_times(times, where)
    kind = run.dtype.kind
    if kind not in "biuf":
        raise InputError(f"{where}: values must be real numbers, got dtype {run.dtype}")
    return run.assign_coords(time=("time", times, {"units": "s",
                                                   "long_name": "time from run onset"}))


def _names_of(runs: Sequence[xr.DataArray], where: Sequence[str]) -> np.ndarray:
    """The feature names shared by every run (defaults when no run names them)."""
    named = [(i, r) for i, r in enumerate(runs) if "feature" in r.coords]
    width = int(runs[0].sizes["feature"])
    if width == 0:
        raise InputError(f"{where[0]}: no features (the feature dimension is empty)")
    names = (np.array([str(v) for v in named[0][1]["feature"].values], dtype=object)
             if named else feature_labels((width,)))
    first = named[0][0] if named else 0
    for i, r in enumerate(runs):
        if r.sizes["feature"] != names.size:
            raise InputError(f"{where[i]}: {r.sizes['feature']} features but "
                             f"{where[first]} has {names.size}; every run needs the same")
        if "feature" in r.coords:
            own = np.array([str(v) for v in r["feature"].values], dtype=object)
            if not np.array_equal(own, names):
                extra = sorted(set(own) - set(names))
                raise InputError(f"{where[i]}: feature names differ from {where[first]}'s"
                                 + (f" (unknown: {', '.join(extra[:5])})" if extra else
                                    " (same names, other order)"))
    if len(set(names)) != names.size or any(n == "" for n in names):
        dup = sorted({n for n in names if list(names).count(n) > 1})[:5]
        raise InputError(f"{where[first]}: feature names must be unique and non-empty"
                         + (f" (repeated: {', '.join(dup)})" if dup else ""))
    return names


def check_feature_runs(runs: Sequence[Any], where: Sequence[str] | None = None
                       ) -> tuple[list[xr.DataArray], np.ndarray]:
    """``(runs as (time, feature) DataArrays with float64 seconds as time, names)``.

    ``where[r]`` names run ``r`` in error messages (default ``run r``).  Raises a
    one-line :class:`InputError` for anything :func:`write_features` cannot store.
    In-memory values are checked to be finite here; dask-backed ones when written.
    """
    if isinstance(runs, (xr.DataArray, xr.Dataset)) or not len(runs):
        raise InputError("runs must be a non-empty list of DataArrays, one per run")
    where = list(where) if where is not None else [f"run {r}" for r in range(len(runs))]
    canon = [_canonical(r, w) for r, w in zip(runs, where)]
    names = _names_of(canon, where)
    for r, w in zip(canon, where):
        if not isinstance(r.data, da.Array):
            _check_finite(np.asarray(r.values), np.asarray(r["time"].values), w)
    return canon, names


def _check_finite(values: np.ndarray, times: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(values) if values.dtype.kind == "f" else None
    if bad is not None and bad.any():
        t, f = np.argwhere(bad)[0]
        raise InputError(f"{where}: NaN or infinite value at time {times[t]:g} s "
                         f"(feature {f}); fill or drop it before importing")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a folder's files (relative paths and bytes, in
    sorted order: a Zarr store); read in 1 MiB pieces."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            for piece in iter(lambda: fh.read(2**20), b""):
                digest.update(piece)
    return digest.hexdigest()


def content_sha256(runs: Sequence[xr.DataArray], names: np.ndarray, block: int) -> str:
    """SHA-256 of what would be stored: every run's times, the names, float32 values."""
    h = hashlib.sha256("\x1f".join(names).encode())
    for r in runs:
        h.update(np.ascontiguousarray(r["time"].values, np.float64).tobytes())
        for start in range(0, r.sizes["time"], block):
            part = np.asarray(r.isel(time=slice(start, start + block)).values)
            h.update(np.ascontiguousarray(part, FEATURE_DTYPE).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------ writing
@dataclass
class ArrayFeaturesWork:
    """One block of given arrays: convert to float32, check, write (the per-block work
    of :func:`write_features`; ``key`` is ``(run, block)``)."""

    writer: StageWriter
    runs: tuple[xr.DataArray, ...]
    where: tuple[str, ...]

    def compute(self, key: tuple[int, int]) -> np.ndarray:
        run, block = key
        region = self.writer.block_slice(run, block)
        part = self.runs[run].isel(time=region)
        values = np.asarray(part.values)
        _check_finite(values, np.asarray(part["time"].values), self.where[run])
        return values.astype(FEATURE_DTYPE, copy=False)

    def write(self, key: tuple[int, int], values: np.ndarray) -> int:
        self.writer.write_block_data(key[0], key[1], {"features": values})
        return int(values.shape[0])


def write_features(store: str | Path | Workspace, name: str, runs: Sequence[xr.DataArray], *,
                   params: Mapping[str, Any] | None = None,
                   attrs: Mapping[str, Any] | None = None, overwrite: bool = False,
                   block_size: int | None = None, where: Sequence[str] | None = None,
                   warn: bool = True) -> dict:
    """Write one ``(time, feature)`` DataArray per run as ``/features/<name>``.

    ``runs[r]``: dims ``(time, feature)`` (a 1-D ``(time,)`` array is one feature),
    a ``time`` coordinate in seconds from run ``r``'s onset (numbers or timedelta64),
    strictly increasing, any sampling (regular or not); real values, finite; an
    optional ``feature`` coordinate (names, made strings; the same in every run;
    default ``unit-0000`` ...).  NumPy- or dask-backed.  Values are **stored as
    float32** (a ``UserWarning`` says so when they were another dtype, unless
    ``warn=False``).  Runs pair with BOLD runs by index in ``voxelflow fit``.

    ``params`` identify the content (kept in the group's attrs; default: the SHA-256
    of the float32 values, times and names): a rerun with the same params skips the
    written blocks (resume), other params are refused unless ``overwrite``.  ``attrs``
    are extra group attributes.  Returns a summary dict (group, runs, samples,
    n_features, blocks written/skipped, source dtypes).
    """
    workspace = store if isinstance(store, Workspace) else Workspace(store)
    check_name(name, "--name")
    where = list(where) if where is not None else [f"run {r}" for r in range(len(runs))]
    canon, names = check_feature_runs(runs, where)
    dtypes = [str(r.dtype) for r in canon]
    converted = sorted({d for d in dtypes if np.dtype(d) != FEATURE_DTYPE})
    if converted and warn:
        warnings.warn(f"/features/{name}: values of dtype {', '.join(converted)} are stored "
                      f"as float32", UserWarning, stacklevel=2)
    block = int(block_size) if block_size else choose_block_size([names.size])
    if block < 1:
        raise InputError(f"block_size must be a positive number of time points (got {block})")
    if params is None:
        params = {"stage": "features", "source": "arrays",
                  "sha256": content_sha256(canon, names, block)}
    params = {**params, "block_size": block}
    templates = [feature_template(r["time"].values, i, names, block, f"{name} features")
                 for i, r in enumerate(canon)]
    group = f"features/{name}"
    group_attrs = {"source": "arrays", **dict(attrs or {}), "n_features": int(names.size),
                   "block_size": block}
    writer = workspace.start_stage(group, params, templates, overwrite=overwrite,
                                   group_attrs=group_attrs)
    keys = writer.pending_keys()
    n_blocks = sum(t.n_blocks for t in templates)
    run_blocks(ArrayFeaturesWork(writer, tuple(canon), tuple(where)), keys, client=None,
               mark_done=lambda key: writer.mark_done(*key))
    writer.finish()
    return {"group": group, "runs": len(canon), "samples": [r.sizes["time"] for r in canon],
            "n_features": int(names.size), "feature_names": [str(n) for n in names],
            "blocks_written": len(keys), "blocks_skipped": n_blocks - len(keys),
            "dtypes": dtypes, "converted": converted}
