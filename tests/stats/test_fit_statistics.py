"""The test-set statistics of the fit stage, end to end on the demo's planted-BOLD
generator with three repeated test runs: every stored statistic recomputed
independently from the stored predictions and BOLD (voxelwise_tutorials, scipy,
sklearn, explicit permutation and resampling loops), planted voxels found, resume after
a kill byte-identical, CLI output, warnings and errors."""

from __future__ import annotations

import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from scipy import stats
from sklearn.metrics import r2_score

from conftest import cli_error
from voxelflow import cli
from voxelflow.pipeline.stages.bold import run_bold_stage
from voxelflow.pipeline.stages.fit import run_fit_stage
from voxelflow.pipeline.stats import resampling
from voxelflow.pipeline.stats.per_block import StatisticsOptions
from voxelflow.pipeline.synthetic.simulate import planted_response
from voxelflow.stores import RunTemplate, Workspace

utils = pytest.importorskip("voxelwise_tutorials.utils")

FPS, TR, N_VOL, N_FEAT, SIDE = 2.0, 1.0, 120, 6, 4
LAGS = [4.0, 5.0]
REPEATS = [2, 3, 4]  # runs 2-4 show the same clip
KEEP = np.arange(5, N_VOL)  # BOLD samples with a full history at lags 4 and 5 s
STATS = StatisticsOptions(permutations=400, bootstrap=300, block_length=10, seed=5)


