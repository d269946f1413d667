"""Banded ridge (voxelflow.pipeline.ridge.banded_ridge) against himalaya:
BandedRidgeCV (primal) and MultipleKernelRidgeCV (dual, precomputed kernels)
with the same fixed weightings, folds and score (Pearson r); the product-measure
split against himalaya's r2_score_split; one space against the single-space
engine (bit-equal); variance partitioning against the explicit set formulas."""
from __future__ import annotations

import numpy as np
import pytest

from voxelflow.pipeline import ridge
from voxelflow.pipeline.ridge.partition import variance_partition
from voxelflow.pipeline.ridge.scoring import contiguous_folds, train_indices

ALPHAS = np.logspace(-1, 4, 8)
N_TEST = 40


def spaces_problem(n_train, widths, n_voxels, seed=5):
    """Spaces with different relevance per voxel: voxel v draws on space i with
    a weight that varies across voxels, so the best weighting varies too."""
    rng = np.random.default_rng(seed)
    n = n_train + N_TEST
    xs = [rng.standard_normal((n, w)) for w in widths]
    mix = rng.dirichlet([0.5] * len(widths), n_voxels).T  # (space, voxel)
    signal = sum(x @ (rng.standard_normal((x.shape[1], n_voxels)) / np.sqrt(x.shape[1]))
                 * m for x, m in zip(xs, mix))
    y = signal * np.geomspace(0.3, 3, n_voxels) + rng.standard_normal((n, n_voxels)) + 7
    return ([x[:n_train] for x in xs], y[:n_train], [x[n_train:] for x in xs],
            y[n_train:])


def column_r(a, b):
    """Pearson r per column, by the textbook formula."""
    a, b = a - a.mean(axis=0), b - b.mean(axis=0)
    return (a * b).sum(axis=0) / np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))


@pytest.fixture(scope="module")
def himalaya_numpy():
    from himalaya.backend import set_backend
    set_backend("numpy", on_error="raise")


def _himalaya_primal(xs, y, xs_test, gammas, cv):
    from himalaya.ridge import BandedRidgeCV
    from himalaya.scoring import correlation_score
    model = BandedRidgeCV(groups=np.concatenate(
        [np.full(x.shape[1], i) for i, x in enumerate(xs)]), cv=cv, fit_intercept=True,
        solver_params=dict(n_iter=gammas, alphas=ALPHAS, score_func=correlation_score,
                           progress_bar=False))
    model.fit(np.hstack(xs), y)
    # himalaya's predict(split=True) refuses fit_intercept=True: split by hand
    coef = np.asarray(model.coef_)
    bounds = np.cumsum([0] + [x.shape[1] for x in xs])
    split = [(xt - x.mean(axis=0)) @ coef[a:b]
             for x, xt, a, b in zip(xs, xs_test, bounds[:-1], bounds[1:])]
    return model, np.stack(split)


def _himalaya_dual(xs, y, xs_test, gammas, cv):
    from himalaya.kernel_ridge import MultipleKernelRidgeCV
    from himalaya.scoring import correlation_score
    kernels = np.stack([x @ x.T for x in xs])
    model = MultipleKernelRidgeCV(
        kernels="precomputed", cv=cv, fit_intercept=True,
        solver_params=dict(n_iter=gammas, alphas=ALPHAS, score_func=correlation_score,
                           progress_bar=False))
    model.fit(kernels, y)
    # split by hand on kernels centred on the training mean (as himalaya's
    # KernelCenterer does for fit_intercept=True)
    dual = np.asarray(model.dual_coef_)
    split = [np.exp(delta)[None] * (((xt - x.mean(axis=0)) @ (x - x.mean(axis=0)).T) @ dual)
             for x, xt, delta in zip(xs, xs_test, np.asarray(model.deltas_))]
    return model, np.stack(split)


