"""Feature files made elsewhere -> ``/features/<name>`` (``voxelflow import-features``).

One file per run, in run order:

- ``.tsv`` / ``.csv`` (also ``.gz``/``.bz2``/``.zip``/``.xz`` compressed): one row
  per time point, a header naming the columns; every column is a numeric feature
  (named by its header), except the ``times_column`` (seconds from the run's onset)
  when one is given; without it, row ``k`` is at ``k / rate``;
- ``.npy``: a ``(time, feature)`` (or ``(time,)``) array, row ``k`` at ``k / rate``;
  read memory-mapped, written block by block; ``.npz``: its single array (or the one
  named ``features``), the same way;
- any file or folder xarray opens (``.zarr``, ``.nc``, ``.nc4``, ``.h5``, ``.hdf5``):
  a variable with a ``time`` coordinate in seconds (numbers, or timedeltas) and at
  most one other dimension (its coordinate, if any, names the features); the only
  data variable, or the one named by ``variable``.  Read lazily, written block by
  block.

Everything goes through :func:`~voxelflow.pipeline.stages.feature_arrays.write_features`
(float32, checked, resumable); the group's params are the files' SHA-256 and the
options.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from voxelflow.pipeline.errors import InputError, exception_reason
from voxelflow.pipeline.stages.feature_arrays import file_sha256, write_features
from voxelflow.stores.workspace import Workspace

__all__ = ["read_feature_file", "run_import_stage"]

TABLE_SUFFIXES = (".tsv", ".csv", ".txt")
ARRAY_SUFFIXES = (".npy", ".npz")
XARRAY_SUFFIXES = (".zarr", ".nc", ".nc4", ".netcdf", ".h5", ".hdf5", ".cdf")
COMPRESSED = (".gz", ".bz2", ".zip", ".xz")


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    for kind, known in (("table", TABLE_SUFFIXES), ("array", ARRAY_SUFFIXES),
                        ("xarray", XARRAY_SUFFIXES)):
        if last in known:
            return kind
    raise InputError(f"{path}: unknown kind of file (suffix {last or 'none'}); import "
                     f"reads .tsv/.csv tables, .npy/.npz arrays, or .zarr/.nc datasets")


def _times(n: int, rate: float | None, path: Path) -> np.ndarray:
    if rate is None:
        raise InputError(f"{path}: give --rate HZ (samples per second; row k is at k / HZ)"
                         f" or, for a table, --times-column COL")
    return np.arange(n) / rate


def _read_table(path: Path, rate: float | None, times_column: str | None) -> xr.DataArray:
    import pandas as pd

    sep = "," if ".csv" in [s.lower() for s in path.suffixes] else "\t"
    try:
        table = pd.read_csv(path, sep=sep)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file; a table has a header line and one row per "
                         f"time point") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise InputError(f"{path}: not a readable table ({exception_reason(exc)})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if times_column is not None:
        if times_column not in table.columns:
            raise InputError(f"{path}: no column {times_column!r} for --times-column "
                             f"(columns: {', '.join(table.columns)})")
        times = table.pop(times_column)
        if not pd.api.types.is_numeric_dtype(times):
            raise InputError(f"{path}: --times-column {times_column} must hold seconds "
                             f"(numbers), got {times.iloc[0]!r}")
        times = times.to_numpy(np.float64)
    else:
        times = _times(len(table), rate, path)
    text = [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]
    if text:
        raise InputError(f"{path}: column(s) {', '.join(text[:5])} are not numbers; every "
                         f"column but --times-column is a feature")
    return xr.DataArray(table.to_numpy(), dims=("time", "feature"),
                        coords={"time": times, "feature": np.array(table.columns, object)})


def _read_array(path: Path, rate: float | None) -> xr.DataArray:
    try:
        if path.suffix.lower() == ".npy":
            values = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as archive:
                names = list(archive.files)
                key = "features" if "features" in names else (names[0] if len(names) == 1
                                                              else None)
                if key is None:
                    raise InputError(f"{path}: holds arrays {', '.join(names)}; keep one "
                                     f"(or name it 'features')")
                values = archive[key]
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not a NumPy array file ({exception_reason(exc)})") from None
    if values.ndim not in (1, 2):
        raise InputError(f"{path}: array of shape {values.shape}; expected (time, feature) "
                         f"or (time,): reshape it first")
    values = values[:, None] if values.ndim == 1 else values
    return xr.DataArray(values, dims=("time", "feature"),
                        coords={"time": _times(values.shape[0], rate, path)})


def _read_xarray(path: Path, rate: float | None, variable: str | None) -> xr.DataArray:
    try:
        ds = xr.open_dataset(path, chunks={}, decode_times=False, decode_timedelta=True)
    except Exception as exc:  # noqa: BLE001 - any backend's failure is the user's file
        raise InputError(f"{path}: xarray cannot open it ({exception_reason(exc)[:150]})"
                         ) from None
    names = [v for v in ds.data_vars if "time" in ds[v].dims]
    if variable is not None:
        if variable not in ds.data_vars:
            raise InputError(f"{path}: no variable {variable!r} for --variable (variables: "
                             f"{', '.join(map(str, ds.data_vars))})")
        var = ds[variable]
    elif len(names) == 1:
        var = ds[names[0]]
    else:
        raise InputError(f"{path}: {'no variable has' if not names else 'several variables have'}"
                         f" a 'time' dimension ({', '.join(map(str, names)) or 'none'}); "
                         f"choose one with --variable NAME")
    if "time" not in var.dims:
        raise InputError(f"{path}: {var.name} has no 'time' dimension (dims {var.dims})")
    others = [d for d in var.dims if d != "time"]
    if len(others) > 1:
        raise InputError(f"{path}: {var.name} has dims {var.dims}; stack the non-time ones "
                         f"into one feature dimension first")
    if others and others[0] != "feature":
        var = var.rename({others[0]: "feature"})
    if "time" in var.coords:
        if rate is not None:
            raise InputError(f"{path}: it has its own time coordinate; drop --rate")
        units = str(var["time"].attrs.get("units", ""))
        if " since " in units or var["time"].dtype.kind == "M":
            raise InputError(f"{path}: time is a date ({units or var['time'].dtype}); give "
                             f"seconds from the run's onset")
    else:
        var = var.assign_coords(time=_times(var.sizes["time"], rate, path))
    return var


def read_feature_file(path: str | Path, *, rate: float | None = None,
                      times_column: str | None = None, variable: str | None = None
                      ) -> xr.DataArray:
    """One run's features from a file, as a ``(time, feature)`` DataArray (lazy where the
    format allows) with ``time`` in seconds; one-line :class:`InputError` otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file; check the path")
    if rate is not None and (not np.isfinite(rate) or rate <= 0):
        raise InputError(f"--rate must be > 0 samples per second (got {rate:g})")
    kind = _kind(path)
    if times_column is not None and kind != "table":
        raise InputError(f"{path}: --times-column is for .tsv/.csv tables; give --rate HZ")
    if times_column is not None and rate is not None:
        raise InputError("give --rate HZ or --times-column COL, not both")
    if variable is not None and kind != "xarray":
        raise InputError(f"{path}: --variable is for .zarr/.nc datasets")
    if kind == "table":
        return _read_table(path, rate, times_column)
    if kind == "array":
        return _read_array(path, rate)
    return _read_xarray(path, rate, variable)


def run_import_stage(workspace: Workspace, files: Sequence[str | Path], name: str, *,
                     rate: float | None = None, times_column: str | None = None,
                     variable: str | None = None, overwrite: bool = False) -> dict:
    """Feature files (one per run, in order) -> ``/features/<name>`` (float32).

    Every file is opened and checked (dims, names, times; in-memory values finite)
    before anything is written.  Returns the summary of :func:`write_features`.
    """
    if not files:
        raise InputError("give at least one feature file (one per run)")
    paths = [Path(f) for f in files]
    runs = [read_feature_file(p, rate=rate, times_column=times_column, variable=variable)
            for p in paths]
    params = {"stage": "import", "rate": rate, "times_column": times_column,
              "variable": variable,
              "files": [{"name": p.name, "sha256": file_sha256(p)} for p in paths]}
    attrs = {"source": "import", "files": [os.path.abspath(p) for p in paths],
             "rate": rate, "times_column": times_column, "variable": variable}
    return write_features(workspace, name, runs, params=params, attrs=attrs,
                          overwrite=overwrite, where=[str(p) for p in paths], warn=False)
