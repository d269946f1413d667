"""One voxel chunk: all per-voxel outputs (CV scores, selected alpha, test
scores, weights, predictions) from the factors and the chunk's BOLD."""
from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import _column_dot, get_array_module, to_numpy
from ._checks import _check_targets
from ._factorize import FoldFactors, RidgeFactors
from ._operators import _predictions, _project
from ._select import _held_out_scores, _mean_over_folds, _pick_best, select_best_alpha
from .scoring import correlation_from_sums


def _shift_targets(Y: Any, dtype: np.dtype, xp: Any) -> tuple[Any, Any]:
    """BOLD minus its column mean, in ``dtype``; and the float64 mean (V,).

    The mean is accumulated in float64 and rounded to ``dtype`` before the
    subtraction, which is then exact for typical BOLD (Sterbenz) and needs
    no float64 copy of the block. Later sums re-centre exactly.
    """
    mean = Y.mean(axis=0, dtype=xp.float64)
    return Y.astype(dtype, copy=False) - mean.astype(dtype), mean


def _cv_scores_primal(factors: RidgeFactors, shifted: Any, xp: Any
                      ) -> tuple[list[Any], Any]:
    """Held-out r per fold (primal) and the full centred ``X^T Y`` (p, V)."""
    products, sums = [], []
    for rows, design in zip(factors.group_rows, factors.group_design):
        block = xp.take(shifted, rows, axis=0)
        products.append(design.T @ block)
        sums.append(block.sum(axis=0, dtype=xp.float64))
    cross_total = products[0].copy()
    for product in products[1:]:
        cross_total += product
    y_sum = sum(sums[1:], sums[0])
    dtype = factors.dtype
    fold_scores = []
    for number, fold in enumerate(factors.folds):
        n_fold_train = factors.n_train - len(fold.held_out)
        y_sum_train = y_sum - sums[number]
        rhs = cross_total - products[number]
        rhs -= xp.outer(fold.x_sum_train.astype(dtype),
                        (y_sum_train / n_fold_train).astype(dtype))
        y_held = xp.take(shifted, fold.held_out, axis=0)
        y_held = y_held - (sums[number] / len(fold.held_out)).astype(dtype)
        fold_scores.append(_held_out_scores(fold.operator, rhs, y_held, xp))
        del rhs, y_held
    cross_total -= xp.outer(factors.x_sum.astype(dtype),
                            (y_sum / factors.n_train).astype(dtype))
    return fold_scores, cross_total


def _cv_scores_dual(factors: RidgeFactors, shifted: Any, xp: Any
                    ) -> tuple[list[Any], Any]:
    """Held-out r per fold (dual); the right-hand side is the BOLD itself."""
    return [dual_fold_scores(fold, shifted, factors.dtype, xp)
            for fold in factors.folds], shifted


def dual_fold_scores(fold: FoldFactors, shifted: Any, dtype: np.dtype, xp: Any) -> Any:
    """Held-out r (n_alphas, voxel) float64 of one fold (dual regime) from the
    shifted BOLD (n_train, voxel) of every training sample (the fold's rows are
    taken here; the held-out block is centred on itself)."""
    y_train = xp.take(shifted, fold.train, axis=0)
    y_held = xp.take(shifted, fold.held_out, axis=0)
    y_held = y_held - y_held.mean(axis=0, dtype=xp.float64).astype(dtype)
    return _held_out_scores(fold.operator, y_train, y_held, xp)


def _test_outputs(factors: RidgeFactors, rhs: Any, y_mean: Any, Y_test: Any,
                  best: Any, want_predictions: bool, xp: Any,
                  projected: Any | None = None) -> tuple[Any, Any, Any | None]:
    """r_test and r2_test (n_alphas, voxel) float64, and predictions at the best
    alpha.  R^2 is scikit-learn's ``r2_score`` per voxel on the test samples,
    ``1 - sum (y - yhat)^2 / sum (y - mean y)^2`` with ``yhat`` in BOLD units
    (intercept included); NaN where the test BOLD is constant. ``projected``:
    the test operator's ``right.T @ rhs`` when the caller has it already."""
    operator = factors.test
    if projected is None:
        projected = _project(operator, rhs)
    y_offset = Y_test.astype(xp.float64) - y_mean  # yhat - y_mean is the prediction
    y_centred = Y_test.astype(xp.float64)
    y_centred -= y_centred.mean(axis=0)
    y_centred = y_centred.astype(factors.dtype)
    y_ss = _column_dot(y_centred, y_centred, xp)
    y_offset = y_offset.astype(factors.dtype)
    r_test = xp.empty((factors.n_alphas, rhs.shape[1]), dtype=xp.float64)
    r2_test = xp.empty((factors.n_alphas, rhs.shape[1]), dtype=xp.float64)
    predictions = None
    if want_predictions:
        predictions = xp.zeros((factors.n_test, rhs.shape[1]), dtype=factors.dtype)
    for first, batch in _predictions(operator, projected, xp):
        for offset, prediction in enumerate(batch):
            index = first + offset
            if predictions is not None:
                chosen = best == index
                predictions[:, chosen] = prediction[:, chosen]
            residual = y_offset - prediction
            r2_test[index] = _r2_from_sums(_column_dot(residual, residual, xp), y_ss, xp)
            del residual
            prediction -= prediction.mean(axis=0, dtype=xp.float64).astype(
                factors.dtype)
            r_test[index] = correlation_from_sums(
                _column_dot(prediction, y_centred, xp),
                _column_dot(prediction, prediction, xp), y_ss, xp=xp)
        del batch
    if predictions is not None:
        predictions += y_mean.astype(factors.dtype)
    return r_test, r2_test, predictions


