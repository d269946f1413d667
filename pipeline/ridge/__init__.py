"""Ridge regression onto every voxel, for many alphas at once.

Pure computation, no file I/O. The objective, for each voxel ``v`` and each
alpha, is scikit-learn's::

    minimise ||y_v - X w_v||^2 + alpha ||w_v||^2

with ``X`` and ``y_v`` centred on the training samples (the intercept is the
training mean). Everything that depends only on the design ``X`` is computed
once (:func:`factorize_ridge`) and broadcast; each voxel chunk then costs a
few matrix products for *all* alphas together (:func:`ridge_chunk`). Voxels
are independent, so chunking over voxels is exact (up to BLAS rounding), and
:func:`ridge_over_voxels` maps the chunk function over a Dask array of BOLD
chunked along voxels.

Two regimes, picked from the shape of the training design ``(n, p)``:

``primal`` (``p <= n``)
    the float64 Gram matrix ``X^T X`` (``p x p``); each fold's is the total
    minus the held-out block's, centred via sums. The fold cross-products
    ``X^T Y`` are likewise the total minus the held-out block's, so ``X^T Y``
    costs one pass over the data in total.
``dual`` (``p > n``)
    the float64 kernel ``X X^T`` (``n_train x n_train``), built over feature
    blocks (a Dask design is streamed, never held whole); each fold's is a
    re-centred sub-block.

Per fold, held-out predictions for alpha ``a`` are ``(A * d_a) @ B`` with
``(s, V)`` the eigendecomposition of the fold's Gram/kernel, ``A = X_heldout
V``, ``B = V^T (X^T y)_fold`` and ``d_a = 1 / (s + a)``. By default the small
operators ``(A * d_a) V^T = X_heldout (G + a)^-1`` are precomputed ("dense"
form, within a memory budget), so every alpha is part of one stacked GEMM on
the fold's right-hand side; on CPU they are built with one float64 Cholesky
per alpha, which for a dozen alphas is twice as fast as eigh (whose
tridiagonal reduction is memory-bound) and gives the same operators. Folds
beyond the budget keep the eigh factors ("factored" form). Big products run
in the compute dtype (float32 for float32 data), decompositions and sums in
float64. Held-out predictions are centred on the held-out block (r is
unchanged) so float32 sums stay accurate.

For recordings too long for one time block, :func:`ridge_over_voxels`
accumulates ``X^T X`` and ``X^T Y`` over time chunks instead
(:func:`accumulate_design_statistics`, :func:`target_statistics`,
:func:`ridge_chunk_from_statistics`); the results equal the direct path.

Arrays are ``(sample, feature)`` for designs and ``(sample, voxel)`` for
BOLD. ``device="cuda"`` runs the same code with CuPy (imported lazily).
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .scoring import check_folds, correlation_from_sums, train_indices

__all__ = [
    "get_array_module",
    "check_alphas",
    "eigh_psd",
    "PredictionOperator",
    "FoldFactors",
    "RidgeFactors",
    "factorize_ridge",
    "ridge_chunk",
    "select_best_alpha",
    "ridge_cv_scores",
    "fit_ridge",
    "ridge_over_voxels",
    "DesignStatistics",
    "accumulate_design_statistics",
    "factorize_from_statistics",
    "target_statistics",
    "ridge_chunk_from_statistics",
    "count_constant_voxels",
    "ridge_flops",
]

#: Tie-break slope added to mean CV scores, ``1e-10 * log(alpha)``: among
#: alphas whose scores are equal to ~1e-10, the largest wins (as in himalaya).
TIE_BREAK_SLOPE = 1e-10

#: Default cap on the memory of the precomputed dense CV operators, bytes.
#: The study's dual shape (8,192 features) needs 0.78 GB for all five folds;
#: under 512 MiB three are dense and two factored (~12 % more flops per
#: voxel), which keeps a worker's peak below the BOLD matrix size. Raise it
#: where memory is plentiful.
DEFAULT_MAX_DENSE_BYTES = 512 << 20


# --------------------------------------------------------------------------
# Backend and validation
# --------------------------------------------------------------------------

def get_array_module(device: str = "cpu") -> Any:
    """Array module for a device: ``numpy`` for "cpu", ``cupy`` for "cuda".

    CuPy is imported only when asked for; a missing CuPy raises an
    ImportError that names the package to install.
    """
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy  # noqa: PLC0415 - optional, GPU only
        except ImportError as error:  # pragma: no cover - depends on machine
            raise ImportError(
                "device='cuda' needs CuPy, which is not installed. Install it "
                "with `pip install 'voxelflow[gpu]'` (cupy-cuda12x), or use "
                "device='cpu'.") from error
        return cupy
    raise ValueError(f"device must be 'cpu' or 'cuda'; got {device!r}.")


def _to_numpy(array: Any) -> np.ndarray:
    """Host (numpy) copy of a numpy or cupy array."""
    if isinstance(array, np.ndarray):
        return array
    getter = getattr(array, "get", None)
    return np.asarray(getter() if getter is not None else array)


def check_alphas(alphas: Any) -> np.ndarray:
    """Validate ridge penalties: a non-empty 1-D list of finite values > 0.

    Returns
    -------
    alphas : float64 numpy array (n_alphas,)

    Raises
    ------
    ValueError naming the first bad alpha.
    """
    values = np.atleast_1d(np.asarray(alphas, dtype=np.float64))
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"alphas must be a non-empty 1-D sequence; got shape {values.shape}.")
    for index, value in enumerate(values):
        if not np.isfinite(value) or value <= 0:
            raise ValueError(
                f"Every alpha must be a finite number > 0; got alphas[{index}] = "
                f"{value!r}. Ridge with alpha <= 0 is ill-posed here; use a small "
                "positive value such as 1e-3 instead.")
    return values


def _compute_dtype(*dtypes: Any) -> np.dtype:
    """float32 when every input is float32 (or smaller), else float64."""
    kinds = [np.dtype(dtype) for dtype in dtypes if dtype is not None]
    if kinds and all(kind == np.float32 or kind.itemsize < 4 and kind.kind in "fiub"
                     for kind in kinds):
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _check_design(x: Any, name: str, xp: Any) -> None:
    """Raise a clear ValueError if a design matrix is not 2-D and finite."""
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (sample, feature); got shape {tuple(x.shape)}.")
    finite = xp.isfinite(x)
    if not bool(finite.all()):
        bad = _to_numpy(xp.argwhere(~finite)[0])
        count = int((~finite).sum())
        raise ValueError(
            f"{name} contains {count} NaN/inf value(s), first at sample "
            f"{int(bad[0])}, feature {int(bad[1])}. Features must be finite: "
            "fill or drop those samples before fitting.")


def _check_targets(y: Any, name: str, n_samples: int, xp: Any) -> None:
    """Raise a clear ValueError if a BOLD block has the wrong rows or NaN."""
    if y.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (sample, voxel); got shape {tuple(y.shape)}.")
    if y.shape[0] != n_samples:
        raise ValueError(
            f"{name} has {y.shape[0]} samples but the design has {n_samples}; "
            "X and Y must share their sample (time) axis.")
    finite = xp.isfinite(y)
    if not bool(finite.all()):
        bad = _to_numpy(xp.argwhere(~finite)[0])
        raise ValueError(
            f"{name} contains {int((~finite).sum())} NaN/inf value(s), first at "
            f"sample {int(bad[0])}, voxel {int(bad[1])} of this block. Mask "
            "those voxels out before fitting.")


#: With at most this many alphas, "auto" builds dense operators with one
#: Cholesky per alpha on CPU: eigh's tridiagonal reduction is memory-bound
#: (a 3,600-sample kernel: ~20 CPU-s for eigh + build vs ~13 CPU-s for 12
#: LAPACK potrf + potrs on the project's 2-core machine).
CHOLESKY_MAX_ALPHAS = 24


def _resolve_decomposition(decomposition: str, n_alphas: int, device: str) -> str:
    """'eigh' or 'cholesky' for decomposition='auto' (see CHOLESKY_MAX_ALPHAS)."""
    if decomposition == "auto":
        fast = device == "cpu" and n_alphas <= CHOLESKY_MAX_ALPHAS
        return "cholesky" if fast else "eigh"
    if decomposition in ("eigh", "cholesky"):
        return decomposition
    raise ValueError("decomposition must be 'auto', 'eigh' or 'cholesky'; got "
                     f"{decomposition!r}.")


def _resolve_regime(solver: str, n_train: int, n_features: int) -> str:
    """'primal' (Gram, p <= n) or 'dual' (kernel, p > n) for solver='auto'."""
    if solver == "auto":
        return "primal" if n_features <= n_train else "dual"
    if solver in ("primal", "dual"):
        return solver
    raise ValueError(f"solver must be 'auto', 'primal' or 'dual'; got {solver!r}.")


# --------------------------------------------------------------------------
# Decomposition
# --------------------------------------------------------------------------

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
        eigenvalues, eigenvectors = scipy.linalg.eigh(
            matrix.T, overwrite_a=True, check_finite=False, driver="evr")
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
    remove_constant : subtract each dense operator row's mean, so constants
        in the right-hand side (dual regime: un-centred BOLD) are ignored.
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
    rows_in_basis = row_matrix @ eigenvectors
    shrinkage = _shrinkage(eigenvalues, alphas, xp)
    if form == "factored":
        left = rows_in_basis.astype(dtype)
        del rows_in_basis
        right = eigenvectors.astype(dtype)
        if not keep_basis:
            eigenvectors = None
        operator = PredictionOperator(left=left, right=right,
                                      shrinkage=shrinkage.astype(dtype))
        return operator, eigenvalues, eigenvectors
    dense = xp.empty((len(alphas), row_matrix.shape[0], eigenvectors.shape[0]),
                     dtype=dtype)
    for index in range(len(alphas)):
        block = (rows_in_basis * shrinkage[index]) @ eigenvectors.T
        if remove_constant:
            block -= block.mean(axis=1, keepdims=True)
        dense[index] = block
    return PredictionOperator(dense=dense), eigenvalues, eigenvectors


# --------------------------------------------------------------------------
# Factors (depend on X only)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class FoldFactors:
    """What one cross-validation fold needs, precomputed from ``X``.

    Attributes
    ----------
    held_out : int64 (n_held_out,) on the device -- held-out sample indices
    train : int64 (n_fold_train,) on the device -- training sample indices
    x_sum_train : float64 (feature,) or None -- primal: sum of the shifted
        design over the fold's training samples (centring via sums)
    operator : predicts the held-out samples, centred over the held-out block
        (which leaves Pearson r unchanged and keeps float32 sums accurate)
    """

    held_out: Any
    train: Any
    x_sum_train: Any
    operator: PredictionOperator


@dataclass(frozen=True)
class RidgeFactors:
    """Everything ridge needs from the design, computed once per fit.

    Memory is O(features^2) (primal) or O(n_alphas * n_train^2) (dual,
    dense form) and independent of the number of voxels.

    Attributes
    ----------
    regime : "primal" or "dual"
    alphas : float64 numpy (n_alphas,)
    dtype : compute dtype of the big products (float32 or float64)
    device : "cpu" or "cuda"
    n_train, n_test, n_features : ints
    folds : one :class:`FoldFactors` per held-out fold
    test : operator predicting the test samples (minus the training mean of
        Y) from the full training fit, or None without a test set
    group_rows : primal: for each fold then the never-held-out rest, the
        int64 sample indices (device)
    group_design : primal: matching rows of the shifted design, compute dtype
        (n_group, feature)
    x_sum : primal: float64 (feature,), sum of the shifted training design
    basis, eigenvalues : full-fit eigenvectors (q, q) compute dtype and
        float64 eigenvalues (q,); kept only when weights are requested
    design_centred : dual with weights: centred training design (n, feature)
    x_mean : float64 (feature,), training mean of the design
    fold_sizes : held-out samples per fold
    """

    regime: str
    alphas: np.ndarray
    dtype: np.dtype
    device: str
    n_train: int
    n_test: int
    n_features: int
    folds: tuple[FoldFactors, ...]
    test: PredictionOperator | None
    group_rows: tuple[Any, ...] = ()
    group_design: tuple[Any, ...] = ()
    x_sum: Any = None
    basis: Any = None
    eigenvalues: Any = None
    design_centred: Any = None
    x_mean: Any = None
    fold_sizes: tuple[int, ...] = field(default=())

    @property
    def n_alphas(self) -> int:
        return len(self.alphas)

    @property
    def nbytes(self) -> int:
        """Device bytes held by the factors."""
        total = sum(fold.operator.nbytes for fold in self.folds)
        if self.test is not None:
            total += self.test.nbytes
        for part in (*self.group_design, self.basis, self.design_centred):
            if part is not None:
                total += int(part.nbytes)
        return total


def _choose_forms(n_alphas: int, fold_shapes: Sequence[tuple[int, int]],
                  itemsize: int, operator_form: str, max_dense_bytes: int,
                  decomposition: str) -> list[str]:
    """Form of each fold's operator: "dense"/"cholesky" while the dense
    operators fit ``max_dense_bytes``, "factored" beyond (``operator_form``
    "auto"), or the form asked for."""
    dense = "cholesky" if decomposition == "cholesky" else "dense"
    if operator_form == "dense":
        return [dense] * len(fold_shapes)
    if operator_form == "factored":
        return ["factored"] * len(fold_shapes)
    if operator_form != "auto":
        raise ValueError("operator_form must be 'auto', 'dense' or 'factored'; "
                         f"got {operator_form!r}.")
    forms, used = [], 0
    for n_rows, q in fold_shapes:
        size = n_alphas * n_rows * q * itemsize
        if used + size <= max_dense_bytes:
            forms.append(dense)
            used += size
        else:
            forms.append("factored")
    return forms


def factorize_ridge(X_train: Any, X_test: Any | None, alphas: Any,
                    folds: Sequence[Any], *, device: str = "cpu",
                    dtype: Any = None, solver: str = "auto",
                    operator_form: str = "auto",
                    max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
                    decomposition: str = "auto",
                    keep_weight_factors: bool = False) -> RidgeFactors:
    """Decompose the training design once: per fold and for the full fit.

    Parameters
    ----------
    X_train : array (n_train, feature), float32 or float64, finite
    X_test : array (n_test, feature) or None
    alphas : sequence of float > 0 (n_alphas,)
    folds : held-out index arrays into the training samples (contiguous
        blocks or whole runs; see :mod:`voxelflow.pipeline.ridge.scoring`); disjoint
    device : "cpu" (NumPy) or "cuda" (CuPy)
    dtype : compute dtype for the big products; default float32 for float32
        designs, else float64
    solver : "auto" (primal if feature <= n_train, else dual), "primal", "dual"
    operator_form : "dense" precomputes ``(A * d_a) V^T`` per alpha (fewest
        flops per voxel); "factored" keeps ``A`` and ``V`` (less memory, one
        extra GEMM per fold and chunk); "auto" is dense within
        ``max_dense_bytes`` (bytes of dense operators), factored beyond
    decomposition : "eigh" (one float64 eigendecomposition per fold and one
        for the full fit), "cholesky" (dense operators from one float64
        Cholesky solve per alpha instead; factored folds and weights still
        use eigh) or "auto" (Cholesky on CPU for up to
        :data:`CHOLESKY_MAX_ALPHAS` alphas, else eigh). Results agree to
        rounding.
    keep_weight_factors : keep what :func:`ridge_chunk` needs for weights

    Returns
    -------
    RidgeFactors
    """
    xp = get_array_module(device)
    alphas = check_alphas(alphas)
    if len(getattr(X_train, "shape", ())) != 2:
        X_train = xp.asarray(X_train)
        _check_design(X_train, "X_train", xp)
    n_train, n_features = (int(size) for size in X_train.shape)
    regime = _resolve_regime(solver, n_train, n_features)
    if not (_is_dask(X_train) and regime == "dual"):
        # The dual regime streams a Dask design over feature blocks (checked
        # block by block); everything else holds it in memory.
        X_train = xp.asarray(_materialize(X_train))
        _check_design(X_train, "X_train", xp)
    if X_test is not None:
        X_test = xp.asarray(_materialize(X_test))
        _check_design(X_test, "X_test", xp)
        if X_test.shape[1] != n_features:
            raise ValueError(
                f"X_test has {X_test.shape[1]} features but X_train has "
                f"{n_features}.")
    folds = check_folds(folds, n_train)
    compute = np.dtype(dtype) if dtype is not None else _compute_dtype(X_train.dtype)
    if compute not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64; got {compute}.")
    decomposition = _resolve_decomposition(decomposition, len(alphas), device)
    builder = _factorize_primal if regime == "primal" else _factorize_dual
    return builder(X_train, X_test, alphas, folds, xp=xp, dtype=compute,
                   device=device, operator_form=operator_form,
                   max_dense_bytes=max_dense_bytes, decomposition=decomposition,
                   keep_weight_factors=keep_weight_factors)


def _design_mean(X_train: Any, xp: Any) -> Any:
    """Float64 column means (feature,) of a design."""
    return X_train.mean(axis=0, dtype=xp.float64)


def _full_fit_operator(train_matrix: Any, test_rows: Any | None, alphas, *,
                       decomposition: str, dtype, xp, remove_constant: bool,
                       keep_weight_factors: bool):
    """Test operator of the full training fit (+ basis for weights)."""
    if test_rows is None and not keep_weight_factors:
        return None, None, None
    rows = test_rows if test_rows is not None else xp.zeros(
        (0, train_matrix.shape[0]), dtype=xp.float64)
    form = "cholesky" if decomposition == "cholesky" else "dense"
    operator, eigenvalues, eigenvectors = _build_operator(
        train_matrix, rows, alphas, form, dtype, xp,
        remove_constant=remove_constant, keep_basis=keep_weight_factors)
    basis = eigenvectors.astype(dtype) if keep_weight_factors else None
    return (operator if test_rows is not None else None), eigenvalues, basis


def _factorize_primal(X_train, X_test, alphas, folds, *, xp, dtype, device,
                      operator_form, max_dense_bytes, decomposition,
                      keep_weight_factors):
    """Primal factors: float64 Gram ``X^T X`` per fold, by downdating.

    The fold Gram is the total minus the held-out block's, centred via sums.
    """
    n_train, n_features = X_train.shape
    x_mean = _design_mean(X_train, xp)
    shifted = (X_train.astype(xp.float64) - x_mean).astype(dtype)
    design64 = shifted.astype(xp.float64)
    gram = design64.T @ design64
    x_sum = design64.sum(axis=0)

    rest = train_indices(np.concatenate(folds), n_train)
    groups = [*folds, rest] if rest.size else list(folds)
    forms = _choose_forms(len(alphas), [(len(f), n_features) for f in folds],
                          np.dtype(dtype).itemsize, operator_form, max_dense_bytes,
                          decomposition)
    fold_factors = []
    for held_out, form in zip(folds, forms):
        rows = design64[xp.asarray(held_out)]
        n_fold_train = n_train - len(held_out)
        x_sum_train = x_sum - rows.sum(axis=0)
        gram_train = gram - rows.T @ rows
        gram_train -= xp.outer(x_sum_train, x_sum_train) / n_fold_train
        rows -= rows.mean(axis=0)  # centre over the held-out block
        operator, _, _ = _build_operator(gram_train, rows, alphas, form, dtype, xp,
                                         remove_constant=False)
        fold_factors.append(FoldFactors(
            held_out=xp.asarray(held_out),
            train=xp.asarray(train_indices(held_out, n_train)),
            x_sum_train=x_sum_train, operator=operator))
        del rows, gram_train
    del design64
    gram -= xp.outer(x_sum, x_sum) / n_train
    test_rows = None if X_test is None else X_test.astype(xp.float64) - x_mean
    test_operator, eigenvalues, basis = _full_fit_operator(
        gram, test_rows, alphas, decomposition=decomposition, dtype=dtype, xp=xp,
        remove_constant=False, keep_weight_factors=keep_weight_factors)
    return RidgeFactors(
        regime="primal", alphas=alphas, dtype=np.dtype(dtype), device=device,
        n_train=n_train, n_test=0 if X_test is None else int(X_test.shape[0]),
        n_features=n_features, folds=tuple(fold_factors), test=test_operator,
        group_rows=tuple(xp.asarray(group) for group in groups),
        group_design=tuple(shifted[xp.asarray(group)] for group in groups),
        x_sum=x_sum, basis=basis, eigenvalues=eigenvalues, x_mean=x_mean,
        fold_sizes=tuple(len(f) for f in folds))


def _is_dask(array: Any) -> bool:
    """True for a Dask array (anything with a task graph and chunks)."""
    return hasattr(array, "dask") and hasattr(array, "chunks")


def _materialize(array: Any) -> Any:
    """Compute a Dask array; return anything else unchanged."""
    return array.compute() if _is_dask(array) else array


def _feature_blocks(X: Any, block: int) -> Iterable[tuple[slice, Any]]:
    """(columns, X[:, columns]) over feature blocks; a Dask design is read
    one of its own feature chunks at a time, never whole."""
    n_features = X.shape[1]
    if _is_dask(X):
        start = 0
        for width in X.chunks[1]:
            columns = slice(start, start + width)
            yield columns, X[:, columns].compute()
            start += width
        return
    for start in range(0, n_features, block):
        columns = slice(start, start + block)
        yield columns, X[:, columns]


def _centred_kernels(X_train: Any, X_test: Any | None, dtype, xp: Any,
                     block: int = 512) -> tuple[Any, Any, Any]:
    """Float64 kernels of the design centred on its training mean.

    Accumulated over feature blocks, so the float64 copy of X is only
    (n, block) and a Dask design is never held whole. Each block is centred
    (float64 mean) and rounded to the compute dtype, as in the primal path.

    Returns (train kernel (n, n), test-by-train kernel (n_test, n) or None,
    training mean (feature,) float64).
    """
    n_train, n_features = X_train.shape
    kernel = xp.zeros((n_train, n_train), dtype=xp.float64)
    cross = None if X_test is None else xp.zeros(
        (X_test.shape[0], n_train), dtype=xp.float64)
    x_mean = xp.zeros(n_features, dtype=xp.float64)
    for columns, part in _feature_blocks(X_train, block):
        part = xp.asarray(part)
        _check_design(part, f"X_train[:, {columns.start}:{columns.stop}]", xp)
        x_mean[columns] = part.mean(axis=0, dtype=xp.float64)
        part = (part.astype(xp.float64) - x_mean[columns]).astype(dtype)
        part = part.astype(xp.float64)
        kernel += part @ part.T
        if cross is not None:
            cross += (X_test[:, columns].astype(xp.float64) - x_mean[columns]) @ part.T
    return kernel, cross, x_mean


def _recentre_kernel_block(block: Any, column_means: Any, overall: float) -> Any:
    """In place: centre ``K[rows, train]`` on the training samples' mean.

    ``(x_i - m)^T (x_j - m) = K_ij - mean_j' K_ij' - mean_i' K_i'j + mean K``
    with ``i'``, ``j'`` over the training samples; ``column_means`` holds
    ``mean_i' K_i'j`` and ``overall`` the mean of the training block.
    """
    block -= block.mean(axis=1, keepdims=True)
    block -= column_means[None, :]
    block += overall
    return block


def _dual_fold_operator(blocks: list, alphas: np.ndarray, form: str,
                        dtype: np.dtype, xp: Any) -> PredictionOperator:
    """One fold's operator from ``blocks = [K[train, train], K[held, train]]``
    (popped, so that eigh can free the training block as soon as it is
    decomposed). Both are re-centred on the fold's training mean; the
    held-out rows also on their own mean."""
    rows = blocks.pop()
    column_means = blocks[0].mean(axis=0)
    overall = float(column_means.mean())
    rows = _recentre_kernel_block(rows, column_means, overall)
    rows -= rows.mean(axis=0, keepdims=True)  # centre over held-out block
    _recentre_kernel_block(blocks[0], column_means, overall)
    operator, _, _ = _build_operator(blocks.pop(), rows, alphas, form, dtype, xp,
                                     remove_constant=True)
    return operator


def _factorize_dual(X_train, X_test, alphas, folds, *, xp, dtype, device,
                    operator_form, max_dense_bytes, decomposition,
                    keep_weight_factors):
    """Dual factors: float64 kernel ``X X^T`` per fold (sub-blocks of one
    kernel, re-centred on each fold's training mean)."""
    n_train, n_features = X_train.shape
    kernel, cross, x_mean = _centred_kernels(X_train, X_test, dtype, xp)
    forms = _choose_forms(len(alphas), [(len(f), n_train - len(f)) for f in folds],
                          np.dtype(dtype).itemsize, operator_form, max_dense_bytes,
                          decomposition)
    # The full fit first, on a copy of the kernel, while no fold operator is
    # held yet: this keeps the peak memory of the factorisation low.
    test_operator, eigenvalues, basis = _full_fit_operator(
        kernel.copy(), cross, alphas, decomposition=decomposition, dtype=dtype,
        xp=xp, remove_constant=True, keep_weight_factors=keep_weight_factors)
    del cross
    fold_factors = []
    for number, (held_out, form) in enumerate(zip(folds, forms)):
        train = xp.asarray(train_indices(held_out, n_train))
        held = xp.asarray(held_out)
        blocks = [kernel[train[:, None], train], kernel[held[:, None], train]]
        if number == len(folds) - 1:
            kernel = None  # last fold: release the full kernel before solving
        operator = _dual_fold_operator(blocks, alphas, form, dtype, xp)
        fold_factors.append(FoldFactors(held_out=held, train=train,
                                        x_sum_train=None, operator=operator))
    design_centred = None
    if keep_weight_factors:
        design = xp.asarray(_materialize(X_train))
        design_centred = (design.astype(xp.float64) - x_mean).astype(dtype)
    return RidgeFactors(
        regime="dual", alphas=alphas, dtype=np.dtype(dtype), device=device,
        n_train=n_train, n_test=0 if X_test is None else int(X_test.shape[0]),
        n_features=n_features, folds=tuple(fold_factors), test=test_operator,
        basis=basis, eigenvalues=eigenvalues, design_centred=design_centred,
        x_mean=x_mean, fold_sizes=tuple(len(f) for f in folds))


# --------------------------------------------------------------------------
# One voxel chunk
# --------------------------------------------------------------------------

def _shift_targets(Y: Any, dtype: np.dtype, xp: Any) -> tuple[Any, Any]:
    """BOLD minus its column mean, in ``dtype``; and the float64 mean (V,).

    The mean is accumulated in float64 and rounded to ``dtype`` before the
    subtraction, which is then exact for typical BOLD (Sterbenz) and needs
    no float64 copy of the block. Later sums re-centre exactly.
    """
    mean = Y.mean(axis=0, dtype=xp.float64)
    return Y.astype(dtype, copy=False) - mean.astype(dtype), mean


def _column_dot(a: Any, b: Any, xp: Any) -> Any:
    """``sum_t a[t, v] * b[t, v]`` accumulated in float64: (V,)."""
    return (a * b).sum(axis=0, dtype=xp.float64)


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
    fold_scores = []
    for fold in factors.folds:
        y_train = xp.take(shifted, fold.train, axis=0)
        y_held = xp.take(shifted, fold.held_out, axis=0)
        y_held = y_held - y_held.mean(axis=0, dtype=xp.float64).astype(factors.dtype)
        fold_scores.append(_held_out_scores(fold.operator, y_train, y_held, xp))
        del y_train, y_held
    return fold_scores, shifted


def _test_outputs(factors: RidgeFactors, rhs: Any, y_mean: Any, Y_test: Any,
                  best: Any, want_predictions: bool, xp: Any
                  ) -> tuple[Any, Any | None]:
    """r_test (n_alphas, voxel) float64 and predictions at the best alpha."""
    operator = factors.test
    projected = _project(operator, rhs)
    y_centred = Y_test.astype(xp.float64)
    y_centred -= y_centred.mean(axis=0)
    y_centred = y_centred.astype(factors.dtype)
    y_ss = _column_dot(y_centred, y_centred, xp)
    r_test = xp.empty((factors.n_alphas, rhs.shape[1]), dtype=xp.float64)
    predictions = None
    if want_predictions:
        predictions = xp.zeros((factors.n_test, rhs.shape[1]), dtype=factors.dtype)
    for first, batch in _predictions(operator, projected, xp):
        for offset, prediction in enumerate(batch):
            index = first + offset
            if predictions is not None:
                chosen = best == index
                predictions[:, chosen] = prediction[:, chosen]
            prediction -= prediction.mean(axis=0, dtype=xp.float64).astype(
                factors.dtype)
            r_test[index] = correlation_from_sums(
                _column_dot(prediction, y_centred, xp),
                _column_dot(prediction, prediction, xp), y_ss, xp=xp)
        del batch
    if predictions is not None:
        predictions += y_mean.astype(factors.dtype)
    return r_test, predictions


def _weights_at_best(factors: RidgeFactors, rhs: Any, best: Any, xp: Any) -> Any:
    """Ridge weights (feature, voxel) at each voxel's selected alpha.

    Primal: ``V diag(1/(s+a_v)) V^T (X^T y_v)``. Dual: ``Xc^T U diag(1/(s+a_v))
    U^T y_v``. Voxels without a selected alpha get zero weights.
    """
    if factors.basis is None:
        raise ValueError("Weights need factors made with keep_weight_factors=True.")
    alphas = xp.asarray(factors.alphas)
    chosen = alphas[xp.maximum(best, 0)]
    shrink = 1.0 / (factors.eigenvalues[:, None] + chosen[None, :])
    shrink = xp.where((best >= 0)[None, :], shrink, 0.0).astype(factors.dtype)
    solution = factors.basis @ ((factors.basis.T @ rhs) * shrink)
    if factors.regime == "dual":
        solution = factors.design_centred.T @ solution
    return solution


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
        selected one (only with ``Y_test``)
        ``weights``, ``predictions`` when asked for.
    """
    xp = get_array_module(factors.device)
    Y_train = xp.asarray(Y_train)
    _check_targets(Y_train, "Y_train", factors.n_train, xp)
    if Y_test is not None:
        if factors.test is None:
            raise ValueError("Y_test given but the factors were made without X_test.")
        Y_test = xp.asarray(Y_test)
        _check_targets(Y_test, "Y_test", factors.n_test, xp)
        if Y_test.shape[1] != Y_train.shape[1]:
            raise ValueError(
                f"Y_test has {Y_test.shape[1]} voxels but Y_train has "
                f"{Y_train.shape[1]} in this chunk.")
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
    r_cv = _mean_over_folds(fold_scores, xp)
    best = select_best_alpha(r_cv, factors.alphas, xp)
    alphas = xp.asarray(factors.alphas)
    out = {
        "r_cv": r_cv,
        "best_alpha_index": best,
        "best_alpha": xp.where(best >= 0, alphas[xp.maximum(best, 0)], xp.nan),
        "constant_voxel": (shifted == 0).all(axis=0),
        "intercept": y_mean,
    }
    if Y_test is not None:
        r_test, predictions = _test_outputs(factors, rhs, y_mean, Y_test, best,
                                            return_predictions, xp)
        out["r_test"] = r_test
        out["r_test_cv"] = _pick_best(r_test, best, xp)
        if predictions is not None:
            out["predictions"] = predictions
    if return_weights:
        out["weights"] = _weights_at_best(factors, rhs, best, xp)
    return out


def _pick_best(values: Any, best: Any, xp: Any) -> Any:
    """``values[best[v], v]`` per voxel (float64), NaN where best is -1."""
    picked = xp.take_along_axis(values, xp.maximum(best, 0)[None, :], axis=0)[0]
    return xp.where(best >= 0, picked, xp.nan)


def count_constant_voxels(result: dict[str, Any]) -> int:
    """Number of voxels whose training BOLD is constant (their r is NaN)."""
    return int(_to_numpy(result["constant_voxel"]).sum())


# --------------------------------------------------------------------------
# Eager convenience API
# --------------------------------------------------------------------------

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
            parts.setdefault(key, []).append(_to_numpy(value))
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


# --------------------------------------------------------------------------
# Flop count (for benchmarks)
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# Dask: map over voxel chunks
# --------------------------------------------------------------------------

def _output_layout(factors: RidgeFactors, has_test: bool, weights: bool,
                   predictions: bool) -> dict[str, slice]:
    """Rows of the packed per-chunk result array, by output name."""
    n_alphas = factors.n_alphas
    sizes = [("r_cv", n_alphas), ("best_alpha_index", 1), ("constant_voxel", 1),
             ("intercept", 1)]
    if has_test:
        sizes += [("r_test", n_alphas), ("r_test_cv", 1)]
    if predictions:
        sizes.append(("predictions", factors.n_test))
    if weights:
        sizes.append(("weights", factors.n_features))
    layout, start = {}, 0
    for name, size in sizes:
        layout[name] = slice(start, start + size)
        start += size
    return layout


def _pack(result: dict[str, Any], layout: dict[str, slice], dtype: np.dtype
          ) -> np.ndarray:
    """Stack a chunk's outputs into one host array (rows, voxel_chunk)."""
    n_voxels = int(result["best_alpha_index"].shape[0])
    rows = max(part.stop for part in layout.values())
    packed = np.empty((rows, n_voxels), dtype=dtype)
    for name, rows_of in layout.items():
        packed[rows_of] = _to_numpy(result[name]).reshape(-1, n_voxels)
    return packed


def _packed_chunk(Y_train_block: Any, Y_test_block: Any = None, *,
                  factors: RidgeFactors, layout: dict[str, slice],
                  out_dtype: np.dtype, weights: bool, predictions: bool,
                  block_voxels: int = DEFAULT_BLOCK_VOXELS) -> np.ndarray:
    """blockwise kernel of the direct path: one voxel chunk -> packed rows."""
    result = ridge_chunk(factors, Y_train_block, Y_test_block,
                         return_weights=weights, return_predictions=predictions,
                         block_voxels=block_voxels)
    return _pack(result, layout, out_dtype)


def _packed_chunk_from_statistics(statistics_block: Any, y_test_block: Any = None,
                                  *, factors: StreamedFactors,
                                  layout: dict[str, slice], out_dtype: np.dtype,
                                  weights: bool, predictions: bool) -> np.ndarray:
    """blockwise kernel of the time-chunked path."""
    result = ridge_chunk_from_statistics(
        factors, statistics_block, y_test_block,
        return_weights=weights, return_predictions=predictions)
    return _pack(result, layout, out_dtype)


def _broadcast(factors: Any) -> Any:
    """Wrap factors as one Dask task that every chunk task depends on."""
    import dask  # noqa: PLC0415

    return dask.delayed(factors, name=f"ridge-factors-{uuid.uuid4().hex}",
                        traverse=False)


def ridge_over_voxels(X_train: Any, Y_train: Any, X_test: Any | None,
                      Y_test: Any | None, alphas: Any, folds: Sequence[Any], *,
                      device: str = "cpu", dtype: Any = None,
                      solver: str = "auto", return_weights: bool = False,
                      return_predictions: bool = False,
                      operator_form: str = "auto",
                      max_dense_bytes: int = DEFAULT_MAX_DENSE_BYTES,
                      decomposition: str = "auto",
                      block_voxels: int = DEFAULT_BLOCK_VOXELS,
                      voxel: Any = None, factors: Any = None) -> Any:
    """Lazy ridge over every voxel of Dask BOLD chunked along voxels.

    Factors are computed here, once (they depend on X only), and broadcast
    as one Dask task; each voxel chunk is one task (``map_blocks``), so
    memory holds O(features^2 + features x voxel_chunk), never all of Y.
    If ``Y_train`` has several chunks along time, ``X^T X`` and ``X^T Y`` are
    accumulated over time chunks instead (primal regime; same results).

    Parameters
    ----------
    X_train : numpy/cupy (n_train, feature) -- or Dask when time-chunked
    Y_train : dask array (n_train, voxel), chunked along voxels
    X_test : (n_test, feature) or None; Y_test : dask (n_test, voxel) or None
    alphas : (n_alphas,) floats > 0; folds : held-out index arrays
    solver, operator_form, max_dense_bytes, decomposition : see
        :func:`factorize_ridge`
    block_voxels : voxels processed together inside a chunk (memory bound)
    voxel : optional coordinate values for the ``voxel`` dimension
    factors : optional precomputed :class:`RidgeFactors` (direct path)

    Returns
    -------
    xarray.Dataset (lazy) with
        ``r_cv`` (alpha, voxel), ``best_alpha`` (voxel), ``constant_voxel``
        (voxel) bool, ``intercept`` (voxel); with a test set ``r_test``
        (alpha, voxel) and ``r_test_cv`` (voxel); optionally ``weights``
        (feature, voxel) and ``predictions`` (test_sample, voxel).
        Float outputs have the compute dtype. ``attrs`` record alphas,
        regime, folds and dtype.
    """
    import dask.array as da  # noqa: PLC0415

    if (X_test is None) != (Y_test is None):
        raise ValueError("Give both X_test and Y_test, or neither.")
    Y_train = da.asarray(Y_train)
    if Y_train.ndim != 2:
        raise ValueError(f"Y_train must be 2-D (sample, voxel); got {Y_train.shape}.")
    if X_train.shape[0] != Y_train.shape[0]:
        raise ValueError(f"X_train has {X_train.shape[0]} samples, Y_train "
                         f"{Y_train.shape[0]}; they must share the time axis.")
    compute = (np.dtype(dtype) if dtype is not None
               else _compute_dtype(X_train.dtype, Y_train.dtype))
    if Y_test is not None:
        Y_test = da.asarray(Y_test)
        if Y_test.ndim != 2 or Y_test.shape[1] != Y_train.shape[1]:
            raise ValueError(f"Y_test must be (n_test, {Y_train.shape[1]}); got "
                             f"{Y_test.shape}.")
        if X_test.shape[0] != Y_test.shape[0]:
            raise ValueError(f"X_test has {X_test.shape[0]} samples, Y_test "
                             f"{Y_test.shape[0]}.")
        Y_test = Y_test.rechunk({0: -1, 1: Y_train.chunks[1]})
    streamed = len(Y_train.chunks[0]) > 1
    if streamed:
        regime = _resolve_regime(solver, X_train.shape[0], X_train.shape[1])
        if regime == "dual":
            # n < p: one time block of Y is small; no need to accumulate.
            Y_train = Y_train.rechunk({0: -1})
            streamed = False
    if streamed:
        packed, factors = _streamed_packed(
            X_train, Y_train, X_test, Y_test, alphas, folds, device=device,
            dtype=compute, return_weights=return_weights,
            return_predictions=return_predictions)
    else:
        if factors is None:
            factors = factorize_ridge(
                X_train, X_test, alphas, folds, device=device, dtype=compute,
                solver=solver, operator_form=operator_form,
                max_dense_bytes=max_dense_bytes, decomposition=decomposition,
                keep_weight_factors=return_weights)
        layout = _output_layout(factors, Y_test is not None, return_weights,
                                return_predictions)
        rows = max(part.stop for part in layout.values())
        arrays = [Y_train, "tv"] if Y_test is None else [Y_train, "tv", Y_test, "sv"]
        packed = da.blockwise(
            _packed_chunk, "ov", *arrays, new_axes={"o": rows}, concatenate=True,
            factors=_broadcast(factors), layout=layout, out_dtype=factors.dtype,
            weights=return_weights, predictions=return_predictions,
            block_voxels=block_voxels,
            dtype=factors.dtype, meta=np.empty((0, 0), dtype=factors.dtype),
            name=f"ridge-chunk-{uuid.uuid4().hex}")
    layout = _output_layout(factors, Y_test is not None, return_weights,
                            return_predictions)
    return _dataset_from_packed(packed, layout, factors, voxel)


def _dataset_from_packed(packed: Any, layout: dict[str, slice],
                         factors: Any, voxel: Any) -> Any:
    """Split the packed Dask array into named, lazily sliced outputs."""
    import xarray as xr  # noqa: PLC0415

    alphas = factors.alphas
    dims = {"r_cv": ("alpha", "voxel"), "r_test": ("alpha", "voxel"),
            "weights": ("feature", "voxel"), "predictions": ("test_sample", "voxel")}
    data_vars = {}
    for name, rows in layout.items():
        block = packed[rows]
        if name == "best_alpha_index":
            index = block[0]
            data_vars["best_alpha"] = (("voxel",), index.map_blocks(
                _index_to_alpha, alphas=alphas, dtype=np.float64))
        elif name == "constant_voxel":
            data_vars[name] = (("voxel",), block[0] > 0.5)
        elif name in dims:
            data_vars[name] = (dims[name], block)
        else:
            data_vars[name] = (("voxel",), block[0])
    coords = {"alpha": alphas}
    if voxel is not None:
        coords["voxel"] = voxel
    attrs = {"alphas": [float(a) for a in alphas], "regime": factors.regime,
             "n_folds": len(factors.fold_sizes),
             "fold_sizes": [int(s) for s in factors.fold_sizes],
             "n_train": factors.n_train, "n_features": factors.n_features,
             "compute_dtype": str(np.dtype(factors.dtype)),
             "objective": "||y - Xw||^2 + alpha ||w||^2, X and y centred on train",
             "alpha_selection": "argmax over alphas of mean held-out Pearson r"}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _index_to_alpha(index: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Packed best-alpha index (float) -> alpha value, NaN for -1."""
    position = np.rint(index).astype(np.int64)
    return np.where(position >= 0, alphas[np.maximum(position, 0)], np.nan)


# --------------------------------------------------------------------------
# Time-chunked accumulation (long recordings, primal regime)
# --------------------------------------------------------------------------

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
    if hasattr(X, "chunks") and hasattr(X, "dask"):
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
class StreamedFactors:
    """Factors of the time-chunked path (see :func:`factorize_from_statistics`)."""

    statistics: DesignStatistics
    folds: tuple[StreamedFold, ...]
    test: PredictionOperator | None
    alphas: np.ndarray
    dtype: np.dtype
    device: str
    n_train: int
    n_test: int
    n_features: int
    basis: Any = None
    eigenvalues: Any = None
    regime: str = "primal"
    fold_sizes: tuple[int, ...] = ()

    @property
    def n_alphas(self) -> int:
        return len(self.alphas)


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
        projected = fold.basis.T @ rhs
        target_in_basis = fold.basis.T @ held_cross
        products = (fold.shrinkage @ (projected * target_in_basis)).astype(xp.float64)
        scores = xp.empty((factors.n_alphas, rhs.shape[1]), dtype=xp.float64)
        for index in range(factors.n_alphas):
            rotated = fold.held_out_root @ (projected * fold.shrinkage[index][:, None])
            scores[index] = correlation_from_sums(
                products[index], _column_dot(rotated, rotated, xp), y_ss, xp=xp)
        fold_scores.append(scores)
    r_cv = _mean_over_folds(fold_scores, xp)
    best = select_best_alpha(r_cv, factors.alphas, xp)
    y_mean = y_reference + y_total / n_train
    y_ss_total = y_squares.sum(axis=0) - y_total ** 2 / n_train
    rhs = (cross_total - xp.outer(x_total, y_total) / n_train).astype(dtype)
    alphas = xp.asarray(factors.alphas)
    out = {
        "r_cv": r_cv,
        "best_alpha_index": best,
        "best_alpha": xp.where(best >= 0, alphas[xp.maximum(best, 0)], xp.nan),
        "constant_voxel": y_ss_total <= 0,
        "intercept": y_mean,
    }
    if Y_test is not None:
        Y_test = xp.asarray(Y_test)
        _check_targets(Y_test, "Y_test", factors.n_test, xp)
        r_test, predictions = _test_outputs(factors, rhs, y_mean, Y_test, best,
                                            return_predictions, xp)
        out["r_test"] = r_test
        out["r_test_cv"] = _pick_best(r_test, best, xp)
        if predictions is not None:
            out["predictions"] = predictions
    if return_weights:
        out["weights"] = _weights_at_best(factors, rhs, best, xp)
    return out


def _streamed_packed(X_train, Y_train, X_test, Y_test, alphas, folds, *,
                     device, dtype, return_weights, return_predictions):
    """Dask graph of the time-chunked path: block statistics, summed over
    time blocks, then one finishing task per voxel chunk."""
    import dask.array as da  # noqa: PLC0415

    statistics = accumulate_design_statistics(X_train, folds, device=device)
    if X_test is not None and hasattr(X_test, "dask"):
        X_test = X_test.compute()
    factors = factorize_from_statistics(statistics, X_test, alphas, device=device,
                                        dtype=dtype,
                                        keep_weight_factors=return_weights)
    n_features, n_groups = factors.n_features, statistics.n_groups
    x_design = da.asarray(X_train).rechunk({0: Y_train.chunks[0], 1: -1})
    groups = da.from_array(statistics.group_of_sample, chunks=(Y_train.chunks[0],))
    y_reference = Y_train[0].astype(np.float64)
    x_reference = _to_numpy(statistics.x_reference)

    def block_statistics(x_block, y_block, group_block, reference_block):
        stats = target_statistics(x_block, y_block, group_block, n_groups,
                                  x_reference, reference_block, device=device,
                                  dtype=dtype)
        return _to_numpy(stats)[None]

    partial = da.blockwise(
        block_statistics, "tgrv", x_design, "tf", Y_train, "tv", groups, "t",
        y_reference, "v", new_axes={"g": n_groups, "r": n_features + 2},
        adjust_chunks={"t": 1}, dtype=np.float64, concatenate=True,
        meta=np.empty((0, 0, 0, 0), dtype=np.float64))
    summed = partial.sum(axis=0)
    reference_row = da.broadcast_to(y_reference[None, None, :],
                                    (n_groups, 1, Y_train.shape[1]),
                                    chunks=(n_groups, 1, Y_train.chunks[1]))
    packed_statistics = da.concatenate([summed, reference_row], axis=1)
    packed_statistics = packed_statistics.rechunk({0: -1, 1: -1})
    layout = _output_layout(factors, Y_test is not None, return_weights,
                            return_predictions)
    rows = max(part.stop for part in layout.values())
    arrays = ([packed_statistics, "grv"] if Y_test is None
              else [packed_statistics, "grv", Y_test, "sv"])
    packed = da.blockwise(
        _packed_chunk_from_statistics, "ov", *arrays, new_axes={"o": rows},
        concatenate=True, factors=_broadcast(factors), layout=layout,
        out_dtype=dtype, weights=return_weights, predictions=return_predictions,
        dtype=dtype, meta=np.empty((0, 0), dtype=dtype),
        name=f"ridge-streamed-{uuid.uuid4().hex}")
    return packed, factors
