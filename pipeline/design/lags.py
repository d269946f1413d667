"""Lagged pairing of stimulus features with BOLD, as a shift of the ``time`` coordinate.

For a BOLD sample at time ``t`` (s from its run's onset) and a lag ``L`` (s), the
design row holds the features of the frame shown at ``t - L`` (the latest frame at or
before it), or with ``aggregate="mean"`` the mean of the frames in ``[t - L - TR, t - L)``.
Several lags are concatenated along a ``(lag, feature)`` axis, flattened to
``lag_feature``.  Everything stays within a run: samples whose history starts before
their run (``t - max(L) < 0``) or reaches past the end of the stimulus run are dropped
and counted.  Runs are matched by index.  Selection is lazy (dask fancy indexing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import dask.array as da
import numpy as np
import xarray as xr

from voxelflow.pipeline.design.needed import (MissingTimes, design_grid, extend_hint,
                                              stored_positions)
from voxelflow.pipeline.errors import InputError

TIME_TOLERANCE_S = 1e-6  # frame-time comparisons allow float rounding of k / fps
AGGREGATES = ("last", "mean")


@dataclass
class LaggedDesign:
    """The paired problem for one lag set.

    ``X`` (sample, lag_feature) float32 dask; ``Y`` (sample, voxel) float32 dask;
    ``run`` (sample,) int run index and ``time`` (sample,) float BOLD time (s) of each
    kept sample; ``dropped`` per run: BOLD samples without a full stimulus history;
    ``feature_names`` (n_features,) the features' ``feature`` coordinate (``None`` for
    groups written before features had names).  Column ``l * n_features + f`` of ``X``
    is feature ``f`` at ``lags[l]``.
    """

    X: da.Array
    Y: da.Array
    run: np.ndarray
    time: np.ndarray
    lags: list[float]
    n_features: int
    dropped: list[int] = field(default_factory=list)
    feature_names: np.ndarray | None = None

    @property
    def n_samples(self) -> int:
        return int(self.run.size)


def parse_lags(text: str) -> list[float]:
    """``"4,5,6,7"`` -> ``[4.0, 5.0, 6.0, 7.0]`` (seconds); refuses negative or empty."""
    try:
        lags = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--lags must be comma-separated seconds, e.g. 4,5,6,7 (got {text!r})") from None
    if not lags:
        raise InputError("--lags needs at least one lag in seconds, e.g. --lags 4,5,6,7")
    if any(l < 0 or not np.isfinite(l) for l in lags):
        raise InputError(f"--lags must be >= 0 seconds (got {text!r})")
    return lags


def frame_indices_for(frame_times: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the latest frame at or before each target time (-1 when none)."""
    return np.searchsorted(frame_times, targets + TIME_TOLERANCE_S, side="right") - 1


def _stimulus_end(frame_times: np.ndarray) -> float:
    step = float(np.median(np.diff(frame_times))) if frame_times.size > 1 else 0.0
    return float(frame_times[-1] + step)


def run_design_indices(frame_times: np.ndarray, bold_times: np.ndarray, lags: list[float],
                       tr: float, aggregate: str = "last") -> tuple[np.ndarray, list[np.ndarray]]:
    """Which BOLD samples of one run are kept, and which frames feed each lag.

    Returns ``keep`` (n_kept,) indices into ``bold_times`` and, per lag, either an
    (n_kept,) frame index array (``last``) or an (n_kept, 2) [start, stop) frame range
    (``mean``: frames with ``t - L - TR <= time < t - L``).  The history must start at
    or after the run's onset (0 s) and the first stimulus sample (imported features
    may start later).
    """
    end = _stimulus_end(frame_times)
    start = max(0.0, float(frame_times[0]))
    lo_needed = bold_times - max(lags) - (tr if aggregate == "mean" else 0.0)
    hi_needed = bold_times - min(lags)
    keep_mask = ((lo_needed >= start - TIME_TOLERANCE_S)
                 & (hi_needed < end + TIME_TOLERANCE_S))
    keep = np.flatnonzero(keep_mask)
    t = bold_times[keep]
    per_lag = []
    for lag in lags:
        if aggregate == "last":
            per_lag.append(frame_indices_for(frame_times, t - lag))
        else:
            start = np.searchsorted(frame_times, t - lag - tr - TIME_TOLERANCE_S, side="left")
            stop = np.searchsorted(frame_times, t - lag - TIME_TOLERANCE_S, side="left")
            per_lag.append(np.stack([start, stop], axis=1))
    return keep, per_lag


