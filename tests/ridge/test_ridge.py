"""Tests of the ridge engine (voxelflow.pipeline.ridge) and its scores (voxelflow.pipeline.ridge.scoring).

Small problems only; references are scikit-learn's Ridge(solver="svd") and
himalaya's RidgeCV / KernelRidgeCV (numpy backend).
"""
from __future__ import annotations

import importlib.util
import warnings

import dask.array as da
import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from voxelflow.pipeline import ridge
from voxelflow.pipeline.ridge.scoring import (check_folds, contiguous_folds, pearson_r, run_folds,
                              train_indices)

ALPHAS = np.logspace(-1, 4, 6)
REGIMES = {"primal": (90, 24), "dual": (60, 140)}  # (n_train, n_features)
N_TEST = 30


def make_problem(n_train, n_features, n_voxels, dtype, seed=0, n_test=N_TEST,
                 offset=50.0):
    """Planted linear problem with per-voxel SNR; BOLD has a large mean."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    x = rng.standard_normal((n, n_features)) + 0.3 * rng.standard_normal((n, 1))
    weights = rng.standard_normal((n_features, n_voxels)) / np.sqrt(n_features)
    snr = np.linspace(0.2, 2.0, n_voxels)
    y = x @ weights * snr + rng.standard_normal((n, n_voxels)) + offset
    x, y = x.astype(dtype), y.astype(dtype)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def sklearn_fit(x_train, y_train, alpha):
    """sklearn Ridge(svd) on data centred on the training means.

    Float32 inputs are solved in float64 (same values): sklearn's own float32
    SVD solve is off by up to ~2e-5 in r at alpha = 1e4 on these problems,
    while voxelflow's float32 path stays within ~1e-7 of the exact answer.
    """
    x_train = np.asarray(x_train, np.float64)
    y_train = np.asarray(y_train, np.float64)
    x_mean, y_mean = x_train.mean(axis=0), y_train.mean(axis=0)
    model = Ridge(alpha=alpha, solver="svd", fit_intercept=False)
    model.fit(x_train - x_mean, y_train - y_mean)
    return model, x_mean, y_mean


def sklearn_predict(fitted, x):
    model, x_mean, y_mean = fitted
    return model.predict(np.asarray(x, np.float64) - x_mean) + y_mean


def relative_error(actual, expected):
    return np.abs(np.asarray(actual, np.float64) - expected).max() / np.abs(expected).max()


# ------------------------------------------------------------------ scoring

def test_pearson_r_matches_corrcoef_and_broadcasts():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((40, 5)).astype(np.float32)
    p = (y + rng.standard_normal((3, 40, 5))).astype(np.float32)
    r = pearson_r(y, p)
    assert r.shape == (3, 5) and r.dtype == np.float64
    expected = [[np.corrcoef(y[:, v], p[k, :, v])[0, 1] for v in range(5)]
                for k in range(3)]
    np.testing.assert_allclose(r, expected, rtol=1e-6)


def test_pearson_r_constant_column_is_nan_without_warnings():
    y = np.ones((10, 3))
    y[:, 1] = np.arange(10)
    pred = np.arange(30.0).reshape(10, 3)
    pred[:, 2] = 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = pearson_r(y, pred)
    assert np.isnan(r[0]) and np.isnan(r[2]) and r[1] == pytest.approx(1.0)


def test_contiguous_folds_equal_kfold_and_run_folds_keep_runs_whole():
    folds = contiguous_folds(23, 5)
    expected = [test for _, test in KFold(5).split(np.zeros(23))]
    assert all(np.array_equal(a, b) for a, b in zip(folds, expected))
    runs = run_folds(["b", "b", "a", "a", "a", "c"])
    assert [f.tolist() for f in runs] == [[0, 1], [2, 3, 4], [5]]
    with pytest.raises(ValueError, match="at least 2 distinct runs"):
        run_folds([1, 1, 1])
    with pytest.raises(ValueError, match="overlaps"):
        check_folds([[0, 1], [1, 2]], 10)


# ------------------------------------------------------------------ sklearn

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("regime", ["primal", "dual"])
def test_matches_sklearn_per_alpha(regime, dtype):
    n_train, n_features = REGIMES[regime]
    x_train, y_train, x_test, y_test = make_problem(n_train, n_features, 9, dtype)
    folds = contiguous_folds(n_train, 4)
    out = ridge.ridge_cv_scores(x_train, y_train, x_test, y_test, ALPHAS, folds,
                                solver=regime, return_weights=True,
                                return_predictions=True)
    x64 = [np.asarray(a, np.float64) for a in (x_train, y_train, x_test, y_test)]
    # r_test for every alpha, and mean held-out r per alpha, against sklearn
    r_test = np.empty((len(ALPHAS), 9))
    r_cv = np.zeros((len(ALPHAS), 9))
    for index, alpha in enumerate(ALPHAS):
        fitted = sklearn_fit(x_train, y_train, alpha)
        r_test[index] = pearson_r(x64[3], sklearn_predict(fitted, x_test))
        for held_out in folds:
            train = train_indices(held_out, n_train)
            fold_fit = sklearn_fit(x_train[train], y_train[train], alpha)
            r_cv[index] += pearson_r(x64[1][held_out],
                                     sklearn_predict(fold_fit, x_train[held_out]))
    r_cv /= len(folds)
    np.testing.assert_allclose(out["r_test"], r_test, rtol=0, atol=1e-5)
    np.testing.assert_allclose(out["r_cv"], r_cv, rtol=0, atol=1e-5)
    best = out["best_alpha_index"]
    np.testing.assert_array_equal(best, np.argmax(r_cv, axis=0))
    np.testing.assert_array_equal(out["best_alpha"], ALPHAS[best])
    np.testing.assert_allclose(out["r_test_cv"], r_test[best, np.arange(9)], atol=1e-5)
    # predictions and weights at each voxel's selected alpha
    for voxel in range(9):
        fitted = sklearn_fit(x_train, y_train[:, voxel], ALPHAS[best[voxel]])
        expected = sklearn_predict(fitted, x_test)
        assert relative_error(out["predictions"][:, voxel], expected) < 1e-4
        assert relative_error(out["weights"][:, voxel], fitted[0].coef_) < 1e-4
    # ... and the test predictions of every single alpha
    for alpha in ALPHAS:
        single = ridge.ridge_cv_scores(x_train, y_train, x_test, y_test, [alpha],
                                       folds, solver=regime, return_predictions=True)
        expected = sklearn_predict(sklearn_fit(x_train, y_train, alpha), x_test)
        assert relative_error(single["predictions"], expected) < 1e-4


def test_fit_ridge_matches_sklearn_with_per_voxel_alpha():
    x_train, y_train, x_test, _ = make_problem(50, 12, 4, np.float64)
    alphas = np.array([0.1, 1.0, 10.0, 100.0])
    for solver_shape in [(x_train, y_train), (x_train[:10], y_train[:10])]:
        x, y = solver_shape  # second case: features > samples (dual)
        weights, intercept = ridge.fit_ridge(x, y, alphas)
        for voxel, alpha in enumerate(alphas):
            model = Ridge(alpha=alpha, solver="svd").fit(x, y[:, voxel])
            np.testing.assert_allclose(weights[:, voxel], model.coef_, rtol=1e-8,
                                       atol=1e-10)
            np.testing.assert_allclose(x_test @ weights[:, voxel] + intercept[voxel],
                                       model.predict(x_test), rtol=1e-9)


def test_operator_forms_and_decompositions_agree():
    options = [dict(operator_form="dense", decomposition="eigh"),
               dict(operator_form="factored"),
               dict(operator_form="dense", decomposition="cholesky"),
               dict(max_dense_bytes=1)]  # auto: every fold over budget -> factored
    for regime, (n_train, n_features) in REGIMES.items():
        x_train, y_train, x_test, y_test = make_problem(n_train, n_features, 6,
                                                        np.float64)
        folds = contiguous_folds(n_train, 3)
        results = [ridge.ridge_cv_scores(x_train, y_train, x_test, y_test, ALPHAS,
                                         folds, solver=regime, return_predictions=True,
                                         **option)
                   for option in options]
        for other in results[1:]:
            for key in ("r_cv", "r_test", "best_alpha", "predictions"):
                np.testing.assert_allclose(other[key], results[0][key], rtol=1e-9)


# ------------------------------------------------------------------ himalaya

def planted_problem(n_train, n_features, n_voxels, dtype, seed=3):
    """Planted weights, SNR from low to high over 500 voxels (no pure noise)."""
    rng = np.random.default_rng(seed)
    n = n_train + N_TEST
    x = rng.standard_normal((n, n_features))
    weights = rng.standard_normal((n_features, n_voxels)) / np.sqrt(n_features)
    weights *= rng.random((n_features, n_voxels)) < rng.uniform(0.05, 1, n_voxels)
    snr = np.geomspace(0.05, 3.0, n_voxels)
    y = (x @ weights) * snr + rng.standard_normal((n, n_voxels)) + 10.0
    return x[:n_train].astype(dtype), y[:n_train].astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("regime", ["primal", "dual"])
def test_selected_alphas_match_himalaya(regime, dtype):
    from himalaya.backend import set_backend
    from himalaya.kernel_ridge import KernelRidgeCV
    from himalaya.ridge import RidgeCV
    from himalaya.scoring import correlation_score

    set_backend("numpy", on_error="raise")
    n_train, n_features = (240, 30) if regime == "primal" else (150, 300)
    x, y = planted_problem(n_train, n_features, 500, dtype)
    alphas = np.logspace(-1, 5, 13)
    folds = contiguous_folds(n_train, 5)
    cv = [(train_indices(fold, n_train), fold) for fold in folds]
    params = dict(score_func=correlation_score)
    if regime == "primal":
        model = RidgeCV(alphas=alphas, cv=cv, fit_intercept=True, solver_params=params)
    else:
        model = KernelRidgeCV(alphas=alphas, kernel="linear", cv=cv,
                              fit_intercept=True, solver_params=params)
    model.fit(x, y)
    out = ridge.ridge_cv_scores(x, y, None, None, alphas, folds, voxel_chunk=128)
    assert out["best_alpha_index"].min() >= 0
    ours = out["best_alpha"]
    theirs = np.asarray(model.best_alphas_, dtype=np.float64)
    # himalaya stores alphas in the data dtype; compare on the alpha grid
    theirs = alphas[np.argmin(np.abs(np.log(theirs)[:, None] - np.log(alphas)), axis=1)]
    assert len(np.unique(ours)) >= 4, "alpha choice should vary across voxels"
    if dtype == np.float64:
        np.testing.assert_array_equal(ours, theirs)
        np.testing.assert_allclose(out["r_cv"].max(axis=0), model.cv_scores_,
                                   rtol=0, atol=1e-8)
    else:
        # float32: differences only where the two best mean CV scores tie to
        # float32 precision
        differ = ours != theirs
        top_two = np.sort(out["r_cv"], axis=0)[-2:]
        assert np.all(top_two[1, differ] - top_two[0, differ] < 1e-5)
        assert differ.mean() <= 0.01


# ------------------------------------------------------------------ chunking

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("regime", ["primal", "dual"])
def test_voxel_chunking_is_exact(regime, dtype):
    n_train, n_features = REGIMES[regime]
    x_train, y_train, x_test, y_test = make_problem(n_train, n_features, 23, dtype)
    folds = contiguous_folds(n_train, 4)
    results = [ridge.ridge_cv_scores(x_train, y_train, x_test, y_test, ALPHAS, folds,
                                     solver=regime, voxel_chunk=chunk,
                                     return_weights=True, return_predictions=True)
               for chunk in (1, 7, 4096)]
    lazy = ridge.ridge_over_voxels(
        x_train, da.from_array(y_train, chunks=(-1, 7)), x_test,
        da.from_array(y_test, chunks=(-1, 5)), ALPHAS, folds, solver=regime,
        return_weights=True, return_predictions=True).compute()
    tolerance = 1e-12 if dtype == np.float64 else 2e-6
    for other in results[:2]:
        np.testing.assert_array_equal(other["best_alpha"], results[2]["best_alpha"])
        for key in ("r_cv", "r_test", "r_test_cv", "weights", "predictions"):
            np.testing.assert_allclose(other[key], results[2][key], rtol=tolerance,
                                       atol=tolerance * np.abs(results[2][key]).max())
    np.testing.assert_array_equal(lazy.best_alpha.values, results[2]["best_alpha"])
    for key in ("r_cv", "r_test", "r_test_cv"):
        np.testing.assert_allclose(lazy[key].values, results[2][key], rtol=1e-6,
                                   atol=1e-6)
    assert lazy.r_test.dims == ("alpha", "voxel")
    assert lazy.best_alpha.dims == ("voxel",)


@pytest.mark.parametrize("regime", ["primal", "dual"])
def test_dask_design_gives_same_results(regime):
    n_train, n_features = REGIMES[regime]
    x_train, y_train, x_test, y_test = make_problem(n_train, n_features, 8,
                                                    np.float64)
    folds = contiguous_folds(n_train, 4)
    direct = ridge.ridge_cv_scores(x_train, y_train, x_test, y_test, ALPHAS, folds,
                                   solver=regime, return_weights=True)
    lazy = ridge.ridge_over_voxels(
        da.from_array(x_train, chunks=(-1, 32)), da.from_array(y_train, chunks=(-1, 3)),
        x_test, da.from_array(y_test, chunks=(-1, 3)), ALPHAS, folds, solver=regime,
        return_weights=True).compute()
    for key in ("r_cv", "r_test", "weights"):
        np.testing.assert_allclose(lazy[key].values, direct[key], rtol=1e-10,
                                   atol=1e-12)
    bad = x_train.copy()
    bad[3, n_features - 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ridge.factorize_ridge(da.from_array(bad, chunks=(-1, 32)), x_test, ALPHAS,
                              folds, solver=regime)


def test_dask_path_computes_factors_once_and_one_task_per_chunk():
    x_train, y_train, x_test, y_test = make_problem(*REGIMES["primal"], 20,
                                                    np.float32)
    folds = contiguous_folds(len(x_train), 3)
    lazy = ridge.ridge_over_voxels(
        x_train, da.from_array(y_train, chunks=(-1, 6)), x_test,
        da.from_array(y_test, chunks=(-1, 6)), ALPHAS, folds)
    graph = dict(lazy.r_test.data.__dask_graph__())
    assert sum(str(key).startswith("ridge-factors") for key in graph) == 1
    chunk_keys = [key for key in graph
                  if isinstance(key, tuple) and str(key[0]).startswith("ridge-chunk")]
    assert len(chunk_keys) == 4  # ceil(20 / 6)


# ------------------------------------------------------------------ time chunks

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_time_chunk_accumulation_equals_direct(dtype):
    x_train, y_train, x_test, y_test = make_problem(150, 20, 17, dtype)
    folds = run_folds(np.repeat([0, 1, 2, 3, 4], 30))
    direct = ridge.ridge_cv_scores(x_train, y_train, x_test, y_test, ALPHAS, folds,
                                   return_weights=True, return_predictions=True)
    streamed = ridge.ridge_over_voxels(
        da.from_array(x_train, chunks=(37, -1)),
        da.from_array(y_train, chunks=(37, 6)), x_test,
        da.from_array(y_test, chunks=(-1, 6)), ALPHAS, folds,
        return_weights=True, return_predictions=True)
    graph = dict(streamed.r_test.data.__dask_graph__())
    assert any("ridge-streamed" in str(key) for key in graph)
    streamed = streamed.compute()
    tolerance = 1e-9 if dtype == np.float64 else 2e-5
    np.testing.assert_array_equal(streamed.best_alpha.values, direct["best_alpha"])
    for key in ("r_cv", "r_test", "r_test_cv", "weights", "predictions", "intercept"):
        scale = np.abs(direct[key]).max()
        np.testing.assert_allclose(streamed[key].values, direct[key], rtol=0,
                                   atol=tolerance * scale, err_msg=key)


def test_statistics_functions_accumulate_over_blocks():
    x_train, y_train, x_test, y_test = make_problem(120, 16, 5, np.float64)
    folds = contiguous_folds(120, 4)
    stats = ridge.accumulate_design_statistics(da.from_array(x_train, chunks=(25, -1)),
                                               folds)
    factors = ridge.factorize_from_statistics(stats, x_test, ALPHAS, dtype=np.float64)
    y_reference = y_train[0]
    total = sum(
        ridge.target_statistics(x_train[s:s + 25], y_train[s:s + 25],
                                stats.group_of_sample[s:s + 25], stats.n_groups,
                                stats.x_reference, y_reference, dtype=np.float64)
        for s in range(0, 120, 25))
    out = ridge.ridge_chunk_from_statistics(factors, total, y_test,
                                            y_reference=y_reference)
    direct = ridge.ridge_cv_scores(x_train, y_train, x_test, y_test, ALPHAS, folds)
    np.testing.assert_allclose(out["r_cv"], direct["r_cv"], atol=1e-10)
    np.testing.assert_allclose(out["r_test"], direct["r_test"], atol=1e-10)


# ------------------------------------------------------------------ bad input

def test_bad_alphas_raise_and_name_the_alpha():
    x, y, _, _ = make_problem(40, 5, 3, np.float64)
    folds = contiguous_folds(40, 4)
    for bad in ([1.0, 0.0], [-2.0], [1.0, np.nan]):
        with pytest.raises(ValueError, match=r"alphas\[\d\]"):
            ridge.ridge_cv_scores(x, y, None, None, bad, folds)
    with pytest.raises(ValueError, match="non-empty"):
        ridge.check_alphas([])


def test_nan_features_raise_clear_error():
    x, y, x_test, y_test = make_problem(40, 5, 3, np.float32)
    x[7, 2] = np.nan
    with pytest.raises(ValueError, match="X_train contains 1 NaN.*sample 7, feature 2"):
        ridge.ridge_cv_scores(x, y, x_test, y_test, ALPHAS, contiguous_folds(40, 4))
    x[7, 2] = 0.0
    x_test[0, 0] = np.inf
    with pytest.raises(ValueError, match="X_test"):
        ridge.factorize_ridge(x, x_test, ALPHAS, contiguous_folds(40, 4))


@pytest.mark.parametrize("regime", ["primal", "dual"])
def test_constant_voxels_give_nan_and_are_counted(regime):
    n_train, n_features = REGIMES[regime]
    x_train, y_train, x_test, y_test = make_problem(n_train, n_features, 6, np.float32)
    y_train[:, [1, 4]] = 3.25
    y_test[:, 4] = 3.25
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ridge.ridge_cv_scores(x_train, y_train, x_test, y_test, ALPHAS,
                                    contiguous_folds(n_train, 4), solver=regime,
                                    return_weights=True, return_predictions=True)
    assert ridge.count_constant_voxels(out) == 2
    for voxel in (1, 4):
        assert np.all(np.isnan(out["r_cv"][:, voxel]))
        assert np.isnan(out["best_alpha"][voxel]) and out["best_alpha_index"][voxel] == -1
        assert np.isnan(out["r_test_cv"][voxel])
        assert np.all(out["weights"][:, voxel] == 0)
        np.testing.assert_allclose(out["predictions"][:, voxel], 3.25)
    assert np.all(np.isnan(out["r_test"][:, 4]))
    assert not np.any(np.isnan(out["r_test"][:, [0, 2, 3, 5]]))


def test_shape_mismatches_raise():
    x, y, x_test, y_test = make_problem(40, 5, 3, np.float64)
    folds = contiguous_folds(40, 4)
    with pytest.raises(ValueError, match="samples"):
        ridge.ridge_cv_scores(x, y[:30], x_test, y_test, ALPHAS, folds)
    with pytest.raises(ValueError, match="features"):
        ridge.ridge_cv_scores(x, y, x_test[:, :4], y_test, ALPHAS, folds)
    with pytest.raises(ValueError, match="voxels"):
        ridge.ridge_cv_scores(x, y, x_test, y_test[:, :2], ALPHAS, folds)
    with pytest.raises(ValueError, match="outside"):
        ridge.ridge_cv_scores(x, y, x_test, y_test, ALPHAS, [[0, 1], [38, 40]])
    with pytest.raises(ValueError, match="2-D"):
        ridge.ridge_cv_scores(x, y[:, 0], x_test, y_test, ALPHAS, folds)
    with pytest.raises(ValueError, match="share the time axis"):
        ridge.ridge_over_voxels(x, da.from_array(y[:30]), None, None, ALPHAS, folds)


def test_cuda_without_cupy_is_a_clear_error():
    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed")
    with pytest.raises(ImportError, match="needs CuPy"):
        ridge.get_array_module("cuda")
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        ridge.get_array_module("gpu")
