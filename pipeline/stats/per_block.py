"""The test-set statistics of one voxel block, and their combination over blocks.

:class:`TestStatistics` is the per-fit plan (options, the permutations or shifts,
the bootstrap counts; small and picklable, so it travels with the fit's work object
to cluster workers).  :meth:`TestStatistics.block_arrays` turns one voxel block's
measured and predicted test data into its stored outputs: per voxel
(``p_parametric``, ``p_perm``, ``explainable_variance``, ``cc_max``, ``cc_norm``,
the five ``block_sum_*`` (time_block, voxel)) and per block (``null_max_r``: each permutation's largest null
r over the block's scored voxels; ``bootstrap_sum_r``/``bootstrap_n``: each
resample's sum of r over them and their number).  Once every block is written,
:func:`combine_blocks` makes what needs all voxels: BH-FDR q-values, max-statistic
FWE p-values and the mean r of every bootstrap resample.  Memory: a few
``(resample or permutation) x 256-voxel`` arrays at a time, whatever the block size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from voxelflow.pipeline.errors import InputError
from voxelflow.pipeline.stats import bootstrap, permutation, repeats, resampling

__all__ = ["StatisticsOptions", "TestStatistics", "combine_blocks"]


@dataclass(frozen=True)
class StatisticsOptions:
    """What to compute on the test set (``voxelflow fit`` options of the same names).

    ``permutations`` null draws (0: none), ``bootstrap`` resamples (0: none),
    ``block_length`` samples (TRs) per block, ``null`` ``"blocks"`` or ``"shifts"``,
    ``seed`` of the permutations and resamples.
    """

    permutations: int = 1000
    bootstrap: int = 1000
    block_length: int = resampling.DEFAULT_BLOCK_LENGTH
    null: str = "blocks"
    seed: int = 0

    def checked(self) -> "StatisticsOptions":
        """Itself, or a one-line :class:`InputError` naming the bad option."""
        for name in ("permutations", "bootstrap", "seed"):
            if int(getattr(self, name)) < 0:
                raise InputError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        if int(self.block_length) < 1:
            raise InputError(f"--block-length must be >= 1 sample (got {self.block_length})")
        if self.null not in permutation.NULL_KINDS:
            raise InputError(f"--null must be one of {', '.join(permutation.NULL_KINDS)} "
                             f"(got {self.null!r})")
        return self

    def as_params(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TestStatistics:
    """The statistics plan of one fit with ``n_test`` test samples (picklable)."""

    options: StatisticsOptions
    n_test: int
    orders: np.ndarray      # (permutations, full blocks) block orders ("blocks")
    shifts: np.ndarray      # (shifts,) circular shifts ("shifts")
    counts: np.ndarray      # (resamples, blocks) bootstrap draws per block
    boundaries: np.ndarray  # (blocks + 1,) block starts, then n_test

    __test__ = False  # not a pytest class

    @classmethod
    def plan(cls, options: StatisticsOptions, n_test: int) -> "TestStatistics":
        o = options.checked()
        orders = (resampling.block_permutations(n_test, o.block_length, o.permutations, o.seed)
                  if o.null == "blocks" else np.zeros((0, 0), np.int64))
        shifts = (resampling.circular_shifts(n_test, o.block_length)
                  if o.null == "shifts" and o.permutations else np.zeros(0, np.int64))
        return cls(o, int(n_test), orders, shifts,
                   resampling.bootstrap_counts(n_test, o.block_length, o.bootstrap, o.seed),
                   resampling.block_boundaries(n_test, o.block_length))

    @property
    def n_null(self) -> int:
        """Null draws per voxel (0: no permutation test is possible or asked for)."""
        if self.options.null == "shifts":
            return int(self.shifts.size)
        return int(self.orders.shape[0]) if self.orders.shape[1] >= 2 else 0

    @property
    def null_labels(self) -> np.ndarray:
        """The ``permutation`` coordinate: draw number, or the shift in samples."""
        return self.shifts if self.options.null == "shifts" else np.arange(self.n_null)

    @property
    def n_resamples(self) -> int:
        return int(self.counts.shape[0]) if self.n_time_blocks >= 2 else 0

    @property
    def n_time_blocks(self) -> int:
        return int(self.boundaries.size - 1)

    @property
    def block_lengths(self) -> np.ndarray:
        return np.diff(self.boundaries)

    def block_arrays(self, y_test: np.ndarray, predictions: np.ndarray,
                     r_test_cv: np.ndarray, scored: np.ndarray,
                     repeat_data: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The stored statistics of one voxel block.

        ``y_test`` (test_sample, voxel) measured (the mean of the repeats with
        ``repeat_data`` (repeat, test_sample, voxel)); ``predictions`` at each voxel's
        CV alpha (test_sample, voxel); ``r_test_cv`` (voxel,) their r; ``scored``
        (voxel,) bool.  Per-voxel outputs are NaN outside ``scored``.
        """
        nan = np.float32(np.nan)
        out = {"p_parametric": np.where(scored, permutation.parametric_pvalues(
            r_test_cv, self.n_test), nan).astype(np.float32)}
        if self.n_null:
            observed, null = permutation.null_correlations(
                y_test, predictions, kind=self.options.null,
                block_length=self.options.block_length, orders=self.orders,
                shifts=self.shifts)
            p = permutation.permutation_pvalues(observed, null)
            out["p_perm"] = np.where(scored, p, nan).astype(np.float32)
            out["null_max_r"] = permutation.max_over_voxels(null, scored)
        if self.n_resamples:
            sums = bootstrap.time_block_sums(y_test, predictions, self.boundaries)
            total, number = bootstrap.resampled_sums(sums, self.counts, self.block_lengths,
                                                     scored)
            sums = np.where(scored, sums, np.nan).astype(np.float32)
            out.update(zip(bootstrap.BLOCK_SUM_VARIABLES, sums))
            out["bootstrap_sum_r"], out["bootstrap_n"] = total, number
        if repeat_data is not None:
            ev = repeats.explainable_variance(repeat_data)
            cc_max = repeats.noise_ceiling(repeat_data)
            out["explainable_variance"] = np.where(scored, ev, nan).astype(np.float32)
            out["cc_max"] = np.where(scored, cc_max, nan).astype(np.float32)
            out["cc_norm"] = np.where(scored, repeats.normalised_correlation(
                r_test_cv, cc_max), nan).astype(np.float32)
        return out