def needed_frame_indices(frame_grid: np.ndarray, bold_times: np.ndarray,
                         lag_sets: Sequence[Sequence[float]], tr: float,
                         aggregate: str = "last") -> np.ndarray:
    """Sorted unique indices into ``frame_grid`` (n_frames,) of every frame that the
    design of any lag set reads for this run's ``bold_times`` (n_volumes,) (s): the
    frames :func:`run_design_indices` picks, all of each window for ``"mean"``."""
    picked = [np.empty(0, dtype=np.int64)]
    for lags in lag_sets:
        _, per_lag = run_design_indices(frame_grid, bold_times, list(lags), tr, aggregate)
        for idx in per_lag:
            if idx.ndim == 1:
                picked.append(idx.astype(np.int64))
            else:
                picked += [np.arange(a, b, dtype=np.int64) for a, b in idx]
    out = np.unique(np.concatenate(picked))
    return out[(out >= 0) & (out < frame_grid.size)]


def _mean_frames(features: da.Array, ranges: np.ndarray) -> da.Array:
    """Mean of features over [start, stop) frame ranges (n_rows, 2) -> (n_rows, feature).

    The frames of each window are added one after the other in float64 (the j-th frame
    of every window at once), so a row depends on its window's frames only: features
    of a sparse subset holding those frames give the same bits as features of every
    frame.  Work: rows x window length x features.
    """
    counts = ranges[:, 1] - ranges[:, 0]
    if np.any(counts <= 0):
        raise InputError("a lag window holds no frames: the stimulus is sampled more "
                         "slowly than the TR; use --aggregate last")
    total = None
    for j in range(int(counts.max())):
        part = features[np.minimum(ranges[:, 0] + j, ranges[:, 1] - 1)].astype(np.float64)
        if np.any(counts <= j):
            part = da.where((counts > j)[:, None], part, 0.0)
        total = part if total is None else total + part
    return (total / counts.astype(np.float64)[:, None]).astype(np.float32)


def durations_match(stimulus_s: float, bold_s: float, tr: float) -> bool:
    """Whether a stimulus run of ``stimulus_s`` seconds pairs with a BOLD run of
    ``bold_s`` seconds: they differ by at most two TRs or 5 % of the BOLD run."""
    return abs(stimulus_s - bold_s) <= max(2 * tr, 0.05 * bold_s)


def check_runs_match(feature_runs: list[xr.Dataset], bold_runs: list[xr.Dataset],
                     tr: float, features_name: str, bold_name: str) -> None:
    """Runs pair by index: same count, and each stimulus run about as long as its BOLD run."""
    if len(feature_runs) != len(bold_runs):
        raise InputError(
            f"/features/{features_name} has {len(feature_runs)} run(s) but /bold/{bold_name} "
            f"has {len(bold_runs)}; runs are paired by index, give one video per BOLD run"
        )
    for r, (f, b) in enumerate(zip(feature_runs, bold_runs)):
        f_end = _stimulus_end(design_grid(f["time"].attrs, f["time"].values))
        b_end = float(b["time"].values[-1]) + tr
        if not durations_match(f_end, b_end, tr):
            raise InputError(
                f"run {r}: stimulus lasts {f_end:.1f} s but BOLD lasts {b_end:.1f} s "
                f"(/features/{features_name} vs /bold/{bold_name}); check that the runs "
                f"are given in the same order and trimmed alike"
            )


def run_length_problem(n_volumes: int, tr: float, lags: list[float],
                       aggregate: str = "last") -> str | None:
    """Why a run of ``n_volumes`` at ``tr`` s is too short for ``lags`` (None: long
    enough).  A run must last at least the longest lag plus one TR (plus another TR with
    ``aggregate="mean"``, whose window reaches one TR further back), or no sample of it
    has a stimulus history and the run would be dropped silently."""
    history = max(lags) + (tr if aggregate == "mean" else 0.0)
    if (n_volumes - 1) * tr >= history - TIME_TOLERANCE_S:
        return None
    need = history + tr
    return (f"lasts {n_volumes * tr:g} s ({n_volumes} volumes x TR {tr:g} s), shorter than "
            f"the {need:g} s that lags up to {max(lags):g} s need (the longest lag plus one "
            f"TR{' plus the mean window' if aggregate == 'mean' else ''})")


