"""The report's intervals, paired comparisons (in numbers and in words), per-voxel
winner map and warnings, from fit Datasets whose statistics are computed here by
explicit resampling of test rows (no pipeline run)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import xarray as xr
from scipy import stats

from voxelflow.pipeline.stats import bootstrap, resampling
from voxelflow.pipeline.study.report import FitResult, summary_table, write_report

N_TEST, N_VOXELS, BLOCK, RESAMPLES, SEED = 80, 30, 8, 400, 2
ALPHAS = (1.0, 10.0, 100.0)
PARAMS = {"block_length": BLOCK, "seed": SEED, "bootstrap": RESAMPLES, "permutations": 0}


def _fit(y: np.ndarray, pred: np.ndarray, key: str = "same", best_alpha: float = 10.0
         ) -> xr.Dataset:
    """A fit Dataset of predictions ``pred`` of ``y``: r per voxel, and the bootstrap
    means and block sums of the fit stage, computed by resampling rows explicitly."""
    r = stats.pearsonr(y, pred, axis=0).statistic
    boundaries = resampling.block_boundaries(N_TEST, BLOCK)
    counts = resampling.bootstrap_counts(N_TEST, BLOCK, RESAMPLES, SEED)
    means = []
    for row in counts:
        rows = np.concatenate([np.tile(np.arange(boundaries[k], boundaries[k + 1]), c)
                               for k, c in enumerate(row)])
        means.append(stats.pearsonr(y[rows], pred[rows], axis=0).statistic.mean())
    sums = bootstrap.time_block_sums(y, pred, boundaries).astype(np.float32)
    data = {"r_test": (("alpha", "voxel"), np.tile(r, (3, 1)).astype(np.float32)),
            "r_cv": (("alpha", "voxel"), np.full((3, N_VOXELS), 0.1, np.float32)),
            "r_test_cv": (("voxel",), r.astype(np.float32)),
            "best_alpha": (("voxel",), np.full(N_VOXELS, best_alpha, np.float32)),
            "bootstrap_mean_r": (("resample",), np.asarray(means))}
    data.update({name: (("time_block", "voxel"), values)
                 for name, values in zip(bootstrap.BLOCK_SUM_VARIABLES, sums)})
    return xr.Dataset(data, coords={"alpha": list(ALPHAS)},
                      attrs={"n_test": N_TEST, "test_key": key, "statistics": PARAMS,
                             "lags": [4.0], "min_train_per_fold": 100})


def _study():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(N_TEST, N_VOXELS))
    noise = [rng.normal(size=(N_TEST, N_VOXELS)) for _ in range(4)]
    strong = np.r_[np.full(20, 1.0), np.full(10, 0.2)]  # model a: best on voxels 0-19
    weak = np.r_[np.full(20, 0.2), np.full(10, 1.0)]    # model b: best on voxels 20-29
    return y, [
        FitResult("a", [4.0], _fit(y, strong * y + noise[0])),
        FitResult("a", [4.0, 5.0], _fit(y, 0.98 * strong * y + noise[1])),  # a close second
        FitResult("b", [4.0], _fit(y, weak * y + noise[2], best_alpha=100.0)),
        FitResult("c", [4.0], _fit(y, 0.5 * y + noise[3], key="other test set")),
    ]


def test_intervals_and_paired_comparisons_against_the_stored_resamples():
    _, results = _study()
    table = summary_table(results)
    assert list(table["model"]) == ["a", "a", "b", "c"]
    best = int(np.argmax(table["r_cv_selected"]))
    assert best == 0
    boot = [r.fit["bootstrap_mean_r"].values for r in results]
    for i, row in table.iterrows():
        np.testing.assert_allclose([row["ci_low"], row["ci_high"]],
                                   np.quantile(boot[i], [0.025, 0.975]), rtol=1e-12)
        assert abs(row["r_cv_selected"] - results[i].fit["r_test_cv"].values.mean()) < 1e-6
    d = boot[0] - boot[2]
    row = table.iloc[2]
    assert abs(row["diff_vs_best"] - (table["r_cv_selected"][0] - row["r_cv_selected"])) < 1e-12
    np.testing.assert_allclose([row["diff_ci_low"], row["diff_ci_high"]],
                               np.quantile(d, [0.025, 0.975]), rtol=1e-12)
    assert row["p_vs_best"] == min(1, 2 * min(1 + (d <= 0).sum(), 1 + (d >= 0).sum()) / 401)
    # Holm over the two paired comparisons (rows 1 and 2); row 3 has other test samples
    p = sorted([(table["p_vs_best"][1], 1), (table["p_vs_best"][2], 2)])
    assert table["p_vs_best_holm"][p[0][1]] == min(1, 2 * p[0][0])
    assert np.isnan(table["p_vs_best"][3]) and np.isfinite(table["ci_low"][3])


def test_report_states_the_differences_in_words_and_shows_warnings(tmp_path):
    _, results = _study()
    out = write_report(results, tmp_path, experiment="t")
    words = out["comparisons"]
    assert words[0].startswith("Best: a, lags 4, mean r")
    table = out["table"]
    assert table["p_vs_best_holm"][1] > 0.05 and table["p_vs_best_holm"][2] < 0.05
    assert any(w.startswith("The difference with a, lags 4,5 is not significant") for w in words)
    assert any(w.startswith("It predicts significantly better than b, lags 4") for w in words)
    assert any(w.startswith("Not compared with c, lags 4") for w in words)
    page = (tmp_path / "index.html").read_text()
    assert "Which differences are significant" in page and "class='warn'" in page
    # only b's best alpha (100) is at an edge of the grid (1, 10, 100): one warning
    assert out["warnings"] == ["b, lags 4: best alpha at an edge of the grid for 100 % of "
                               "scored voxels (0 % at 1, 100 % at 100): extend the alphas "
                               "beyond that edge"]
    assert "b, lags 4: best alpha at an edge of the grid for 100 %" in page


def test_winner_map_labels_only_significant_winners(tmp_path):
    _, results = _study()
    written = {}

    def write_values(values, path, description):  # voxels on a 5 x 3 x 2 grid
        written[path.name] = np.asarray(values)
        volume = np.asarray(values, np.int16).reshape(5, 3, 2)
        nib.save(nib.Nifti1Image(volume, np.eye(4)), path)

    out = write_report(results[:3], tmp_path, experiment="t", write_values=write_values)
    counts = out["winners"]
    # candidates: each model at its best lag set (a: lags 4; b: lags 4)
    assert list(counts["model"]) == ["a", "b"] and list(counts["lags"]) == ["4", "4"]
    labels = written["winner_model.nii.gz"]
    assert labels.shape == (N_VOXELS,) and set(np.unique(labels)) <= {0, 1, 2}
    assert (labels[:20] == 1).mean() > 0.8 and (labels[20:] == 2).mean() > 0.8
    assert counts["n_significant_winner"].tolist() == [(labels == 1).sum(), (labels == 2).sum()]
    assert (tmp_path / "winner_model.png").exists()
    # cells that do not pair (other test samples): no winner map
    assert write_report([results[0], results[3]], tmp_path / "x", experiment="t")["winners"] is None
