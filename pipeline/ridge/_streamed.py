"""Time-chunked accumulation for recordings too long for one time block (primal
regime): per-group ``X^T X`` and ``X^T Y`` summed over time chunks, then the same
outputs as the direct path."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import _column_dot, _is_dask, get_array_module
from ._checks import _check_design, _check_targets, check_alphas
from ._factorize import FitShape
from ._operators import PredictionOperator, _build_operator, _shrinkage, eigh_psd
from ._solve import _chunk_outputs
from .scoring import check_folds, correlation_from_sums


@dataclass(frozen=True)
class DesignStatistics:
    """Sufficient statistics of the design, accumulated over time chunks.

    Samples are split into groups: each held-out fold, then the samples
    never held out. Sums use the design shifted by ``x_reference`` (the first
    training sample) to keep float64 cancellation harmless.

    Attributes
    ----------
    x_reference : float64 (feature,)
    group_of_sample : int64 numpy (n_train,), group number of each sample
    group_size : int64 numpy (n_groups,)
    x_sum : float64 (n_groups, feature) -- sum of shifted rows per group
    gram : float64 (n_groups, feature, feature) -- shifted ``X_g^T X_g``
    """

    x_reference: Any
    group_of_sample: np.ndarray
    group_size: np.ndarray
    x_sum: Any
    gram: Any

    @property
    def n_groups(self) -> int:
        return int(self.group_size.shape[0])


def _sample_groups(folds: Sequence[np.ndarray], n_train: int
                   ) -> tuple[np.ndarray, int]:
    """Group number per sample: fold k -> k, never held out -> n_folds."""
    groups = np.full(n_train, len(folds), dtype=np.int64)
    for number, held_out in enumerate(folds):
        groups[held_out] = number
    return groups, len(folds) + 1


def _time_blocks(X: Any) -> Iterable[tuple[int, Any]]:
    """(first sample, block) over time chunks of a Dask or in-memory design."""
    if _is_dask(X):
        start = 0
        for index in range(len(X.chunks[0])):
            block = X.blocks[index].compute()
            yield start, block
            start += block.shape[0]
    else:
        yield 0, X


def accumulate_design_statistics(X_train: Any, folds: Sequence[Any], *,
                                 device: str = "cpu") -> DesignStatistics:
    """Accumulate per-group ``X^T X`` and ``sum X`` over time chunks of X.

    Parameters
    ----------
    X_train : (n_train, feature), numpy/cupy or Dask chunked along time
    folds : held-out index arrays (disjoint)

    Returns
    -------
    DesignStatistics (float64, on the device)
    """
    xp = get_array_module(device)
    n_train, n_features = (int(size) for size in X_train.shape)
    folds = check_folds(folds, n_train)
    groups, n_groups = _sample_groups(folds, n_train)
    x_sum = xp.zeros((n_groups, n_features), dtype=xp.float64)
    gram = xp.zeros((n_groups, n_features, n_features), dtype=xp.float64)
    reference = None
    for start, block in _time_blocks(X_train):
        block = xp.asarray(block)
        _check_design(block, f"X_train[{start}:{start + block.shape[0]}]", xp)
        if reference is None:
            reference = block[0].astype(xp.float64)
        shifted = block.astype(xp.float64) - reference
        block_groups = groups[start:start + block.shape[0]]
        for group in np.unique(block_groups):
            rows = shifted[xp.asarray(np.flatnonzero(block_groups == group))]
            x_sum[group] += rows.sum(axis=0)
            gram[group] += rows.T @ rows
    return DesignStatistics(
        x_reference=reference, group_of_sample=groups,
        group_size=np.bincount(groups, minlength=n_groups).astype(np.int64),
        x_sum=x_sum, gram=gram)


@dataclass(frozen=True)
class StreamedFold:
    """One fold of the time-chunked path (all float64/compute dtype, device).

    basis (p, p) and shrinkage (n_alphas, p): eigendecomposition of the
    fold's centred training Gram; held_out_root (r, p): ``R V`` with
    ``R^T R`` the centred held-out Gram, so ``||R V (d * B)||^2`` is the
    held-out sum of squared (centred) predictions.
    """

    basis: Any
    shrinkage: Any
    held_out_root: Any


@dataclass(frozen=True)
class StreamedFactors(FitShape):
    """Factors of the time-chunked path (see :func:`factorize_from_statistics`)."""

    statistics: DesignStatistics
    folds: tuple[StreamedFold, ...]
    test: PredictionOperator | None
    basis: Any = None
    eigenvalues: Any = None
    regime: str = "primal"
    fold_sizes: tuple[int, ...] = ()


def _gram_square_root(matrix: Any, xp: Any) -> Any:
    """``R`` (rank, q) with ``R^T R = matrix`` for a PSD float64 matrix."""
    eigenvalues, eigenvectors = eigh_psd(matrix, xp)
    keep = eigenvalues > eigenvalues[-1] * 1e-13
    return (eigenvectors[:, keep] * xp.sqrt(eigenvalues[keep])).T


def factorize_from_statistics(statistics: DesignStatistics, X_test: Any | None,
                              alphas: Any, *, device: str = "cpu",
                              dtype: Any = np.float32,
                              keep_weight_factors: bool = False
                              ) -> StreamedFactors:
    """Per-fold eigendecompositions from accumulated design statistics.

    Parameters
    ----------
    statistics : from :func:`accumulate_design_statistics`
    X_test : (n_test, feature) in memory, or None
    alphas : (n_alphas,) floats > 0

    Returns
    -------
    StreamedFactors
    """
    xp = get_array_module(device)
    alphas = check_alphas(alphas)
    compute = np.dtype(dtype)
    sizes = statistics.group_size
    n_train = int(sizes.sum())
    n_features = int(statistics.gram.shape[1])
    gram_total = statistics.gram.sum(axis=0)
    sum_total = statistics.x_sum.sum(axis=0)
    folds = []
    for group in range(statistics.n_groups - 1):
        n_held = int(sizes[group])
        held_sum = statistics.x_sum[group]
        train_sum = sum_total - held_sum
        gram_train = (gram_total - statistics.gram[group]
                      - xp.outer(train_sum, train_sum) / (n_train - n_held))
        gram_held = statistics.gram[group] - xp.outer(held_sum, held_sum) / n_held
        eigenvalues, eigenvectors = eigh_psd(gram_train, xp)
        root = _gram_square_root(gram_held, xp)
        folds.append(StreamedFold(
            basis=eigenvectors.astype(compute),
            shrinkage=_shrinkage(eigenvalues, alphas, xp).astype(compute),
            held_out_root=(root @ eigenvectors).astype(compute)))
    test_operator, basis, eigenvalues = None, None, None
    if X_test is not None or keep_weight_factors:
        gram_full = gram_total - xp.outer(sum_total, sum_total) / n_train
        x_mean = statistics.x_reference + sum_total / n_train
        if X_test is not None:
            X_test = xp.asarray(X_test)
            _check_design(X_test, "X_test", xp)
            rows = X_test.astype(xp.float64) - x_mean
        else:
            rows = xp.zeros((0, n_features))
        test_operator, eigenvalues, eigenvectors = _build_operator(
            gram_full, rows, alphas, "dense", compute, xp, remove_constant=False)
        if keep_weight_factors:
            basis = eigenvectors.astype(compute)
    return StreamedFactors(
        statistics=statistics, folds=tuple(folds),
        test=test_operator if X_test is not None else None, alphas=alphas,
        dtype=compute, device=device, n_train=n_train,
        n_test=0 if X_test is None else int(X_test.shape[0]),
        n_features=n_features, basis=basis, eigenvalues=eigenvalues,
        fold_sizes=tuple(int(s) for s in sizes[:-1]))


def target_statistics(X_block: Any, Y_block: Any, group_of_sample: np.ndarray,
                      n_groups: int, x_reference: Any, y_reference: Any, *,
                      device: str = "cpu", dtype: Any = np.float32) -> Any:
    """Per-group cross-products of one (time block, voxel chunk) of BOLD.

    Parameters
    ----------
    X_block : (n_block, feature); Y_block : (n_block, voxel_chunk)
    group_of_sample : int (n_block,), group of each sample of the block
    x_reference : (feature,); y_reference : (voxel_chunk,) -- shifts (the
        first training sample), identical for every block
    dtype : dtype of the ``X^T Y`` product

    Returns
    -------
    float64 (n_groups, feature + 2, voxel_chunk): rows ``[:feature]`` hold
    ``X_g^T Y_g``, row ``feature`` the sum of Y, row ``feature + 1`` the sum
    of squares of Y, over the block's samples of group g (all shifted).
    Summing this over time blocks gives the chunk's statistics.
    """
    xp = get_array_module(device)
    X_block = xp.asarray(X_block)
    Y_block = xp.asarray(Y_block)
    _check_targets(Y_block, "Y_train block", X_block.shape[0], xp)
    n_features = X_block.shape[1]
    x_shifted = (X_block.astype(xp.float64) - xp.asarray(x_reference)).astype(dtype)
    y64 = Y_block.astype(xp.float64) - xp.asarray(y_reference, dtype=xp.float64)
    y_shifted = y64.astype(dtype)
    out = xp.zeros((n_groups, n_features + 2, Y_block.shape[1]), dtype=xp.float64)
    group_of_sample = np.asarray(group_of_sample)
    for group in np.unique(group_of_sample):
        rows = xp.asarray(np.flatnonzero(group_of_sample == group))
        out[group, :n_features] = x_shifted[rows].T @ y_shifted[rows]
        out[group, n_features] = y64[rows].sum(axis=0)
        out[group, n_features + 1] = (y64[rows] ** 2).sum(axis=0)
    return out


def ridge_chunk_from_statistics(factors: StreamedFactors, statistics: Any,
                                Y_test: Any | None = None, *,
                                return_weights: bool = False,
                                return_predictions: bool = False,
                                y_reference: Any = None) -> dict[str, Any]:
    """Per-voxel outputs of one voxel chunk from accumulated statistics.

    Parameters
    ----------
    factors : from :func:`factorize_from_statistics`
    statistics : float64 (n_groups, feature + 2, voxel_chunk), the sum over
        time blocks of :func:`target_statistics`, plus (optional) one extra
        row appended holding ``y_reference`` -- see ``y_reference``
    Y_test : (n_test, voxel_chunk) or None
    y_reference : (voxel_chunk,) shift used for Y; if None it is read from
        ``statistics[0, feature + 2]`` (the packed Dask layout)

    Returns
    -------
    dict as :func:`ridge_chunk`.
    """
    xp = get_array_module(factors.device)
    statistics = xp.asarray(statistics)
    design = factors.statistics
    p, dtype = factors.n_features, factors.dtype
    if y_reference is None:
        y_reference = statistics[0, p + 2]
    cross = statistics[:, :p]
    y_sum = statistics[:, p]
    y_squares = statistics[:, p + 1]
    sizes = design.group_size
    n_train = factors.n_train
    cross_total = cross.sum(axis=0)
    x_total = design.x_sum.sum(axis=0)
    y_total = y_sum.sum(axis=0)
    fold_scores = []
    for group, fold in enumerate(factors.folds):
        n_held = int(sizes[group])
        x_held, y_held = design.x_sum[group], y_sum[group]
        x_train, y_train = x_total - x_held, y_total - y_held
        rhs = (cross_total - cross[group]
               - xp.outer(x_train, y_train) / (n_train - n_held)).astype(dtype)
        held_cross = (cross[group] - xp.outer(x_held, y_held) / n_held).astype(dtype)
        y_ss = y_squares[group] - y_held ** 2 / n_held
        fold_scores.append(_streamed_fold_scores(fold, rhs, held_cross, y_ss, xp))
    y_mean = y_reference + y_total / n_train
    y_ss_total = y_squares.sum(axis=0) - y_total ** 2 / n_train
    rhs = (cross_total - xp.outer(x_total, y_total) / n_train).astype(dtype)
    if Y_test is not None:
        Y_test = xp.asarray(Y_test)
        _check_targets(Y_test, "Y_test", factors.n_test, xp)
    return _chunk_outputs(factors, fold_scores, rhs, y_mean, y_ss_total <= 0, Y_test,
                          return_weights, return_predictions, xp)


def _streamed_fold_scores(fold: StreamedFold, rhs: Any, held_cross: Any, y_ss: Any,
                          xp: Any) -> Any:
    """Held-out Pearson r (n_alphas, voxel), float64, of one fold from sums only.

    ``rhs`` (feature, voxel): the fold's centred training ``X^T y``; ``held_cross``
    (feature, voxel): the held-out block's centred ``X^T y``; ``y_ss`` (voxel,): the
    held-out sum of squares of centred BOLD.  Predictions are never formed: their
    dot product with y is ``d_a . (V^T rhs * V^T held_cross)`` and their sum of
    squares ``||R V (d_a * V^T rhs)||^2``.
    """
    projected = fold.basis.T @ rhs
    target_in_basis = fold.basis.T @ held_cross
    products = (fold.shrinkage @ (projected * target_in_basis)).astype(xp.float64)
    n_alphas = fold.shrinkage.shape[0]
    scores = xp.empty((n_alphas, rhs.shape[1]), dtype=xp.float64)
    for index in range(n_alphas):
        rotated = fold.held_out_root @ (projected * fold.shrinkage[index][:, None])
        scores[index] = correlation_from_sums(
            products[index], _column_dot(rotated, rotated, xp), y_ss, xp=xp)
    return scores