def check_run_lengths(bold_runs: list[xr.Dataset], lags: list[float], tr: float,
                      aggregate: str, bold_name: str) -> None:
    """Refuse a BOLD run too short for ``lags`` (:func:`run_length_problem`)."""
    for r, b in enumerate(bold_runs):
        problem = run_length_problem(int(b.sizes["time"]), tr, lags, aggregate)
        if problem:
            raise InputError(f"/bold/{bold_name} run {r} {problem}; use shorter lags or "
                             f"leave the run out")


def build_design(feature_runs: list[xr.Dataset], bold_runs: list[xr.Dataset],
                 lags: list[float], tr: float, *, aggregate: str = "last",
                 features_var: str = "features", bold_var: str = "bold",
                 features_name: str = "?", bold_name: str = "?") -> LaggedDesign:
    """Pair every run's features with its BOLD at each lag; concatenate runs.

    ``feature_runs[r]`` has ``features (time, feature)`` at frame times (s);
    ``bold_runs[r]`` has ``bold (time, voxel)`` at ``i * tr``.  Lazy: nothing is
    computed here except index arithmetic on the time coordinates.
    """
    if aggregate not in AGGREGATES:
        raise InputError(f"--aggregate must be one of {', '.join(AGGREGATES)} (got {aggregate!r})")
    check_runs_match(feature_runs, bold_runs, tr, features_name, bold_name)
    check_run_lengths(bold_runs, lags, tr, aggregate, bold_name)
    xs, ys, runs, times, dropped = [], [], [], [], []
    n_features = int(feature_runs[0].sizes["feature"])
    for r, (f, b) in enumerate(zip(feature_runs, bold_runs)):
        frame_times = design_grid(f["time"].attrs, f["time"].values)
        bold_times = b["time"].values.astype(np.float64)
        keep, per_lag = run_design_indices(frame_times, bold_times, lags, tr, aggregate)
        if f["time"].attrs.get("sparse") and keep.size:
            per_lag = _to_stored(per_lag, f["time"], frame_times, r, lags,
                                 features_name, bold_name)
        dropped.append(int(bold_times.size - keep.size))
        if keep.size == 0:
            continue
        feats = f[features_var].data
        if not isinstance(feats, da.Array):
            feats = da.from_array(np.asarray(feats), chunks=(1024, -1))
        blocks = []
        for idx in per_lag:
            blocks.append(feats[idx] if aggregate == "last" else _mean_frames(feats, idx))
        xs.append(da.concatenate(blocks, axis=1).astype(np.float32))
        bold = b[bold_var].data
        if not isinstance(bold, da.Array):
            bold = da.from_array(np.asarray(bold), chunks=(-1, 4096))
        ys.append(bold[keep])
        runs.append(np.full(keep.size, r, dtype=np.int32))
        times.append(bold_times[keep])
    if not xs:
        longest = max(float(b["time"].values[-1]) for b in bold_runs)
        raise InputError(
            f"no BOLD sample of /bold/{bold_name} has a full stimulus history for lags "
            f"{lags} (runs last at most {longest:.1f} s); use shorter lags"
        )
    X = da.concatenate(xs, axis=0)
    Y = da.concatenate(ys, axis=0)
    return LaggedDesign(X, Y, np.concatenate(runs), np.concatenate(times), list(lags),
                        n_features, dropped, shared_feature_names(feature_runs, features_name))


