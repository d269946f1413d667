"""Report pieces against independent computations (no pipeline run needed)."""

from __future__ import annotations

import numpy as np
import xarray as xr
from scipy import stats

from voxelflow.pipeline.study.report import FitResult, n_significant, roi_table, summary_table


def _fit(rng, n_vox=50, alphas=(1.0, 10.0, 100.0)):
    r = rng.uniform(-0.2, 0.6, size=(len(alphas), n_vox)).astype(np.float32)
    valid = np.ones(n_vox, bool)
    valid[:3] = False
    ds = xr.Dataset({"r_test": (("alpha", "voxel"), r),
                     "r_test_cv": (("voxel",), r[1]),
                     "best_alpha": (("voxel",), np.full(n_vox, alphas[1], np.float32))},
                    coords={"alpha": list(alphas), "valid": ("voxel", valid)},
                    attrs={"n_test": 60})
    return ds


def test_summary_table_means_over_valid_voxels():
    rng = np.random.default_rng(0)
    fit = _fit(rng)
    table = summary_table([FitResult("m", [4.0, 5.0], fit)])
    row = table.iloc[0]
    assert row["lags"] == "4,5"
    for a_i, a in enumerate(fit["alpha"].values):
        assert abs(row[f"{a:g}"] - fit["r_test"].values[a_i, 3:].mean()) < 1e-6
    assert row["n_valid_voxels"] == 47


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
    rng = np.random.default_rng(2)
    fit = _fit(rng)
    labels = np.repeat([0, 1, 2, 3, 4], 10)
    table = roi_table([FitResult("m", [4.0], fit)], labels, {1: "V1", 2: "FFA"})
    assert list(table["roi"]) == [1, 2, 3, 4]
    assert list(table["roi_name"][:2]) == ["V1", "FFA"]
    r = fit["r_test_cv"].values
    for _, row in table.iterrows():
        assert abs(row["mean_r"] - r[labels == row["roi"]].mean()) < 1e-6