def combine_blocks(*, p_perm: np.ndarray | None, r_test_cv: np.ndarray,
                   null_max_r: np.ndarray | None, bootstrap_sum_r: np.ndarray | None,
                   bootstrap_n: np.ndarray | None) -> dict[str, np.ndarray]:
    """What needs every voxel block: ``q_perm_fdr`` and ``p_perm_fwe`` (voxel,) and
    ``bootstrap_mean_r`` (resample,).

    ``p_perm`` (voxel,) NaN outside the scored voxels; ``r_test_cv`` (voxel,);
    ``null_max_r`` (voxel_block, permutation); ``bootstrap_sum_r``/``bootstrap_n``
    (voxel_block, resample).  ``None`` where the fit has no permutations or bootstrap.
    """
    out: dict[str, np.ndarray] = {}
    if p_perm is not None and null_max_r is not None:
        out["q_perm_fdr"] = permutation.bh_fdr(p_perm).astype(np.float32)
        null_max = np.asarray(null_max_r, np.float64)
        with np.errstate(invalid="ignore"):
            has = np.isfinite(null_max).any(axis=0)
        maxima = np.where(has, np.nanmax(np.where(np.isfinite(null_max), null_max, -np.inf),
                                         axis=0), np.nan)
        fwe = permutation.max_statistic_pvalues(r_test_cv, maxima)
        out["p_perm_fwe"] = np.where(np.isfinite(p_perm), fwe, np.nan).astype(np.float32)
    if bootstrap_sum_r is not None and bootstrap_n is not None:
        number = np.asarray(bootstrap_n, np.float64).sum(axis=0)
        total = np.asarray(bootstrap_sum_r, np.float64).sum(axis=0)
        out["bootstrap_mean_r"] = np.where(number > 0, total / np.maximum(number, 1), np.nan)
    return out
