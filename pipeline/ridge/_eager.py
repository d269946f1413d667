"""Eager convenience API: every voxel of in-memory arrays in one call
(:func:`ridge_cv_scores`), and plain ridge weights at given alphas (:func:`fit_ridge`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._backend import _compute_dtype, get_array_module, to_numpy
from ._checks import _check_design, _check_targets, check_alphas
from ._factorize import DEFAULT_MAX_DENSE_BYTES, _design_mean, factorize_ridge
from ._operators import eigh_psd
from ._solve import _shift_targets, ridge_chunk


def ridge_cv_scores(X_train: Any, Y_train: Any, X_test: Any | None,
                    Y_test: Any | None, alphas: Any, folds: Sequence[Any], *,
                    device: str = "cpu", dtype: Any = None,
                    solver: str = "auto", voxel_chunk: int = 4096,
                    return_weights: bool = False,
                    return_predictions: bool = False,
                    operator_form: str = "auto",
                    max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
                    decomposition: str = "auto",
                    ) -> dict[str, np.ndarray]:
    """Fit ridge for every alpha and voxel, select alpha by CV, score on test.

    In-memory convenience around :func:`factorize_ridge` + :func:`ridge_chunk`
    looping over voxel chunks; use :func:`ridge_over_voxels` for Dask.

    Parameters
    ----------
    X_train : (n_train, feature); Y_train : (n_train, voxel)
    X_test : (n_test, feature) or None; Y_test : (n_test, voxel) or None
    alphas : (n_alphas,) floats > 0
    folds : held-out index arrays (see :func:`voxelflow.pipeline.ridge.scoring.contiguous_folds`)
    voxel_chunk : voxels per chunk (results do not depend on it)
    solver, operator_form, max_dense_bytes, decomposition : see
        :func:`factorize_ridge`

    Returns
    -------
    dict of numpy arrays as documented in :func:`ridge_chunk`.
    """
    if (X_test is None) != (Y_test is None):
        raise ValueError("Give both X_test and Y_test, or neither.")
    if not hasattr(Y_train, "shape"):
        Y_train = np.asarray(Y_train)
    if not hasattr(X_train, "shape"):
        X_train = np.asarray(X_train)
    if Y_train.ndim != 2:
        raise ValueError(f"Y_train must be 2-D (sample, voxel); got {Y_train.shape}.")
    compute = (np.dtype(dtype) if dtype is not None
               else _compute_dtype(X_train.dtype, Y_train.dtype))
    factors = factorize_ridge(X_train, X_test, alphas, folds, device=device,
                              dtype=compute, solver=solver,
                              operator_form=operator_form,
                              max_dense_bytes=max_dense_bytes,
                              decomposition=decomposition,
                              keep_weight_factors=return_weights)
    if Y_test is not None and Y_test.shape[1] != Y_train.shape[1]:
        raise ValueError(f"Y_test has {Y_test.shape[1]} voxels, Y_train "
                         f"{Y_train.shape[1]}.")
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, Y_train.shape[1], int(voxel_chunk)):
        stop = start + int(voxel_chunk)
        chunk = ridge_chunk(
            factors, Y_train[:, start:stop],
            None if Y_test is None else Y_test[:, start:stop],
            return_weights=return_weights, return_predictions=return_predictions)
        for key, value in chunk.items():
            parts.setdefault(key, []).append(to_numpy(value))
    return {key: np.concatenate(values, axis=-1) for key, values in parts.items()}


def fit_ridge(X_train: Any, Y_train: Any, alpha: Any, *, device: str = "cpu",
              dtype: Any = None) -> tuple[Any, Any]:
    """Ridge weights and intercepts for one alpha, or one alpha per voxel.

    Parameters
    ----------
    X_train : (n, feature); Y_train : (n, voxel)
    alpha : float > 0, or array (voxel,) of floats > 0

    Returns
    -------
    weights : (feature, voxel) compute dtype; intercept : (voxel,) float64,
    so that ``prediction = X @ weights + intercept``.
    """
    xp = get_array_module(device)
    X_train = xp.asarray(X_train)
    Y_train = xp.asarray(Y_train)
    _check_design(X_train, "X_train", xp)
    _check_targets(Y_train, "Y_train", X_train.shape[0], xp)
    per_voxel = check_alphas(alpha)
    if per_voxel.size not in (1, Y_train.shape[1]):
        raise ValueError(f"alpha must be a scalar or have one value per voxel "
                         f"({Y_train.shape[1]}); got {per_voxel.size}.")
    compute = (np.dtype(dtype) if dtype is not None
               else _compute_dtype(X_train.dtype, Y_train.dtype))
    x_mean = _design_mean(X_train, xp)
    shifted_x = (X_train.astype(xp.float64) - x_mean).astype(compute)
    shifted_y, y_mean = _shift_targets(Y_train, compute, xp)
    design64 = shifted_x.astype(xp.float64)
    n_train, n_features = X_train.shape
    dual = n_features > n_train
    square = design64 @ design64.T if dual else design64.T @ design64
    eigenvalues, eigenvectors = eigh_psd(square, xp)
    basis = eigenvectors.astype(compute)
    alphas = xp.asarray(per_voxel)
    shrink = (1.0 / (eigenvalues[:, None] + alphas[None, :])).astype(compute)
    rhs = shifted_y if dual else shifted_x.T @ shifted_y
    weights = basis @ ((basis.T @ rhs) * shrink)
    if dual:
        weights = shifted_x.T @ weights
    intercept = y_mean - x_mean @ weights.astype(xp.float64)
    return weights, intercept