@pytest.mark.parametrize("regime", ["primal", "dual"])
def test_banded_matches_himalaya(regime, himalaya_numpy):
    from himalaya.scoring import r2_score_split
    n_train, widths = (200, (6, 10, 4)) if regime == "primal" else (80, (60, 90, 40))
    xs, y, xs_test, y_test = spaces_problem(n_train, widths, 300)
    gammas = ridge.simplex_weightings(3, 10, seed=1)
    folds = contiguous_folds(n_train, 4)
    cv = [(train_indices(fold, n_train), fold) for fold in folds]
    reference = _himalaya_primal if regime == "primal" else _himalaya_dual
    model, split = reference(xs, y, xs_test, gammas, cv)
    ours = ridge.banded_ridge(xs, y, xs_test, y_test, ALPHAS, gammas, folds,
                              solver=regime, return_weights=True, voxel_chunk=128)
    theirs = np.exp(-np.asarray(model.deltas_))  # (space, voxel) per-space alphas
    same = np.isclose(ours["space_alpha"], theirs, rtol=1e-6).all(axis=0)
    assert len(np.unique(ours["best_weighting"])) >= 3, "weighting should vary"
    assert same.mean() >= 0.99, same.mean()
    # test r of the chosen model against himalaya's own prediction (r ignores the
    # intercept, so the sum of the per-space predictions is enough)
    predicted = np.asarray(split).sum(axis=0)
    np.testing.assert_allclose(ours["r_test_cv"][same], column_r(predicted, y_test)[same],
                               atol=1e-3)
    # product-measure split on test-centred data
    y_centred = y_test - y_test.mean(axis=0)
    split_centred = np.asarray(split) - np.asarray(split).mean(axis=1, keepdims=True)
    expected = r2_score_split(y_centred, split_centred)
    np.testing.assert_allclose(ours["r2_split"][:, same], np.asarray(expected)[:, same],
                               atol=1e-6)
    if regime == "primal":
        coef = np.asarray(model.coef_)
    else:  # primal weights of the dual model: exp(delta_i) Xc_i^T dual_coef
        coef = np.concatenate([np.exp(delta)[None] * ((x - x.mean(axis=0)).T
                                                      @ np.asarray(model.dual_coef_))
                               for x, delta in zip(xs, np.asarray(model.deltas_))])
    np.testing.assert_allclose(ours["weights"][:, same], coef[:, same], atol=1e-6)


def test_float32_dual_eigen_path_matches_himalaya_float32(himalaya_numpy):
    """float32 data: one float32 eigendecomposition per (fold, weighting), as
    himalaya's numpy backend does; alphas and test r still agree."""
    xs, y, xs_test, y_test = spaces_problem(80, (60, 90, 40), 300)
    xs, xs_test = [x.astype(np.float32) for x in xs], [x.astype(np.float32) for x in xs_test]
    y, y_test = y.astype(np.float32), y_test.astype(np.float32)
    gammas = ridge.simplex_weightings(3, 10, seed=1)
    folds = contiguous_folds(80, 4)
    cv = [(train_indices(fold, 80), fold) for fold in folds]
    model, split = _himalaya_dual(xs, y, xs_test, gammas.astype(np.float32), cv)
    ours = ridge.banded_ridge(xs, y, xs_test, y_test, ALPHAS, gammas, folds)
    same = np.isclose(ours["space_alpha"], np.exp(-np.asarray(model.deltas_, np.float64)),
                      rtol=1e-4).all(axis=0)
    assert same.mean() >= 0.99, same.mean()
    np.testing.assert_allclose(ours["r_test_cv"][same],
                               column_r(split.sum(axis=0), y_test)[same], atol=1e-3)


