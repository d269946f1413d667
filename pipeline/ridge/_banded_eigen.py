"""Banded ridge's eigen path (dual regime, several spaces or weightings).

Per weighting ``gamma`` the centred training kernel of the scaled design is
``K = sum_i gamma_i K_i`` (per-space kernels computed once). Each CV fold's
training block of ``K`` is eigendecomposed ONCE (``K_f = U diag(s) U^T``) and the
held-out predictions of every alpha come from that one decomposition
(``K_held U diag(1 / (s + alpha)) U^T y``), as in himalaya's random search; the
full training fit likewise (test predictions and the dual solution). The
eigendecomposition runs in ``eigh_dtype`` (default: the compute dtype, float32
for float32 data as himalaya does; float64 on request).

Only what a voxel chunk needs is kept per weighting (:class:`~._factorize.
RidgeFactors`: fold operators, dense within a byte budget or factored, the full
fit's test operator, its eigenbasis), never the scaled design. The voxel scan is
fold-outer (:func:`scan_weighting`): with streamed folds
(:func:`streamed_eigen_factors`, one pass over all voxels as ``banded_ridge``
makes) one fold operator is alive at a time, so folds can be dense (fewest flops
per voxel) where all of them dense would not fit. Weights and the
product-measure split are computed from the dual solution
``c = U diag(1 / (s + alpha_v)) U^T y_v`` and the per-space quantities shared by
every weighting, for the voxels whose best (weighting, alpha) improves only::

    weights_i = gamma_i Xc_i^T c        (unscaled units, scikit-learn's coef_)
    test prediction_i = gamma_i Kt_i c   (Kt_i: centred test-by-train kernel)

Arrays are ``(sample, feature)`` per space and ``(sample, voxel)`` for BOLD.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ._backend import to_numpy
from ._factorize import (FoldFactors, RidgeFactors, _choose_forms, _full_fit_operator,
                         iter_dual_fold_factors)
from ._operators import PredictionOperator, _shrinkage, densify, eigh_psd
from ._select import TIE_BREAK_SLOPE, _pick_best
from ._checks import _check_targets
from ._solve import (_chunk_outputs, _shift_targets, _test_outputs, checked_test_targets,
                     chosen_shrinkage, dual_fold_scores)


@dataclass(frozen=True)
class SpaceTerms:
    """What every weighting shares, per space (device arrays, compute dtype).

    ``cross``: centred test-by-train kernels (n_test, n_train), one per space, or
    () without a test set; ``designs``: centred training designs (n_train,
    feature_i), one per space, or () when weights are not wanted.
    """

    cross: tuple = ()
    designs: tuple = ()


def space_terms(kernels: Sequence[tuple[Any, Any, Any]], Xs_train: Sequence[Any],
                dtype: Any, want_weights: bool, xp: Any) -> SpaceTerms:
    """:class:`SpaceTerms` from the per-space float64 centred kernels
    (:func:`~._factorize._centred_kernels`: train, cross, mean) and designs."""
    cross = () if kernels[0][1] is None else tuple(
        k[1].astype(dtype) for k in kernels)
    designs = ()
    if want_weights:
        designs = tuple((xp.asarray(x).astype(xp.float64) - k[2]).astype(dtype)
                        for x, k in zip(Xs_train, kernels))
    return SpaceTerms(cross=cross, designs=designs)


def weighted_kernels(kernels: Sequence[tuple[Any, Any, Any]], gamma: np.ndarray, xp: Any
                     ) -> tuple[Any, Any, Any]:
    """Centred kernels of the scaled design from the per-space ones:
    ``sum_i gamma_i K_i`` (train (n, n) in the per-space kernels' dtype, and
    test-by-train (n_test, n) float64) and the scaled mean (feature,)."""
    kernel = xp.zeros_like(kernels[0][0])
    for g, k in zip(gamma, kernels):
        kernel += float(g) * k[0]  # a Python float keeps the kernels' dtype
    cross = None if kernels[0][1] is None else sum(
        g * k[1] for g, k in zip(gamma, kernels))
    x_mean = xp.concatenate([np.sqrt(g) * k[2] for g, k in zip(gamma, kernels)])
    return kernel, cross, x_mean


def eigen_factors(kernels: Sequence[tuple[Any, Any, Any]], gamma: np.ndarray,
                  alphas: np.ndarray, folds: Sequence[np.ndarray], *, n_features: int,
                  dtype: Any, device: str, xp: Any, keep_basis: bool,
                  operator_form: str = "auto", max_dense_bytes: int,
                  eigh_dtype: Any = None) -> RidgeFactors:
    """One weighting's factors: one eigendecomposition per fold and one for the
    full fit, each reused for every alpha; every fold's operator held.

    Parameters
    ----------
    kernels : per space (train kernel (n, n) in the eigendecompositions' dtype,
        float64 test-by-train (n_test, n) or None, float64 mean (feature_i,)),
        centred on the training mean
    gamma : (space,) the weighting; alphas : float64 (n_alphas,)
    folds : held-out index arrays; n_features : columns of the joint design
    dtype : compute dtype; keep_basis : keep the full fit's eigenbasis (for the
        dual solution: weights and split)
    operator_form, max_dense_bytes : dense fold operators within the budget, all
        folds together (see :func:`~._factorize.factorize_ridge`)
    eigh_dtype : dtype of the eigendecompositions (default ``dtype``)
    """
    n_train = int(kernels[0][0].shape[0])
    forms = _choose_forms(len(alphas), [(len(f), n_train - len(f)) for f in folds],
                          np.dtype(dtype).itemsize, operator_form, max_dense_bytes,
                          "eigh")
    factors, fold_factors = _eigen_parts(kernels, gamma, alphas, folds, forms,
                                         n_features=n_features, dtype=dtype,
                                         device=device, xp=xp, keep_basis=keep_basis,
                                         eigh_dtype=eigh_dtype)
    return replace(factors, folds=tuple(fold_factors))


def streamed_eigen_factors(kernels: Sequence[tuple[Any, Any, Any]], gamma: np.ndarray,
                           alphas: np.ndarray, folds: Sequence[np.ndarray], *,
                           n_voxels: int, n_features: int, dtype: Any, device: str,
                           xp: Any, keep_basis: bool, operator_form: str = "auto",
                           max_dense_bytes: int, eigh_dtype: Any = None
                           ) -> tuple[RidgeFactors, Iterator[FoldFactors]]:
    """:func:`eigen_factors` for one pass over ``n_voxels`` voxels, folds streamed.

    Returns the full fit's factors (``folds`` empty) and an iterator that makes
    each fold's factors when asked (the weighted kernel is kept until the last
    fold's), for :func:`scan_weighting`'s fold-outer loop: one fold operator alive
    at a time, so a fold can be dense (:func:`streamed_fold_forms`) where holding
    every fold dense would not fit ``max_dense_bytes``.
    """
    n_train = int(kernels[0][0].shape[0])
    forms = streamed_fold_forms(len(alphas), [(len(f), n_train - len(f)) for f in folds],
                                np.dtype(dtype).itemsize, operator_form,
                                max_dense_bytes, n_voxels)
    return _eigen_parts(kernels, gamma, alphas, folds, forms, n_features=n_features,
                        dtype=dtype, device=device, xp=xp, keep_basis=keep_basis,
                        eigh_dtype=eigh_dtype)


def streamed_fold_forms(n_alphas: int, fold_shapes: Sequence[tuple[int, int]],
                        itemsize: int, operator_form: str, max_dense_bytes: int,
                        n_voxels: int) -> list[str]:
    """Form of each streamed fold operator (one alive at a time).

    ``fold_shapes``: per fold (held-out rows, training samples ``q``). "auto" makes
    a fold "dense" when its dense operator (n_alphas, rows, q) fits
    ``max_dense_bytes`` AND serves at least ``n_alphas * rows`` voxels: building it
    costs ``2 n_alphas rows q^2`` flops and saves the factored form's ``V^T y``,
    ``2 q^2`` per voxel, so below that many voxels it costs more than it saves.
    "dense"/"factored" force the form.
    """
    if operator_form in ("dense", "factored"):
        return [operator_form] * len(fold_shapes)
    if operator_form != "auto":
        raise ValueError("operator_form must be 'auto', 'dense' or 'factored'; "
                         f"got {operator_form!r}.")
    return ["dense" if n_alphas * rows * q * itemsize <= max_dense_bytes
            and n_voxels >= n_alphas * rows else "factored" for rows, q in fold_shapes]


def dense_where_it_pays(folds: Sequence[FoldFactors], n_voxels: int, dtype: Any,
                        max_dense_bytes: int, xp: Any) -> Iterator[FoldFactors]:
    """Held fold factors for one fold-outer pass over ``n_voxels`` voxels (a voxel
    block of :func:`~._banded.banded_chunk`): a factored fold that
    :func:`streamed_fold_forms` would make dense for that many voxels is expanded
    (:func:`~._operators.densify`) when the pass reaches it and dropped after it, so
    one dense operator is alive at a time; the others are passed through."""
    itemsize = np.dtype(dtype).itemsize
    for fold in folds:
        operator = fold.operator
        if operator.dense is None and operator.left is not None:
            rows, q = int(operator.left.shape[0]), int(operator.right.shape[0])
            form = streamed_fold_forms(int(operator.shrinkage.shape[0]), [(rows, q)],
                                       itemsize, "auto", max_dense_bytes, n_voxels)[0]
            if form == "dense":
                dense = replace(fold, operator=densify(operator, dtype, xp, True))
                yield dense
                del dense  # freed before the next fold is expanded
                continue
        yield fold


def _eigen_parts(kernels: Sequence[tuple[Any, Any, Any]], gamma: np.ndarray,
                 alphas: np.ndarray, folds: Sequence[np.ndarray], forms: Sequence[str],
                 *, n_features: int, dtype: Any, device: str, xp: Any,
                 keep_basis: bool, eigh_dtype: Any) -> tuple[RidgeFactors,
                                                             Iterator[FoldFactors]]:
    """The full fit's factors (``folds`` empty) now, and the folds' (in ``forms``)
    as an iterator over the weighted kernel."""
    eigh_dtype = np.dtype(dtype if eigh_dtype is None else eigh_dtype)
    kernel, cross, x_mean = weighted_kernels(kernels, gamma, xp)
    n_train = int(kernel.shape[0])
    space_test: tuple = ()
    if keep_basis and cross is not None:
        test_operator, eigenvalues, basis, space_test = _factored_test_operator(
            kernel.astype(eigh_dtype), kernels, gamma, alphas, dtype, xp)
    else:
        test_operator, eigenvalues, basis = _full_fit_operator(
            kernel.astype(eigh_dtype), cross, alphas, decomposition="eigh",
            dtype=dtype, xp=xp, remove_constant=True, keep_weight_factors=keep_basis)
    holder = [kernel]
    del kernel  # released before the last fold's eigh
    fold_factors = iter_dual_fold_factors(holder, folds, forms, alphas, dtype, xp,
                                          eigh_dtype=eigh_dtype)
    factors = RidgeFactors(
        regime="dual", alphas=alphas, dtype=np.dtype(dtype), device=device,
        n_train=n_train, n_test=0 if cross is None else int(cross.shape[0]),
        n_features=n_features, folds=(), test=test_operator,
        basis=basis, eigenvalues=None if eigenvalues is None
        else eigenvalues.astype(xp.float64), x_mean=x_mean,
        fold_sizes=tuple(len(f) for f in folds), space_test=space_test)
    return factors, fold_factors


def _factored_test_operator(kernel: Any, kernels: Sequence[tuple[Any, Any, Any]],
                            gamma: np.ndarray, alphas: np.ndarray, dtype: Any, xp: Any
                            ) -> tuple[PredictionOperator, Any, Any, tuple]:
    """The full fit's test operator in factored form over its eigenbasis ``U``.

    ``kernel`` (n, n), the weighted centred training kernel, is destroyed. Returns
    the operator (rows ``sum_i gamma_i Kt_i U`` (n_test, n), ``right`` = ``U``),
    the eigenvalues (n,), ``U`` (n, n) in ``dtype`` (the same array as the
    operator's ``right``) and the per-space rows ``gamma_i Kt_i U``. A voxel's
    ``U^T y`` then serves its test predictions at every alpha, its dual solution
    and the split (:func:`scan_weighting`).
    """
    eigenvalues, eigenvectors = eigh_psd(kernel, xp)
    del kernel
    basis = eigenvectors.astype(dtype, copy=False)
    del eigenvectors
    space_test = tuple((float(g) * k[1]).astype(dtype) @ basis
                       for g, k in zip(gamma, kernels))
    rows = space_test[0].copy()
    for part in space_test[1:]:
        rows += part
    shrinkage = _shrinkage(eigenvalues, alphas, xp).astype(dtype)
    return (PredictionOperator(left=rows, right=basis, shrinkage=shrinkage),
            eigenvalues, basis, space_test)


def split_r2(y_test: Any, space_predictions: Sequence[Any], xp: Any) -> Any:
    """Product-measure split of test R^2 (himalaya's ``r2_score_split``).

    ``y_test`` (n_test, voxel) and each space's prediction (n_test, voxel) are
    centred on the test samples here; per space ``i``::

        r2_i = sum_t (2 y_t p_it - p_it sum_j p_jt) / sum_t y_t^2

    so ``sum_i r2_i = 1 - ||y - sum_i p_i||^2 / ||y||^2`` (R^2 of the joint
    prediction once its mean offset on the test set is removed). Float64
    (n_spaces, voxel), NaN where the test BOLD is constant.
    """
    y = xp.asarray(y_test, dtype=xp.float64)
    y = y - y.mean(axis=0)
    parts = [xp.asarray(p, dtype=xp.float64) for p in space_predictions]
    parts = [p - p.mean(axis=0) for p in parts]
    total = sum(parts[1:], parts[0])
    sst = (y * y).sum(axis=0)
    defined = sst > 0
    out = xp.empty((len(parts), y.shape[1]), dtype=xp.float64)
    for index, p in enumerate(parts):
        value = ((2.0 * y - total) * p).sum(axis=0)
        out[index] = xp.where(defined, value / xp.where(defined, sst, 1.0), xp.nan)
    return out


class ChunkBest:
    """Per-voxel best (weighting, alpha) over the weightings seen so far, for the
    voxels ``[0, n_voxels)`` of one call; host arrays filled chunk by chunk.

    A later weighting replaces the best where its score (mean CV r at its best
    alpha plus ``1e-10 log(alpha)``) beats the best by more than ``eps`` (the
    compute dtype's epsilon), as in himalaya's random search.
    """

    def __init__(self, n_voxels: int, eps: float):
        self.n_voxels, self.eps = int(n_voxels), float(eps)
        self.score = np.full(self.n_voxels, -np.inf)
        self.candidate = np.full(self.n_voxels, -1, dtype=np.int64)
        self.arrays: dict[str, np.ndarray] = {}

    def update(self, number: int, start: int, out: dict[str, Any],
               alphas: np.ndarray) -> np.ndarray:
        """Take chunk ``[start, start + voxels)``'s outputs where this weighting
        wins (every voxel for the first); returns that chunk-local bool mask."""
        out = {key: to_numpy(value) for key, value in out.items()}
        index = out["best_alpha_index"]
        slope = TIE_BREAK_SLOPE * np.log(alphas)
        safe = np.maximum(index, 0)
        picked = np.take_along_axis(out["r_cv"], safe[None], 0)[0]
        score = np.where(index >= 0, picked + slope[safe], -np.inf)
        stop = start + index.shape[0]
        wins = score > self.score[start:stop] + self.eps
        self.score[start:stop][wins] = score[wins]
        self.candidate[start:stop][wins] = number
        # the first weighting fills every voxel (undefined ones too), later
        # ones only those they win
        mask = wins if number else np.ones_like(wins)
        for key, value in out.items():
            self.put(key, start, mask, value[..., mask], value)
        return mask

    def put(self, key: str, start: int, mask: np.ndarray, values: np.ndarray,
            like: np.ndarray | None = None) -> None:
        """Store ``values`` (..., masked voxels) of the chunk at ``start``."""
        if key not in self.arrays:
            like = values if like is None else like
            fill = -1 if like.dtype.kind in "iu" else (False if like.dtype == bool
                                                      else np.nan)
            self.arrays[key] = np.full((*like.shape[:-1], self.n_voxels), fill,
                                       dtype=like.dtype)
        target = self.arrays[key][..., start:start + mask.shape[0]]
        target[..., mask] = values


def scan_weighting(factors: RidgeFactors, terms: SpaceTerms, gamma: np.ndarray,
                   number: int, Y_train: Any, Y_test: Any | None, best: ChunkBest,
                   *, voxel_chunk: int, return_weights: bool, return_split: bool,
                   return_predictions: bool, xp: Any,
                   folds: Iterable[FoldFactors] | None = None) -> None:
    """Every voxel of ``Y_train`` (n_train, voxel) through one weighting's factors,
    chunk by chunk, into ``best``.

    Fold-outer: each fold's held-out scores for every voxel (:func:`fold_scores`),
    the folds taken from ``folds`` (streamed: one alive at a time) or
    ``factors.folds``; then per chunk the mean CV score and alpha of every voxel
    and, only for the voxels this weighting wins (all of them for the first), the
    rest from one ``U^T y`` each when the eigenbasis is kept: the test scores at
    every alpha, the dual solution (weights) and the split. A voxel another
    weighting wins costs no test-set work."""
    want_split = return_split and Y_test is not None
    scores = fold_scores(factors.folds if folds is None else folds, Y_train,
                         factors, voxel_chunk, xp)
    for start in range(0, int(Y_train.shape[1]), int(voxel_chunk)):
        stop = start + int(voxel_chunk)
        y_train = xp.asarray(Y_train[:, start:stop])
        y_test = None if Y_test is None else checked_test_targets(
            factors, Y_test[:, start:stop], y_train.shape[1], xp)
        shifted, y_mean = _shift_targets(y_train, factors.dtype, xp)
        out = _chunk_outputs(factors, [s[:, start:stop] for s in scores], shifted,
                             y_mean, (shifted == 0).all(axis=0), None, False, False, xp)
        mask = best.update(number, start, out, factors.alphas)
        if not mask.any() or (y_test is None and not return_weights):
            continue
        device_mask = xp.asarray(mask)
        shifted, y_mean = shifted[:, device_mask], y_mean[device_mask]
        chosen = xp.asarray(out["best_alpha_index"])[device_mask]
        projected = None if factors.basis is None else factors.basis.T @ shifted
        if y_test is not None:
            y_test = y_test[:, device_mask]
            _put_test_outputs(best, start, mask, factors, shifted, y_mean, y_test,
                              chosen, projected, return_predictions, xp)
        if projected is None or not (want_split or return_weights):
            continue
        scaled = projected * chosen_shrinkage(factors, chosen, xp)
        if want_split:
            parts = [rows @ scaled for rows in factors.space_test]
            best.put("r2_split", start, mask, to_numpy(split_r2(y_test, parts, xp)))
        if return_weights:
            solution = factors.basis @ scaled  # the dual solution (n_train, voxel)
            weights = xp.concatenate([float(g) * (x.T @ solution)
                                      for g, x in zip(gamma, terms.designs)])
            best.put("weights", start, mask, to_numpy(weights))


def fold_scores(folds: Iterable[FoldFactors], Y_train: Any, factors: RidgeFactors,
                voxel_chunk: int, xp: Any) -> list[Any]:
    """Held-out r of every alpha, per fold, for every voxel of ``Y_train``
    (n_train, voxel): float64 (n_alphas, voxel) device arrays, one per fold.

    Fold-outer and chunk-inner, so a streamed fold is dropped before the next is
    made; ``Y_train`` is read once per fold and checked (``n_train`` rows, finite)
    on the first.
    """
    n_voxels, step = int(Y_train.shape[1]), int(voxel_chunk)
    scores = []
    for fold in folds:
        per_fold = xp.empty((factors.n_alphas, n_voxels), dtype=xp.float64)
        for start in range(0, n_voxels, step):
            y_train = xp.asarray(Y_train[:, start:start + step])
            if not scores:  # the first fold's pass
                _check_targets(y_train, "Y_train", factors.n_train, xp)
            shifted, _ = _shift_targets(y_train, factors.dtype, xp)
            per_fold[:, start:start + step] = dual_fold_scores(fold, shifted,
                                                               factors.dtype, xp)
            del y_train, shifted
        scores.append(per_fold)
        del fold  # a streamed fold's operator is freed before the next is made
    return scores


def _put_test_outputs(best: ChunkBest, start: int, mask: np.ndarray,
                      factors: RidgeFactors, shifted: Any, y_mean: Any, y_test: Any,
                      chosen: Any, projected: Any | None, want_predictions: bool,
                      xp: Any) -> None:
    """Test scores of the won voxels (``mask`` True in the chunk at ``start``):
    ``r_test``/``r2_test`` (alpha, voxel), at the chosen alpha ``r_test_cv``/
    ``r2_test_cv`` and, when asked, ``predictions`` (n_test, voxel);
    ``projected`` is ``U^T shifted`` when the test operator is factored over U."""
    r_test, r2_test, predictions = _test_outputs(
        factors, shifted, y_mean, y_test, chosen, want_predictions, xp,
        projected=projected if factors.test.right is factors.basis else None)
    outputs = {"r_test": r_test, "r_test_cv": _pick_best(r_test, chosen, xp),
               "r2_test": r2_test, "r2_test_cv": _pick_best(r2_test, chosen, xp)}
    if predictions is not None:
        outputs["predictions"] = predictions
    for key, value in outputs.items():
        best.put(key, start, mask, to_numpy(value))


def banded_factor_bytes(widths: Sequence[int], n_train: int, n_test: int,
                        n_alphas: int, fold_sizes: Sequence[int], n_weightings: int,
                        keep_basis: bool, keep_designs: bool,
                        max_dense_bytes: int) -> tuple[int, int]:
    """``(held, transient)`` bytes of :func:`~._banded.banded_factors` (float32).

    ``held``: what stays alive for the voxel blocks. Eigen path (dual regime,
    several spaces), per weighting: the fold operators counted factored
    (``q^2 + held q`` per fold, ``q`` the fold's training samples), the dense
    ones within ``max_dense_bytes`` once for all weightings, the test operator
    (alpha, n_test, n_train) or, with ``keep_basis``, the eigenbasis (n_train^2)
    and the test rows factored over it, summed and per space;
    once: the per-space test-by-train kernels and, with ``keep_designs``, the
    centred designs. Scaled-design path: per weighting one single fit's factors
    (float64 Gram per fold, the scaled design). ``transient``: the peak extra
    while factorising (the float32 per-space kernels, one float64 kernel while
    accumulating, the weighted kernel, its copy, the divide-and-conquer
    eigendecomposition's workspace and eigenvectors, a fold's blocks).
    """
    n, p, spaces = int(n_train), int(sum(widths)), len(widths)
    if p > n and spaces > 1:
        folds = sum((n - h) ** 2 + h * (n - h) for h in fold_sizes)
        test = ((spaces + 1) * n_test * n + n * n if keep_basis  # factored over U
                else n_alphas * n_test * n)
        per_weighting = 4 * (folds + test)
        held = (n_weightings * per_weighting + max_dense_bytes + 4 * spaces * n_test * n
                + (4 * n * p if keep_designs else 0))
        return held, 4 * (spaces + 8) * n * n
    q = min(p, n)
    dense = min(max_dense_bytes, n_alphas * n * q * 4)
    per_weighting = (len(fold_sizes) + 1) * q * q * 8 + n_test * p * 4 + n * p * 8 + dense
    return n_weightings * per_weighting, 0
