"""Lagged design: exact frame picks, run boundaries, dropped samples, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.design.lags import build_design, parse_lags, split_train_test


def feature_run(run: int, seconds: float, fps: float = 20.0) -> xr.Dataset:
    """Features that encode where they come from: [run, frame time (s)]."""
    t = np.arange(int(round(seconds * fps))) / fps
    data = np.stack([np.full_like(t, run), t], axis=1).astype(np.float32)
    return xr.Dataset({"features": (("time", "feature"), data)},
                      coords={"time": t, "run": ("time", np.full(t.size, run))})


def bold_run(run: int, n: int, tr: float, n_vox: int = 3) -> xr.Dataset:
    t = np.arange(n) * tr
    rng = np.random.default_rng(run)
    return xr.Dataset({"bold": (("time", "voxel"), rng.normal(size=(n, n_vox)).astype(np.float32))},
                      coords={"time": t, "run": ("time", np.full(n, run))})


def test_fractional_lags_pick_exact_frames():
    lags = [4, 4.5, 5, 5.5]
    design = build_design([feature_run(0, 30)], [bold_run(0, 30, 1.0)], lags, tr=1.0)
    X = design.X.compute().reshape(design.n_samples, len(lags), 2)
    for row, t in enumerate(design.time):
        np.testing.assert_allclose(X[row, :, 1], [t - l for l in lags], atol=1e-6)
    # t < 5.5 s has no full history: samples 0..5 dropped, 6..29 kept.
    assert design.dropped == [6]
    np.testing.assert_array_equal(design.time, np.arange(6, 30))


def test_latest_frame_at_or_before_when_lag_is_between_frames():
    design = build_design([feature_run(0, 20, fps=2)], [bold_run(0, 10, 2.0)], [1.3], tr=2.0)
    X = design.X.compute()
    # frames at 0, 0.5, 1.0 ...; t - 1.3 = 0.7 -> frame 0.5; 2.7 -> 2.5; ...
    np.testing.assert_allclose(X[:, 1], np.floor((design.time - 1.3) * 2) / 2)


def test_no_sample_mixes_runs_or_precedes_its_run():
    feats = [feature_run(r, 40) for r in range(3)]
    bolds = [bold_run(r, 20, 2.0) for r in range(3)]
    design = build_design(feats, bolds, [4, 5, 6, 7], tr=2.0)
    X = design.X.compute().reshape(design.n_samples, 4, 2)
    assert (X[:, :, 0] == design.run[:, None]).all()
    assert (X[:, :, 1] >= 0).all()
    assert design.dropped == [4, 4, 4]
    Y = design.Y.compute()
    for r in range(3):
        np.testing.assert_array_equal(Y[design.run == r], bolds[r]["bold"].values[4:])


def test_mean_aggregate_averages_the_tr_window():
    """Random features (on a ramp, the mean of the window's two ends would pass too):
    each design row is the NumPy mean of the frames shown in [t - L - TR, t - L).  The
    last feature is the frame time, so its mean is the window's mean time."""
    rng = np.random.default_rng(3)
    fps, tr, lags = 20.0, 2.0, [4.0, 5.5]
    feats = feature_run(0, 30, fps)
    frame_times = feats["time"].values
    data = np.column_stack([rng.normal(size=(frame_times.size, 4)), frame_times])
    data = data.astype(np.float32)
    feats = feats.drop_vars("features").assign(features=(("time", "feature"), data))
    design = build_design([feats], [bold_run(0, 15, tr)], lags, tr=tr, aggregate="mean")
    X = design.X.compute().reshape(design.n_samples, len(lags), 5)
    # kept: every window starts at or after 0 s (t >= 5.5 + 2)
    np.testing.assert_array_equal(design.time, np.arange(8, 30, 2.0))
    for row, t in enumerate(design.time):
        for i, lag in enumerate(lags):
            window = (frame_times >= t - lag - tr) & (frame_times < t - lag)
            assert window.sum() == tr * fps
            np.testing.assert_allclose(X[row, i], data[window].astype(np.float64).mean(0),
                                       rtol=0, atol=1e-5)
            ramp = np.arange(int(round((t - lag - tr) * fps)), int(round((t - lag) * fps))) / fps
            assert abs(X[row, i, -1] - ramp.mean()) < 1e-4


def test_mismatched_runs_are_refused():
    with pytest.raises(InputError, match="runs are paired by index"):
        build_design([feature_run(0, 30)], [bold_run(0, 15, 2.0), bold_run(1, 15, 2.0)],
                     [4], tr=2.0)
    with pytest.raises(InputError, match="stimulus lasts 30.0 s but BOLD lasts 100.0 s"):
        build_design([feature_run(0, 30)], [bold_run(0, 50, 2.0)], [4], tr=2.0)


def test_lag_longer_than_run_is_refused():
    with pytest.raises(InputError, match="use shorter lags"):
        build_design([feature_run(0, 30)], [bold_run(0, 15, 2.0)], [40], tr=2.0)
    # One run long enough, the other not: refused (it was dropped without a word).
    # A run of 10 volumes at TR 2 s keeps a sample for lags up to 18 s (t = 18 s).
    build_design([feature_run(0, 20), feature_run(1, 20)],
                 [bold_run(0, 10, 2.0), bold_run(1, 10, 2.0)], [18], tr=2.0)
    with pytest.raises(InputError, match=r"run 1 lasts 6 s \(3 volumes x TR 2 s\), shorter "
                                         r"than the 20 s that lags up to 18 s need"):
        build_design([feature_run(0, 60), feature_run(1, 6)],
                     [bold_run(0, 30, 2.0), bold_run(1, 3, 2.0)], [18], tr=2.0)


def test_parse_lags_and_split():
    assert parse_lags("4,4.5, 5") == [4.0, 4.5, 5.0]
    with pytest.raises(InputError):
        parse_lags("4,x")
    with pytest.raises(InputError):
        parse_lags("-1")
    design = build_design([feature_run(r, 40) for r in range(2)],
                          [bold_run(r, 20, 2.0) for r in range(2)], [4], tr=2.0)
    train, test = split_train_test(design, test_samples=5)
    assert test.tolist() == list(range(design.n_samples - 5, design.n_samples))
    train, test = split_train_test(design, test_runs=[1])
    assert set(design.run[test]) == {1} and set(design.run[train]) == {0}
    with pytest.raises(InputError):
        split_train_test(design, test_runs=[0, 1])
