"""R^2 beside r: the ridge engine's ``r2_test``/``r2_test_cv`` against
``sklearn.metrics.r2_score`` column by column, in both regimes, in float32 and float64,
and on the Dask (voxel-chunked and time-chunked) paths."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from sklearn.metrics import r2_score

from test_ridge import ALPHAS, REGIMES, make_problem, sklearn_fit, sklearn_predict
from voxelflow.pipeline import ridge
from voxelflow.pipeline.ridge.scoring import contiguous_folds, run_folds


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_r2_matches_sklearn_r2_score_per_alpha_and_at_the_cv_alpha(regime, dtype):
    n_train, n_features = REGIMES[regime]
    x_train, y_train, x_test, y_test = make_problem(n_train, n_features, 9, dtype)
    folds = contiguous_folds(n_train, 3)
    out = ridge.ridge_cv_scores(x_train, y_train, x_test, y_test, ALPHAS, folds,
                                solver=regime)
    tolerance = 1e-10 if dtype == np.float64 else 2e-5
    expected = np.stack([r2_score(y_test.astype(np.float64),
                                  sklearn_predict(sklearn_fit(x_train, y_train, a), x_test),
                                  multioutput="raw_values") for a in ALPHAS])
    np.testing.assert_allclose(out["r2_test"], expected, rtol=0, atol=tolerance)
    best = out["best_alpha_index"]
    np.testing.assert_allclose(out["r2_test_cv"], expected[best, np.arange(9)], rtol=0,
                               atol=tolerance)
    # R^2 is not r^2: a strongly shrunk model correlates but misses the scale
    assert (expected[-1] < out["r_test"][-1] ** 2 - 0.05).any()


def test_r2_on_dask_paths_equals_direct_and_constant_test_voxel_is_nan():
    x_train, y_train, x_test, y_test = make_problem(150, 20, 12, np.float64)
    y_test[:, 3] = 7.0  # constant over the test samples: R^2 undefined
    folds = run_folds(np.repeat([0, 1, 2, 3, 4], 30))
    direct = ridge.ridge_cv_scores(x_train, y_train, x_test, y_test, ALPHAS, folds)
    assert np.isnan(direct["r2_test"][:, 3]).all() and np.isnan(direct["r2_test_cv"][3])
    for y_chunks in ((-1, 5), (37, 5)):  # voxel chunks, then time chunks too
        lazy = ridge.ridge_over_voxels(da.from_array(x_train, chunks=(37, -1)),
                                       da.from_array(y_train, chunks=y_chunks), x_test,
                                       da.from_array(y_test, chunks=(-1, 5)), ALPHAS,
                                       folds).compute()
        for key in ("r2_test", "r2_test_cv"):
            np.testing.assert_allclose(lazy[key].values, direct[key], rtol=0, atol=1e-9,
                                       equal_nan=True, err_msg=key)
