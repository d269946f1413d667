"""Factors of the training design, computed once per fit (they depend on X only):
per CV fold and for the full training fit, in the primal (Gram ``X^T X``, by
downdating) or dual (kernel ``X X^T``, over feature blocks) regime; dense or
factored operators within a memory budget."""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backend import _compute_dtype, _is_dask, _materialize, get_array_module
from ._checks import (_check_design, _resolve_decomposition, _resolve_regime,
                      check_alphas)
from ._operators import PredictionOperator, _build_operator
from .scoring import check_folds, train_indices


#: Default cap on the memory of the precomputed dense CV operators, bytes.
#: The study's dual shape (8,192 features) needs 0.78 GB for all five folds;
#: under 512 MiB three are dense and two factored (~12 % more flops per
#: voxel), which keeps a worker's peak below the BOLD matrix size. Raise it
#: where memory is plentiful.
DEFAULT_MAX_DENSE_BYTES = 512 << 20


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
class FitShape:
    """What factors record about their fit (direct and time-chunked paths).

    Attributes
    ----------
    alphas : float64 numpy (n_alphas,)
    dtype : compute dtype of the big products (float32 or float64)
    device : "cpu" or "cuda"
    n_train, n_test, n_features : ints
    """

    alphas: np.ndarray
    dtype: np.dtype
    device: str
    n_train: int
    n_test: int
    n_features: int

    @property
    def n_alphas(self) -> int:
        return len(self.alphas)


@dataclass(frozen=True)
class RidgeFactors(FitShape):
    """Everything ridge needs from the design, computed once per fit.

    Memory is O(features^2) (primal) or O(n_alphas * n_train^2) (dual,
    dense form) and independent of the number of voxels.

    Attributes
    ----------
    alphas, dtype, device, n_train, n_test, n_features : see :class:`FitShape`
    regime : "primal" or "dual"
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
    space_test : banded ridge's eigen path with a test set and ``basis``: per
        space ``gamma_i Kt_i U`` (n_test, n_train), compute dtype, whose sum is
        the factored test operator's rows (its ``right`` is ``basis``)
    """

    regime: str
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
    space_test: tuple[Any, ...] = ()

    @property
    def nbytes(self) -> int:
        """Device bytes held by the factors (an array shared by two fields once)."""
        total = sum(fold.operator.nbytes for fold in self.folds)
        if self.test is not None:
            total += self.test.nbytes
        basis = None if self.test is not None and self.test.right is self.basis \
            else self.basis
        for part in (*self.group_design, basis, self.design_centred, *self.space_test):
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
                    keep_weight_factors: bool = False,
                    centred_kernels: tuple[Any, Any, Any] | None = None
                    ) -> RidgeFactors:
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
    centred_kernels : dual only, optional: the float64 (train kernel (n, n),
        test-by-train kernel (n_test, n) or None, training mean (feature,)) of
        the design centred on its training mean, when the caller has them
        (banded ridge sums per-space kernels); ``X_train`` is then only read
        for weights

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
    options = dict(xp=xp, dtype=compute, device=device, operator_form=operator_form,
                   max_dense_bytes=max_dense_bytes, decomposition=decomposition,
                   keep_weight_factors=keep_weight_factors)
    if regime == "primal":
        return _factorize_primal(X_train, X_test, alphas, folds, **options)
    return _factorize_dual(X_train, X_test, alphas, folds,
                           centred_kernels=centred_kernels, **options)


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
            test_part = X_test[:, columns]
            test_part = xp.asarray(_materialize(test_part))
            cross += (test_part.astype(xp.float64) - x_mean[columns]) @ part.T
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
                        dtype: np.dtype, xp: Any, eigh_dtype: Any = None
                        ) -> PredictionOperator:
    """One fold's operator from ``blocks = [K[train, train], K[held, train]]``
    (popped, so that eigh can free the training block as soon as it is
    decomposed). Both are re-centred on the fold's training mean; the
    held-out rows also on their own mean. ``eigh_dtype``: decompose the
    re-centred training block in that dtype (banded ridge's float32 eigh)."""
    rows = blocks.pop()
    column_means = blocks[0].mean(axis=0)
    overall = float(column_means.mean())
    rows = _recentre_kernel_block(rows, column_means, overall)
    rows -= rows.mean(axis=0, keepdims=True)  # centre over held-out block
    _recentre_kernel_block(blocks[0], column_means, overall)
    if eigh_dtype is not None:
        blocks[0] = blocks[0].astype(eigh_dtype, copy=False)
    operator, _, _ = _build_operator(blocks.pop(), rows, alphas, form, dtype, xp,
                                     remove_constant=True)
    return operator


def iter_dual_fold_factors(holder: list, folds: Sequence[Any], forms: Sequence[str],
                           alphas: np.ndarray, dtype: np.dtype, xp: Any,
                           eigh_dtype: Any = None) -> Iterator[FoldFactors]:
    """Every fold's factors from the centred training kernel ``holder[0]`` (n, n)
    float64, sub-blocks re-centred per fold (:func:`_dual_fold_operator`); the
    kernel is popped from ``holder`` before the last fold's decomposition.

    One fold at a time: each fold's factors are made when the consumer asks for
    them, so a consumer that drops each before the next holds one fold's operator
    at a time (banded ridge's fold-outer scan); ``list(...)`` holds them all."""
    kernel = holder.pop()
    n_train = int(kernel.shape[0])
    for number, (held_out, form) in enumerate(zip(folds, forms)):
        train = xp.asarray(train_indices(held_out, n_train))
        held = xp.asarray(held_out)
        blocks = [kernel[train[:, None], train], kernel[held[:, None], train]]
        if number == len(folds) - 1:
            kernel = None  # last fold: release the full kernel before solving
        operator = _dual_fold_operator(blocks, alphas, form, dtype, xp,
                                       eigh_dtype=eigh_dtype)
        yield FoldFactors(held_out=held, train=train, x_sum_train=None,
                          operator=operator)
        del operator


def _factorize_dual(X_train, X_test, alphas, folds, *, xp, dtype, device,
                    operator_form, max_dense_bytes, decomposition,
                    keep_weight_factors, centred_kernels=None):
    """Dual factors: float64 kernel ``X X^T`` per fold (sub-blocks of one
    kernel, re-centred on each fold's training mean)."""
    n_train, n_features = X_train.shape
    if centred_kernels is None:
        kernel, cross, x_mean = _centred_kernels(X_train, X_test, dtype, xp)
    else:
        kernel, cross, x_mean = centred_kernels
    forms = _choose_forms(len(alphas), [(len(f), n_train - len(f)) for f in folds],
                          np.dtype(dtype).itemsize, operator_form, max_dense_bytes,
                          decomposition)
    # The full fit first, on a copy of the kernel, while no fold operator is
    # held yet: this keeps the peak memory of the factorisation low.
    test_operator, eigenvalues, basis = _full_fit_operator(
        kernel.copy(), cross, alphas, decomposition=decomposition, dtype=dtype,
        xp=xp, remove_constant=True, keep_weight_factors=keep_weight_factors)
    del cross
    holder = [kernel]
    del kernel
    fold_factors = list(iter_dual_fold_factors(holder, folds, forms, alphas, dtype, xp))
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
