"""Prediction operators: decompose a training Gram/kernel once, then map a
right-hand side ``(q, voxel)`` to predictions for every alpha.

Dense form ``dense[a] = rows (G + alpha_a)^-1`` (built by eigh or by one float64
Cholesky per alpha) or factored form ``(A * d_a) V^T`` (eigh, less memory).
Applying an operator stacks several alphas into one matrix product.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PredictionOperator:
    """Maps a right-hand side ``(q, voxel)`` to predictions, for every alpha.

    Dense form: ``prediction_a = dense[a] @ rhs``.
    Factored form: ``prediction_a = (left * shrinkage[a]) @ (right.T @ rhs)``.

    For the primal regime ``rhs`` is the centred cross-product ``X^T Y``
    (feature, voxel); for the dual regime it is the centred BOLD itself
    (training sample, voxel). Arrays are in the compute dtype on the device.

    Attributes
    ----------
    dense : (n_alphas, n_rows, q) or None
    left : (n_rows, q) or None -- rows in the eigenbasis (``A``)
    right : (q, q) or None -- eigenvectors (``V`` or ``U``)
    shrinkage : (n_alphas, q) or None -- ``1 / (s + alpha)``
    method : how it was built, "eigh" or "cholesky" (for flop counts)
    """

    dense: Any = None
    left: Any = None
    right: Any = None
    shrinkage: Any = None
    method: str = "eigh"

    @property
    def n_rows(self) -> int:
        source = self.dense if self.dense is not None else self.left
        return int(source.shape[-2])

    @property
    def nbytes(self) -> int:
        return sum(int(part.nbytes) for part in
                   (self.dense, self.left, self.right, self.shrinkage)
                   if part is not None)


def eigh_psd(matrix: Any, xp: Any = np) -> tuple[Any, Any]:
    """Eigendecomposition of a symmetric positive semi-definite float64 matrix.

    Parameters
    ----------
    matrix : float64 array (q, q), symmetric; destroyed on CPU (no copy).

    Returns
    -------
    eigenvalues : float64 (q,), ascending, tiny negative values clamped to 0
    eigenvectors : float64 (q, q), columns
    """
    if xp is np:
        import scipy.linalg  # noqa: PLC0415

        # The transpose of a C-ordered symmetric matrix is the same matrix in
        # Fortran order, which LAPACK overwrites in place instead of copying.
        # Divide and conquer ("evd") is several times faster than MRRR ("evr")
        # at the study's n (benchmarks/eigh.py prints both).
        eigenvalues, eigenvectors = scipy.linalg.eigh(
            matrix.T, overwrite_a=True, check_finite=False, driver="evd")
    else:
        eigenvalues, eigenvectors = xp.linalg.eigh(matrix)
    return xp.maximum(eigenvalues, 0.0), eigenvectors


def _solve_shifted(matrix: Any, alpha: float, right: Any, buffer: Any,
                   solution: Any, xp: Any) -> Any | None:
    """``(matrix + alpha I)^-1 right`` by Cholesky, float64, into ``solution``.

    ``matrix`` (q, q) symmetric PSD is left unchanged; ``buffer`` (q, q) and
    ``solution`` (q, r), Fortran-ordered, are scratch space reused across
    alphas (no allocation per alpha); ``right`` is (q, r). Returns the
    solution, or None when the shifted matrix is not positive definite.
    """
    buffer[...] = matrix
    diagonal = xp.arange(matrix.shape[0])
    buffer[diagonal, diagonal] += alpha
    solution[...] = right
    if xp is np:
        from scipy.linalg import lapack  # noqa: PLC0415

        # LAPACK directly (numpy's cholesky is unblocked and ~10x slower);
        # buffer.T is the same symmetric matrix in Fortran order: in place.
        factor, info = lapack.dpotrf(buffer.T, lower=1, overwrite_a=1, clean=0)
        if info != 0:
            return None
        result, info = lapack.dpotrs(factor, solution, lower=1, overwrite_b=1)
        return result if info == 0 else None
    import cupyx.scipy.linalg  # noqa: PLC0415

    try:
        lower = xp.linalg.cholesky(buffer)
    except xp.linalg.LinAlgError:
        return None
    if not bool(xp.isfinite(lower).all()):
        return None
    half = cupyx.scipy.linalg.solve_triangular(lower, solution, lower=True,
                                               overwrite_b=True)
    return cupyx.scipy.linalg.solve_triangular(lower, half, lower=True, trans="T",
                                               overwrite_b=True)


def _dense_operator_by_cholesky(train_matrix: Any, row_matrix: Any,
                                alphas: np.ndarray, dtype: np.dtype, xp: Any,
                                remove_constant: bool) -> PredictionOperator | None:
    """Dense operators ``row_matrix (train_matrix + alpha)^-1``, one Cholesky
    per alpha (float64), stored as (n_alphas, n_rows, q) in ``dtype``; None
    if a shifted matrix is not positive definite."""
    dense = xp.empty((len(alphas), row_matrix.shape[0], train_matrix.shape[0]),
                     dtype=dtype)
    right = row_matrix.T  # Fortran-ordered view when row_matrix is C-ordered
    buffer = xp.empty_like(train_matrix)
    solution = xp.empty(right.shape, dtype=xp.float64, order="F")
    for index, alpha in enumerate(alphas):
        result = _solve_shifted(train_matrix, float(alpha), right, buffer,
                                solution, xp)
        if result is None:
            return None  # not positive definite: let the caller use eigh
        if remove_constant:
            result -= result.mean(axis=0, keepdims=True)
        dense[index] = result.T
    return PredictionOperator(dense=dense, method="cholesky")


def _shrinkage(eigenvalues: Any, alphas: np.ndarray, xp: Any) -> Any:
    """``d[a, k] = 1 / (s_k + alpha_a)``: float64 (n_alphas, q)."""
    alpha_column = xp.asarray(alphas, dtype=xp.float64)[:, None]
    return 1.0 / (eigenvalues[None, :] + alpha_column)


def _build_operator(train_matrix: Any, row_matrix: Any, alphas: np.ndarray,
                    form: str, dtype: np.dtype, xp: Any, remove_constant: bool,
                    keep_basis: bool = False
                    ) -> tuple[PredictionOperator, Any, Any]:
    """Decompose a training Gram/kernel and build its prediction operator.

    Parameters
    ----------
    train_matrix : float64 (q, q), centred Gram ``Xc^T Xc`` or kernel
        ``Xc Xc^T`` of the training samples (destroyed by "dense"/"factored").
    row_matrix : float64 (n_rows, q), the samples to predict expressed so
        that ``prediction = row_matrix @ (train_matrix + alpha)^-1 @ rhs``.
    form : "dense" (eigh, then ``(A * d_a) V^T`` per alpha), "factored"
        (eigh; keep ``A = row_matrix V`` and ``V``) or "cholesky" (dense, one
        Cholesky solve per alpha, no eigh).
    remove_constant : subtract each dense operator row's mean (factored: each
        column of ``right``, so ``right.T @ 1 = 0``), so constants in the
        right-hand side (dual regime: un-centred BOLD) are ignored; in float32 a
        constant left in would be amplified by ``1 / alpha`` along the kernel's
        null direction.
    keep_basis : also return the eigendecomposition (forces eigh).

    Returns
    -------
    operator, eigenvalues (q,) float64 or None, eigenvectors (q, q) or None
    """
    if form == "cholesky" and not keep_basis:
        operator = _dense_operator_by_cholesky(train_matrix, row_matrix, alphas,
                                               dtype, xp, remove_constant)
        if operator is not None:
            return operator, None, None
        form = "dense"  # tiny alpha on a singular matrix: eigh clamps instead
    eigenvalues, eigenvectors = eigh_psd(train_matrix, xp)
    del train_matrix  # destroyed by eigh; freed here if the caller passed a temporary
    # float32 eigenvectors (banded ridge's float32 eigh): float32 products too
    rows_in_basis = row_matrix.astype(eigenvectors.dtype, copy=False) @ eigenvectors
    shrinkage = _shrinkage(eigenvalues, alphas, xp).astype(eigenvectors.dtype,
                                                            copy=False)
    if form == "factored":
        left = rows_in_basis.astype(dtype)
        del rows_in_basis
        right = eigenvectors.astype(dtype)
        if remove_constant:  # right.T @ 1 = 0: the factored twin of the dense rows' mean
            right -= right.mean(axis=0, keepdims=True, dtype=xp.float64).astype(dtype)
        if not keep_basis:
            eigenvectors = None
        operator = PredictionOperator(left=left, right=right,
                                      shrinkage=shrinkage.astype(dtype))
        return operator, eigenvalues, eigenvectors
    factored = PredictionOperator(left=rows_in_basis, right=eigenvectors, shrinkage=shrinkage)
    return densify(factored, dtype, xp, remove_constant), eigenvalues, eigenvectors


def densify(operator: PredictionOperator, dtype: np.dtype, xp: Any,
            remove_constant: bool) -> PredictionOperator:
    """The dense form of a factored operator: per alpha ``(left * shrinkage[a]) @
    right.T``, (n_alphas, n_rows, q) in ``dtype``, computed in the factors' dtype;
    ``remove_constant`` subtracts each row's mean (as :func:`_build_operator`).
    Costs ``2 n_alphas n_rows q^2`` flops."""
    left, right, shrinkage = operator.left, operator.right, operator.shrinkage
    dense = xp.empty((shrinkage.shape[0], left.shape[0], right.shape[0]), dtype=dtype)
    for index in range(shrinkage.shape[0]):
        block = (left * shrinkage[index]) @ right.T
        if remove_constant:
            block -= block.mean(axis=1, keepdims=True)
        dense[index] = block
    return PredictionOperator(dense=dense)


def _project(operator: PredictionOperator, rhs: Any) -> Any:
    """Right-hand side as the operator consumes it (``V^T rhs`` if factored)."""
    return rhs if operator.dense is not None else operator.right.T @ rhs


#: Rows per stacked GEMM: matrix products with fewer than ~2,000 rows run
#: at ~75 % of the float32 peak on CPU, stacked alphas at ~100 %.
STACKED_ROWS = 2048


def _predictions(operator: PredictionOperator, projected: Any, xp: Any
                 ) -> Iterable[tuple[int, Any]]:
    """Predictions of every alpha, a few alphas per matrix product.

    Yields ``(first_alpha, predictions)`` with predictions of shape
    (n_batch_alphas, n_rows, voxel): dense operators are stacked into one
    ``(n_alphas * n_rows, q)`` product; factored ones build ``A * d_a`` for
    enough alphas to fill about :data:`STACKED_ROWS` rows.
    """
    n_rows, n_voxels = operator.n_rows, projected.shape[1]
    if operator.dense is not None:
        n_alphas, _, q = operator.dense.shape
        stacked = operator.dense.reshape(n_alphas * n_rows, q) @ projected
        yield 0, stacked.reshape(n_alphas, n_rows, n_voxels)
        return
    n_alphas, q = operator.shrinkage.shape
    batch = max(1, min(n_alphas, -(-STACKED_ROWS // max(n_rows, 1))))
    for first in range(0, n_alphas, batch):
        shrinkage = operator.shrinkage[first:first + batch]
        left = (operator.left[None, :, :] * shrinkage[:, None, :])
        stacked = left.reshape(-1, q) @ projected
        yield first, stacked.reshape(len(shrinkage), n_rows, n_voxels)


def _n_alphas_of(operator: PredictionOperator) -> int:
    source = operator.dense if operator.dense is not None else operator.shrinkage
    return int(source.shape[0])
