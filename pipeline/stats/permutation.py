"""Permutation tests of test-set Pearson r that respect BOLD's autocorrelation, for a
whole block of voxels at once (matrix products, no loop over voxels).

For one voxel, measured ``y`` and predicted ``p`` test time series (``n`` samples)
are centred; ``r = sum_t y_t p_t / sqrt(sum y^2 sum p^2)``.  Reordering the
predictions changes neither their mean nor their sum of squares, so the r of a
reordered prediction needs only its new cross-product with ``y``.

``"blocks"`` null (default): the ``K = n // L`` full blocks of ``L`` samples are put
in a random order (:func:`~voxelflow.pipeline.stats.resampling.block_permutations`).
With ``C[k, m] = sum_{j<L} y[kL + j] p[mL + j]`` (the block cross-products, ``K x K``
per voxel), the permuted cross-product is ``sum_k C[k, order_b[k]]``: one
``(B, K^2) @ (K^2, voxel)`` product of a 0/1 matrix (which entries each permutation
picks) with ``C`` gives every permutation of every voxel of the block.  With many
blocks (``K > MAX_PRODUCT_BLOCKS``, e.g. a block length of 1) that matrix grows as
``K^2``; the permuted predictions are then gathered directly (``B x n`` per voxel,
a few permutations at a time), still without a loop over voxels.

``"shifts"`` null: every circular shift of the predictions by ``s`` samples with
``L <= s <= n - L``; the cross-products of all shifts are one circular
cross-correlation per voxel (FFT along time).

P-values are one-sided (H1: r > 0), ``(1 + #{null >= r}) / (1 + B)`` (Phipson &
Smyth 2010), null values within :data:`TIE_TOLERANCE` below ``r`` counting as ties.
The max-statistic family-wise p-value of a voxel compares its r with the maximum over
all voxels of each permutation's null r (the same permutations in every voxel block:
they depend on the seed and the test set only).
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

__all__ = ["TIE_TOLERANCE", "NULL_KINDS", "block_cross_products", "null_correlations",
           "permutation_pvalues", "max_over_voxels", "max_statistic_pvalues", "bh_fdr",
           "parametric_pvalues"]

#: Null r within this distance below the observed r count as reaching it: the null
#: is computed in float32 (r to ~1e-6), and a permutation that restores the observed
#: order must never count as smaller than the observed r.
TIE_TOLERANCE = 1e-5
NULL_KINDS = ("blocks", "shifts")
#: Voxels per matrix product: keeps the (permutation, voxel) product in cache.
_VOXEL_STEP = 1024
#: Most blocks for the ``(B, K^2)`` selection product; more are gathered directly.
MAX_PRODUCT_BLOCKS = 100
_GATHER_PERMUTATIONS = 32


def _centred(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values - values.mean(axis=0)


def block_cross_products(y: np.ndarray, p: np.ndarray, n_blocks: int, block_length: int
                         ) -> np.ndarray:
    """float64 (n_blocks, n_blocks, voxel): ``C[k, m, v] = sum_{j < L} y[kL + j, v]
    p[mL + j, v]`` over the first ``n_blocks * L`` samples of (already centred) ``y``
    and ``p`` (sample, voxel)."""
    used = n_blocks * block_length
    y_blocks = y[:used].reshape(n_blocks, block_length, -1).transpose(2, 0, 1)
    p_blocks = p[:used].reshape(n_blocks, block_length, -1).transpose(2, 1, 0)
    return np.matmul(y_blocks, p_blocks).transpose(1, 2, 0)  # batched over voxels


def _selection_matrix(orders: np.ndarray) -> np.ndarray:
    """float32 (B, K^2): row ``b`` has a 1 at ``k * K + orders[b, k]`` for every ``k``."""
    n_perm, n_blocks = orders.shape
    picks = np.zeros((n_perm, n_blocks * n_blocks), dtype=np.float32)
    picks[np.arange(n_perm)[:, None], np.arange(n_blocks) * n_blocks + orders] = 1.0
    return picks


def null_correlations(y: np.ndarray, p: np.ndarray, *, kind: str, block_length: int,
                      orders: np.ndarray | None = None, shifts: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Observed r (voxel,) float64 and null r (B, voxel) float32 of one voxel block.

    ``y`` measured and ``p`` predicted test data (sample, voxel); ``kind`` "blocks"
    with ``orders`` (B, K) from :func:`block_permutations`, or "shifts" with
    ``shifts`` (B,) from :func:`circular_shifts`.  r is NaN (observed and null) where
    ``y`` or ``p`` is constant.
    """
    yc, pc = _centred(y), _centred(p)
    norm = np.sqrt((yc * yc).sum(axis=0) * (pc * pc).sum(axis=0))
    defined = norm > 0
    scale = np.where(defined, 1.0 / np.where(defined, norm, 1.0), np.nan)
    observed = (yc * pc).sum(axis=0) * scale
    if kind == "blocks":
        null = _block_null(yc, pc, scale, block_length, orders)
    elif kind == "shifts":
        null = _shift_null(yc, pc, scale, shifts)
    else:
        raise ValueError(f"null must be one of {NULL_KINDS} (got {kind!r})")
    return np.clip(observed, -1.0, 1.0), null


