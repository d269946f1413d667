"""Statistics of the test set: numbers a reviewer accepts.

Pure computation (NumPy/SciPy, no workspace I/O), one voxel block at a time, so that
they run inside the fit stage's per-block work (here or on a cluster worker) and
combine across blocks and across fits afterwards:

- :mod:`~voxelflow.pipeline.stats.resampling`: test-time blocks, block permutations,
  circular shifts and block-bootstrap draws, each a function of a seed and the test
  set's size (the same resamples for every voxel block and every fit);
- :mod:`~voxelflow.pipeline.stats.permutation`: null r of a whole voxel block as one
  matrix product, permutation / max-statistic (FWE) p-values, BH-FDR, the parametric
  t-test;
- :mod:`~voxelflow.pipeline.stats.bootstrap`: per-time-block sufficient statistics,
  r of every resample by matrix products, intervals and paired differences;
- :mod:`~voxelflow.pipeline.stats.repeats`: repeated test presentations, explainable
  variance, noise ceiling ``cc_max`` and ``cc_norm``;
- :mod:`~voxelflow.pipeline.stats.diagnostics`: which voxels are scored, warnings;
- :mod:`~voxelflow.pipeline.stats.per_block`: one voxel block's stored statistics
  and their combination over blocks (used by the fit stage);
- :mod:`~voxelflow.pipeline.stats.compare`: cells of a study against each other
  (intervals of mean r, paired comparisons, per-voxel winners; used by the report).

Every definition is written out in ``docs/statistics.md``.
"""

from __future__ import annotations

from voxelflow.pipeline.lazy import lazy_exports

_MODULES = {
    "resampling": ("DEFAULT_BLOCK_LENGTH", "block_boundaries", "block_permutations",
                   "bootstrap_counts", "circular_shifts"),
    "permutation": ("null_correlations", "permutation_pvalues", "max_statistic_pvalues",
                    "bh_fdr", "parametric_pvalues"),
    "bootstrap": ("time_block_sums", "resampled_r", "percentile_interval",
                  "paired_difference"),
    "repeats": ("repeat_split", "explainable_variance", "noise_ceiling"),
    "diagnostics": ("scored_voxels", "fit_warnings"),
    "per_block": ("StatisticsOptions", "TestStatistics", "combine_blocks"),
    "compare": ("compare_cells", "winner_map"),
}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
