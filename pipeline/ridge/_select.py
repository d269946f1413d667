"""Cross-validation scores and the choice of alpha: held-out Pearson r of every
alpha on one fold, the NaN-aware mean over folds, and the per-voxel best alpha
(ties to the larger alpha, as in himalaya)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._backend import _column_dot
from ._operators import PredictionOperator, _n_alphas_of, _predictions, _project
from .scoring import correlation_from_sums


#: Tie-break slope added to mean CV scores, ``1e-10 * log(alpha)``: among
#: alphas whose scores are equal to ~1e-10, the largest wins (as in himalaya).
TIE_BREAK_SLOPE = 1e-10


def _held_out_scores(operator: PredictionOperator, rhs: Any,
                     y_held_out: Any, xp: Any) -> Any:
    """Pearson r (n_alphas, voxel), float64, of every alpha on one fold.

    ``y_held_out`` (n_held_out, voxel) is centred on the held-out block and
    the operator's predictions are too, so r needs only two dot products.
    """
    projected = _project(operator, rhs)
    y_ss = _column_dot(y_held_out, y_held_out, xp)
    scores = xp.empty((_n_alphas_of(operator), rhs.shape[1]), dtype=xp.float64)
    for first, batch in _predictions(operator, projected, xp):
        for offset, prediction in enumerate(batch):
            scores[first + offset] = correlation_from_sums(
                _column_dot(prediction, y_held_out, xp),
                _column_dot(prediction, prediction, xp), y_ss, xp=xp)
        del batch
    return scores


def select_best_alpha(r_cv: Any, alphas: np.ndarray, xp: Any = np) -> Any:
    """Index of the best alpha per voxel from mean CV scores.

    Parameters
    ----------
    r_cv : float64 (n_alphas, voxel), NaN where undefined
    alphas : (n_alphas,)

    Returns
    -------
    int64 (voxel,): argmax over alphas of ``r_cv + 1e-10 * log(alpha)`` (ties
    go to the larger alpha, as in himalaya); -1 where every alpha is NaN.
    """
    slope = xp.asarray(TIE_BREAK_SLOPE * np.log(alphas))[:, None]
    defined = ~xp.isnan(r_cv)
    score = xp.where(defined, r_cv + slope, -xp.inf)
    best = xp.argmax(score, axis=0).astype(xp.int64)
    return xp.where(defined.any(axis=0), best, -1)


def _mean_over_folds(fold_scores: Sequence[Any], xp: Any) -> Any:
    """NaN-aware mean of per-fold scores (n_alphas, voxel): folds where r is
    undefined (a constant held-out block) are left out; all-NaN gives NaN."""
    stacked = xp.stack(fold_scores)
    defined = ~xp.isnan(stacked)
    counts = defined.sum(axis=0)
    total = xp.where(defined, stacked, 0.0).sum(axis=0)
    return xp.where(counts > 0, total / xp.maximum(counts, 1), xp.nan)


def _pick_best(values: Any, best: Any, xp: Any) -> Any:
    """``values[best[v], v]`` per voxel (float64), NaN where best is -1."""
    picked = xp.take_along_axis(values, xp.maximum(best, 0)[None, :], axis=0)[0]
    return xp.where(best >= 0, picked, xp.nan)
