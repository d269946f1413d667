"""Cells of a study against each other, from what each fit stored.

A *cell* is one row of the study's table (a feature space with a lag set) and its
score is the mean test r over its scored voxels at their CV-selected alphas.  Every
fit stores that mean for each block-bootstrap resample (``bootstrap_mean_r``); fits
with the same test samples, seed, block length and number of resamples drew the same
resamples, so their bootstrap values are *paired*:

* :func:`compare_cells`: a 95 % percentile interval of each cell's mean r, and the
  best cell against every other: the difference of mean r, its interval and its
  two-sided bootstrap p (plus Holm's adjustment over the comparisons);
* :func:`winner_map`: per voxel, the cell with the highest r and whether it beats
  every other cell (bootstrap over the same resamples from the stored per-block
  sums, ``block_sum_*``), with BH-FDR over voxels; read voxel chunk by voxel
  chunk, so memory is bounded by the chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from voxelflow.pipeline.stats.bootstrap import (bootstrap_p_two_sided, paired_difference,
                                                percentile_interval, resampled_r)
from voxelflow.pipeline.stats.permutation import bh_fdr

__all__ = ["Cell", "holm", "compare_cells", "winner_map"]

LEVEL = 0.95
SIGNIFICANCE = 0.05
_VOXEL_CHUNK = 1024


@dataclass
class Cell:
    """One cell: its name, observed mean r, bootstrap means (resample,) or None, and
    the key of its resamples (cells pair only when their keys are equal)."""

    name: str
    mean_r: float
    bootstrap: np.ndarray | None
    key: tuple | None


def holm(p: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries stay NaN, others adjusted
    among themselves)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = order.size
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        out[index] = running
    return out


def compare_cells(cells: Sequence[Cell], best: int, level: float = LEVEL) -> list[dict]:
    """Per cell: ``ci_low``/``ci_high`` of its mean r and, against cell ``best``,
    ``diff_vs_best`` (best minus it), ``diff_ci_low``/``diff_ci_high``, ``p_vs_best``
    and ``p_vs_best_holm``; NaN where there is no bootstrap or the cell's resamples
    are not the best cell's (other test samples or settings)."""
    rows = []
    ref = cells[best]
    for index, cell in enumerate(cells):
        low, high = (percentile_interval(cell.bootstrap, level) if cell.bootstrap is not None
                     else (np.nan, np.nan))
        row = {"ci_low": low, "ci_high": high, "diff_vs_best": np.nan, "diff_ci_low": np.nan,
               "diff_ci_high": np.nan, "p_vs_best": np.nan, "paired": False}
        if index == best:
            row["diff_vs_best"] = 0.0
        elif (cell.bootstrap is not None and ref.bootstrap is not None
              and cell.key is not None and cell.key == ref.key):
            d = paired_difference(ref.bootstrap, cell.bootstrap, ref.mean_r - cell.mean_r,
                                  level)
            row.update(diff_vs_best=d["difference"], diff_ci_low=d["low"],
                       diff_ci_high=d["high"], p_vs_best=d["p"], paired=True)
        rows.append(row)
    adjusted = holm([r["p_vs_best"] for r in rows])
    for row, p in zip(rows, adjusted):
        row["p_vs_best_holm"] = float(p)
    return rows


def winner_map(r_test_cv: np.ndarray, scored: np.ndarray,
               read_sums: Callable[[int, slice], np.ndarray], counts: np.ndarray,
               lengths: np.ndarray, q: float = SIGNIFICANCE, chunk: int = _VOXEL_CHUNK
               ) -> dict[str, np.ndarray]:
    """Per voxel, the winning cell if it beats every other one significantly.

    ``r_test_cv`` (cell, voxel) observed r; ``scored`` (cell, voxel) bool;
    ``read_sums(cell, voxels)`` returns that cell's five ``block_sum_*`` stacked
    (5, block, voxels); ``counts`` (resample, block) and ``lengths`` (block,) the shared
    bootstrap; ``chunk`` voxels are read at a time.  The winner is the cell with the highest r; its p against each other
    cell is the two-sided bootstrap p of the paired difference of their r, and the
    voxel's p the largest of them (it must beat all); BH-FDR over voxels.

    Returns ``winner`` int16 (voxel,): 1 + the winning cell's index where its
    adjusted p is below ``q``, 0 elsewhere; ``best`` int16 (voxel,): 1 + the cell with
    the highest r (0 where a cell is not scored); ``p`` and ``q`` float32 (voxel,).
    """
    n_cells, n_voxels = r_test_cv.shape
    everywhere = scored.all(axis=0)
    best = np.where(everywhere, np.argmax(np.where(scored, r_test_cv, -np.inf), axis=0), -1)
    p = np.full(n_voxels, np.nan)
    for start in range(0, n_voxels, chunk):
        cols = slice(start, min(start + chunk, n_voxels))
        if not everywhere[cols].any():
            continue
        r = np.stack([resampled_r(read_sums(c, cols), counts, lengths)
                      for c in range(n_cells)])  # (cell, resample, voxel)
        chunk_best = best[cols]
        winner_r = np.take_along_axis(r, np.maximum(chunk_best, 0)[None, None, :], 0)[0]
        worst = np.zeros(chunk_best.size)
        for c in range(n_cells):
            p_c = bootstrap_p_two_sided(winner_r - r[c], axis=0)
            worst = np.where(chunk_best == c, worst, np.fmax(worst, p_c))
        p[cols] = np.where(everywhere[cols], worst, np.nan)
    adjusted = bh_fdr(p)
    significant = np.isfinite(adjusted) & (adjusted < q)
    return {"winner": np.where(significant, best + 1, 0).astype(np.int16),
            "best": (best + 1).astype(np.int16), "p": p.astype(np.float32),
            "q": adjusted.astype(np.float32)}