def _r2_from_sums(residual_ss: Any, total_ss: Any, xp: Any) -> Any:
    """``1 - residual_ss / total_ss`` (float64), NaN where ``total_ss`` is zero."""
    defined = total_ss > 0
    return xp.where(defined, 1.0 - residual_ss / xp.where(defined, total_ss, 1.0), xp.nan)


def _weights_at_best(factors: RidgeFactors, rhs: Any, best: Any, xp: Any) -> Any:
    """Ridge weights (feature, voxel) at each voxel's selected alpha.

    Primal: ``V diag(1/(s+a_v)) V^T (X^T y_v)``. Dual: ``Xc^T U diag(1/(s+a_v))
    U^T y_v``. Voxels without a selected alpha get zero weights.
    """
    if factors.basis is None:
        raise ValueError("Weights need factors made with keep_weight_factors=True.")
    solution = factors.basis @ ((factors.basis.T @ rhs) * chosen_shrinkage(factors, best, xp))
    if factors.regime == "dual":
        solution = factors.design_centred.T @ solution
    return solution


def chosen_shrinkage(factors: RidgeFactors, best: Any, xp: Any) -> Any:
    """``1 / (s + alpha_v)`` (q, voxel) in the compute dtype, ``s`` the full fit's
    eigenvalues and ``alpha_v`` each voxel's selected alpha (index ``best``, (voxel,));
    zero for voxels without one (index -1)."""
    alphas = xp.asarray(factors.alphas)
    chosen = alphas[xp.maximum(best, 0)]
    shrink = 1.0 / (xp.asarray(factors.eigenvalues)[:, None] + chosen[None, :])
    return xp.where((best >= 0)[None, :], shrink, 0.0).astype(factors.dtype)


def checked_test_targets(factors: RidgeFactors, Y_test: Any, n_voxels: int, xp: Any
                         ) -> Any:
    """``Y_test`` (n_test, voxel) on the device, checked against the factors (made
    with a test set, ``n_test`` samples, finite) and the chunk's ``n_voxels``."""
    if factors.test is None:
        raise ValueError("Y_test given but the factors were made without X_test.")
    Y_test = xp.asarray(Y_test)
    _check_targets(Y_test, "Y_test", factors.n_test, xp)
    if Y_test.shape[1] != n_voxels:
        raise ValueError(
            f"Y_test has {Y_test.shape[1]} voxels but Y_train has "
            f"{n_voxels} in this chunk.")
    return Y_test


#: Voxels per sub-block inside :func:`ridge_chunk`: bounds the working memory
#: of a (possibly large) Dask chunk; results do not depend on it.
DEFAULT_BLOCK_VOXELS = 1024