def _features(ws: Workspace, runs: list[np.ndarray]) -> None:
    """/features/f as the features stage writes it (one node per run)."""
    templates = []
    for r, f in enumerate(runs):
        t = np.arange(f.shape[0]) / FPS
        ds = xr.Dataset({"features": (("time", "feature"),
                                      da.empty(f.shape, np.float32, chunks=f.shape))},
                        coords={"time": ("time", t), "run": ("time", np.full(t.size, r))})
        templates.append(RunTemplate(ds, {"features": {"chunks": f.shape}}, "time",
                                     f.shape[0]))
    writer = ws.start_stage("features/f", {"stage": "test-features"}, templates)
    for r, f in enumerate(runs):
        writer.write_block(r, 0, {"features": f.astype(np.float32)})
    writer.finish()


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Five runs: 0 and 1 with their own clips, 2-4 the same clip; BOLD of 64 voxels
    from the demo's generator (one voxel tuning for all runs, fresh noise in each)."""
    tmp = tmp_path_factory.mktemp("fit-statistics")
    rng = np.random.default_rng(0)
    clips = [np.repeat(rng.normal(size=(int(N_VOL * FPS) // 4, N_FEAT)), 4, axis=0)
             for _ in range(3)]
    runs = [clips[0], clips[1], clips[2], clips[2], clips[2]]
    frame_times = np.arange(len(runs) * runs[0].shape[0]) / FPS
    bold, snr = planted_response(np.concatenate(runs), frame_times,
                                 np.arange(len(runs) * N_VOL) * TR, LAGS, SIDE ** 3,
                                 snr=0.5, seed=1)
    paths = []
    for r in range(len(runs)):
        vol = bold[r * N_VOL:(r + 1) * N_VOL].T.reshape(SIDE, SIDE, SIDE, N_VOL)
        img = nib.Nifti1Image(vol, np.diag([3.0, 3.0, 3.0, 1.0]))
        img.header.set_xyzt_units("mm", "sec")
        img.header["pixdim"][4] = TR
        paths.append(tmp / f"run{r}.nii.gz")
        nib.save(img, paths[-1])
    mask = tmp / "mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((SIDE,) * 3, np.uint8), img.affine), mask)
    ws = Workspace(tmp / "ws.zarr")
    _features(ws, runs)
    run_bold_stage(ws, paths, "s", mask=mask, progress=False)
    summary = run_fit_stage(ws, "f", "s", LAGS, [1, 10, 100, 1e3], test_repeats=[REPEATS],
                            cv=2, save_predictions=True, statistics=STATS, name="rep",
                            progress=False)
    return ws, summary, snr


def _measured(ws: Workspace) -> np.ndarray:
    """(repeat, test_sample, voxel) stored BOLD of the repeats at the test samples."""
    return np.stack([ws.open_run("bold/s", r)["bold"].values[KEEP] for r in REPEATS])


def test_repeats_ceiling_r_and_r2_against_independent_references(study):
    ws, summary, _ = study
    fit = ws.open_node(summary.group).load()
    repeats = _measured(ws)
    ybar = repeats.mean(axis=0)
    pred = fit["predictions"].values.astype(np.float64)
    assert pred.shape == ybar.shape and summary.n_test == KEEP.size
    np.testing.assert_allclose(fit["explainable_variance"].values,
                               utils.explainable_variance(repeats), rtol=0, atol=1e-6)
    # cc_max by Schoppe et al.'s signal power, written out here once more
    n = len(REPEATS)
    sp = (n * ybar.var(0, ddof=1) - repeats.var(1, ddof=1).mean(0)) / (n - 1)
    cc_max = np.where(sp > 0, np.sqrt(np.clip(sp, 0, None) / ybar.var(0, ddof=1)), np.nan)
    np.testing.assert_allclose(fit["cc_max"].values, cc_max, rtol=0, atol=1e-6, equal_nan=True)
    r = np.array([stats.pearsonr(pred[:, v], ybar[:, v]).statistic for v in range(SIDE ** 3)])
    np.testing.assert_allclose(fit["r_test_cv"].values, r, rtol=0, atol=2e-5)
    np.testing.assert_allclose(fit["cc_norm"].values, r / cc_max, rtol=0, atol=1e-4,
                               equal_nan=True)
    np.testing.assert_allclose(fit["r2_test_cv"].values,
                               r2_score(ybar, pred, multioutput="raw_values"), rtol=0, atol=2e-5)
    assert "noise ceiling (3 repeats)" in summary.table()
    assert fit["cc_max"].attrs["units"] == "1" and "Schoppe" in fit["cc_max"].attrs["long_name"]


def _explicit_null(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """(permutation, voxel) r with the block orders of the fit's seed, one at a time."""
    orders = resampling.block_permutations(y.shape[0], 10, STATS.permutations, STATS.seed)
    tail = np.arange(orders.shape[1] * 10, y.shape[0])
    null = np.empty((orders.shape[0], y.shape[1]))
    for b, row in enumerate(orders):
        idx = np.concatenate([np.arange(k * 10, k * 10 + 10) for k in row] + [tail])
        null[b] = stats.pearsonr(y, p[idx], axis=0).statistic
    return null


def test_permutation_fdr_fwe_and_bootstrap_against_explicit_loops(study):
    ws, summary, _ = study
    fit = ws.open_node(summary.group).load()
    y, p = _measured(ws).mean(axis=0), fit["predictions"].values.astype(np.float64)
    r = fit["r_test_cv"].values.astype(np.float64)
    null = _explicit_null(y, p)
    expected_p = (1 + (null >= r - 1e-5).sum(axis=0)) / (1 + STATS.permutations)
    np.testing.assert_allclose(fit["p_perm"].values, expected_p, rtol=1e-6)
    np.testing.assert_allclose(fit["q_perm_fdr"].values,
                               stats.false_discovery_control(expected_p), rtol=1e-5)
    maxima = null.max(axis=1)
    np.testing.assert_allclose(fit["null_max_r"].values[0], maxima, rtol=0, atol=2e-6)
    fwe = (1 + (maxima[None, :] >= r[:, None] - 1e-5).sum(axis=1)) / (1 + STATS.permutations)
    np.testing.assert_allclose(fit["p_perm_fwe"].values, fwe, rtol=1e-6)
    # the bootstrap: resample whole 10-sample blocks of test rows, mean r over voxels
    boundaries = resampling.block_boundaries(y.shape[0], 10)
    counts = resampling.bootstrap_counts(y.shape[0], 10, STATS.bootstrap, STATS.seed)
    means = []
    for row in counts[:60]:
        rows = np.concatenate([np.tile(np.arange(boundaries[k], boundaries[k + 1]), c)
                               for k, c in enumerate(row)])
        means.append(np.mean(stats.pearsonr(y[rows], p[rows], axis=0).statistic))
    np.testing.assert_allclose(fit["bootstrap_mean_r"].values[:60], means, rtol=0, atol=1e-5)
    assert fit["p_parametric"].values.min() < fit["p_perm"].values.min()


def test_planted_voxels_are_found(study):
    ws, summary, snr = study
    fit = ws.open_node(summary.group)
    significant = fit["q_perm_fdr"].values < 0.05
    planted = snr > 0
    assert planted.sum() > 50 and (~planted).sum() >= 3
    assert significant[planted].mean() > 0.9, significant[planted].mean()
    assert significant[~planted].sum() <= 1
    # no voxel without signal passes the family-wise threshold
    assert not (fit["p_perm_fwe"].values[~planted] < 0.05).any()


def test_resume_after_a_kill_mid_blocks_and_before_finalize_is_identical(study, monkeypatch):
    ws, _, _ = study
    from voxelflow.pipeline.stages import _fit_stats
    from voxelflow.stores.stage import StageWriter

    def fit(name):
        return run_fit_stage(ws, "f", "s", LAGS, [1, 10, 100, 1e3], test_repeats=[REPEATS],
                             cv=2, statistics=STATS, name=name, voxel_block=32,
                             progress=False)

    whole = ws.open_node(fit("whole").group).load()
    original, written = StageWriter.write_block_data, []

    def crash_on_the_second_block(self, run, block, arrays):
        if written:  # the first block is written, then the process "dies"
            raise KeyboardInterrupt
        written.append(block)
        original(self, run, block, arrays)

    monkeypatch.setattr(StageWriter, "write_block_data", crash_on_the_second_block)
    with pytest.raises(KeyboardInterrupt):
        fit("resumed")
    monkeypatch.setattr(StageWriter, "write_block_data", original)

    def crash(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(_fit_stats, "finalize", crash)  # every block done, not combined
    with pytest.raises(KeyboardInterrupt):
        fit("resumed")
    assert ws.state("fits/resumed/lags-4-5") == "writing"
    monkeypatch.undo()
    resumed = ws.open_node(fit("resumed").group).load()
    assert ws.state("fits/resumed/lags-4-5") == "complete"
    assert sorted(resumed.variables) == sorted(whole.variables)
    for name in whole.variables:
        np.testing.assert_array_equal(resumed[name].values, whole[name].values, err_msg=name)


def test_cli_prints_statistics_warnings_and_exports_maps(study, capsys, tmp_path):
    ws, _, _ = study
    base = ["fit", "--features", "f", "--bold", "s", "--lags", "4,5", "--store", str(ws.path),
            "--no-progress", "--alphas", "1,10", "--cv", "2", "--permutations", "100",
            "--bootstrap", "50"]
    assert cli.main(base + ["--test-samples", "15", "--name", "short"]) == 0
    out = capsys.readouterr()
    assert "95 % CI" in out.out and "significant voxels (r > 0)" in out.out
    warnings = out.err.strip().splitlines()
    assert any("only 15 test samples" in w for w in warnings)
    assert any("fewer than two blocks of 10" in w for w in warnings)
    assert all(w.startswith("voxelflow: warning: ") for w in warnings)
    fit = ws.open_node("fits/short/lags-4-5")
    assert "p_perm" not in fit and "p_parametric" in fit  # one block: nothing to permute
    assert cli.main(base + ["--test-repeats", "2,3,4", "--name", "cli-rep", "--null",
                            "shifts"]) == 0
    out = capsys.readouterr()
    assert "noise ceiling (3 repeats)" in out.out and "shifts null" in out.out
    fit = ws.open_node("fits/cli-rep/lags-4-5")
    np.testing.assert_array_equal(fit["permutation"].values,
                                  resampling.circular_shifts(KEEP.size, 10))
    for var in ("q_perm_fdr", "cc_norm", "r2_test_cv"):
        path = tmp_path / f"{var}.nii.gz"
        assert cli.main(["export", "fits/cli-rep/lags-4-5", var, str(path), "--store",
                         str(ws.path)]) == 0
        volume = np.asarray(nib.load(path).dataobj)
        np.testing.assert_array_equal(volume[fit["i"].values, fit["j"].values, fit["k"].values],
                                      fit[var].values)
    capsys.readouterr()
    for bad, message in [(["--test-repeats", "2,9"], "runs [9] not among"),
                         (["--test-repeats", "2,3,4", "--block-length", "0"],
                          "--block-length must be >= 1"),
                         (["--test-repeats", "2,3,4", "--permutations", "-1"],
                          "--permutations must be >= 0")]:
        assert message in cli_error(capsys, *base, "--name", "bad", *bad)
