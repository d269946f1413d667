"""The fit stage end to end: stored features + ingested NIfTI BOLD -> /fits, against
an independent sklearn reference, planted-lag recovery, chunk exactness, resume, errors."""

from __future__ import annotations

import shutil

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from sklearn.linear_model import Ridge

from conftest import cli_here
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stages.fit import fit_weights, run_fit_stage
from voxelflow.pipeline.ridge.scoring import contiguous_folds
from voxelflow.stores import RunTemplate, Workspace

FPS = 4.0
TR = 1.0
N_VOL = 90
ALPHAS = [0.1, 1.0, 10.0, 100.0, 1000.0]


def _write_features(ws: Workspace, name: str, runs: list[np.ndarray]) -> None:
    """A features group as the features stage writes it: per run, (time, feature)."""
    templates = []
    for r, f in enumerate(runs):
        t = np.arange(f.shape[0]) / FPS
        ds = xr.Dataset({"features": (("time", "feature"), da.empty(f.shape, np.float32,
                                                                     chunks=f.shape))},
                        coords={"time": ("time", t, {"units": "s"}),
                                "run": ("time", np.full(t.size, r, np.int32))})
        templates.append(RunTemplate(ds, {"features": {"chunks": f.shape}}, "time", f.shape[0]))
    writer = ws.start_stage(f"features/{name}", {"stage": "test-features", "name": name},
                            templates)
    for r, f in enumerate(runs):
        writer.write_block(r, 0, {"features": f.astype(np.float32)})
    writer.finish()