@pytest.mark.parametrize("form", ["factored", "dense"])
def test_chunked_banded_factors_equal_banded_ridge_on_the_eigen_path(form):
    """The stage's API (every weighting factorised once, then voxel chunks) gives
    banded_ridge's outputs (its folds streamed, factored or dense), and its
    predictions are the chosen model's."""
    xs, y, xs_test, y_test = spaces_problem(60, (50, 70), 40)
    y[:, 0] = 3.0  # a constant voxel: undefined, flagged, still filled
    gammas = ridge.simplex_weightings(2, 5, seed=3)
    folds = contiguous_folds(60, 3)
    whole = ridge.banded_ridge(xs, y, xs_test, y_test, ALPHAS, gammas, folds,
                               return_weights=True, voxel_chunk=7, operator_form=form)
    banded = ridge.banded_factors(xs, xs_test, ALPHAS, gammas, folds, dtype=np.float64,
                                  keep_weight_factors=True)
    assert banded.terms is not None and banded.nbytes > 0  # the eigen path
    parts = [ridge.banded_chunk(banded, y[:, v:v + 15], y_test[:, v:v + 15],
                                voxel_chunk=4, return_weights=True,
                                return_predictions=True) for v in range(0, 40, 15)]
    for key, value in whole.items():
        np.testing.assert_allclose(np.concatenate([p[key] for p in parts], axis=-1),
                                   value, rtol=1e-10, atol=1e-12, err_msg=key)
    assert whole["constant_voxel"][0] and whole["best_weighting"][0] == -1
    assert whole["intercept"][0] == 3.0 and not whole["constant_voxel"][1:].any()
    predictions = np.concatenate([p["predictions"] for p in parts], axis=-1)
    np.testing.assert_allclose(column_r(predictions[:, 1:], y_test[:, 1:]), whole["r_test_cv"][1:],
                               atol=1e-10)


def test_streamed_folds_are_dense_only_where_the_build_pays_and_fits():
    """At the study's shape (12 alphas, 5 folds of ~900 of 4,497 samples, float32) a
    streamed fold is dense for the study's 65,665 voxels, factored for a 4,096-voxel
    slice (the build's 2 x 12 x 900 x q^2 flops exceed the 2 q^2 per voxel it saves)
    or when one fold's operator (148 MiB) exceeds the budget."""
    from voxelflow.pipeline.ridge._banded import EIGEN_DENSE_BYTES
    from voxelflow.pipeline.ridge._banded_eigen import streamed_fold_forms
    shapes = [(len(f), 4497 - len(f)) for f in contiguous_folds(4497, 5)]
    def forms(voxels, budget=EIGEN_DENSE_BYTES, form="auto"):
        return streamed_fold_forms(12, shapes, 4, form, budget, voxels)
    assert forms(65_665) == ["dense"] * 5
    assert forms(4096) == ["factored"] * 5
    assert forms(65_665, budget=128 << 20) == ["factored"] * 5
    # folds of 900, 900, 899, 899, 899 held-out samples: the threshold is per fold
    assert forms(12 * 900) == ["dense"] * 5
    assert forms(12 * 900 - 1) == ["factored"] * 2 + ["dense"] * 3
    assert forms(10, form="dense") == ["dense"] * 5
    with pytest.raises(ValueError, match="operator_form"):
        forms(10, form="sparse")


def _count_alive_operators(monkeypatch, module, name: str) -> list[int]:
    """Wrap the operator builder ``module.name``; the returned list gets, at each
    call, how many operators that earlier calls built are still alive."""
    import gc
    import weakref

    alive_at_build, made = [], []
    build = getattr(module, name)

    def spy(*args, **kwargs):
        gc.collect()
        alive_at_build.append(sum(ref() is not None for ref in made))
        operator = build(*args, **kwargs)
        made.append(weakref.ref(operator.dense if operator.dense is not None
                                else operator.left))
        return operator

    monkeypatch.setattr(module, name, spy)
    return alive_at_build


def test_streamed_folds_are_built_one_at_a_time(monkeypatch):
    """banded_ridge's fold-outer scan frees each streamed fold operator before the
    next is built: when a fold's operator is made, no earlier one is alive."""
    from voxelflow.pipeline.ridge import _factorize
    alive_at_build = _count_alive_operators(monkeypatch, _factorize, "_dual_fold_operator")
    xs, y, xs_test, y_test = spaces_problem(60, (50, 70), 40)
    gammas = ridge.simplex_weightings(2, 3, seed=3)
    ridge.banded_ridge(xs, y, xs_test, y_test, ALPHAS, gammas, contiguous_folds(60, 3),
                       operator_form="dense")
    assert len(alive_at_build) == 3 * 3  # 3 folds x 3 weightings, all streamed
    assert alive_at_build == [0] * 9, alive_at_build


