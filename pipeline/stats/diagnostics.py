"""Which voxels a fit scores, and the warnings a fit deserves instead of silent NaN.

A voxel is *scored* (counted in every mean, count and test) when the BOLD stage kept
it (``valid``) and its ``r_test`` (every alpha), ``r_cv`` (every alpha),
``best_alpha`` and ``r_test_cv`` are all finite.  A valid voxel that misses one of
them is a *NaN voxel*: counted and reported as such, never averaged in.

Warnings (one line each, printed by the CLI and shown in the report):

* the best alpha is at either edge of the grid for more than
  :data:`EDGE_FRACTION` of the scored voxels (the grid should be extended);
* fewer than :data:`MIN_TEST_SAMPLES` test samples;
* fewer training samples in some CV fold than :data:`SAMPLES_PER_LAG` x the
  number of lags;
* too few test samples for the block permutation or bootstrap (fewer than two
  blocks);
* NaN voxels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["EDGE_FRACTION", "MIN_TEST_SAMPLES", "SAMPLES_PER_LAG", "scored_voxels",
           "fit_warnings", "scored_in", "nan_voxel_count", "warnings_of"]

EDGE_FRACTION = 0.10
MIN_TEST_SAMPLES = 20
SAMPLES_PER_LAG = 5


def scored_voxels(valid: np.ndarray, r_test: np.ndarray, r_cv: np.ndarray,
                  best_alpha: np.ndarray, r_test_cv: np.ndarray) -> np.ndarray:
    """bool (voxel,): valid, with finite ``r_test``/``r_cv`` (alpha, voxel) at every
    alpha and finite ``best_alpha``/``r_test_cv`` (voxel,)."""
    return (np.asarray(valid, bool) & np.isfinite(r_test).all(axis=0)
            & np.isfinite(r_cv).all(axis=0) & np.isfinite(best_alpha)
            & np.isfinite(r_test_cv))


def _edge_warning(best_alpha: np.ndarray, alphas: np.ndarray) -> str | None:
    if best_alpha.size == 0 or alphas.size < 2:
        return None
    low = float(np.mean(best_alpha == np.float32(alphas[0])))
    high = float(np.mean(best_alpha == np.float32(alphas[-1])))
    if low + high <= EDGE_FRACTION:
        return None
    return (f"best alpha at an edge of the grid for {100 * (low + high):.0f} % of scored "
            f"voxels ({100 * low:.0f} % at {alphas[0]:g}, {100 * high:.0f} % at "
            f"{alphas[-1]:g}): extend the alphas beyond that edge")


def fit_warnings(*, best_alpha: np.ndarray, alphas: np.ndarray, n_test: int,
                 min_train_per_fold: int | None, n_lags: int, n_nan: int,
                 n_valid: int, n_blocks_test: int | None = None,
                 block_length: int | None = None) -> list[str]:
    """One-line warnings about a fit (empty when nothing is wrong).

    ``best_alpha`` of the scored voxels; ``alphas`` the grid; ``n_test`` test samples;
    ``min_train_per_fold`` the fewest training samples of a CV fold (None: unknown);
    ``n_lags`` lags in the lag set; ``n_nan`` NaN voxels among ``n_valid`` valid
    ones; ``n_blocks_test`` full test blocks of ``block_length`` samples (None: no
    permutation or bootstrap asked for).
    """
    found = []
    edge = _edge_warning(np.asarray(best_alpha), np.asarray(alphas, np.float64))
    if edge:
        found.append(edge)
    if n_test < MIN_TEST_SAMPLES:
        found.append(f"only {n_test} test samples (fewer than {MIN_TEST_SAMPLES}): test r "
                     f"and its p-values are unreliable; hold out more samples")
    if min_train_per_fold is not None and min_train_per_fold < SAMPLES_PER_LAG * n_lags:
        found.append(f"a CV fold trains on {min_train_per_fold} samples, fewer than "
                     f"{SAMPLES_PER_LAG} x {n_lags} lags: use fewer folds or lags")
    if n_blocks_test is not None and n_blocks_test < 2:
        found.append(f"{n_test} test samples make fewer than two blocks of {block_length}: "
                     f"no block permutation or bootstrap (use a shorter block length or "
                     f"more test samples)")
    if n_nan:
        found.append(f"{n_nan} of {n_valid} valid voxels have NaN r_cv, best_alpha or "
                     f"r_test_cv (constant within a CV fold?): left out of every score")
    return found


def scored_in(fit) -> np.ndarray:
    """bool (voxel,): :func:`scored_voxels` of a fit Dataset (variables it lacks, as in
    fits made before they existed, are not required)."""
    r_test = np.asarray(fit["r_test"].values)
    n_voxels = r_test.shape[-1]
    valid = (np.asarray(fit["valid"].values, bool) if "valid" in fit.variables
             else np.ones(n_voxels, bool))

    def values(name: str, shape: tuple) -> np.ndarray:
        return np.asarray(fit[name].values) if name in fit else np.zeros(shape)

    return scored_voxels(valid, r_test, values("r_cv", r_test.shape),
                         values("best_alpha", (n_voxels,)), values("r_test_cv", (n_voxels,)))


def nan_voxel_count(fit) -> tuple[int, int]:
    """``(n_nan, n_valid)``: valid voxels of a fit Dataset that are not scored, and all
    valid voxels."""
    n_voxels = fit["r_test"].shape[-1]
    valid = (np.asarray(fit["valid"].values, bool) if "valid" in fit.variables
             else np.ones(n_voxels, bool))
    return int((valid & ~scored_in(fit)).sum()), int(valid.sum())


def warnings_of(fit, attrs: dict) -> list[str]:
    """:func:`fit_warnings` of a fit Dataset and its group ``attrs`` (``n_test``,
    ``lags``, ``min_train_per_fold``, ``statistics``)."""
    scored = scored_in(fit)
    n_nan, n_valid = nan_voxel_count(fit)
    stats = attrs.get("statistics") or {}
    n_test = int(attrs.get("n_test", 0))
    block_length = stats.get("block_length")
    asked = bool(stats.get("permutations") or stats.get("bootstrap"))
    best = np.asarray(fit["best_alpha"].values)[scored] if "best_alpha" in fit else np.zeros(0)
    return fit_warnings(
        best_alpha=best, alphas=np.asarray(fit["alpha"].values), n_test=n_test,
        min_train_per_fold=attrs.get("min_train_per_fold"),
        n_lags=len(attrs.get("lags", [])) or 1, n_nan=n_nan, n_valid=n_valid,
        n_blocks_test=(n_test // int(block_length)) if asked and block_length else None,
        block_length=block_length)