def _planted(tmp_path, seed=0, lag=5.0, n_runs=2, n_feat=6):
    """Features per run and NIfTI BOLD whose voxels respond to features at t - lag."""
    rng = np.random.default_rng(seed)
    feats, paths = [], []
    n_frames = int(N_VOL * TR * FPS)
    w = rng.normal(size=(n_feat, 27))
    snr = np.linspace(0.2, 3, 27)
    for r in range(n_runs):
        # Slowly varying features (piecewise constant per second) so lags are separable.
        f = np.repeat(rng.normal(size=(n_frames // 4, n_feat)), 4, axis=0)
        feats.append(f)
        idx = np.searchsorted(np.arange(n_frames) / FPS, np.arange(N_VOL) * TR - lag + 1e-6,
                              side="right") - 1
        sig = np.where((idx >= 0)[:, None], f[np.clip(idx, 0, None)] @ w, 0.0)
        bold = sig * snr + rng.normal(size=sig.shape)
        vol = (100 + bold).T.reshape(3, 3, 3, N_VOL).astype(np.float32)
        img = nib.Nifti1Image(vol, np.diag([3.0, 3.0, 3.0, 1.0]))
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = TR
        paths.append(tmp_path / f"run{r}.nii.gz")
        nib.save(img, paths[-1])
    nib.save(nib.Nifti1Image(np.ones((3, 3, 3), np.uint8), img.affine), tmp_path / "mask.nii.gz")
    return feats, paths


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    """The planted features and ingested BOLD, built once per module (read-only)."""
    tmp = tmp_path_factory.mktemp("planted")
    feats, paths = _planted(tmp)
    ws = Workspace(tmp / "ws.zarr")
    _write_features(ws, "f", feats)
    run_bold_stage(ws, paths, "s", mask=paths[0].parent / "mask.nii.gz", progress=False)
    return ws.path, feats


@pytest.fixture
def planted_ws(tmp_path, planted_store):
    """A private copy of the planted workspace: each test writes its own fits."""
    path, feats = planted_store
    shutil.copytree(path, tmp_path / "ws.zarr")
    return Workspace(tmp_path / "ws.zarr"), feats


def test_fit_matches_independent_sklearn_reference(planted_ws):
    ws, feats = planted_ws
    summary = run_fit_stage(ws, "f", "s", [4, 5], ALPHAS, test_samples=30, cv=4,
                            progress=False)
    fit = ws.open_node(summary.group)
    # Independent design: for each run and BOLD sample t >= 5 s, features at t-4 and t-5.
    bold = [ws.open_run("bold/s", r)["bold"].values for r in range(2)]
    rows, ys = [], []
    for r in range(2):
        ft = np.arange(feats[r].shape[0]) / FPS
        for i in range(N_VOL):
            t = i * TR
            if t - 5 < 0:
                continue
            pick = [np.flatnonzero(ft <= t - L + 1e-9)[-1] for L in (4, 5)]
            rows.append(np.concatenate([feats[r][p] for p in pick]))
            ys.append(bold[r][i])
    X, Y = np.asarray(rows, np.float64), np.asarray(ys, np.float64)
    Xtr, Xte, Ytr, Yte = X[:-30], X[-30:], Y[:-30], Y[-30:]
    for a_i, alpha in enumerate(ALPHAS):
        model = Ridge(alpha=alpha, solver="svd").fit(Xtr, Ytr)
        pred = model.predict(Xte)
        r = [np.corrcoef(pred[:, v], Yte[:, v])[0, 1] for v in range(Y.shape[1])]
        np.testing.assert_allclose(fit["r_test"].values[a_i], r, atol=1e-4)
    # CV-selected alpha per voxel: mean over contiguous folds of held-out r.
    folds = contiguous_folds(len(Xtr), 4)
    cv = np.zeros((len(ALPHAS), Y.shape[1]))
    for held in folds:
        keep = np.setdiff1d(np.arange(len(Xtr)), held)
        for a_i, alpha in enumerate(ALPHAS):
            p = Ridge(alpha=alpha, solver="svd").fit(Xtr[keep], Ytr[keep]).predict(Xtr[held])
            cv[a_i] += [np.corrcoef(p[:, v], Ytr[held][:, v])[0, 1] for v in range(Y.shape[1])]
    best = np.asarray(ALPHAS)[cv.argmax(0)]
    np.testing.assert_array_equal(fit["best_alpha"].values, best.astype(np.float32))
    assert summary.n_test == 30 and summary.dropped == [5, 5]


def test_planted_lag_is_found(planted_ws):
    ws, _ = planted_ws
    scores = {}
    for lag in (3, 4, 5, 6, 7):
        s = run_fit_stage(ws, "f", "s", [lag], ALPHAS, test_samples=30, cv=3, progress=False)
        scores[lag] = s.mean_r_cv_selected
    assert max(scores, key=scores.get) == 5, scores


def test_voxel_blocks_are_exact_and_resume_finishes(planted_ws, monkeypatch):
    ws, _ = planted_ws
    outs = []
    for block in (1, 7, 4096):
        s = run_fit_stage(ws, "f", "s", [5], ALPHAS, test_samples=30, name=f"b{block}",
                          voxel_block=block, progress=False)
        outs.append(ws.open_node(s.group).load())
    # Voxels are independent: blocks change only the float32 rounding of the BLAS
    # kernels BLAS picks for the block width (a few ULP), never the result.
    for other in outs[1:]:
        for var in ("r_test", "r_cv", "r_test_cv"):
            np.testing.assert_allclose(outs[0][var].values, other[var].values, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(outs[0]["best_alpha"].values, other["best_alpha"].values)
    # Interrupt after two blocks, rerun: only the rest is computed, same result.
    from voxelflow.stores.workspace import StageWriter
    original = StageWriter.write_block_data
    calls = {"n": 0}

    def crash_after_two(self, run, block, arrays):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        original(self, run, block, arrays)

    monkeypatch.setattr(StageWriter, "write_block_data", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_fit_stage(ws, "f", "s", [5], ALPHAS, test_samples=30, name="resume",
                      voxel_block=7, progress=False)
    monkeypatch.setattr(StageWriter, "write_block_data", original)
    s = run_fit_stage(ws, "f", "s", [5], ALPHAS, test_samples=30, name="resume",
                      voxel_block=7, progress=False)
    assert s.blocks_skipped == 2 and s.blocks_written == 2
    got = ws.open_node(s.group)
    np.testing.assert_array_equal(got["r_test"].values, outs[1]["r_test"].values)


def test_constant_voxels_are_excluded_and_counted(tmp_path):
    feats, paths = _planted(tmp_path)
    img = nib.load(paths[0])
    data = img.get_fdata()
    data[0, 0, 0, :] = 7.0
    nib.save(nib.Nifti1Image(data.astype(np.float32), img.affine, img.header), paths[0])
    ws = Workspace(tmp_path / "ws.zarr")
    _write_features(ws, "f", feats)
    run_bold_stage(ws, paths, "s", mask=paths[0].parent / "mask.nii.gz", progress=False)
    s = run_fit_stage(ws, "f", "s", [5], ALPHAS, test_samples=30, progress=False)
    assert s.n_valid == 26 and s.n_voxels == 27
    fit = ws.open_node(s.group)
    assert np.isnan(fit["r_test"].values[:, 0]).all()
    assert "26 of 27 voxels scored" in s.table()


def test_bad_fit_inputs(planted_ws):
    ws, _ = planted_ws
    with pytest.raises(InputError, match="use shorter lags"):
        run_fit_stage(ws, "f", "s", [200], ALPHAS, test_samples=30, progress=False)
    with pytest.raises(InputError, match="alphas must all be > 0"):
        run_fit_stage(ws, "f", "s", [5], [1, 0], test_samples=30, progress=False)
    with pytest.raises(InputError, match="no group /features/nope"):
        run_fit_stage(ws, "f" if False else "nope", "s", [5], ALPHAS, test_samples=30,
                      progress=False)
    res = cli_here("fit", "--features", "f", "--bold", "s", "--lags", "5", "--alphas", "1,-1",
                   "--test-samples", "30", "--store", str(ws.path))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "--alphas must all be > 0" in res.stderr


def test_nan_features_are_refused(tmp_path):
    feats, paths = _planted(tmp_path)
    feats[1][12, 2] = np.nan  # frame at 3 s, used by t = 8 s
    ws = Workspace(tmp_path / "ws.zarr")
    _write_features(ws, "f", feats)
    run_bold_stage(ws, paths, "s", mask=paths[0].parent / "mask.nii.gz", progress=False)
    with pytest.raises(InputError, match="NaN"):
        run_fit_stage(ws, "f", "s", [5], ALPHAS, test_samples=30, progress=False)
    assert ws.state("fits/f__s/lags-5") != "complete"


def test_fit_cli_prints_table(planted_ws):
    ws, _ = planted_ws
    res = cli_here("fit", "--features", "f", "--bold", "s", "--lags", "4,5", "--alphas",
                   "1,10,100", "--test-samples", "30", "--cv", "3", "--store", str(ws.path),
                   "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "CV-selected" in res.stdout and "<- best" in res.stdout
    assert "/fits/f__s/lags-4-5" in res.stdout


# ------------------------------------------------ README options against sklearn
# One small workspace shared by the tests below: 4 runs of unequal length (so that
# whole-run folds differ from contiguous blocks), features i.i.d. per frame (so that
# a frame and a mean over frames differ), BOLD written directly (no ingestion).
RUN_VOLUMES = (52, 60, 68, 56)
N_FEAT = 5
LAGS = (2.0, 3.0)
N_VOX = 12


def _write_bold(ws: Workspace, name: str, runs: list[np.ndarray]) -> None:
    """A BOLD group as the bold stage leaves it: per run, ``bold (time, voxel)`` at i * TR."""
    templates = []
    for data in runs:
        t = np.arange(data.shape[0]) * TR
        ds = xr.Dataset({"bold": (("time", "voxel"), da.empty(data.shape, np.float32,
                                                              chunks=data.shape))},
                        coords={"time": ("time", t, {"units": "s"})})
        templates.append(RunTemplate(ds, {"bold": {"chunks": data.shape}}, "time",
                                     data.shape[0]))
    writer = ws.start_stage(f"bold/{name}", {"stage": "test-bold", "name": name}, templates,
                            group_attrs={"tr": TR})
    for r, data in enumerate(runs):
        writer.write_block(r, 0, {"bold": data.astype(np.float32)})
    writer.finish()


def _design_row(frames: np.ndarray, frame_times: np.ndarray, t: float, aggregate: str
                ) -> np.ndarray:
    """Lag-major design row of BOLD time ``t``: per lag L, the frame shown at t - L
    (``last``) or the mean of the frames in [t - L - TR, t - L) (``mean``)."""
    parts = []
    for lag in LAGS:
        if aggregate == "last":
            parts.append(frames[np.flatnonzero(frame_times <= t - lag + 1e-9)[-1]])
        else:
            inside = (frame_times >= t - lag - TR - 1e-9) & (frame_times < t - lag - 1e-9)
            parts.append(frames[inside].mean(axis=0))
    return np.concatenate(parts)


def _reference_design(ws: Workspace, aggregate: str, rows_as: str | None = None):
    """``(X, Y, run)`` in float64 from the stored features and BOLD, for every BOLD
    sample with a full history under ``aggregate``; rows built as ``rows_as``."""
    history = max(LAGS) + (TR if aggregate == "mean" else 0.0)
    xs, ys, runs = [], [], []
    for r in range(len(RUN_VOLUMES)):
        feat = ws.open_run("features/f", r)
        frames = feat["features"].values.astype(np.float64)
        frame_times = feat["time"].values.astype(np.float64)
        bold = ws.open_run("bold/s", r)["bold"].values.astype(np.float64)
        for i in range(bold.shape[0]):
            if i * TR - history < 0:
                continue
            xs.append(_design_row(frames, frame_times, i * TR, rows_as or aggregate))
            ys.append(bold[i])
            runs.append(r)
    return np.asarray(xs), np.asarray(ys), np.asarray(runs)


def _column_r(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r per column."""
    pred, y = pred - pred.mean(0), y - y.mean(0)
    return (pred * y).sum(0) / np.sqrt((pred ** 2).sum(0) * (y ** 2).sum(0))


def _sklearn_r(X_train, Y_train, X_held, Y_held) -> np.ndarray:
    """(alpha, voxel) held-out r of sklearn Ridge trained on the given samples."""
    return np.stack([_column_r(Ridge(alpha=a, solver="svd").fit(X_train, Y_train)
                               .predict(X_held), Y_held) for a in ALPHAS])


@pytest.fixture(scope="session")
def options_ws(tmp_path_factory):
    """The shared workspace and two fits made through the CLI: ``runs`` (--test-runs
    1 --cv runs --save-weights --save-predictions) and ``mean`` (--aggregate mean)."""
    from voxelflow import cli

    tmp = tmp_path_factory.mktemp("fit-options")
    rng = np.random.default_rng(7)
    feats = [rng.normal(size=(int(n * TR * FPS), N_FEAT)).astype(np.float32)
             for n in RUN_VOLUMES]
    ws = Workspace(tmp / "ws.zarr")
    _write_features(ws, "f", feats)
    w = rng.normal(size=(len(LAGS) * N_FEAT, N_VOX))
    snr = np.linspace(0.0, 2.0, N_VOX)  # voxel 0 is noise: a large alpha wins there
    bolds = []
    for f, n in zip(feats, RUN_VOLUMES):
        ft = np.arange(f.shape[0]) / FPS
        rows = np.stack([_design_row(f, ft, max(i * TR, max(LAGS)), "last")
                         for i in range(n)])
        bolds.append(100.0 + snr * (rows @ w) / np.sqrt(w.shape[0])
                     + rng.normal(size=(n, N_VOX)))
    _write_bold(ws, "s", bolds)
    common = ["fit", "--features", "f", "--bold", "s", "--lags", "2,3", "--alphas",
              ",".join(f"{a:g}" for a in ALPHAS), "--store", str(ws.path), "--no-progress"]
    assert cli.main(common + ["--name", "runs", "--test-runs", "1", "--cv", "runs",
                              "--save-weights", "--save-predictions"]) == 0
    assert cli.main(common + ["--name", "mean", "--aggregate", "mean", "--test-samples",
                              "30", "--cv", "3"]) == 0
    return ws


def test_cv_runs_and_test_runs_match_sklearn_leave_one_run_out(options_ws):
    from sklearn.model_selection import LeaveOneGroupOut

    ws = options_ws
    fit = ws.open_node("fits/runs/lags-2-3")
    X, Y, run = _reference_design(ws, "last")
    test = run == 1  # --test-runs 1: the test samples are exactly run 1's
    assert fit.sizes["test_sample"] == test.sum() == RUN_VOLUMES[1] - 3
    assert ws.attrs("fits/runs/lags-2-3")["n_train"] == (~test).sum()
    np.testing.assert_allclose(fit["r_test"].values,
                               _sklearn_r(X[~test], Y[~test], X[test], Y[test]), atol=1e-4)
    # --cv runs: one fold per training run (LeaveOneGroupOut), mean held-out r.
    X_train, Y_train, groups = X[~test], Y[~test], run[~test]
    folds = list(LeaveOneGroupOut().split(X_train, groups=groups))
    assert len(folds) == 3
    r_cv = np.mean([_sklearn_r(X_train[keep], Y_train[keep], X_train[held], Y_train[held])
                    for keep, held in folds], axis=0)
    np.testing.assert_allclose(fit["r_cv"].values, r_cv, atol=1e-4)
    # Unequal runs: three contiguous blocks would give other scores (the check can fail).
    blocks = contiguous_folds(len(X_train), 3)
    r_blocks = np.mean([_sklearn_r(np.delete(X_train, h, 0), np.delete(Y_train, h, 0),
                                   X_train[h], Y_train[h]) for h in blocks], axis=0)
    assert np.abs(r_blocks - r_cv).max() > 1e-2
    # best alpha per voxel = argmax of the LOGO score (where no near tie)
    ranked = np.sort(r_cv, axis=0)
    clear = ranked[-1] - ranked[-2] > 1e-4
    best = np.asarray(ALPHAS)[r_cv.argmax(0)]
    np.testing.assert_array_equal(fit["best_alpha"].values[clear],
                                  best[clear].astype(np.float32))


def test_aggregate_mean_design_and_scores_match_sklearn(options_ws):
    from voxelflow.pipeline.design.lags import build_design

    ws = options_ws
    X, Y, run = _reference_design(ws, "mean")
    # The rows of the mean design are the frame means in [t - L - TR, t - L) ...
    design = build_design(ws.open_runs("features/f"), ws.open_runs("bold/s"), list(LAGS), TR,
                          aggregate="mean")
    np.testing.assert_allclose(design.X.compute(), X, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(design.run, run)
    # ... which are not the frames at t - L of the same samples.
    X_last, _, _ = _reference_design(ws, "mean", rows_as="last")
    assert np.abs(X_last - X).max() > 0.5
    # Through the fit: test r of the last 30 samples equals sklearn's on that design.
    fit = ws.open_node("fits/mean/lags-2-3")
    attrs = ws.attrs("fits/mean/lags-2-3")
    assert attrs["dropped_per_run"] == [4] * len(RUN_VOLUMES)  # t < max(L) + TR
    assert attrs["aggregate"] == "mean" and attrs["n_train"] == len(X) - 30
    np.testing.assert_allclose(fit["r_test"].values,
                               _sklearn_r(X[:-30], Y[:-30], X[-30:], Y[-30:]), atol=1e-4)
    assert np.abs(_sklearn_r(X_last[:-30], Y[:-30], X_last[-30:], Y[-30:])
                  - fit["r_test"].values).max() > 1e-2


def test_saved_weights_and_predictions_match_sklearn_at_the_selected_alpha(options_ws):
    ws = options_ws
    fit = ws.open_node("fits/runs/lags-2-3")
    assert fit["weights"].dims == ("lag", "feature", "voxel")
    assert fit["lag"].values.tolist() == list(LAGS)
    assert fit["feature"].values.tolist() == [f"unit-{f:04d}" for f in range(N_FEAT)]
    assert fit["predictions"].dims == ("test_sample", "voxel")
    X, Y, run = _reference_design(ws, "last")
    test = run == 1
    best = fit["best_alpha"].values  # float32 copies of ALPHAS
    assert np.unique(best).size > 1  # the per-voxel alpha matters here
    coef = np.empty((X.shape[1], N_VOX))
    pred = np.empty((test.sum(), N_VOX))
    for alpha in ALPHAS:
        voxels = best == np.float32(alpha)
        if not voxels.any():
            continue
        model = Ridge(alpha=alpha, solver="svd").fit(X[~test], Y[~test][:, voxels])
        coef[:, voxels] = model.coef_.reshape(-1, X.shape[1]).T
        pred[:, voxels] = model.predict(X[test]).reshape(test.sum(), -1)
    weights = fit["weights"].values.reshape(len(LAGS) * N_FEAT, N_VOX)
    # (lag, feature, voxel): the design's column l * n_features + f is feature f at lag l
    np.testing.assert_allclose(weights, coef, rtol=1e-3, atol=1e-4 * np.abs(coef).max())
    np.testing.assert_allclose(fit["weights"].sel(feature="unit-0003", lag=3).values,
                               coef[1 * N_FEAT + 3], rtol=1e-3, atol=1e-4 * np.abs(coef).max())
    feature_major = coef.reshape(len(LAGS), N_FEAT, N_VOX).transpose(1, 0, 2).reshape(coef.shape)
    assert not np.allclose(weights, feature_major, rtol=1e-3, atol=1e-4 * np.abs(coef).max())
    # a group written in the old layout, weights (lag_feature, voxel), reads the same
    old = fit.drop_vars(["weights", "lag", "feature"]).assign(
        weights=(("lag_feature", "voxel"), weights))
    np.testing.assert_array_equal(fit_weights(old, {"lags": list(LAGS)}).values,
                                  fit["weights"].values)
    # predictions in BOLD units (intercept included), test samples in time order
    np.testing.assert_allclose(fit["predictions"].values, pred, rtol=0, atol=2e-3)
