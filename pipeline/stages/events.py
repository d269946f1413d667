"""BIDS-style events files -> boxcar features in ``/features/<name>`` (``voxelflow events``).

One tab-separated file per run, with ``onset`` and ``duration`` in seconds from the
run's first volume and a categorical column (``trial_type`` by default) or a numeric
one.  Each run becomes ``features (time, feature) float32`` sampled at ``rate`` Hz,
``time = k / rate`` for ``k = 0 .. ceil(run seconds * rate) - 1``, where sample ``k``
stands for the interval ``[k / rate, (k + 1) / rate)`` (as a video frame does until
the next one) and holds, per feature, the **fraction of that interval covered** by
the feature's events ``[onset, onset + duration)`` times their height.  So the
integral of a feature over time (sum of samples / rate) is the covered duration at
any rate: a 20 Hz and a 0.5 Hz grid agree, and an event that starts mid-sample
contributes its share.

- **Categorical** (``columns``, default ``["trial_type"]``): one feature per category,
  height 1, named by the category (``column=value`` with several columns).  The
  categories are the first run's, sorted, and every run must have the same ones
  (errors name the unknown and missing ones) unless ``categories`` lists them (then a
  run may lack some: zeros; events of an unlisted category are refused).  Two events
  of one category that overlap in time are refused (the boxcar would count the time
  twice).
- **Amplitude** (``amplitude=COL``): one feature named ``COL`` whose boxcar height is
  the event's value in the numeric column ``COL``; overlapping events add up.

Rows may come in any order.  Event parts before 0 s or after the run's end are cut;
an event that starts after the run's end is refused (wrong file or run length).  A
run's length comes from the matching BOLD run (``bold``: volumes x TR) or is given
(``duration``).  :func:`events_to_features` is pure (files -> DataArrays); writing is
:func:`~voxelflow.pipeline.stages.feature_arrays.write_features` (templates, one
block per run for narrow features, done flags, params in attrs, resumable).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from voxelflow.pipeline.errors import InputError, exception_reason
from voxelflow.pipeline.stages.feature_arrays import file_sha256, write_features
from voxelflow.stores.names import check_name
from voxelflow.stores.workspace import Workspace

__all__ = ["EventsOptions", "RunEvents", "boxcars", "check_events_options",
           "events_to_features", "read_events", "run_events_stage"]

DEFAULT_COLUMNS = ("trial_type",)
MISSING = ("", "n/a", "N/A", "nan", "NaN")  # BIDS writes n/a for a missing value
SNAP = 1e-9  # sample-grid positions this close to an integer are taken as on the grid


@dataclass(frozen=True)
class EventsOptions:
    """How events become features (the options of ``voxelflow events``)."""

    rate: float
    columns: tuple[str, ...] = DEFAULT_COLUMNS
    amplitude: str | None = None
    fixed_duration: float | None = None   # --duration-from fixed:S
    categories: tuple[str, ...] | None = None

    @property
    def kind(self) -> str:
        return "amplitude" if self.amplitude else "categorical"

    def duration_from(self) -> str:
        return "column" if self.fixed_duration is None else f"fixed:{self.fixed_duration:g}"


def check_events_options(rate: float, columns: Sequence[str] | None = None,
                         amplitude: str | None = None, duration_from: str = "column",
                         categories: Sequence[str] | None = None) -> EventsOptions:
    """Checked :class:`EventsOptions`; one-line :class:`InputError` naming the option."""
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise InputError(f"--rate must be a number of samples per second (got {rate!r})") from None
    if not math.isfinite(rate) or rate <= 0:
        raise InputError(f"--rate must be > 0 samples per second (got {rate:g})")
    if columns and amplitude:
        raise InputError("give --columns (categories) or --amplitude COL (one numeric "
                         "feature), not both")
    cols = tuple(c.strip() for c in (columns or DEFAULT_COLUMNS))
    if not all(cols) or len(set(cols)) != len(cols):
        raise InputError(f"--columns must name distinct columns (got {','.join(cols)!r})")
    if categories is not None:
        if amplitude:
            raise InputError("--categories is for categorical columns, not --amplitude")
        categories = tuple(str(c).strip() for c in categories)
        if not categories or not all(categories) or len(set(categories)) != len(categories):
            raise InputError(f"--categories must list distinct, non-empty names "
                             f"(got {','.join(categories)!r})")
    return EventsOptions(rate, () if amplitude else cols, amplitude,
                         _fixed_duration(duration_from), categories)


def _fixed_duration(text: str) -> float | None:
    """``"column"`` -> None; ``"fixed:S"`` -> S seconds (> 0)."""
    text = (text or "column").strip()
    if text == "column":
        return None
    kind, _, value = text.partition(":")
    try:
        seconds = float(value) if kind == "fixed" else None
    except ValueError:
        seconds = None
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"--duration-from must be 'column' or 'fixed:S' with S > 0 seconds "
                         f"(got {text!r})")
    return seconds


# ------------------------------------------------------------------- one file
@dataclass
class RunEvents:
    """The checked events of one file: per event (n,) ``onset``/``duration`` (s),
    ``height``, and ``label`` (the feature it belongs to); ``line`` its file line."""

    path: Path
    onset: np.ndarray
    duration: np.ndarray
    height: np.ndarray
    label: np.ndarray
    line: np.ndarray


def _read_table(path: Path):
    import pandas as pd

    if not path.is_file():
        raise InputError(f"{path}: no such events file; check the path")
    try:
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False,
                            na_filter=False)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: empty file; an events file has a header line "
                         f"(onset, duration, ...) and one row per event") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{path}: not a tab-separated events table "
                         f"({exception_reason(exc)})") from None
    table.columns = [str(c).strip() for c in table.columns]
    if "onset" not in table.columns:
        hint = (" (the header has commas: events files are tab-separated)"
                if len(table.columns) == 1 and "," in table.columns[0] else "")
        raise InputError(f"{path}: no 'onset' column (columns: "
                         f"{', '.join(table.columns)}){hint}; BIDS events files have "
                         f"onset and duration in seconds")
    return table


def _numbers(table, column: str, path: Path, what: str) -> np.ndarray:
    """A column as float64; a missing value or a non-number is an error naming its line."""
    values = np.empty(len(table), np.float64)
    for i, text in enumerate(table[column].str.strip()):
        try:
            values[i] = float("nan") if text in MISSING else float(text)
        except ValueError:
            raise InputError(f"{path}:{i + 2}: {column} {text!r} is not a number") from None
        if not math.isfinite(values[i]):
            raise InputError(f"{path}:{i + 2}: {column} is missing ({text!r}); {what}")
    return values


def read_events(path: str | Path, options: EventsOptions) -> RunEvents:
    """Read and check one events file (rows in any order; one event per row and
    categorical column)."""
    path = Path(path)
    table = _read_table(path)
    onset = _numbers(table, "onset", path, "every event needs an onset in seconds")
    lines = np.arange(len(table)) + 2
    if options.fixed_duration is not None:
        duration = np.full(len(table), options.fixed_duration)
    elif "duration" not in table.columns:
        raise InputError(f"{path}: no 'duration' column; add one or give "
                         f"--duration-from fixed:S")
    else:
        duration = _numbers(table, "duration", path,
                            "give it, or --duration-from fixed:S for every event")
        if (duration <= 0).any():
            i = int(np.flatnonzero(duration <= 0)[0])
            fix = ("durations cannot be negative" if duration[i] < 0 else
                   "a boxcar of length 0 is empty; give --duration-from fixed:S")
            raise InputError(f"{path}:{i + 2}: duration {duration[i]:g} s; {fix}")
    if options.amplitude:
        if options.amplitude not in table.columns:
            raise InputError(f"{path}: no column {options.amplitude!r} for --amplitude "
                             f"(columns: {', '.join(table.columns)})")
        height = _numbers(table, options.amplitude, path, "give every event a number")
        return RunEvents(path, onset, duration, height,
                         np.full(len(table), options.amplitude, dtype=object), lines)
    parts = []
    for column in options.columns:
        if column not in table.columns:
            raise InputError(f"{path}: no column {column!r} for --columns (columns: "
                             f"{', '.join(table.columns)})")
        values = table[column].str.strip()
        bad = np.flatnonzero(values.isin(MISSING).to_numpy())
        if bad.size:
            raise InputError(f"{path}:{bad[0] + 2}: no {column} ({values.iloc[bad[0]]!r}); "
                             f"name the event's category or drop the row")
        prefix = f"{column}=" if len(options.columns) > 1 else ""
        parts.append(np.array([prefix + v for v in values], dtype=object))
    n = len(parts)
    events = RunEvents(path, np.tile(onset, n), np.tile(duration, n), np.ones(len(table) * n),
                       np.concatenate(parts), np.tile(lines, n))
    _check_no_overlap(events)
    return events


def _check_no_overlap(events: RunEvents) -> None:
    """Two events of one category must not overlap (the boxcar would exceed 1)."""
    for label in np.unique(events.label):
        idx = np.flatnonzero(events.label == label)
        idx = idx[np.argsort(events.onset[idx], kind="stable")]
        ends = events.onset[idx] + events.duration[idx]
        clash = np.flatnonzero(events.onset[idx[1:]] < ends[:-1] - SNAP)
        if clash.size:
            a, b = idx[clash[0]], idx[clash[0] + 1]
            raise InputError(
                f"{events.path}: two {label!r} events overlap (line {events.line[a]}: "
                f"{events.onset[a]:g} s to {events.onset[a] + events.duration[a]:g} s; line "
                f"{events.line[b]}: from {events.onset[b]:g} s); merge them into one event")


# ------------------------------------------------------------------ events -> arrays
def feature_names(runs: Sequence[RunEvents], options: EventsOptions) -> list[str]:
    """The features, in order: ``amplitude``; ``categories``; or the first run's sorted
    categories, which every run must have (errors name the unknown and missing ones)."""
    if options.amplitude:
        return [options.amplitude]
    if options.categories is not None:
        names = list(options.categories)
        for run in runs:
            unknown = sorted(set(run.label) - set(names))
            if unknown:
                raise InputError(f"{run.path}: categories not in --categories: "
                                 f"{', '.join(unknown)}; add them or drop those rows")
        return names
    names = sorted(set(runs[0].label))
    for run in runs[1:]:
        unknown = sorted(set(run.label) - set(names))
        missing = sorted(set(names) - set(run.label))
        if unknown or missing:
            what = "; ".join(p for p in (f"unknown: {', '.join(unknown)}" if unknown else "",
                                         f"missing: {', '.join(missing)}" if missing else "")
                             if p)
            raise InputError(f"{run.path}: categories differ from those of {runs[0].path} "
                             f"({what}); list every category with --categories A,B,...")
    return names


def boxcars(events: RunEvents, names: Sequence[str], n_samples: int, rate: float
            ) -> np.ndarray:
    """float32 ``(n_samples, len(names))``: per sample ``[k, k + 1) / rate`` and feature,
    the fraction of the interval covered by the feature's events times their height
    (events of other labels are left out)."""
    out = np.zeros((n_samples, len(names)), np.float64)
    column = {name: i for i, name in enumerate(names)}
    for onset, duration, height, label in zip(events.onset, events.duration, events.height,
                                              events.label):
        if label not in column:
            continue
        # Positions on the sample grid (sample k covers [k, k + 1)), cut to the run.
        start = _snap(max(onset, 0.0) * rate)
        end = _snap(min((onset + duration) * rate, float(n_samples)))
        if end <= start:
            continue
        k = np.arange(int(math.floor(start)), min(int(math.ceil(end)), n_samples))
        covered = np.minimum(k + 1, end) - np.maximum(k, start)
        out[k, column[label]] += covered * height
    return out.astype(np.float32)


def _snap(position: float) -> float:
    nearest = round(position)
    return float(nearest) if abs(position - nearest) < SNAP else position


def n_samples_of(seconds: float, rate: float) -> int:
    """Samples covering a run of ``seconds`` at ``rate`` Hz: ``ceil(seconds * rate)``."""
    return max(1, int(math.ceil(seconds * rate - SNAP)))


def events_to_features(files: Sequence[str | Path], options: EventsOptions,
                       run_seconds: Sequence[float]) -> tuple[list[xr.DataArray], list[RunEvents]]:
    """One ``(time, feature)`` float32 DataArray per events file (pure: no workspace)."""
    runs = [read_events(f, options) for f in files]
    names = feature_names(runs, options)
    arrays = []
    for events, seconds in zip(runs, run_seconds):
        late = np.flatnonzero(events.onset >= seconds)
        if late.size:
            i = late[0]
            raise InputError(f"{events.path}:{events.line[i]}: event at {events.onset[i]:g} s "
                             f"starts after the run ends ({seconds:g} s); check the file "
                             f"order and the run length")
        n = n_samples_of(seconds, options.rate)
        arrays.append(xr.DataArray(
            boxcars(events, names, n, options.rate), dims=("time", "feature"),
            coords={"time": np.arange(n) / options.rate,
                    "feature": np.array(names, dtype=object)}))
    return arrays, runs


# ------------------------------------------------------------------------ the stage
def run_seconds(workspace: Workspace, n_files: int, bold: str | None,
                duration: Sequence[float] | None) -> tuple[list[float], str]:
    """Each run's length in seconds, from ``/bold/<bold>`` (volumes x TR) or
    ``duration`` (one value for every run, or one per run); and where it came from."""
    if (bold is None) == (duration is None):
        raise InputError("give the runs' length: --bold SUBJECT (the matching BOLD runs) "
                         "or --duration SECONDS[,SECONDS...]")
    if bold is not None:
        group = f"bold/{check_name(bold, '--bold')}"
        attrs = workspace.require_complete(
            group, f"voxelflow bold RUN.nii.gz ... --subject {bold}")
        n_runs = workspace.n_runs(group)
        if n_runs != n_files:
            raise InputError(f"{n_files} events file(s) but /{group} has {n_runs} run(s); "
                             f"give one events file per BOLD run, in the same order")
        tr = float(attrs["tr"])
        sizes = [int(workspace.open_run(group, r).sizes["time"]) for r in range(n_runs)]
        return [n * tr for n in sizes], f"/{group} ({tr:g} s x volumes)"
    values = [float(d) for d in duration]
    if len(values) == 1:
        values = values * n_files
    if len(values) != n_files or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"--duration needs one length > 0 s for every run, or one for "
                         f"all {n_files} (got {', '.join(f'{v:g}' for v in values)})")
    return values, "--duration"


def run_events_stage(workspace: Workspace, files: Sequence[str | Path], name: str,
                     rate: float, *, columns: Sequence[str] | None = None,
                     amplitude: str | None = None, duration_from: str = "column",
                     categories: Sequence[str] | None = None, bold: str | None = None,
                     duration: Sequence[float] | None = None,
                     overwrite: bool = False) -> dict:
    """Events files (one per run, in order) -> ``/features/<name>`` boxcars at ``rate`` Hz.

    Every file is read and checked before anything is written; the group records the
    files' SHA-256 and the options as its params (a rerun with the same ones is a
    no-op or a resume; other ones are refused unless ``overwrite``).  Returns the
    summary of :func:`write_features` plus the events per run.
    """
    options = check_events_options(rate, columns, amplitude, duration_from, categories)
    if not files:
        raise InputError("give at least one events file (one per run)")
    paths = [Path(f) for f in files]
    seconds, source = run_seconds(workspace, len(paths), bold, duration)
    arrays, runs = events_to_features(paths, options, seconds)
    params = {"stage": "events", "rate": options.rate, "columns": list(options.columns),
              "amplitude": options.amplitude, "duration_from": options.duration_from(),
              "categories": list(options.categories) if options.categories else None,
              "run_seconds": seconds,
              "files": [{"name": p.name, "sha256": file_sha256(p)} for p in paths]}
    attrs = {"source": "events", "kind": options.kind, "rate": options.rate,
             "columns": list(options.columns), "amplitude": options.amplitude,
             "duration_from": options.duration_from(),
             "features": [str(v) for v in arrays[0]["feature"].values],
             "events_files": [os.path.abspath(p) for p in paths], "run_seconds": seconds,
             "run_length_from": source}
    summary = write_features(workspace, name, arrays, params=params, attrs=attrs,
                             overwrite=overwrite, where=[str(p) for p in paths], warn=False)
    summary["events"] = [int(np.unique(r.line).size) for r in runs]
    return summary