def test_chunks_expand_held_factored_folds_to_dense_where_it_pays(monkeypatch):
    """banded_chunk (the stage's per-block call) expands each held factored fold to
    its dense operator when the chunk has at least n_alphas x held-out voxels, one
    dense operator alive at a time, and still gives banded_ridge's outputs; a chunk
    one voxel smaller keeps the folds factored."""
    from voxelflow.pipeline.ridge import _banded_eigen
    alive_at_build = _count_alive_operators(monkeypatch, _banded_eigen, "densify")
    xs, y, xs_test, y_test = spaces_problem(60, (50, 70), 40)
    alphas, folds = ALPHAS[::4], contiguous_folds(60, 3)  # 2 alphas x 20 held out: 40
    gammas = ridge.simplex_weightings(2, 3, seed=3)
    whole = ridge.banded_ridge(xs, y, xs_test, y_test, alphas, gammas, folds,
                               return_weights=True, operator_form="factored")
    banded = ridge.banded_factors(xs, xs_test, alphas, gammas, folds, dtype=np.float64,
                                  keep_weight_factors=True, operator_form="factored")
    assert all(f.operator.dense is None for w in banded.factors for f in w.folds)
    ours = ridge.banded_chunk(banded, y, y_test, return_weights=True)
    assert alive_at_build == [0] * 9, alive_at_build  # 3 folds x 3 weightings
    for key, value in whole.items():
        np.testing.assert_allclose(ours[key], value, rtol=1e-9, atol=1e-11, err_msg=key)
    alive_at_build.clear()
    smaller = ridge.banded_chunk(banded, y[:, :39], y_test[:, :39])
    assert alive_at_build == []
    np.testing.assert_array_equal(smaller["best_weighting"], ours["best_weighting"][:39])
    ridge.banded_chunk(banded, y, y_test, max_dense_bytes=2 * 20 * 40 * 8 - 1)
    assert alive_at_build == []  # one fold's dense operator over the budget


def test_float32_factored_and_dense_folds_agree_on_drifting_bold():
    """In float32, factored folds score like dense ones (1e-7) on BOLD whose mean
    drifts across folds: the factored operator removes the constant as the dense
    one does (without it they differed by 1.6e-5 here, the constant's rounding
    amplified by 1 / alpha)."""
    xs, y, xs_test, y_test = spaces_problem(120, (100, 150), 200)
    y = y + np.linspace(0.0, 30.0, 120)[:, None]  # a slow drift
    alphas = np.array([0.5, 1, 5, 10, 100.0, 1e3, 1e4])  # 7 x 24 held out <= 200 voxels
    banded = ridge.banded_factors(xs, xs_test, alphas, ridge.simplex_weightings(2, 3, seed=3),
                                  contiguous_folds(120, 5), dtype=np.float32,
                                  operator_form="factored")
    factored = ridge.banded_chunk(banded, y, y_test, max_dense_bytes=0)["r_cv"]
    dense = ridge.banded_chunk(banded, y, y_test)["r_cv"]
    assert np.nanmax(np.abs(factored - dense)) < 1e-6


