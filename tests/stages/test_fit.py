"""The fit stage end to end: stored features + ingested NIfTI BOLD -> /fits, against
an independent sklearn reference, planted-lag recovery, chunk exactness, resume, errors."""

from __future__ import annotations

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from sklearn.linear_model import Ridge

from conftest import run_cli
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stages.fit import run_fit_stage
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


@pytest.fixture
def planted_ws(tmp_path):
    feats, paths = _planted(tmp_path)
    ws = Workspace(tmp_path / "ws.zarr")
    _write_features(ws, "f", feats)
    run_bold_stage(ws, paths, "s", mask=paths[0].parent / "mask.nii.gz", progress=False)
    return ws, feats


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
    res = run_cli("fit", "--features", "f", "--bold", "s", "--lags", "5", "--alphas", "1,-1",
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
    res = run_cli("fit", "--features", "f", "--bold", "s", "--lags", "4,5", "--alphas",
                  "1,10,100", "--test-samples", "30", "--cv", "3", "--store", str(ws.path),
                  "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "CV-selected" in res.stdout and "<- best" in res.stdout
    assert "/fits/f__s/lags-4-5" in res.stdout