def _block_null(yc: np.ndarray, pc: np.ndarray, scale: np.ndarray, block_length: int,
                orders: np.ndarray | None) -> np.ndarray:
    n_perm, n_blocks = (0, 0) if orders is None else orders.shape
    n_voxels = yc.shape[1]
    if n_blocks < 2:
        return np.full((n_perm, n_voxels), np.nan, dtype=np.float32)
    if n_blocks > MAX_PRODUCT_BLOCKS:
        return _gathered_null(yc, pc, scale, block_length, orders)
    used = n_blocks * block_length
    fixed = (yc[used:] * pc[used:]).sum(axis=0)  # the tail that stays in place
    picks = _selection_matrix(orders)
    null = np.empty((n_perm, n_voxels), dtype=np.float32)
    for start in range(0, n_voxels, _VOXEL_STEP):
        cols = slice(start, start + _VOXEL_STEP)
        cross = block_cross_products(yc[:, cols], pc[:, cols], n_blocks, block_length)
        scaled = (cross * scale[cols]).reshape(n_blocks * n_blocks, -1).astype(np.float32)
        null[:, cols] = picks @ scaled + (fixed[cols] * scale[cols]).astype(np.float32)
    return null


def sample_order(orders: np.ndarray, block_length: int, n_samples: int) -> np.ndarray:
    """int64 (B, n_samples): the sample each position takes its prediction from, for
    block orders (B, K); samples after the ``K`` full blocks stay in place."""
    n_perm, n_blocks = orders.shape
    within = np.arange(block_length)
    moved = (orders[:, :, None] * block_length + within).reshape(n_perm, -1)
    tail = np.arange(n_blocks * block_length, n_samples)
    return np.concatenate([moved, np.broadcast_to(tail, (n_perm, tail.size))], axis=1)


def _gathered_null(yc: np.ndarray, pc: np.ndarray, scale: np.ndarray, block_length: int,
                   orders: np.ndarray) -> np.ndarray:
    """Null r (B, voxel) from the permuted predictions themselves (many blocks)."""
    order = sample_order(orders, block_length, yc.shape[0])
    null = np.empty((order.shape[0], yc.shape[1]), dtype=np.float32)
    for start in range(0, order.shape[0], _GATHER_PERMUTATIONS):
        rows = order[start:start + _GATHER_PERMUTATIONS]
        cross = np.einsum("tv,btv->bv", yc, pc[rows])
        null[start:start + rows.shape[0]] = cross * scale
    return null


def _shift_null(yc: np.ndarray, pc: np.ndarray, scale: np.ndarray,
                shifts: np.ndarray | None) -> np.ndarray:
    n = yc.shape[0]
    shifts = np.zeros(0, np.int64) if shifts is None else np.asarray(shifts, np.int64)
    if shifts.size == 0:
        return np.zeros((0, yc.shape[1]), dtype=np.float32)
    # cross[s, v] = sum_t y[t, v] p[(t + s) mod n, v]: a circular cross-correlation.
    spectrum = np.conj(np.fft.rfft(yc, axis=0)) * np.fft.rfft(pc, axis=0)
    cross = np.fft.irfft(spectrum, n=n, axis=0)[shifts]
    return (cross * scale).astype(np.float32)


def permutation_pvalues(observed: np.ndarray, null: np.ndarray) -> np.ndarray:
    """One-sided p (voxel,) float64: ``(1 + #{b: null[b] >= observed - tol}) / (1 + B)``;
    NaN where the observed r is NaN or there is no null (B = 0)."""
    observed = np.asarray(observed, dtype=np.float64)
    if null.shape[0] == 0:
        return np.full(observed.shape, np.nan)
    reached = (null >= (observed - TIE_TOLERANCE)[None, :]).sum(axis=0)
    p = (1.0 + reached) / (1.0 + null.shape[0])
    return np.where(np.isfinite(observed), p, np.nan)


def max_over_voxels(null: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """float64 (B,): each permutation's largest null r over the ``scored`` voxels of a
    block (NaN when none is scored)."""
    if not scored.any() or null.shape[0] == 0:
        return np.full(null.shape[0], np.nan)
    return null[:, scored].max(axis=1).astype(np.float64)


def max_statistic_pvalues(observed: np.ndarray, null_max: np.ndarray) -> np.ndarray:
    """Family-wise error p (voxel,): ``(1 + #{b: max_b >= observed - tol}) / (1 + B)``
    with ``max_b`` the largest null r over all voxels in permutation ``b``
    (Westfall & Young's single-step max-T); NaN where the observed r is NaN."""
    observed = np.asarray(observed, dtype=np.float64)
    maxima = np.sort(np.asarray(null_max, dtype=np.float64))
    if maxima.size == 0 or not np.isfinite(maxima).all():
        return np.full(observed.shape, np.nan)
    below = np.searchsorted(maxima, observed - TIE_TOLERANCE, side="left")
    p = (1.0 + maxima.size - below) / (1.0 + maxima.size)
    return np.where(np.isfinite(observed), p, np.nan)


def bh_fdr(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q) over the finite entries of ``p``
    (``scipy.stats.false_discovery_control``); NaN elsewhere.  A voxel is
    FDR-significant at level q when its adjusted p is below q."""
    p = np.asarray(p, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    if finite.any():
        q[finite] = sps.false_discovery_control(p[finite], method="bh")
    return q


def parametric_pvalues(r: np.ndarray, n_samples: int) -> np.ndarray:
    """One-sided p of r > 0 by the t-test ``t = r sqrt((n - 2) / (1 - r^2))``, Student t
    with ``n - 2`` df (``scipy.stats.pearsonr(..., alternative="greater")``).  It
    assumes independent samples, which BOLD's autocorrelation violates: labelled
    *parametric* everywhere, kept for comparison.  NaN where r is NaN or n < 4."""
    r = np.asarray(r, dtype=np.float64)
    if n_samples < 4:
        return np.full(r.shape, np.nan)
    clipped = np.clip(r, -0.999999, 0.999999)
    t = clipped * np.sqrt((n_samples - 2) / (1 - clipped ** 2))
    return sps.t.sf(t, df=n_samples - 2)