@pytest.mark.parametrize("weights", [False, True])
def test_every_alphas_test_scores_at_the_chosen_weighting_equal_sklearn(weights):
    """``r_test``/``r2_test`` at every alpha and ``predictions`` of voxels won by a
    later weighting (computed for the winners only, from the factored test operator)
    equal scikit-learn's Ridge on that weighting's scaled design, refitted."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    xs, y, xs_test, y_test = spaces_problem(70, (60, 90, 40), 30)
    gammas = ridge.simplex_weightings(3, 6, seed=2)
    folds = contiguous_folds(70, 3)
    banded = ridge.banded_factors(xs, xs_test, ALPHAS, gammas, folds, dtype=np.float64,
                                  keep_weight_factors=weights)
    ours = ridge.banded_chunk(banded, y, y_test, return_weights=weights,
                              return_predictions=True)
    later = np.flatnonzero(ours["best_weighting"] > 0)
    assert later.size >= 10 and ours["r_test"].shape == (len(ALPHAS), 30)
    for v in later:
        gamma = gammas[ours["best_weighting"][v]]
        scaled = [np.hstack([np.sqrt(g) * x for g, x in zip(gamma, part)])
                  for part in (xs, xs_test)]
        for a, alpha in enumerate(ALPHAS):
            predicted = Ridge(alpha=alpha).fit(scaled[0], y[:, v]).predict(scaled[1])
            assert ours["r_test"][a, v] == pytest.approx(
                np.corrcoef(predicted, y_test[:, v])[0, 1], abs=1e-8)
            assert ours["r2_test"][a, v] == pytest.approx(
                r2_score(y_test[:, v], predicted), abs=1e-8)
            if a == ours["best_alpha_index"][v]:
                np.testing.assert_allclose(ours["predictions"][:, v], predicted,
                                           rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("regime", ["primal", "dual"])
def test_single_space_is_todays_fit_bit_equal(regime):
    n_train, widths = (120, (12,)) if regime == "primal" else (60, (150,))
    xs, y, xs_test, y_test = spaces_problem(n_train, widths, 50)
    xs = [x.astype(np.float32) for x in xs]
    xs_test = [x.astype(np.float32) for x in xs_test]
    y, y_test = y.astype(np.float32), y_test.astype(np.float32)
    folds = contiguous_folds(n_train, 3)
    single = ridge.ridge_cv_scores(xs[0], y, xs_test[0], y_test, ALPHAS, folds,
                                   return_weights=True, return_predictions=True,
                                   voxel_chunk=20)
    prediction = single.pop("predictions").astype(np.float64)
    joint = ridge.banded_ridge(xs, y, xs_test, y_test, ALPHAS,
                               ridge.simplex_weightings(1, 5), folds,
                               return_weights=True, voxel_chunk=20)
    for key, value in single.items():
        np.testing.assert_array_equal(joint[key], value, err_msg=key)
    np.testing.assert_array_equal(joint["space_alpha"][0], single["best_alpha"])
    # one space: the split is the R^2 of the test-centred prediction
    prediction -= prediction.mean(axis=0)
    y_centred = y_test - y_test.mean(axis=0, dtype=np.float64)
    expected = 1 - ((y_centred - prediction) ** 2).sum(0) / (y_centred ** 2).sum(0)
    np.testing.assert_allclose(joint["r2_split"][0], expected, atol=1e-5)


def test_simplex_weightings_are_himalayas():
    from himalaya.kernel_ridge import generate_dirichlet_samples
    expected = generate_dirichlet_samples(20, 3, random_state=7)
    expected[0] = 1 / 3
    np.testing.assert_allclose(ridge.simplex_weightings(3, 20, seed=7), expected)


@pytest.mark.parametrize("weightings, message", [
    ([[0.5, 0.5, 0.0]], "one value per feature space"),
    ([[0.5, np.nan]], "finite"),
    ([[0.5, -1.0]], ">= 0"),
    ([[0.0, 0.0]], "at least one"),
])
def test_bad_weightings_are_rejected(weightings, message):
    xs, y, _, _ = spaces_problem(40, (3, 4), 5)
    with pytest.raises(ValueError, match=message):
        ridge.banded_ridge(xs, y, None, None, ALPHAS, weightings,
                           contiguous_folds(40, 2))


def test_spaces_with_different_samples_are_rejected():
    xs, y, _, _ = spaces_problem(40, (3, 4), 5)
    with pytest.raises(ValueError, match="same samples"):
        ridge.banded_ridge([xs[0], xs[1][:-1]], y, None, None, ALPHAS, [[0.5, 0.5]],
                           contiguous_folds(40, 2))


def test_variance_partition_three_spaces_matches_set_formulas():
    rng = np.random.default_rng(0)
    names = ("A", "B", "C")
    r2 = {frozenset(s): rng.random(4) for s in
          [("A",), ("B",), ("C",), ("A", "B"), ("A", "C"), ("B", "C"), names]}
    f = {"".join(sorted(k)): v for k, v in r2.items()}
    parts = variance_partition(r2, names)
    np.testing.assert_allclose(parts[frozenset("A")], f["ABC"] - f["BC"])
    np.testing.assert_allclose(parts[frozenset("AB")],
                               f["AC"] + f["BC"] - f["C"] - f["ABC"])
    np.testing.assert_allclose(parts[frozenset("ABC")],
                               f["A"] + f["B"] + f["C"] - f["AB"] - f["AC"] - f["BC"]
                               + f["ABC"])
    np.testing.assert_allclose(sum(parts.values()), f["ABC"])
