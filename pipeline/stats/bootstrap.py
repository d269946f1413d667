"""Block bootstrap over test time from per-block sufficient statistics.

Per voxel and test block ``k`` (of ``L_k`` samples), five sums of the centred measured
``y`` and predicted ``p`` test data are enough to recompute Pearson r on any
resample made of whole blocks (:func:`time_block_sums`)::

    S_y, S_p, S_yy, S_pp, S_yp  (statistic, block, voxel)

A resample that draws block ``k`` ``c_bk`` times has ``n_b = sum_k c_bk L_k``
samples and sums ``S_b = c_b @ S``; then

    r_b = (n_b S_yp - S_y S_p) / sqrt((n_b S_yy - S_y^2) (n_b S_pp - S_p^2))

so the r of ``B`` resamples of a whole voxel block are five ``(B, K) @ (K, voxel)``
matrix products and a few element-wise operations (:func:`resampled_r`).  The mean r
over the scored voxels of a fit, for every resample, is then accumulated block by
block as a ``(resample,)`` sum and count (:func:`resampled_sums`); combining cells
(intervals, paired differences) needs only those vectors.
"""

from __future__ import annotations

import numpy as np

__all__ = ["BLOCK_STATISTICS", "BLOCK_SUM_VARIABLES", "time_block_sums", "resampled_r", "resampled_sums",
           "percentile_interval", "bootstrap_p_two_sided", "paired_difference"]

BLOCK_STATISTICS = ("y", "yhat", "y2", "yhat2", "y_yhat")
#: The fit group's variables (time_block, voxel) holding the five sums, in that order.
BLOCK_SUM_VARIABLES = tuple(f"block_sum_{name}" for name in BLOCK_STATISTICS)
#: Voxels per matrix product: large enough for an efficient product, small enough
#: to keep the (resample, voxel) arrays at a few MiB.
_VOXEL_STEP = 1024


def time_block_sums(y: np.ndarray, p: np.ndarray, boundaries: np.ndarray) -> np.ndarray:
    """float64 (5, n_blocks, voxel): per block of test samples (``boundaries`` from
    :func:`~voxelflow.pipeline.stats.resampling.block_boundaries`), the sums of
    ``y``, ``p``, ``y^2``, ``p^2`` and ``y p`` after centring ``y`` and ``p``
    (sample, voxel) on all test samples (the centring keeps float sums accurate and
    does not change any resample's r)."""
    yc = np.asarray(y, np.float64) - np.asarray(y, np.float64).mean(axis=0)
    pc = np.asarray(p, np.float64) - np.asarray(p, np.float64).mean(axis=0)
    starts = boundaries[:-1]
    return np.stack([np.add.reduceat(a, starts, axis=0)
                     for a in (yc, pc, yc * yc, pc * pc, yc * pc)])


def resampled_r(sums: np.ndarray, counts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """float32 (B, voxel): r of every resample of every voxel.

    ``sums`` (5, K, voxel) from :func:`time_block_sums`; ``counts`` (B, K) draws of
    each block; ``lengths`` (K,) samples per block.  NaN where a resample's ``y`` or
    ``p`` is constant.
    """
    c = np.asarray(counts, dtype=np.float32)
    n = (c @ np.asarray(lengths, np.float32))[:, None]
    n_stats, n_blocks, n_voxels = sums.shape
    # one (B, K) @ (K, 5 x voxel) product: small-K products are slow one by one
    stacked = np.ascontiguousarray(np.asarray(sums, np.float32).transpose(1, 0, 2))
    sy, sp, syy, spp, syp = (c @ stacked.reshape(n_blocks, -1)).reshape(
        -1, n_stats, n_voxels).transpose(1, 0, 2)
    var_y = n * syy - sy * sy
    var_p = n * spp - sp * sp
    denominator = var_y * var_p
    defined = (var_y > 0) & (var_p > 0)
    r = (n * syp - sy * sp) / np.sqrt(np.where(defined, denominator, 1.0))
    return np.where(defined, np.clip(r, -1.0, 1.0), np.nan)


def resampled_sums(sums: np.ndarray, counts: np.ndarray, lengths: np.ndarray,
                   scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sum_r, n)``, float64 and int64 (B,): over the ``scored`` voxels of a block,
    the sum of each resample's r and the number of voxels where it is defined."""
    n_resamples = counts.shape[0]
    total = np.zeros(n_resamples, dtype=np.float64)
    number = np.zeros(n_resamples, dtype=np.int64)
    columns = np.flatnonzero(scored)
    for start in range(0, columns.size, _VOXEL_STEP):
        chosen = columns[start:start + _VOXEL_STEP]
        r = resampled_r(sums[:, :, chosen], counts, lengths)
        finite = np.isfinite(r)
        total += np.where(finite, r, 0.0).sum(axis=1, dtype=np.float64)
        number += finite.sum(axis=1)
    return total, number


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap values (NaN ignored): the ``(1 - level)/2``
    and ``(1 + level)/2`` quantiles (NumPy's default, linear interpolation)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_p_two_sided(differences: np.ndarray, axis: int = 0) -> np.ndarray:
    """Two-sided bootstrap p of "the difference is 0": twice the smaller tail
    ``(1 + #{d_b <= 0}) / (1 + B)`` or ``(1 + #{d_b >= 0}) / (1 + B)``, at most 1
    (the p-value that inverts the percentile interval).  NaN entries are left out."""
    d = np.asarray(differences, dtype=np.float64)
    finite = np.isfinite(d)
    n = finite.sum(axis=axis)
    below = (finite & (d <= 0)).sum(axis=axis)
    above = (finite & (d >= 0)).sum(axis=axis)
    p = 2.0 * np.minimum(1.0 + below, 1.0 + above) / (1.0 + n)
    return np.where(n > 0, np.minimum(p, 1.0), np.nan)


def paired_difference(first: np.ndarray, second: np.ndarray, observed: float,
                      level: float = 0.95) -> dict:
    """The difference ``observed`` of two paired statistics with its bootstrap
    interval and two-sided p, from their values on the same resamples (B,)."""
    d = np.asarray(first, np.float64) - np.asarray(second, np.float64)
    low, high = percentile_interval(d, level)
    return {"difference": float(observed), "low": low, "high": high,
            "p": float(bootstrap_p_two_sided(d))}