def ridge_chunk(factors: RidgeFactors, Y_train: Any, Y_test: Any | None = None,
                *, return_weights: bool = False, return_predictions: bool = False,
                block_voxels: int = DEFAULT_BLOCK_VOXELS) -> dict[str, Any]:
    """All per-voxel outputs for one chunk of voxels.

    Parameters
    ----------
    factors : from :func:`factorize_ridge` (depends on X only)
    Y_train : array (n_train, voxel_chunk) float32/float64, finite
    Y_test : array (n_test, voxel_chunk) or None (no test outputs)
    return_weights : also return ``weights`` (feature, voxel_chunk) at the
        selected alpha (needs ``keep_weight_factors=True``)
    return_predictions : also return ``predictions`` (n_test, voxel_chunk)
        at the selected alpha, in BOLD units (intercept included)
    block_voxels : voxels processed together; bounds working memory to
        O(n_train x block_voxels) on top of the factors

    Returns
    -------
    dict of device arrays:
        ``r_cv`` (n_alphas, voxel) float64 -- mean over folds of held-out r
        ``best_alpha_index`` (voxel,) int64, -1 if undefined
        ``best_alpha`` (voxel,) float64, NaN if undefined
        ``constant_voxel`` (voxel,) bool -- training BOLD constant (r is NaN)
        ``intercept`` (voxel,) float64 -- training mean of Y
        ``r_test`` (n_alphas, voxel) float64 and ``r_test_cv`` (voxel,)
        float64 -- test r of the full-training fit, at every alpha and at the
        selected one (only with ``Y_test``); ``r2_test`` (n_alphas, voxel) and
        ``r2_test_cv`` (voxel,) float64 -- its R^2 (scikit-learn's ``r2_score``)
        ``weights``, ``predictions`` when asked for.
    """
    xp = get_array_module(factors.device)
    Y_train = xp.asarray(Y_train)
    _check_targets(Y_train, "Y_train", factors.n_train, xp)
    if Y_test is not None:
        Y_test = checked_test_targets(factors, Y_test, Y_train.shape[1], xp)
    elif return_predictions:
        raise ValueError("return_predictions needs X_test and Y_test.")
    n_voxels = Y_train.shape[1]
    step = max(int(block_voxels), 1)
    parts = [_ridge_block(factors, Y_train[:, start:start + step],
                          None if Y_test is None else Y_test[:, start:start + step],
                          return_weights, return_predictions, xp)
             for start in range(0, max(n_voxels, 1), step)]
    if len(parts) == 1:
        return parts[0]
    return {key: xp.concatenate([part[key] for part in parts], axis=-1)
            for key in parts[0]}


def _ridge_block(factors: RidgeFactors, Y_train: Any, Y_test: Any | None,
                 return_weights: bool, return_predictions: bool, xp: Any
                 ) -> dict[str, Any]:
    """:func:`ridge_chunk` on one block of voxels (inputs already checked)."""
    shifted, y_mean = _shift_targets(Y_train, factors.dtype, xp)
    if factors.regime == "primal":
        fold_scores, rhs = _cv_scores_primal(factors, shifted, xp)
    else:
        fold_scores, rhs = _cv_scores_dual(factors, shifted, xp)
    return _chunk_outputs(factors, fold_scores, rhs, y_mean, (shifted == 0).all(axis=0),
                          Y_test, return_weights, return_predictions, xp)


def _chunk_outputs(factors: Any, fold_scores: list[Any], rhs: Any, y_mean: Any,
                   constant: Any, Y_test: Any | None, return_weights: bool,
                   return_predictions: bool, xp: Any) -> dict[str, Any]:
    """The outputs of one voxel chunk once its folds are scored (direct and
    time-chunked paths alike).

    ``fold_scores``: per fold, float64 (n_alphas, voxel) held-out r; ``rhs``: the
    full training fit's right-hand side (primal: centred ``X^T Y`` (feature, voxel);
    dual: shifted BOLD (n_train, voxel)); ``y_mean`` (voxel,) float64 training mean;
    ``constant`` (voxel,) bool; ``Y_test`` (n_test, voxel) checked, or None.
    Returns the dict documented in :func:`ridge_chunk`.
    """
    r_cv = _mean_over_folds(fold_scores, xp)
    best = select_best_alpha(r_cv, factors.alphas, xp)
    alphas = xp.asarray(factors.alphas)
    out = {
        "r_cv": r_cv,
        "best_alpha_index": best,
        "best_alpha": xp.where(best >= 0, alphas[xp.maximum(best, 0)], xp.nan),
        "constant_voxel": constant,
        "intercept": y_mean,
    }
    if Y_test is not None:
        r_test, r2_test, predictions = _test_outputs(factors, rhs, y_mean, Y_test, best,
                                                     return_predictions, xp)
        out["r_test"] = r_test
        out["r_test_cv"] = _pick_best(r_test, best, xp)
        out["r2_test"] = r2_test
        out["r2_test_cv"] = _pick_best(r2_test, best, xp)
        if predictions is not None:
            out["predictions"] = predictions
    if return_weights:
        out["weights"] = _weights_at_best(factors, rhs, best, xp)
    return out


def count_constant_voxels(result: dict[str, Any]) -> int:
    """Number of voxels whose training BOLD is constant (their r is NaN)."""
    return int(to_numpy(result["constant_voxel"]).sum())
