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

_EXPORTS = {
    "DEFAULT_BLOCK_LENGTH": "resampling", "block_boundaries": "resampling",
    "block_permutations": "resampling", "bootstrap_counts": "resampling",
    "circular_shifts": "resampling",
    "null_correlations": "permutation", "permutation_pvalues": "permutation",
    "max_statistic_pvalues": "permutation", "bh_fdr": "permutation",
    "parametric_pvalues": "permutation",
    "time_block_sums": "bootstrap", "resampled_r": "bootstrap",
    "percentile_interval": "bootstrap", "paired_difference": "bootstrap",
    "repeat_split": "repeats", "explainable_variance": "repeats",
    "noise_ceiling": "repeats",
    "scored_voxels": "diagnostics", "fit_warnings": "diagnostics",
    "StatisticsOptions": "per_block", "TestStatistics": "per_block",
    "combine_blocks": "per_block",
    "compare_cells": "compare", "winner_map": "compare",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
