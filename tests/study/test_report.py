"""Report pieces against independent computations (no pipeline run needed)."""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import stats

from voxelflow.pipeline.study.report import FitResult, n_significant, roi_table, summary_table

ALPHAS = (1.0, 10.0, 100.0)
N_TEST = 60
N_VOXELS = 50
INVALID = [11, 12, 13, 31, 33]  # flagged invalid: inside ROIs 1 and 3 (labels below)
NAN_VOXEL = 40              # flagged valid, but its r is NaN: left out too
LABELS = np.repeat([0, 1, 2, 3, 4], 10)


def _fit(seed: int) -> tuple[xr.Dataset, np.ndarray]:
    """A fit Dataset whose r come from data: r_test[a, v] is Pearson's r between the
    test BOLD of voxel v (N_TEST samples) and a prediction of it for alpha a; each
    voxel's CV-selected alpha is drawn at random.  The invalid voxels are predicted
    almost perfectly at alpha 100 only, so that counting them would change the best
    alpha, the means and the significant count.  Also returns the one-sided
    ``pearsonr`` p-value of each voxel's r_test_cv (NaN for the NaN voxel)."""
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(N_TEST, N_VOXELS))
    strength = np.stack([rng.uniform(0.0, 0.5, N_VOXELS), rng.uniform(0.1, 0.7, N_VOXELS),
                         rng.uniform(0.05, 0.6, N_VOXELS)])
    strength[:, INVALID] = [[0.0], [0.0], [20.0]]
    preds = strength[:, None, :] * y + rng.normal(size=(len(ALPHAS), N_TEST, N_VOXELS))
    r = np.array([[stats.pearsonr(preds[a, :, v], y[:, v]).statistic
                   for v in range(N_VOXELS)] for a in range(len(ALPHAS))])
    cv_index = rng.integers(0, len(ALPHAS), N_VOXELS)
    cv_index[INVALID] = 2
    p = np.array([stats.pearsonr(preds[cv_index[v], :, v], y[:, v],
                                 alternative="greater").pvalue for v in range(N_VOXELS)])
    r[:, NAN_VOXEL] = np.nan
    p[NAN_VOXEL] = np.nan
    r = r.astype(np.float32)
    valid = np.ones(N_VOXELS, bool)
    valid[INVALID] = False
    ds = xr.Dataset({"r_test": (("alpha", "voxel"), r),
                     "r_test_cv": (("voxel",), r[cv_index, np.arange(N_VOXELS)]),
                     "best_alpha": (("voxel",), np.asarray(ALPHAS, np.float32)[cv_index])},
                    coords={"alpha": list(ALPHAS), "valid": ("voxel", valid)},
                    attrs={"n_test": N_TEST})
    return ds, p


def _kept() -> np.ndarray:
    """The voxels a summary counts: flagged valid and with finite r."""
    kept = np.ones(N_VOXELS, bool)
    kept[INVALID] = False
    kept[NAN_VOXEL] = False
    return kept


def test_summary_table_means_over_valid_voxels():
    fit, p = _fit(0)
    table = summary_table([FitResult("m", [4.0, 5.0], fit)])
    row = table.iloc[0]
    assert row["lags"] == "4,5"
    kept = _kept()
    r = fit["r_test"].values.astype(np.float64)
    mean_r = r[:, kept].mean(axis=1)
    for a_i, a in enumerate(fit["alpha"].values):
        assert abs(row[f"{a:g}"] - mean_r[a_i]) < 1e-6
    assert row["n_valid_voxels"] == N_VOXELS - len(INVALID) - 1
    assert row["n_nan_voxels"] == 1  # valid, but its r is NaN: counted apart
    # best alpha: argmax of the mean r per alpha over the kept voxels
    best = int(np.argmax(mean_r))
    assert row["best_alpha"] == ALPHAS[best] and abs(row["r_best_alpha"] - mean_r[best]) < 1e-6
    assert abs(row["r_cv_selected"] - fit["r_test_cv"].values[kept].astype(np.float64).mean()) < 1e-6
    # n_sig_parametric: one-sided pearsonr p-values, Benjamini-Hochberg over the kept voxels
    expected = int((stats.false_discovery_control(p[kept]) < 0.05).sum())
    assert row["n_sig_parametric"] == expected > 0
    # ... and each of these would differ had the invalid voxels been counted.
    with_invalid = np.isfinite(r).all(axis=0)
    assert np.argmax(r[:, with_invalid].mean(axis=1)) != best
    assert int((stats.false_discovery_control(p[with_invalid]) < 0.05).sum()) != expected


def test_significance_matches_scipy_pearson_pvalues_with_bh():
    rng = np.random.default_rng(1)
    n = 40
    x = rng.normal(size=(n, 30))
    y = x * np.linspace(0, 1, 30) + rng.normal(size=(n, 30))
    r = np.array([stats.pearsonr(x[:, v], y[:, v]).statistic for v in range(30)])
    p = np.array([stats.pearsonr(x[:, v], y[:, v], alternative="greater").pvalue
                  for v in range(30)])
    expected = int((stats.false_discovery_control(p) < 0.05).sum())
    assert n_significant(r, n) == expected and expected > 0


def test_roi_table_means_per_label():
    fit, _ = _fit(2)
    table = roi_table([FitResult("m", [4.0], fit)], LABELS, {1: "V1", 2: "FFA"})
    assert list(table["roi"]) == [1, 2, 3, 4]
    assert list(table["roi_name"]) == ["V1", "FFA", "3", "4"]
    r = fit["r_test_cv"].values.astype(np.float64)
    kept = _kept()
    for _, row in table.iterrows():
        in_roi = LABELS == row["roi"]
        assert row["n_voxels"] == (kept & in_roi).sum()
        assert abs(row["mean_r"] - r[kept & in_roi].mean()) < 1e-6
    # ROIs 1 and 3 hold the invalid voxels: counting them would change their means.
    for label in (1, 3):
        row = table[table["roi"] == label].iloc[0]
        assert row["n_voxels"] < 10
        assert abs(row["mean_r"] - np.nanmean(r[LABELS == label])) > 0.01
