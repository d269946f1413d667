"""Scores and cross-validation splits for voxel-wise encoding models.

Pure computation: no file I/O. Array functions take an ``xp`` array module
(``numpy`` or ``cupy``) so the same code runs on CPU and GPU.

Conventions
-----------
* Samples (time points) are along axis ``-2``, voxels along axis ``-1``.
* A *fold* is the array of **held-out** sample indices (int64, sorted); the
  training samples of that fold are all the other samples. Folds are never
  shuffled: they are contiguous blocks of time or whole runs, so that
  autocorrelated neighbours of a held-out sample do not leak into training.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "pearson_r",
    "contiguous_folds",
    "run_folds",
    "check_folds",
    "train_indices",
]


def pearson_r(y_true: Any, y_pred: Any, xp: Any = np) -> Any:
    """Column-wise Pearson correlation between measured and predicted data.

    Parameters
    ----------
    y_true : array (sample, voxel), any float dtype
        Measured data.
    y_pred : array (sample, voxel) or (..., sample, voxel)
        Predictions; leading axes (e.g. one prediction per alpha) broadcast
        against ``y_true``.
    xp : module
        Array module of the inputs (``numpy`` or ``cupy``).

    Returns
    -------
    r : float64 array (voxel,) or (..., voxel)
        Pearson r per voxel, accumulated in float64. NaN where either column
        is constant (zero variance); no warning is emitted for those.
    """
    y_true = xp.asarray(y_true)
    y_pred = xp.asarray(y_pred)
    if y_true.ndim != 2:
        raise ValueError(
            f"y_true must be 2-D (sample, voxel); got shape {tuple(y_true.shape)}")
    if y_pred.ndim < 2 or tuple(y_pred.shape[-2:]) != tuple(y_true.shape):
        raise ValueError(
            "y_pred must have shape (..., sample, voxel) matching y_true "
            f"{tuple(y_true.shape)}; got {tuple(y_pred.shape)}")
    true_centred = y_true.astype(xp.float64)
    true_centred = true_centred - true_centred.mean(axis=0, keepdims=True)
    pred_centred = y_pred.astype(xp.float64)
    pred_centred = pred_centred - pred_centred.mean(axis=-2, keepdims=True)
    covariance = (true_centred * pred_centred).sum(axis=-2)
    true_ss = (true_centred * true_centred).sum(axis=0)
    pred_ss = (pred_centred * pred_centred).sum(axis=-2)
    return correlation_from_sums(covariance, pred_ss, true_ss, xp=xp)


def correlation_from_sums(cross: Any, pred_ss: Any, true_ss: Any,
                          xp: Any = np) -> Any:
    """Pearson r from centred sums, NaN where a variance is zero.

    Parameters
    ----------
    cross : array (..., voxel)
        Sum over samples of centred prediction x centred measurement.
    pred_ss, true_ss : arrays broadcastable to ``cross``
        Sums of squares of the centred prediction and measurement.

    Returns
    -------
    r : float64 array, shape of ``cross``; NaN where ``pred_ss * true_ss``
        is zero (a constant column), silently.
    """
    cross = xp.asarray(cross, dtype=xp.float64)
    denominator_sq = (xp.asarray(pred_ss, dtype=xp.float64)
                      * xp.asarray(true_ss, dtype=xp.float64))
    defined = denominator_sq > 0
    safe = xp.where(defined, denominator_sq, 1.0)
    r = cross / xp.sqrt(safe)
    # Rounding can push |r| a hair over 1 for perfect fits.
    r = xp.clip(r, -1.0, 1.0)
    return xp.where(defined, r, xp.nan)


def contiguous_folds(n_samples: int, k: int) -> list[np.ndarray]:
    """Split ``range(n_samples)`` into ``k`` contiguous held-out blocks.

    Same blocks as ``sklearn.model_selection.KFold(k, shuffle=False)``: the
    first ``n_samples % k`` blocks hold one sample more than the others.

    Returns
    -------
    folds : list of k int64 arrays (held-out indices of each fold), in order.
    """
    n_samples, k = int(n_samples), int(k)
    if k < 2:
        raise ValueError(f"Need at least 2 folds for cross-validation; got k={k}.")
    if n_samples < k:
        raise ValueError(
            f"Cannot make {k} folds from {n_samples} samples: need at least one "
            "sample per fold.")
    return [block.astype(np.int64)
            for block in np.array_split(np.arange(n_samples), k)]


def run_folds(run_labels: Sequence[Any] | np.ndarray) -> list[np.ndarray]:
    """One held-out fold per run: whole runs are never split.

    Parameters
    ----------
    run_labels : array-like (sample,)
        Run label of each training sample (any hashable/comparable values).

    Returns
    -------
    folds : list of int64 arrays, one per distinct run, in order of the run's
        first appearance; each holds the indices of that run's samples.
    """
    labels = np.asarray(run_labels)
    if labels.ndim != 1:
        raise ValueError(
            f"run_labels must be 1-D (sample,); got shape {labels.shape}")
    unique, first_seen = np.unique(labels, return_index=True)
    if unique.size < 2:
        raise ValueError(
            "Cross-validation over runs needs at least 2 distinct runs; got "
            f"{unique.size}. Use contiguous_folds(n_samples, k) for a single run.")
    ordered = unique[np.argsort(first_seen)]
    return [np.flatnonzero(labels == label).astype(np.int64) for label in ordered]


def check_folds(folds: Sequence[Any], n_samples: int) -> list[np.ndarray]:
    """Validate held-out folds and return them as sorted int64 numpy arrays.

    Folds must be non-empty, within ``[0, n_samples)``, free of repeats and
    mutually disjoint, and each must leave at least two training samples.
    They need not cover every sample: uncovered samples are always in training.
    """
    if isinstance(folds, (int, np.integer)):
        raise TypeError(
            "folds must be a list of held-out index arrays; build them with "
            "contiguous_folds(n_samples, k) or run_folds(run_labels).")
    checked = []
    seen = np.zeros(n_samples, dtype=bool)
    for number, fold in enumerate(folds):
        held_out = np.asarray(fold)
        if held_out.dtype == bool:
            raise TypeError(f"Fold {number} is a boolean mask; pass indices "
                            "(np.flatnonzero(mask)).")
        held_out = np.sort(held_out.astype(np.int64).ravel())
        if held_out.size == 0:
            raise ValueError(f"Fold {number} is empty.")
        if held_out[0] < 0 or held_out[-1] >= n_samples:
            raise ValueError(
                f"Fold {number} has indices outside [0, {n_samples}): "
                f"min {held_out[0]}, max {held_out[-1]}.")
        if np.any(np.diff(held_out) == 0):
            raise ValueError(f"Fold {number} repeats sample indices.")
        if np.any(seen[held_out]):
            raise ValueError(
                f"Fold {number} overlaps an earlier fold; held-out folds must be "
                "disjoint.")
        seen[held_out] = True
        if n_samples - held_out.size < 2:
            raise ValueError(
                f"Fold {number} leaves {n_samples - held_out.size} training "
                "samples; need at least 2.")
        checked.append(held_out)
    if len(checked) < 1:
        raise ValueError("Need at least one fold.")
    return checked


def train_indices(held_out: np.ndarray, n_samples: int) -> np.ndarray:
    """Training indices (sorted int64) of a fold: all samples not held out."""
    mask = np.ones(n_samples, dtype=bool)
    mask[np.asarray(held_out)] = False
    return np.flatnonzero(mask).astype(np.int64)