def _to_stored(per_lag: list[np.ndarray], time: xr.DataArray, grid: np.ndarray, run: int,
               lags: list[float], features_name: str, bold_name: str) -> list[np.ndarray]:
    """Grid frame indices (or [start, stop) ranges) -> positions in a sparse run's
    stored ``time``; refuses, saying how to extend the group, when frames are missing."""
    stored = np.asarray(time.values, dtype=np.float64)
    what = f"/features/{features_name} run {run} (sparse: only the frames of its request)"
    out = []
    try:
        for idx in per_lag:
            if idx.ndim == 1:
                out.append(stored_positions(stored, grid, idx, what))
                continue
            every = np.concatenate([np.arange(a, b) for a, b in idx])
            stored_positions(stored, grid, every, what)  # every frame of every window
            start = stored_positions(stored, grid, idx[:, 0], what)
            out.append(np.stack([start, start + idx[:, 1] - idx[:, 0]], axis=1))
    except MissingTimes as exc:
        frames = str(time.attrs.get("frames_name", "FRAMES"))
        hint = extend_hint(frames, features_name, bold_name, [lags], time.attrs)
        raise MissingTimes(f"{exc} for lags {lags}; " + hint) from None
    return out


def shared_feature_names(feature_runs: list[xr.Dataset], features_name: str = "?"
                         ) -> np.ndarray | None:
    """The ``feature`` coordinate common to every run (``None`` when the group has none);
    runs that name their features differently are refused."""
    if "feature" not in feature_runs[0].coords:
        return None
    names = np.asarray(feature_runs[0]["feature"].values)
    for r, f in enumerate(feature_runs[1:], start=1):
        if "feature" not in f.coords or not np.array_equal(np.asarray(f["feature"].values),
                                                           names):
            raise InputError(f"/features/{features_name}: run {r} names its features "
                             f"differently from run 0; rewrite the group")
    return names


def split_train_test(design: LaggedDesign, *, test_samples: int | None = None,
                     test_runs: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of training and test samples: the last ``test_samples`` or whole runs."""
    n = design.n_samples
    if (test_samples is None) == (test_runs is None):
        raise InputError("give exactly one of --test-samples N or --test-runs R[,R...]")
    if test_samples is not None:
        if not 0 < test_samples < n:
            raise InputError(f"--test-samples must be between 1 and {n - 1} (got {test_samples})")
        return np.arange(n - test_samples), np.arange(n - test_samples, n)
    missing = sorted(set(test_runs) - set(np.unique(design.run).tolist()))
    if missing:
        raise InputError(f"--test-runs {missing} not among the runs "
                         f"{sorted(set(design.run.tolist()))}")
    is_test = np.isin(design.run, test_runs)
    if is_test.all():
        raise InputError("--test-runs leaves no training runs")
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def first_test_frame(frame_times: list[np.ndarray], bold_times: list[np.ndarray],
                     lag_sets: list[list[float]], tr: float, *, aggregate: str = "last",
                     test_samples: int | None = None,
                     test_runs: list[int] | None = None) -> tuple[int, int]:
    """``(run, frame)``: the earliest stimulus frame that any test sample's design uses.

    ``frame_times[r]`` (n_frames_r,) and ``bold_times[r]`` (n_volumes_r,) are the time
    coordinates (s) of run ``r``.  Over every lag set, the test samples are chosen as
    :func:`split_train_test` does (the last ``test_samples`` kept samples, or whole
    ``test_runs``), and each one's frames are found as :func:`run_design_indices` does.
    Frames strictly before the returned one (runs in order) are never part of a test
    sample, so a model trained on them (the autoencoder) has not seen the test
    stimulus.  With ``test_runs`` the earliest frame of the first test run is returned.
    """
    if test_runs is not None:
        return int(min(test_runs)), 0
    earliest: tuple[int, int] | None = None
    for lags in lag_sets:
        kept = []
        for r, (ft, bt) in enumerate(zip(frame_times, bold_times)):
            keep, per_lag = run_design_indices(np.asarray(ft, np.float64),
                                               np.asarray(bt, np.float64), lags, tr, aggregate)
            if keep.size:
                first = np.min([(p[:, 0] if p.ndim == 2 else p) for p in per_lag], axis=0)
                kept.extend((r, int(f)) for f in first)
        if not test_samples or not 0 < test_samples < len(kept):
            raise InputError(f"test_samples must be between 1 and {len(kept) - 1} for lags "
                             f"{lags} (got {test_samples})")
        candidate = min(kept[-test_samples:])
        earliest = candidate if earliest is None else min(earliest, candidate)
    assert earliest is not None
    return earliest
