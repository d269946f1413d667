"""Floating-point operation counts of the exact computation (for benchmarks)."""
from __future__ import annotations

from ._factorize import RidgeFactors
from ._operators import PredictionOperator


def ridge_flops(factors: RidgeFactors, n_voxels: int, *,
                include_factorization: bool = True) -> float:
    """Floating-point operations of the exact computation, for ``n_voxels``.

    Counts every matrix product of :func:`ridge_chunk` (``2 m k n`` each)
    and the elementwise correlation sums (4 per element); with
    ``include_factorization``, also :func:`_factorization_flops`.
    """
    n_alphas, p, n = factors.n_alphas, factors.n_features, factors.n_train
    total = 0.0
    if factors.regime == "primal":
        total += 2.0 * n * p * n_voxels  # X^T Y over all groups
    for fold in factors.folds:
        n_held = int(fold.held_out.shape[0])
        q = p if factors.regime == "primal" else n - n_held
        if fold.operator.dense is None:
            total += 2.0 * q * q * n_voxels  # B = V^T rhs
        total += n_alphas * (2.0 * n_held * q + 4.0 * n_held) * n_voxels
    if factors.test is not None:
        q = p if factors.regime == "primal" else n
        if factors.test.dense is None:
            total += 2.0 * q * q * n_voxels  # B = U^T rhs
        total += n_alphas * (2.0 * factors.n_test * q + 4.0 * factors.n_test) * n_voxels
    if include_factorization:
        total += _factorization_flops(factors)
    return total


def _operator_flops(operator: PredictionOperator, n_rows: int, q: int,
                    n_alphas: int) -> float:
    """Flops to build one operator: eigh counted as ``(4/3 + 2) q^3``
    (tridiagonal reduction + back-transformation), Cholesky as ``q^3 / 3``
    plus ``2 r q^2`` for its two triangular solves."""
    if operator.method == "cholesky":
        return n_alphas * (q ** 3 / 3.0 + 2.0 * n_rows * q * q)
    total = (4.0 / 3.0 + 2.0) * q ** 3 + 2.0 * n_rows * q * q
    if operator.dense is not None:
        total += n_alphas * 2.0 * n_rows * q * q
    return total


def _factorization_flops(factors: RidgeFactors) -> float:
    """Approximate flops of :func:`factorize_ridge`: Gram or kernel products,
    held-out downdates and every operator build (see :func:`_operator_flops`)."""
    n_alphas, p, n = factors.n_alphas, factors.n_features, factors.n_train
    if factors.regime == "primal":
        total = 2.0 * n * p * p  # Gram; the held-out Grams add up to it again
        total += 2.0 * sum(factors.fold_sizes) * p * p
        full_q = p
    else:
        total = 2.0 * n * n * p + 2.0 * factors.n_test * n * p  # kernels
        full_q = n
    for fold in factors.folds:
        n_held = int(fold.held_out.shape[0])
        q = p if factors.regime == "primal" else n - n_held
        total += _operator_flops(fold.operator, n_held, q, n_alphas)
    if factors.test is not None:
        total += _operator_flops(factors.test, factors.n_test, full_q, n_alphas)
    return total
